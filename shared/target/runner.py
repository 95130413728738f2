"""The supervisor: run one train.py of a target under its budget and judge it honestly.

    result = run_target(load_target("targets/cpu_gpt"), budget=Budget("steps", 200))

It owns the outer clock and every number in the result. Two child processes, each in its own
process group, confined (sandbox.py) and under resource limits (limits.py): the trainer runs
train.py and reports progress as JSON lines on a dedicated pipe; the evaluator scores the exported
model on the val split, which the trainer cannot read. Every POLL_S the supervisor checks the wall
clock, a stop request and the limits, and kills the run when one says so. Whatever train.py prints
is kept only as the log tail of failed runs. After the run, its folder keeps train.py, the context
and the end of the log; whatever else the run wrote is deleted.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import torch

import shared
from shared.target.config import Target
from shared.target.data import PreparedData, data_root, prepare
from shared.target.evaluate import Evaluation
from shared.target.limits import (
    DISK_SCAN_S,
    Limits,
    breach,
    check_can_run_as,
    disk,
    disk_breach,
    end_run,
    hand_over,
    hold_slot,
    limit_hit,
    network_namespaces,
    preexec,
    private_shm,
    reap,
    run_uid,
    usage,
)
from shared.target.records import Budget, Progress, RunContext, RunResult, Status
from shared.target.sandbox import abi_version
from shared.target.trainer import NOT_SUBMITTED_EXIT

POLL_S = 0.2
"""How often the supervisor checks the clock, a stop request and the limits of a running process."""
MAX_PROGRESS_LINE = 1 << 16
MAX_REASON = 200
"""Characters of an exception line quoted in a crash's error (the log tail has all of it)."""
ERROR_TAIL_BYTES = 4096
LOG_KEPT_BYTES = 1 << 20
"""What stays of a run's log after the run: its last MB (the run may have written up to its disk limit)."""
PASSED_ENV = ("PATH", "LD_LIBRARY_PATH", "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "CUDA_HOME")

ProgressCallback = Callable[[Progress], None]


def resolve_device(wanted: str) -> str:
    if wanted == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if wanted == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("this target asks for a CUDA device and none is available")
    return wanted


class StopRequest:
    """Ask a run to stop early (a forecast, a diverged loss, an operator). Safe from any thread; the
    first reason given is the one the result carries. The run ends within a poll or two: status
    "aborted", error = the reason."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reason: str | None = None

    def request(self, reason: str) -> None:
        with self._lock:
            if self._reason is None:
                self._reason = reason

    @property
    def reason(self) -> str | None:
        with self._lock:
            return self._reason


def run_target(
    target: Target,
    source: str | None = None,
    *,
    budget: Budget | None = None,
    seed: int = 0,
    device: str | None = None,
    root: Path | None = None,
    on_progress: ProgressCallback | None = None,
    limits: Limits | None = None,
    slot: int = 0,
    stop: StopRequest | None = None,
    visible_devices: str | None = None,
) -> RunResult:
    """Train `source` (default: the target's train.py) and evaluate it. Never raises for bad code.

    limits: what the run may use (default: Limits()). slot: which of the concurrent runs this is; a
    root supervisor runs slot s as its own uid (limits.py), so concurrent runs need distinct slots.
    stop: ends the run early when requested. visible_devices: CUDA_VISIBLE_DEVICES of the run.
    Raises RuntimeError where a root supervisor cannot start processes as the slot's uid.
    """
    config = target.config
    root = root or data_root()
    code = target.train_py.read_text() if source is None else source
    budget = budget or Budget("seconds", config.time_budget_s)
    device = resolve_device(device or config.device)
    limits = limits or Limits()
    uid = run_uid(slot)
    if uid is not None:
        check_can_run_as(uid)
    data = prepare(config.corpus, config.tokenizer, root, quiet=True)
    run = _Run(
        started=time.monotonic(),
        base=dict(
            code_sha256=hashlib.sha256(code.encode()).hexdigest(),
            corpus_sha256=data.manifest["corpus_sha256"],
            tokenizer_id=data.manifest["tokenizer_id"],
            budget=str(budget),
            seed=seed,
            device=device,
            sandbox=_sandbox_name(),
        ),
    )
    try:
        compile(code, "train.py", "exec")
    except SyntaxError as error:
        return run.result("invalid", error=f"train.py does not compile: {error.msg} (line {error.lineno})")
    if stop is not None and stop.reason is not None:
        return run.result("aborted", error=stop.reason)

    run_dir = root / "runs" / uuid.uuid4().hex[:12]
    workspace = run_dir / "workspace"
    (workspace / "tmp").mkdir(parents=True)
    (workspace / "train.py").write_text(code)
    read_end, write_end = os.pipe()
    context = _context(target, data, workspace, budget, seed, device, write_end, root)
    (run_dir / "context.json").write_bytes(msgspec.json.encode(context))
    launcher = _Launcher(run_dir, limits, device, config.cpu_threads, uid, visible_devices)
    limit = config.wall_limit_s(budget.unit)
    try:
        with hold_slot(uid):
            return _train_and_judge(run, launcher, _Guard(limits, uid, stop, run_dir), (read_end, write_end),
                                    limit, config.eval_allowance_s, on_progress)
    finally:
        os.close(read_end)
        _clear(workspace, code)
        _cut(launcher.log_path, LOG_KEPT_BYTES)


def _train_and_judge(run: _Run, launcher: _Launcher, guard: _Guard, progress: tuple[int, int], limit: float,
                     eval_allowance: float, on_progress: ProgressCallback | None) -> RunResult:
    """Train under the guard until train.py hands its model in, then evaluate the model."""
    if launcher.uid is not None:
        reap(launcher.uid)  # whatever an earlier run of this slot left would count against this one's limits
        hand_over(launcher.workspace, launcher.uid)
    read_end, write_end = progress
    try:
        with open(launcher.log_path, "wb") as log:
            trainer = launcher.spawn("shared.target.trainer", log, pass_fds=(write_end,))
    finally:
        os.close(write_end)
    run.spawned = time.monotonic()
    channel = _Channel(read_end, run, on_progress)
    try:
        verdict = _watch(trainer, guard, run.spawned + limit, f"killed at the run's hard wall-clock limit of "
                         f"{limit:.0f} s", channel.wait)
    finally:
        channel.close()
    log_path = launcher.log_path
    if verdict is not None:
        error = f"{verdict.error}, {_where(run.last)}" if verdict.status == "timeout" else verdict.error
        return run.result(verdict.status, error=error, error_tail=_failure_tail(verdict.status, log_path))
    if trainer.returncode != 0:
        reason = ("train.py ended without calling env.submit(model)" if trainer.returncode == NOT_SUBMITTED_EXIT
                  else _exit_reason("training process", "train.py", trainer.returncode, log_path, launcher.limits))
        return run.result("crashed", error=reason, error_tail=_tail(log_path))
    run.evaluating = time.monotonic()
    evaluation = _evaluate(launcher, guard, eval_allowance)
    return run.result(evaluation.status, val_bpb=evaluation.val_bpb, eval_tokens=evaluation.eval_tokens,
                      error=evaluation.error, error_tail=_failure_tail(evaluation.status, log_path))


def _where(last: Progress) -> str:
    """Where training was when the clock ran out, from its last progress record."""
    if last.phase == "started":
        return "before its first training step"
    if last.phase == "training":
        return f"in training, {last.step} steps done"
    return "while handing in its model"


def _sandbox_name() -> str:
    parts = [f"landlock-abi{abi_version()}"] if abi_version() else []
    if network_namespaces():
        parts.append("netns")
    if private_shm():
        parts.append("shm")
    return "+".join(parts) or "none"


@dataclass
class _Run:
    """What the supervisor has seen of one run so far."""

    started: float
    base: dict
    spawned: float = 0.0
    first_step: float | None = None
    evaluating: float | None = None
    last: Progress = field(default_factory=lambda: Progress(phase="started"))
    bad_lines: int = 0

    def result(self, status: Status, val_bpb: float | None = None, eval_tokens: int = 0,
               error: str | None = None, error_tail: str | None = None) -> RunResult:
        now = time.monotonic()
        startup = (self.first_step or now) - self.spawned if self.spawned else 0.0
        return RunResult(
            status=status,
            val_bpb=val_bpb,
            training_s=self.last.elapsed_train_s,
            startup_s=round(startup, 3),
            total_s=round(now - self.started, 3),
            setup_s=round((self.spawned or now) - self.started, 3),
            eval_s=round(now - self.evaluating, 3) if self.evaluating else 0.0,
            steps=self.last.step,
            tokens=self.last.tokens,
            peak_mem_mb=self.last.peak_mem_mb,
            num_params=self.last.num_params,
            eval_tokens=eval_tokens,
            error=error,
            error_tail=error_tail,
            **self.base,
        )


def _context(target: Target, data: PreparedData, workspace: Path, budget: Budget, seed: int, device: str,
             progress_fd: int, root: Path) -> RunContext:
    config = target.config
    return RunContext(
        workspace=str(workspace),
        target_dir=str(target.path),
        train_bin=str(data.train_bin),
        val_bin=str(data.val_bin),
        token_bytes=str(data.token_bytes_npy),
        dtype=data.dtype.name,
        vocab_size=data.manifest["vocab_size"],
        seq_len=config.seq_len,
        device=device,
        cpu_threads=config.cpu_threads,
        seed=seed,
        budget=budget,
        excluded_warmup_steps=config.excluded_warmup_steps,
        progress_interval_s=config.progress_interval_s,
        progress_fd=progress_fd,
        eval_batch=config.eval_batch,
        eval_tokens=config.eval_tokens,
        readable=[str(target.path), str(Path(shared.__file__).parent)],
        hidden=[str(root)],
    )


@dataclass(frozen=True)
class _Launcher:
    """How the run's processes start: environment, working folder, identity and limits."""

    run_dir: Path
    limits: Limits
    device: str
    cpu_threads: int
    uid: int | None
    visible_devices: str | None

    @property
    def workspace(self) -> Path:
        return self.run_dir / "workspace"

    @property
    def log_path(self) -> Path:
        return self.run_dir / "train.log"

    def spawn(self, module: str, log, pass_fds=(), stdout=None) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", module, str(self.run_dir / "context.json")],
            cwd=self.workspace,
            env=self.env(),
            stdin=subprocess.DEVNULL,
            stdout=stdout or log,
            stderr=log,
            pass_fds=pass_fds,
            start_new_session=True,
            # Python between fork and exec: it only makes system calls (no imports, no locks), which keeps it
            # safe in a supervisor with threads.
            preexec_fn=preexec(self.limits, self.device, self.uid),
        )

    def env(self) -> dict[str, str]:
        env = {name: os.environ[name] for name in PASSED_ENV if name in os.environ}
        env.update(
            HOME=str(self.workspace),
            TMPDIR=str(self.workspace / "tmp"),
            PYTHONPATH=os.pathsep.join(filter(None, [str(Path(shared.__file__).parent.parent),
                                                      os.environ.get("PYTHONPATH")])),
            PYTHONDONTWRITEBYTECODE="1",
            PYTHONUNBUFFERED="1",
            LANG="C.UTF-8",
            # Inductor would compile in worker processes, which cannot start CUDA under the sandbox (confine.py).
            TORCHINDUCTOR_COMPILE_THREADS="1",
            # numpy's OpenBLAS starts a thread per core at import, which on a large machine alone would
            # reach the run's process limit; torch's threads are set from the same number (trainer.py).
            OPENBLAS_NUM_THREADS=str(self.cpu_threads),
        )
        if self.uid is not None:  # the run's uid has no passwd entry, and getpass.getuser() (inductor) needs a name
            env.update(USER=f"run{self.uid}", LOGNAME=f"run{self.uid}")
        if self.visible_devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.visible_devices
        return env


@dataclass(frozen=True)
class _Verdict:
    """Why the supervisor ended a run process before it exited by itself."""

    status: Status
    error: str


@dataclass
class _Guard:
    """What ends a run process early besides its own exit: the clock, a stop request, the limits."""

    limits: Limits
    uid: int | None
    stop: StopRequest | None
    run_dir: Path
    next_scan: float = 0.0
    next_disk_scan: float = 0.0

    def check(self, process: subprocess.Popen, deadline: float, timeout_error: str) -> _Verdict | None:
        if self.stop is not None and (reason := self.stop.reason) is not None:
            return _Verdict("aborted", reason)
        now = time.monotonic()
        if now >= deadline:
            return _Verdict("timeout", timeout_error)
        if now < self.next_scan:  # progress lines can wake the loop often; /proc is read once a poll
            return None
        self.next_scan = now + POLL_S
        processes = usage(process.pid, self.uid)
        exceeded = breach(processes, self.limits)
        if exceeded is None and now >= self.next_disk_scan:  # a walk of the run folder: less often
            self.next_disk_scan = now + DISK_SCAN_S
            exceeded = disk_breach(disk(self.run_dir, processes.pids, self.limits), self.limits)
        return _Verdict("crashed", exceeded) if exceeded else None

    def end(self, process: subprocess.Popen) -> None:
        """Kill the process and everything it started: its process group, and its uid's processes."""
        end_run(process.pid, self.uid)
        process.wait()


def _watch(process: subprocess.Popen, guard: _Guard, deadline: float, timeout_error: str,
           wait: Callable[[float], None]) -> _Verdict | None:
    """Wait for `process` a poll at a time, ending it when the guard says so; then kill what is left.
    None when it exited by itself."""
    try:
        while process.poll() is None:
            verdict = guard.check(process, deadline, timeout_error)
            if verdict is not None:
                return verdict
            wait(max(0.0, min(POLL_S, deadline - time.monotonic())))
        return None
    finally:
        guard.end(process)


class _Channel:
    """The trainer's progress pipe: lines are relayed to the run record and `on_progress` as they come."""

    def __init__(self, fd: int, run: _Run, on_progress: ProgressCallback | None):
        self.fd = fd
        self.run = run
        self.on_progress = on_progress
        self.selector = selectors.DefaultSelector()
        self.selector.register(fd, selectors.EVENT_READ)
        self.pending = b""

    def wait(self, timeout: float) -> None:
        """Relay what arrives within `timeout`; after the end of the pipe, just sleep."""
        if not self.selector.get_map():
            time.sleep(timeout)
            return
        if self.selector.select(timeout=timeout):
            chunk = os.read(self.fd, 1 << 16)
            if not chunk:
                self.selector.unregister(self.fd)
            self.pending = _relay(self.pending + chunk, self.run, self.on_progress)

    def close(self) -> None:
        self.selector.close()


def _relay(buffer: bytes, run: _Run, on_progress: ProgressCallback | None) -> bytes:
    *lines, rest = buffer.split(b"\n")
    for line in lines:
        try:
            record = msgspec.json.decode(line, type=Progress)
        except (msgspec.DecodeError, UnicodeDecodeError):  # whatever train.py wrote on the channel
            run.bad_lines += 1
            continue
        if record.phase == "training" and run.first_step is None:
            run.first_step = time.monotonic()
        run.last = record
        if on_progress:
            on_progress(record)
    if len(rest) > MAX_PROGRESS_LINE:
        run.bad_lines += 1
        return b""
    return rest


def _evaluate(launcher: _Launcher, guard: _Guard, allowance: float) -> Evaluation:
    output = launcher.run_dir / "evaluation.json"  # a file, not a pipe: the supervisor polls instead of reading
    with open(launcher.log_path, "ab") as log, open(output, "wb") as out:
        evaluator = launcher.spawn("shared.target.evaluate", log, stdout=out)
    verdict = _watch(evaluator, guard, time.monotonic() + allowance,
                     f"killed at the evaluation's wall-clock limit of {allowance:.0f} s",
                     lambda timeout: _wait(evaluator, timeout))
    if verdict is not None:
        return Evaluation(status=verdict.status, error=verdict.error)
    lines = output.read_bytes().strip().splitlines()
    if evaluator.returncode != 0 or not lines:
        return Evaluation(status="crashed", error=_exit_reason("evaluation process", "the evaluation",
                                                               evaluator.returncode, launcher.log_path,
                                                               launcher.limits))
    return msgspec.json.decode(lines[-1], type=Evaluation)


def _wait(process: subprocess.Popen, timeout: float) -> None:
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout)


def _exit_reason(process: str, subject: str, code: int, log_path: Path, limits: Limits) -> str:
    """Why a run process failed, naming the limit it hit, else the exception it died of, when its log or exit
    status tells."""
    exited = f"{process} was killed by {_signal_name(-code)}" if code < 0 else f"{process} exited with code {code}"
    tail = _tail(log_path)
    hit = limit_hit(subject, code, tail, limits)
    if hit:
        return f"{hit} ({exited})"
    raised = _exception(tail)
    return f"{subject} raised {raised} ({exited})" if raised else exited


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _exception(log_tail: str) -> str | None:
    """The exception line that ends a Python traceback at the end of the log, cut to one short line."""
    if "Traceback (most recent call last):" not in log_tail:
        return None
    lines = [line for line in log_tail.splitlines() if line.strip()]
    if not lines or lines[-1].startswith(" "):
        return None
    return lines[-1] if len(lines[-1]) <= MAX_REASON else lines[-1][: MAX_REASON - 3] + "..."


def _clear(workspace: Path, code: str) -> None:
    """Delete what the run wrote in its workspace, leaving the train.py it ran; its processes are dead by now. By rm,
    not shutil.rmtree: that recurses, and raises RecursionError (ignore_errors or not) in a tree a few thousand
    folders deep, which a run makes in a tenth of a second."""
    with contextlib.suppress(OSError):
        subprocess.run(["rm", "-rf", "--", str(workspace)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, check=False)
        workspace.mkdir(exist_ok=True)
        (workspace / "train.py").write_text(code)


def _cut(log_path: Path, kept: int) -> None:
    """Keep the last `kept` bytes of a log."""
    with contextlib.suppress(FileNotFoundError), open(log_path, "r+b") as log:
        size = log.seek(0, os.SEEK_END)
        if size > kept:
            log.seek(size - kept)
            end = log.read()
            log.seek(0)
            log.write(end)
            log.truncate()


def _failure_tail(status: Status, log_path: Path) -> str | None:
    """The log tail, for a run whose code failed; not for one that was judged or stopped on request."""
    return None if status in ("ok", "aborted") else _tail(log_path)


def _tail(log_path: Path) -> str:
    with open(log_path, "rb") as log:
        log.seek(max(0, log_path.stat().st_size - ERROR_TAIL_BYTES))
        return log.read().decode("utf-8", errors="replace")
