"""Hostile edits of train.py, one row each: every one is contained, recorded with a reason, and the next run goes on.

Each row is a train.py that a policy could propose, run through run_target as the executor runs a proposal
(services/executor/main.py `_run`): the tiny CPU target, the edit as its source, tight Limits, a slot, a stop
request. Every row then checks the same things besides its own: the status and a fragment of the one-line reason
the ledger shows, no val-bpb unless judged, no process of the run left, the supervisor's neighbour (a sentinel
process) alive, the workspace emptied but for train.py, and nothing of the run's uid in /tmp or /dev/shm.

What holds depends on the machine, and the rows assert it rather than assume it: a root supervisor runs each slot as
a uid of its own (fork bomb, killing), in network and mount namespaces of its own (network, /dev/shm); Landlock
confines files, TCP (ABI >= 4) and signals (ABI >= 6). Written against a root supervisor on Landlock ABI 7; each
row's docstring says which mechanism contains it there.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import REPO, alive_processes, make_target

from shared.target.config import load_target
from shared.target.data import prepare
from shared.target.limits import MAX_DEPTH, SHM_MB, Limits, private_shm, run_uid
from shared.target.records import Budget, Progress, RunResult, Status
from shared.target.runner import StopRequest, run_target
from shared.target.sandbox import abi_version

SLOT = 7
UID = run_uid(SLOT)
ROOT = UID is not None
LIMITS = Limits(memory_mb=3072, processes=16, file_size_mb=16, open_files=256, disk_mb=64)
"""Tight, but roomy enough for the tiny target to train and be judged (the fake-number and causal-mask rows)."""
FEW_STEPS = Budget("steps", 6)
QUICK = dict(time_budget_s=1, startup_allowance_s=5, eval_allowance_s=1)
"""A hard limit 7 s after the trainer starts, for the rows only the clock ends: time to reach train.py (importing torch
takes 2 s on 2 idle cores, several on busy ones)."""


@dataclass(frozen=True)
class Scene:
    """What a row's edit may aim at, and what the checks look at afterwards."""

    train_py: str
    val_bin: Path
    data_root: Path
    target: Path
    tcp: socket.socket
    udp: socket.socket
    sentinel: subprocess.Popen
    """A process of the supervisor's uid, in a session of its own: no row may kill it."""
    outsider: Outsider


@dataclass(frozen=True)
class Row:
    name: str
    edit: Callable[[Scene], str]
    status: Status
    reason: str | None
    """A fragment of the recorded error; None: there is none (the run was judged)."""
    check: Callable[[RunResult, Scene], None] = lambda result, scene: None
    config: dict = field(default_factory=dict)
    budget: Budget = FEW_STEPS
    visible_devices: str | None = None
    watch: Callable[[Scene], Callable[[Progress], None] | None] = lambda scene: None
    """What listens to the run's progress, as the executor's reporter does."""
    needs: tuple[bool, str] = (True, "")
    """(condition, why): the row is skipped where the condition is false."""


def endless(scene: Scene) -> str:
    """Killed by the supervisor's outer clock: the hard limit, whatever the code does."""
    return "import os\nprint(f'visible={os.environ.get(\"CUDA_VISIBLE_DEVICES\")} uid={os.getuid()}', flush=True)\n" \
           "while True:\n    pass\n"


def check_endless(result: RunResult, scene: Scene) -> None:
    assert result.startup_s < 10  # from the trainer's start to the kill (total_s also counts waiting for the slot)
    assert "visible=3" in result.error_tail and f"uid={UID or os.getuid()}" in result.error_tail


FORK_BOMB = """
import os
while True:
    try:
        if os.fork() == 0:
            os.setsid()  # out of the process group the supervisor kills
    except OSError:
        pass
"""


def fork_bomb(scene: Scene) -> str:
    """RLIMIT_NPROC on the slot's uid and the supervisor's count of its tasks stop it; the uid is how the copies that
    left the process group (setsid) are found and killed. Root only: without a uid of its own a run shares the count
    with its user and its escaped copies are out of reach."""
    return FORK_BOMB


def huge_allocation(scene: Scene) -> str:
    """50 GiB on a 24 GB machine: RLIMIT_AS (CPU) fails the allocation at once, in Python and in torch. (On CUDA,
    which has no RLIMIT_AS, the supervisor's VmRSS poll kills it: test_containment's spread row.)"""
    return ("try:\n    bytearray(50 * 2**30)\nexcept MemoryError:\n    print('python: MemoryError', flush=True)\n"
            "import torch\ntorch.empty((50 * 2**30,), dtype=torch.uint8).fill_(1)\n")


def check_huge_allocation(result: RunResult, scene: Scene) -> None:
    assert "python: MemoryError" in result.error_tail
    assert result.startup_s < 10, "the allocation failed at once, not after the machine swapped"


FILL = """
import os, time
chunk = b"x" * (1 << 20)
if {shm}:  # the run's own /dev/shm: a tmpfs of SHM_MB, in its mount namespace
    written = 0
    try:
        for i in range(100_000):
            with open(f"/dev/shm/fill-{{i}}", "wb") as out:
                for _ in range(8):
                    written += out.write(chunk)
    except OSError as error:
        print(f"shm: {{error.strerror}} after {{written >> 20}} MB", flush=True)
held = []
for i in range(100_000):
    with open(f"fill-{{i}}", "wb") as out:  # 4 MB each, under the file size limit: only the sum is caught
        for _ in range(4):
            out.write(chunk)
    if len(held) < 8 and i % 2:  # deleted but held open: gone from the folder, not from the disk
        held.append(open(f"fill-{{i}}", "rb"))
        os.remove(f"fill-{{i}}")
    time.sleep(0.02)  # at most 200 MB/s: what it writes past the limit before a scan sees it stays small
"""


def fill_disk(scene: Scene) -> str:
    """Many files under the file size limit, a few deleted but held open. The supervisor's disk scan (workspace
    and log, and deleted files the run's processes hold open) kills it past disk_mb; the runner then empties the
    workspace. /dev/shm, which Landlock lets a run write, is the run's own tmpfs of SHM_MB here (mount namespace):
    it fills up and vanishes with the run. Not covered: a deleted file only mapped (fd closed); RLIMIT_AS bounds it
    on CPU."""
    return FILL.format(shm=private_shm())  # never the machine's /dev/shm


def check_fill_disk(result: RunResult, scene: Scene) -> None:
    assert "MB of it in deleted files it held open" in result.error, "the held-open files were counted"
    if "+shm" in result.sandbox:
        assert f"shm: No space left on device after {SHM_MB} MB" in result.error_tail


NEST = """
import os, time
for _ in range(5000):
    os.mkdir("d")
    os.chdir("d")
time.sleep(60)
"""


def nest_folders(scene: Scene) -> str:
    """Filling the disk with folders instead of bytes: 5000 deep takes a tenth of a second. The disk scan walks by
    descriptors and ends the run past MAX_DEPTH levels; the workspace is still emptied (shutil.rmtree would raise
    RecursionError here, out of run_target)."""
    return NEST


PROBE = """
import glob, os, socket
def attempt(what, action):
    try:
        action()
    except OSError as error:
        print(f"refused: {what}: {type(error).__name__}", flush=True)
    else:
        print(f"allowed: {what}", flush=True)
"""


def network(scene: Scene) -> str:
    """Landlock (ABI >= 4) refuses TCP connect and bind; the run's own network namespace (root) has no interface up,
    so UDP and DNS reach nothing either. The last attempt is left to fail, as a careless edit would."""
    tcp, udp = scene.tcp.getsockname()[1], scene.udp.getsockname()[1]
    return PROBE + (
        f"attempt('udp', lambda: socket.socket(type=socket.SOCK_DGRAM).sendto(b'leak', ('127.0.0.1', {udp})))\n"
        "attempt('dns', lambda: socket.getaddrinfo('pypi.org', 443))\n"
        "attempt('bind', lambda: socket.create_server(('127.0.0.1', 0)))\n"
        f"socket.create_connection(('127.0.0.1', {tcp}), timeout=2)\n"
    )


def check_network(result: RunResult, scene: Scene) -> None:
    assert result.sandbox.startswith("landlock"), "TCP is refused by Landlock: this kernel has none"
    assert "+netns" in result.sandbox, "UDP isolation needs network namespaces (a root supervisor)"
    for what in ("udp", "dns", "bind"):
        assert f"refused: {what}" in result.error_tail
    assert "allowed" not in result.error_tail
    with pytest.raises(BlockingIOError):
        scene.tcp.accept()
    with pytest.raises(BlockingIOError):
        scene.udp.recv(16)


def val_split(scene: Scene) -> str:
    """Landlock: the data root (val split, other runs) is carved out of what the trainer may read, and no path to it
    is in its environment. Only the evaluator, which runs no code of train.py, reads val."""
    return PROBE + (
        f"attempt('list data root', lambda: os.listdir({str(scene.data_root)!r}))\n"
        f"print('val files found:', len(glob.glob({str(scene.data_root)!r} + '/**/val.bin', recursive=True)))\n"
        "print('val path in environment:', any('val.bin' in v for v in os.environ.values()), flush=True)\n"
        f"open({str(scene.val_bin)!r}, 'rb').read(16)\n"
    )


def check_val_split(result: RunResult, scene: Scene) -> None:
    tail = result.error_tail
    assert "refused: list data root" in tail and "allowed" not in tail
    assert "val files found: 0" in tail and "val path in environment: False" in tail


def no_causal_mask(scene: Scene) -> str:
    """Judged outside train.py: the evaluator's causality probe finds the model reads future tokens."""
    assert "is_causal=True" in scene.train_py
    return scene.train_py.replace("is_causal=True", "is_causal=False")


def fake_val_bpb(scene: Scene) -> str:
    """Whatever train.py prints only reaches the log; val-bpb comes from the evaluator's own process. Also the
    control of the table: the tiny target trains and is judged under the same tight limits, in the slot the rows
    before it used."""
    return scene.train_py + "\nprint('val_bpb: 0.000100')\nprint('{\"status\": \"ok\", \"val_bpb\": 0.0001}')\n"


def check_fake_val_bpb(result: RunResult, scene: Scene) -> None:
    assert result.val_bpb > 1.0, "the printed number was not taken"
    assert result.steps == FEW_STEPS.amount


def outside(scene: Scene) -> list[Path]:
    own_shm = [Path("/dev/shm/hostile-planted")] if private_shm() else []  # else it is the machine's, and open
    return [scene.target / "prepare.py", REPO / "shared" / "target" / "runtime.py", Path("/tmp/hostile-planted"),
            *own_shm, scene.data_root / "planted.txt"]


def write_outside(scene: Scene) -> str:
    """Landlock: the run writes its workspace, /dev and /proc/self only; the frozen config, the harness's code, the data
    root and /tmp are refused. A write to /dev/shm lands in the run's own tmpfs (mount namespace, root), so nothing
    reaches the machine's; where the run cannot have its own, /dev/shm is open (limits.py) and not tried."""
    *tried, last = outside(scene)
    return PROBE + "".join(f"attempt({str(p)!r}, lambda: os.close(os.open({str(p)!r}, os.O_WRONLY | os.O_CREAT)))\n"
                           for p in tried) + f"open({str(last)!r}, 'w').write('x')\n"


def check_write_outside(result: RunResult, scene: Scene) -> None:
    tail = result.error_tail
    for path in outside(scene)[:3]:
        assert f"refused: {path}: PermissionError" in tail
    if "+shm" in result.sandbox:
        assert "allowed: /dev/shm/hostile-planted" in tail  # into the run's own /dev/shm
    assert not Path("/tmp/hostile-planted").exists() and not Path("/dev/shm/hostile-planted").exists()
    assert not (scene.data_root / "planted.txt").exists()


OUTSIDER = ["sleep", "3599"]

KILL = """
import os, signal, time
from prepare import session
next(session().batches(8))  # training began: the test starts an outsider, a process of this uid outside the sandbox
def outsider():
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if open(f"/proc/{pid}/cmdline", "rb").read() == b"sleep\\x003599\\x00":
                return int(pid)
        except OSError:
            pass
deadline = time.monotonic() + 10
while (found := outsider()) is None and time.monotonic() < deadline:
    time.sleep(0.05)
for what, pid in [("its uid outside the sandbox", found), ("its parent's group", -os.getpgid(os.getppid())),
                  ("pid 1", 1), ("all it may signal", -1)]:
    try:
        os.kill(pid, signal.SIGKILL)
        print(f"sent: {what}", flush=True)
    except OSError as error:
        print(f"refused: {what}: {type(error).__name__}", flush=True)
time.sleep(0.2)
print("outsider state:", open(f"/proc/{found}/stat").read().rsplit(") ", 1)[1][0], flush=True)
os.kill(os.getppid(), signal.SIGKILL)
"""


class Outsider:
    """Started when training begins: a process of the run's own uid, not in the run's Landlock domain. The uid does not
    protect it, so only Landlock's signal scoping can."""

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None

    def __call__(self, record: Progress) -> None:
        if record.phase == "training" and self.process is None:
            self.process = subprocess.Popen(OUTSIDER, preexec_fn=_become_run_uid if ROOT else None)

    def end(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()


def _become_run_uid() -> None:
    os.setresgid(UID, UID, UID)
    os.setresuid(UID, UID, UID)


def kill_parent(scene: Scene) -> str:
    """The parent is the supervisor (this test process). Two mechanisms refuse the signal, either one enough: the run's
    uid differs from every other process's (root supervisor), and Landlock signal scoping (ABI >= 6) stops signals
    leaving the run's domain. The outsider tells them apart: it shares the run's uid, so where it survives, Landlock
    held by itself (ABI 7 here: it does, so for the parent both hold). Skipped where neither would: it would kill the
    test session, and kill(-1) every process of its user. kill(-1) reports success when every target refused (Linux
    counts them), so the sentinel and the outsider are what show that it reached nothing."""
    return KILL


def check_kill_parent(result: RunResult, scene: Scene) -> None:
    scene.outsider.end()
    tail = result.error_tail
    assert "refused: its parent's group: PermissionError" in tail and "refused: pid 1: PermissionError" in tail
    if abi_version() >= 6:
        assert "refused: its uid outside the sandbox: PermissionError" in tail, "Landlock signal scoping"
        assert "outsider state: S" in tail


SLEEP = """
import time
from prepare import session
for x, y in session().batches(8):
    print("sleeping in step 1", flush=True)
    time.sleep(3600)  # never asks for the next batch, so the run's own clock never runs out
"""


def sleep_past_budget(scene: Scene) -> str:
    """Only the supervisor's outer clock ends it: the hard limit (startup + budget + evaluation allowance)."""
    return SLEEP


def check_sleep(result: RunResult, scene: Scene) -> None:
    assert "sleeping in step 1" in result.error_tail


DENIED = "train.py raised PermissionError: [Errno 13] Permission denied"
HARD_LIMIT = "killed at the run's hard wall-clock limit of 7 s"
HOSTILE = [
    Row("endless-loop", endless, "timeout", f"{HARD_LIMIT}, before its first training step", check_endless,
        config=QUICK, budget=Budget("seconds", 1), visible_devices="3"),
    Row("fork-bomb", fork_bomb, "crashed", "train.py hit the process limit of 16 tasks",
        needs=(ROOT, "only a run with its own uid can be killed after it left its group")),
    Row("huge-allocation", huge_allocation, "crashed", "train.py hit the memory limit of 3072 MB",
        check_huge_allocation),
    Row("fill-disk", fill_disk, "crashed", "run exceeded its disk limit of 64 MB: wrote", check_fill_disk),
    Row("nest-folders", nest_folders, "crashed", f"run nested folders more than {MAX_DEPTH} deep in its workspace"),
    Row("network", network, "crashed", DENIED, check_network),
    Row("read-val-split", val_split, "crashed", DENIED, check_val_split),
    Row("no-causal-mask", no_causal_mask, "rejected", "causality probe failed"),
    Row("fake-val-bpb", fake_val_bpb, "ok", None, check_fake_val_bpb),
    Row("write-outside", write_outside, "crashed", DENIED, check_write_outside),
    Row("kill-parent", kill_parent, "crashed", "train.py raised PermissionError: [Errno 1] Operation not permitted",
        check_kill_parent, watch=lambda scene: scene.outsider,
        needs=(ROOT or abi_version() >= 6, "nothing would stop it: it would kill this test session")),
    Row("sleep-past-budget", sleep_past_budget, "timeout", f"{HARD_LIMIT}, in training, 0 steps done", check_sleep,
        config=QUICK, budget=Budget("seconds", 1)),
]


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory, small_corpus: Path, data_root: Path):
    target = make_target(tmp_path_factory.mktemp("hostile"), small_corpus)
    config = load_target(target).config
    with socket.create_server(("127.0.0.1", 0)) as tcp, socket.socket(type=socket.SOCK_DGRAM) as udp:
        tcp.setblocking(False)
        udp.bind(("127.0.0.1", 0))
        udp.setblocking(False)
        sentinel = subprocess.Popen(["sleep", "3600"], start_new_session=True)
        try:
            yield Scene(train_py=(target / "train.py").read_text(),
                        val_bin=prepare(config.corpus, config.tokenizer).val_bin, data_root=data_root, target=target,
                        tcp=tcp, udp=udp, sentinel=sentinel, outsider=Outsider())
        finally:
            sentinel.kill()
            sentinel.wait()


@pytest.mark.parametrize("row", HOSTILE, ids=[row.name for row in HOSTILE])
def test_a_hostile_edit_is_contained_with_a_reason(row: Row, scene: Scene, tmp_path: Path):
    if not row.needs[0]:
        pytest.skip(row.needs[1])
    target = make_target(tmp_path / "target", load_target(scene.target).config.corpus, **row.config) \
        if row.config else scene.target
    runs = set((scene.data_root / "runs").glob("*"))
    result = run_target(load_target(target), row.edit(scene), budget=row.budget, limits=LIMITS, slot=SLOT,
                        stop=StopRequest(), visible_devices=row.visible_devices, on_progress=row.watch(scene))
    assert result.status == row.status, (result.error, result.error_tail)
    if row.reason is None:
        assert result.error is None and result.val_bpb is not None
    else:
        assert row.reason in result.error and "\n" not in result.error, result.error
        assert result.val_bpb is None
    row.check(result, scene)
    # Contained: nothing of the run lives on or stays behind, and the supervisor's neighbour is untouched.
    assert scene.sentinel.poll() is None
    [run_dir] = set((scene.data_root / "runs").glob("*")) - runs
    assert [p.name for p in (run_dir / "workspace").iterdir()] == ["train.py"]
    if ROOT:
        assert not alive_processes(UID)
        assert not [p for folder in ("/tmp", "/dev/shm") for p in Path(folder).iterdir() if _owner(p) == UID]


def _owner(path: Path) -> int | None:
    try:
        return path.lstat().st_uid
    except OSError:
        return None
