"""The supervisor: run one train.py of a target under its budget and judge it honestly.

    result = run_target(load_target("targets/cpu_gpt"), budget=Budget("steps", 200))

It owns the outer clock and every number in the result. Two child processes, each in its own
process group and confined (sandbox.py): the trainer runs train.py and reports progress as JSON
lines on a dedicated pipe; the evaluator scores the exported model on the val split, which the
trainer cannot read. Whatever train.py prints is kept only as the log tail of failed runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import selectors
import shutil
import signal
import subprocess
import sys
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
from shared.target.records import Budget, Progress, RunContext, RunResult, Status
from shared.target.sandbox import abi_version
from shared.target.trainer import NOT_SUBMITTED_EXIT

STEP_BUDGET_WALL_FACTOR = 10
"""In step/token budget mode the outer limit is this many times T_max (compute is not metered)."""
MAX_PROGRESS_LINE = 1 << 16
ERROR_TAIL_BYTES = 4096
PASSED_ENV = ("PATH", "LD_LIBRARY_PATH", "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "CUDA_HOME")

ProgressCallback = Callable[[Progress], None]


def resolve_device(wanted: str) -> str:
    if wanted == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if wanted == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("this target asks for a CUDA device and none is available")
    return wanted


def run_target(
    target: Target,
    source: str | None = None,
    *,
    budget: Budget | None = None,
    seed: int = 0,
    device: str | None = None,
    root: Path | None = None,
    on_progress: ProgressCallback | None = None,
) -> RunResult:
    """Train `source` (default: the target's train.py) and evaluate it. Never raises for bad code."""
    config = target.config
    root = root or data_root()
    code = target.train_py.read_text() if source is None else source
    budget = budget or Budget("seconds", config.time_budget_s)
    device = resolve_device(device or config.device)
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
            sandbox=f"landlock-abi{abi_version()}" if abi_version() else "none",
        ),
    )
    try:
        compile(code, "train.py", "exec")
    except SyntaxError as error:
        return run.result("invalid", error=f"train.py does not compile: {error.msg} (line {error.lineno})")

    run_dir = root / "runs" / uuid.uuid4().hex[:12]
    workspace = run_dir / "workspace"
    (workspace / "tmp").mkdir(parents=True)
    (workspace / "train.py").write_text(code)
    read_end, write_end = os.pipe()
    context = _context(target, data, workspace, budget, seed, device, write_end, root)
    context_path = run_dir / "context.json"
    context_path.write_bytes(msgspec.json.encode(context))
    log_path = run_dir / "train.log"
    try:
        with open(log_path, "wb") as log:
            trainer = _spawn("shared.target.trainer", context_path, workspace, log, pass_fds=(write_end,))
        os.close(write_end)
        limit = config.startup_allowance_s + config.eval_allowance_s + config.time_budget_s * (
            1 if budget.unit == "seconds" else STEP_BUDGET_WALL_FACTOR
        )
        timed_out = _watch(trainer, read_end, run, limit, on_progress)
        if timed_out:
            return run.result("timeout", error=f"run exceeded its wall-clock limit of {limit:.0f} s",
                              error_tail=_tail(log_path))
        if trainer.returncode != 0:
            reason = ("train.py ended without calling env.submit(model)" if trainer.returncode == NOT_SUBMITTED_EXIT
                      else f"training process exited with code {trainer.returncode}")
            return run.result("crashed", error=reason, error_tail=_tail(log_path))
        evaluation = _evaluate(context_path, workspace, log_path, config.eval_allowance_s)
        return run.result(evaluation.status, val_bpb=evaluation.val_bpb, eval_tokens=evaluation.eval_tokens,
                          error=evaluation.error, error_tail=None if evaluation.status == "ok" else _tail(log_path))
    finally:
        os.close(read_end)
        shutil.rmtree(workspace / "tmp", ignore_errors=True)
        Path(context.model_path).unlink(missing_ok=True)


@dataclass
class _Run:
    """What the supervisor has seen of one run so far."""

    started: float
    base: dict
    spawned: float = 0.0
    first_step: float | None = None
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


def _spawn(module: str, context_path: Path, workspace: Path, log, pass_fds=(), stdout=None) -> subprocess.Popen:
    env = {name: os.environ[name] for name in PASSED_ENV if name in os.environ}
    env.update(
        HOME=str(workspace),
        TMPDIR=str(workspace / "tmp"),
        PYTHONPATH=os.pathsep.join(filter(None, [str(Path(shared.__file__).parent.parent),
                                                  os.environ.get("PYTHONPATH")])),
        PYTHONDONTWRITEBYTECODE="1",
        PYTHONUNBUFFERED="1",
        LANG="C.UTF-8",
        # Inductor would compile in worker processes, which cannot start CUDA under the sandbox (confine.py).
        TORCHINDUCTOR_COMPILE_THREADS="1",
    )
    return subprocess.Popen(
        [sys.executable, "-m", module, str(context_path)],
        cwd=workspace,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=stdout or log,
        stderr=log,
        pass_fds=pass_fds,
        start_new_session=True,
    )


def _watch(process: subprocess.Popen, channel: int, run: _Run, limit: float,
           on_progress: ProgressCallback | None) -> bool:
    """Relay progress until the trainer exits; kill its process group at the limit. True if timed out."""
    run.spawned = time.monotonic()
    deadline = run.spawned + limit
    selector = selectors.DefaultSelector()
    selector.register(channel, selectors.EVENT_READ)
    pending = b""
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return True
            if selector.select(timeout=min(remaining, 0.2)):
                chunk = os.read(channel, 1 << 16)
                if not chunk:
                    selector.unregister(channel)
                pending = _relay(pending + chunk, run, on_progress)
            if process.poll() is not None:
                return False
    finally:
        _kill_group(process)
        selector.close()


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


def _evaluate(context_path: Path, workspace: Path, log_path: Path, allowance: float) -> Evaluation:
    with open(log_path, "ab") as log:
        evaluator = _spawn("shared.target.evaluate", context_path, workspace, log, stdout=subprocess.PIPE)
    try:
        out, _ = evaluator.communicate(timeout=allowance)
    except subprocess.TimeoutExpired:
        return Evaluation(status="timeout", error=f"evaluation exceeded {allowance:.0f} s")
    finally:
        _kill_group(evaluator)
    lines = out.strip().splitlines()
    if evaluator.returncode != 0 or not lines:
        return Evaluation(status="crashed", error=f"evaluation process exited with code {evaluator.returncode}")
    return msgspec.json.decode(lines[-1], type=Evaluation)


def _kill_group(process: subprocess.Popen) -> None:
    """Kill the process and everything it started (it leads its own process group)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _tail(log_path: Path) -> str:
    with open(log_path, "rb") as log:
        log.seek(max(0, log_path.stat().st_size - ERROR_TAIL_BYTES))
        return log.read().decode("utf-8", errors="replace")
