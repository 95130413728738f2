"""Containment of one run beyond the hostile edits of test_hostile.py: memory spread over processes, an external
stop, the supervisor's own death, the disk scan, and the reasons a crash is given.

Each train.py runs for real, on the CPU target shrunk to a few seconds (conftest.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import REPO, alive_processes, make_target

from shared.target.config import load_target
from shared.target.limits import MAX_DEPTH, Limits, disk, disk_breach, limit_hit, run_uid
from shared.target.records import Budget, Progress, RunResult
from shared.target.runner import StopRequest, run_target

FEW_STEPS = Budget("steps", 6)
QUICK = dict(time_budget_s=1, startup_allowance_s=2, eval_allowance_s=1)
"""Allowances that put the hard limit 4 s after the trainer starts."""
ROOMY = dict(QUICK, startup_allowance_s=30)
"""For runs that a limit ends: the hard limit must not come first on a slow machine."""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, small_corpus: Path) -> Path:
    return make_target(tmp_path_factory.mktemp("tiny"), small_corpus)


def _run(tiny: Path, tmp_path: Path, source: str, *, config: dict | None = None, **kwargs: object) -> RunResult:
    """Run `source` as the tiny target's train.py, with a quick hard limit unless told otherwise."""
    corpus = load_target(tiny).config.corpus
    target = make_target(tmp_path / "variant", corpus, source, **(config or QUICK))
    return run_target(load_target(target), budget=kwargs.pop("budget", Budget("seconds", 1)), **kwargs)


SPREAD = """
import os, time
for _ in range(4):
    if os.fork() == 0:
        hoard = b"x" * (700 << 20)  # written, so resident
        time.sleep(60)
time.sleep(60)
"""


def test_memory_spread_over_processes_is_polled_and_killed(tiny: Path, tmp_path: Path):
    """No process passes its address-space limit; together they pass the run's memory limit."""
    result = _run(tiny, tmp_path, SPREAD, config=ROOMY, limits=Limits(memory_mb=2500), slot=4)
    assert result.status == "crashed" and result.error == "run exceeded its memory limit of 2500 MB"
    uid = run_uid(4)
    assert uid is None or not alive_processes(uid)


def _processes_of(module: str, data_root: Path) -> list[str]:
    """Run processes of this test session (other sessions on the machine have other data roots)."""
    return [
        pid
        for pid in os.listdir("/proc")
        if module.encode() in (line := _cmdline(pid)) and str(data_root).encode() in line
    ]


def _cmdline(pid: str) -> bytes:
    try:
        return Path("/proc", pid, "cmdline").read_bytes() if pid.isdigit() else b""
    except OSError:
        return b""


@pytest.mark.parametrize("phase", ["training", "evaluation"])
def test_a_stop_request_aborts_the_run_within_a_second(tiny: Path, data_root: Path, phase: str):
    stop = StopRequest()
    training = threading.Event()
    requested: list[float] = []

    def requester() -> None:
        if phase == "training":
            training.wait()
        while phase == "evaluation" and not _processes_of("shared.target.evaluate", data_root):
            time.sleep(0.05)
        stop.request(f"stopped during {phase}")
        requested.append(time.monotonic())

    def on_progress(record: Progress) -> None:
        if record.phase == "training":
            training.set()

    thread = threading.Thread(target=requester, daemon=True)
    thread.start()
    budget = Budget("seconds", 30) if phase == "training" else FEW_STEPS
    result = run_target(load_target(tiny), budget=budget, stop=stop, on_progress=on_progress)
    assert result.status == "aborted" and result.error == f"stopped during {phase}", result.error_tail
    assert requested and time.monotonic() - requested[0] < 1.0
    assert result.val_bpb is None
    if phase == "evaluation":
        assert result.steps == FEW_STEPS.amount  # training had ended: the evaluator was the one stopped


ENDLESS = "while True:\n    pass\n"
SUPERVISOR = """
import sys
from shared.target.config import load_target
from shared.target.records import Budget
from shared.target.runner import run_target
run_target(load_target(sys.argv[1]), budget=Budget("seconds", 1), slot=6)
"""


def test_the_run_dies_with_its_supervisor(tiny: Path, tmp_path: Path, data_root: Path):
    target = make_target(tmp_path / "variant", load_target(tiny).config.corpus, ENDLESS)
    supervisor = subprocess.Popen([sys.executable, "-c", SUPERVISOR, str(target)], cwd=REPO)
    try:
        while not (trainers := _processes_of("shared.target.trainer", data_root)):
            assert supervisor.poll() is None, "the supervisor ended before its trainer started"
            time.sleep(0.05)
        os.kill(supervisor.pid, signal.SIGKILL)
        supervisor.wait()
        deadline = time.monotonic() + 2
        while any(_cmdline(p) for p in trainers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_cmdline(p) for p in trainers), "the trainer outlived its supervisor"
    finally:
        supervisor.kill()
        supervisor.wait()


HOLDER = """
import os, sys, time
with open(sys.argv[1], "wb") as out:
    out.write(os.urandom(3 << 20))
    out.flush()
    os.remove(sys.argv[1])
    print("held", flush=True)
    time.sleep(60)
"""


def test_the_disk_scan_counts_blocks_once_and_deleted_files_held_open(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """What test_hostile's disk rows do not tell apart: hard links, sparse files, the files limit, long paths."""
    (tmp_path / "a").write_bytes(os.urandom(1 << 20))
    os.link(tmp_path / "a", tmp_path / "b")  # a second name for the same blocks
    with open(tmp_path / "sparse", "wb") as sparse:
        sparse.truncate(1 << 30)  # 1 GiB long, no blocks
    limits = Limits(disk_mb=3, files=10)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "gone")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        now = disk(tmp_path, (holder.pid,), limits)
    finally:
        holder.kill()
        holder.wait()
    assert now.files == 3 and 1 << 20 <= now.kept_bytes < (1 << 20) + (64 << 10)
    assert 3 << 20 <= now.held_bytes < (3 << 20) + (64 << 10)
    assert disk_breach(now, limits) == "run exceeded its disk limit of 3 MB: wrote 4 MB, 3 MB of it in deleted " \
                                       "files it held open"
    for i in range(8):
        (tmp_path / f"empty-{i}").touch()
    assert disk_breach(disk(tmp_path, (), limits), limits) == "run exceeded its limit of 10 files in its workspace"
    deep = tmp_path / "deep"
    deep.mkdir()
    monkeypatch.chdir(deep)
    for _ in range(MAX_DEPTH):  # 255-character names: far past what a path may be (PATH_MAX), by descriptors
        os.mkdir("x" * 255)
        os.chdir("x" * 255)
    Path("bottom").write_bytes(os.urandom(1 << 20))
    assert (now := disk(deep, (), Limits())).kept_bytes > 1 << 20 and not now.too_deep
    os.mkdir("one-more")
    assert disk_breach(disk(deep, (), Limits()), Limits()) == f"run nested folders more than {MAX_DEPTH} deep in its " \
                                                            "workspace"
    os.chdir(tmp_path)


@pytest.mark.parametrize(
    ("last_line", "code", "named"),
    [
        ("RuntimeError: DefaultCPUAllocator: can't allocate memory: you tried to allocate 5 bytes", 1, "memory"),
        ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", 1, None),
        ("BlockingIOError: [Errno 11] Resource temporarily unavailable", 1, "process"),
        ("OSError: [Errno 27] File too large", 1, "file size"),
        ("", -signal.SIGXFSZ, "file size"),
        ("OSError: [Errno 24] Too many open files: 'x'", 1, "open file"),
        ("ValueError: boom", 1, None),
    ],
)
def test_the_error_names_the_limit_a_crash_ran_into(last_line: str, code: int, named: str | None):
    hit = limit_hit("train.py", code, f"Traceback (most recent call last):\n{last_line}\n\n", Limits(memory_mb=512))
    assert (hit is None) if named is None else (hit is not None and f"the {named} limit" in hit), hit
