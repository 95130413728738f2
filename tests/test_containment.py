"""Containment of one run: the hard limit, resource limits, an external stop, and nothing left behind.

Each hostile train.py runs for real, on the CPU target shrunk to a few seconds (conftest.py).
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
from conftest import REPO, make_target

from shared.target.config import load_target
from shared.target.limits import Limits, limit_hit, run_uid
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


def _alive(uid: int) -> list[int]:
    """Processes of `uid` that are not zombies (a zombie holds no memory and runs nothing)."""
    pids = []
    for entry in os.scandir("/proc"):
        try:
            status = Path(entry.path, "status").read_text() if entry.name.isdigit() else ""
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if fields and int(fields["Uid"].split()[0]) == uid and fields["State"].split()[0] not in ("Z", "X"):
            pids.append(int(entry.name))
    return pids


def test_a_normal_run_is_judged_under_tight_limits(tiny: Path):
    limits = Limits(memory_mb=3072, processes=32, file_size_mb=64, open_files=256)
    result = run_target(load_target(tiny), budget=FEW_STEPS, limits=limits, slot=3)
    assert result.status == "ok", result.error_tail
    assert result.val_bpb > 1.0 and result.steps == FEW_STEPS.amount
    uid = run_uid(3)
    assert uid is None or not _alive(uid)


ENDLESS = """
import os
print(f"visible={os.environ.get('CUDA_VISIBLE_DEVICES')} uid={os.getuid()}", flush=True)
while True:
    pass
"""


def test_an_endless_loop_is_killed_at_the_hard_limit(tiny: Path, tmp_path: Path):
    result = _run(tiny, tmp_path, ENDLESS, slot=2, visible_devices="3")
    assert result.status == "timeout" and "wall-clock limit of 4 s" in result.error
    assert result.total_s < 8
    assert "visible=3" in result.error_tail
    assert f"uid={run_uid(2) or os.getuid()}" in result.error_tail


@pytest.mark.parametrize(
    "allocation",
    ["import torch\ntorch.empty((50 * 2**30,), dtype=torch.uint8).fill_(1)\n", "x = bytearray(50 * 2**30)\n"],
    ids=["torch", "python"],
)
def test_a_huge_allocation_crashes_the_run_not_the_machine(tiny: Path, tmp_path: Path, allocation: str):
    result = _run(tiny, tmp_path, allocation, config=ROOMY, limits=Limits(memory_mb=4096))
    assert result.status == "crashed"
    assert result.error.startswith("train.py hit the memory limit of 4096 MB"), result.error
    assert result.total_s < 10, "the allocation failed at once, not after the machine swapped"


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
    assert uid is None or not _alive(uid)


FORK_BOMB = """
import os
while True:
    try:
        if os.fork() == 0:
            os.setsid()  # out of the process group the supervisor kills
    except OSError:
        pass
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="only a run with its own uid can be killed after it left its group")
def test_a_fork_bomb_is_stopped_and_leaves_no_process(tiny: Path, tmp_path: Path):
    result = _run(tiny, tmp_path, FORK_BOMB, config=ROOMY, limits=Limits(processes=16), slot=5)
    assert result.status == "crashed" and result.error == "train.py hit the process limit of 16 tasks"
    assert not _alive(run_uid(5))


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
