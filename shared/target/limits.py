"""Resource limits of one training run: what they are, how the run's processes start under them, how
the supervisor (runner.py) checks them while the run lives and kills everything of the run at its end.

Each run process (trainer, evaluator) starts through `preexec`, before any code of train.py exists:
- memory: RLIMIT_AS on CPU (importing torch and training the CPU target peaks at about 1.2 GB of
  address space). Not on CUDA, whose driver reserves far more address space than it uses. There, and
  as a second line everywhere, the supervisor sums the resident memory (VmRSS) of the run's processes
  at every poll and kills the run at the limit (`breach`). VmRSS counts a shared page once in each
  process that maps it, so the sum errs high.
- tasks: RLIMIT_NPROC, which counts the threads and processes of a user. The kernel does not apply it
  to root, so a root supervisor runs each run as a dedicated uid, RUN_UID_BASE + slot, that owns only
  the run's workspace. Every process of that uid is the run's, which is also how the run is killed
  when it has escaped its process group with setsid (`reap`). Concurrent runs need distinct slots.
- file size (RLIMIT_FSIZE), open files (RLIMIT_NOFILE), no core dumps (RLIMIT_CORE = 0).
- disk: RLIMIT_FSIZE caps one file, not many. Every DISK_SCAN_S the supervisor adds up what the run's
  files take on disk (`disk`): the allocated blocks under its run folder (workspace and log, the only
  places it may write besides /dev/shm, below), and the files its processes deleted but still
  hold open; it kills the run past `disk_mb` or `files` (`disk_breach`). A run can overshoot by what
  it writes between two scans. Deleted files it only maps (mmap, fd closed) are not counted; on CPU
  RLIMIT_AS bounds them. The runner empties the workspace after the run.
- PR_SET_PDEATHSIG = SIGKILL: the process dies with the supervisor, even after a kill -9 of it.

Reading files: the dedicated uid keeps a single capability, CAP_DAC_READ_SEARCH (read any file),
because the Python install, the target and the data root need not be readable by other users (under
/root or pytest's 0700 tmp). What the run may read is Landlock's allow-list (sandbox.py), which binds
capabilities as well (it also refuses open_by_handle_at outside the list). Without Landlock the run
reads every file, as it did when it ran as root, but writes only where any user may.

/dev/shm: Landlock lets a run write /dev (devices, and CUDA), so /dev/shm too: files there are memory
that neither the VmRSS poll nor the disk scan sees, and they outlive the run. Where the supervisor may
create namespaces (root, CAP_SYS_ADMIN), each run process gets a mount namespace whose /dev/shm is a
tmpfs of its own of SHM_MB, gone with the process; the result's `sandbox` says `+shm`. Elsewhere the
machine's /dev/shm is open to the run.

Network: where the supervisor may create namespaces, each run process gets a network namespace of its
own, whose only interface is a loopback that is down: no TCP, UDP or DNS reaches anything, and the
result's `sandbox` says `+netns`. Elsewhere Landlock (sandbox.py) is all there is: TCP bind and
connect are refused (ABI >= 4), but UDP is not restricted (datagrams go anywhere, so DNS resolves and
can carry data out). Either way abstract unix sockets outside the run are refused (ABI >= 6), and a
pathname unix socket can be connected to when its file mode lets the run's uid write it.

Signals: a run cannot kill its supervisor, the machine's other processes or another run where either
holds: its uid is its own (root supervisor; kill(-1) then reaches only the run's own processes), or
Landlock scopes signals to its domain (ABI >= 6). Where neither does (a non-root supervisor on an
older kernel), the run can kill its supervisor, and PR_SET_PDEATHSIG takes the run down with it.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import itertools
import os
import resource
import signal
import stat
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec

RUN_UID_BASE = 61000
"""A root supervisor runs the processes of slot s as uid and gid RUN_UID_BASE + s."""
MAX_SLOTS = 1000
AUTO_MEMORY_SHARE = 0.6
"""memory_mb = 0 gives a run this share of physical memory (set it explicitly for concurrent runs)."""
SLOT_LOCKS = "/tmp/autoresearch-run-uid{uid}.lock"
REAP_ROUNDS = 20
REAP_PAUSE_S = 0.05
DISK_SCAN_S = 1.0
"""How often the supervisor adds up the run's files (a walk of its run folder)."""
MAX_DEPTH = 32
"""Folders nested deeper in a run folder end the run: training needs a few levels (inductor's and triton's caches),
and the disk scan holds a descriptor per level."""
SHM_MB = 256
"""Size of a run process's own /dev/shm, where it gets a mount namespace."""
_SHM_OPTIONS = f"size={SHM_MB}m,mode=1777".encode()

_PR_SET_PDEATHSIG, _PR_SET_DUMPABLE, _PR_SET_KEEPCAPS = 1, 4, 8
_PR_SET_NO_NEW_PRIVS, _PR_CAP_AMBIENT, _PR_CAP_AMBIENT_RAISE = 38, 47, 2
_CAP_DAC_READ_SEARCH = 2
_CLONE_NEWNET, _CLONE_NEWNS = 0x40000000, 0x00020000
_MS_NOSUID, _MS_NODEV, _MS_REC, _MS_PRIVATE = 2, 4, 1 << 14, 1 << 18
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

_OPEN_FOLDER = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

_libc = ctypes.CDLL(None, use_errno=True)


class Limits(msgspec.Struct, frozen=True, kw_only=True):
    """What one run may use. The process limit counts threads too: a CPU run's trainer has four."""

    memory_mb: int = 0
    """Memory of the run's processes together (address space per process on CPU); 0: 60% of RAM."""
    processes: int = 64
    """Tasks (processes and threads) the run may have at once; reaching it ends the run."""
    file_size_mb: int = 2048
    """Largest file a run process may write (the exported model is one)."""
    open_files: int = 1024
    """File descriptors per process."""
    disk_mb: int = 8192
    """Disk the run's files may take: its workspace and log, and deleted files it holds open."""
    files: int = 100_000
    """Files and folders the run may have in its workspace (each one an inode, whatever its size)."""

    @property
    def disk_bytes(self) -> int:
        return self.disk_mb << 20

    @property
    def memory_bytes(self) -> int:
        if self.memory_mb > 0:
            return self.memory_mb << 20
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * AUTO_MEMORY_SHARE)


def run_uid(slot: int) -> int | None:
    """The dedicated uid of a slot's runs when the supervisor is root; None when it runs as itself."""
    if not 0 <= slot < MAX_SLOTS:
        raise ValueError(f"slot must be in [0, {MAX_SLOTS}), got {slot}")
    return RUN_UID_BASE + slot if os.geteuid() == 0 else None


def check_can_run_as(uid: int) -> None:
    """Fail clearly, before anything starts, where the run's processes could not start as `uid`."""
    if not _uid_mapped(uid):
        raise RuntimeError(f"uid {uid} is not mapped in this user namespace; runs cannot drop root here")
    python = Path(sys.executable).resolve()
    if not python.stat().st_mode & stat.S_IXOTH:
        raise RuntimeError(f"{python} is not executable by other users, so the run's uid {uid} cannot start it")


@contextlib.contextmanager
def hold_slot(uid: int | None) -> Iterator[None]:
    """Hold a dedicated uid for one run. Supervisors on one machine that share a slot take turns
    instead of killing each other's runs (each kills whatever its uid runs, before and after)."""
    if uid is None:
        yield
        return
    lock = os.open(SLOT_LOCKS.format(uid=uid), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
    finally:
        os.close(lock)


def hand_over(workspace: Path, uid: int) -> None:
    """Give the run's uid the workspace the supervisor made for it (its only writable folder)."""
    for path in (workspace, *workspace.iterdir()):
        os.chown(path, uid, uid, follow_symlinks=False)


def preexec(limits: Limits, device: str, uid: int | None) -> Callable[[], None]:
    """The function a run process runs between fork and exec (subprocess's preexec_fn).

    RLIMIT_NPROC is checked against every task of the process's real uid, so it is set to the tasks
    that uid has now plus `limits.processes`. With a dedicated uid that is the run's own allowance
    (plus zombies of earlier runs not yet reaped by init). Without one (a non-root supervisor) the
    run shares the count with everything else of that user: processes the user starts meanwhile
    take from the run's allowance, and a run's processes that called setsid are out of reach of the
    final kill (only the process group is killed).
    """
    parent = os.getpid()
    nproc = _tasks_of(os.getuid() if uid is None else uid) + limits.processes
    memory = limits.memory_bytes

    isolate_network, own_shm = network_namespaces(), private_shm()

    def apply() -> None:
        # Before giving up root, which they need.
        if isolate_network and _libc.unshare(_CLONE_NEWNET) != 0:
            os._exit(126)
        if own_shm and not _mount_own_shm():
            os._exit(126)
        if device == "cpu":  # CUDA reserves huge virtual ranges; the supervisor's VmRSS poll covers it
            _limit(resource.RLIMIT_AS, memory)
        _limit(resource.RLIMIT_FSIZE, limits.file_size_mb << 20)
        _limit(resource.RLIMIT_NOFILE, limits.open_files)
        _limit(resource.RLIMIT_CORE, 0)
        _limit(resource.RLIMIT_NPROC, nproc)
        if uid is not None:
            _become(uid)
        _prctl(_PR_SET_NO_NEW_PRIVS, 1)  # no setuid binary gives root back, Landlock or not
        # Credential changes clear the parent-death signal, so it comes after them; a supervisor that
        # died before this line would never send it, hence the check of who the parent is now.
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:
            os._exit(1)

    return apply


@functools.cache
def network_namespaces() -> bool:
    """Whether run processes can get a network namespace of their own (asked once, of a throwaway child)."""
    return _in_child(lambda: _libc.unshare(_CLONE_NEWNET) == 0)


@functools.cache
def private_shm() -> bool:
    """Whether run processes can get a /dev/shm of their own (asked once, of a throwaway child)."""
    return os.path.isdir("/dev/shm") and _in_child(_mount_own_shm)


def _in_child(attempt: Callable[[], bool]) -> bool:
    child = os.fork()
    if child == 0:
        os._exit(0 if attempt() else 1)
    _, status = os.waitpid(child, 0)
    return os.waitstatus_to_exitcode(status) == 0


def _mount_own_shm() -> bool:
    """Give this (root) process a mount namespace whose /dev/shm is a tmpfs of SHM_MB. System calls only: it runs
    between fork and exec."""
    if _libc.unshare(_CLONE_NEWNS) != 0:
        return False
    # Private first: with shared propagation the tmpfs would also appear on the machine.
    if _libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None) != 0:
        return False
    return _libc.mount(b"tmpfs", b"/dev/shm", b"tmpfs", _MS_NOSUID | _MS_NODEV, _SHM_OPTIONS) == 0


def _limit(which: int, value: int) -> None:
    """Set soft and hard limit to `value`, never above a hard limit the supervisor itself is under."""
    _, hard = resource.getrlimit(which)
    value = value if hard == resource.RLIM_INFINITY else min(value, hard)
    resource.setrlimit(which, (value, value))


def _become(uid: int) -> None:
    """Turn this (root) process into `uid`, keeping only CAP_DAC_READ_SEARCH, across exec too."""
    _prctl(_PR_SET_KEEPCAPS, 1)  # keep the permitted set through setuid, to keep one capability of it
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    _capset(1 << _CAP_DAC_READ_SEARCH)
    _prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_RAISE, _CAP_DAC_READ_SEARCH)  # ambient: survives exec of python
    # The uid change made /proc/self root's; CUDA writes there when it starts (confine.py).
    _prctl(_PR_SET_DUMPABLE, 1)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _capset(capabilities: int) -> None:
    """Make `capabilities` (caps 0-31) this process's effective, permitted and inheritable sets."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)(_CapData(capabilities, capabilities, capabilities), _CapData(0, 0, 0))
    if _libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset failed")


def _prctl(option: int, *args: int) -> None:
    padded = [ctypes.c_ulong(a) for a in (*args, 0, 0, 0, 0)[:4]]
    if _libc.prctl(ctypes.c_int(option), *padded) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({option}) failed")


@dataclass(frozen=True)
class _Task:
    """One process as /proc shows it."""

    pid: int
    uid: int
    pgid: int
    threads: int
    resident_kb: int
    zombie: bool


def _processes() -> Iterator[_Task]:
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/status", "rb") as status:
                fields = dict(line.split(b":", 1) for line in status.read().splitlines() if b":" in line)
        except OSError:  # it ended while we looked
            continue
        yield _Task(
            pid=int(entry.name),
            uid=int(fields[b"Uid"].split()[0]),  # real uid: the one RLIMIT_NPROC counts
            pgid=int(fields[b"NSpgid"].split()[0]),
            threads=int(fields[b"Threads"]),
            resident_kb=int(fields.get(b"VmRSS", b"0").split()[0]),  # kernel threads and zombies have none
            zombie=fields[b"State"].split()[0] in (b"Z", b"X"),
        )


def _tasks_of(uid: int) -> int:
    return sum(task.threads for task in _processes() if task.uid == uid)


@dataclass(frozen=True)
class Usage:
    """What a run's live processes hold now."""

    resident_mb: float
    tasks: int
    pids: tuple[int, ...] = ()


def usage(pgid: int, uid: int | None) -> Usage:
    """The run's processes: its process group, and every process of its dedicated uid if it has one."""
    mine = [t for t in _processes() if not t.zombie and (t.pgid == pgid or (uid is not None and t.uid == uid))]
    return Usage(resident_mb=sum(t.resident_kb for t in mine) / 1024, tasks=sum(t.threads for t in mine),
                 pids=tuple(t.pid for t in mine))


def breach(now: Usage, limits: Limits) -> str | None:
    """Why the run must be killed now, or None. Tasks first: a fork bomb's copies also add up resident."""
    if now.tasks >= limits.processes:
        return f"train.py hit the process limit of {limits.processes} tasks"
    if now.resident_mb * 2**20 > limits.memory_bytes:
        return f"run exceeded its memory limit of {limits.memory_bytes >> 20} MB"
    return None


@dataclass(frozen=True)
class Disk:
    """What the run's files take on disk now, in allocated blocks (a sparse file costs what it holds)."""

    kept_bytes: int
    """Under the run folder: workspace and log."""
    files: int
    """Files and folders in the run folder; the walk stops a file past the limit."""
    held_bytes: int
    """Files the run's processes deleted but still hold open (memfd too): disk or memory until closed."""
    too_deep: bool = False
    """Folders nested past MAX_DEPTH (the walk stops there)."""

    @property
    def total_bytes(self) -> int:
        return self.kept_bytes + self.held_bytes


def disk(run_dir: Path, pids: tuple[int, ...], limits: Limits) -> Disk:
    """Add up the run's files: a walk of its run folder, and the open files of its processes. The walk goes by
    descriptors, one per level (no path grows past what the system can name), and stops past the limits."""
    seen: set[tuple[int, int]] = set()  # hard links count once
    kept, files, deep = 0, 0, False
    levels = [folder] if (folder := _open_folder(str(run_dir), None, limits.files)) else []
    try:
        while levels and files <= limits.files:
            fd, entries = levels[-1]
            entry = next(entries, None)
            if entry is None:
                os.close(levels.pop()[0])
                continue
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError:  # gone meanwhile
                continue
            files += 1
            if (info.st_dev, info.st_ino) not in seen:
                seen.add((info.st_dev, info.st_ino))
                kept += info.st_blocks * 512
            if stat.S_ISDIR(info.st_mode):
                if len(levels) > MAX_DEPTH:
                    deep = True
                    break
                if folder := _open_folder(entry.name, fd, limits.files):
                    levels.append(folder)
    finally:
        for fd, _ in levels:
            os.close(fd)
    held = 0
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                info = os.stat(f"/proc/{pid}/fd/{fd}")  # follows the link to the file, deleted or not
            except OSError:
                continue
            if stat.S_ISREG(info.st_mode) and info.st_nlink == 0 and (info.st_dev, info.st_ino) not in seen:
                seen.add((info.st_dev, info.st_ino))
                held += info.st_blocks * 512
    return Disk(kept_bytes=kept, files=files, held_bytes=held, too_deep=deep)


def _open_folder(name: str, parent: int | None, most: int) -> tuple[int, Iterator[os.DirEntry]] | None:
    """A folder's descriptor and up to `most` + 1 of its entries, or None when it is gone. A run of the supervisor's
    own uid may have hidden it (chmod 000): its owner opens it up."""
    for attempt in range(2):
        try:
            fd = os.open(name, _OPEN_FOLDER, dir_fd=parent)
        except PermissionError:
            if attempt == 0:
                with contextlib.suppress(OSError):
                    os.chmod(name, 0o700, dir_fd=parent)
            continue
        except OSError:
            return None
        try:
            with os.scandir(fd) as entries:  # their stat() goes through fd, which stays open
                return fd, iter(list(itertools.islice(entries, most + 1)))
        except OSError:
            os.close(fd)
            return None
    return None


def disk_breach(now: Disk, limits: Limits) -> str | None:
    """Why the run must be killed for what it wrote, or None."""
    if now.too_deep:
        return f"run nested folders more than {MAX_DEPTH} deep in its workspace"
    if now.files > limits.files:
        return f"run exceeded its limit of {limits.files} files in its workspace"
    if now.total_bytes > limits.disk_bytes:
        held = f", {now.held_bytes >> 20} MB of it in deleted files it held open" if now.held_bytes >> 20 else ""
        return f"run exceeded its disk limit of {limits.disk_mb} MB: wrote {now.total_bytes >> 20} MB{held}"
    return None


_SIGNS = {
    # The last line of a failed process's log, as Python or the C++ runtime writes it at each limit.
    "memory": ("MemoryError", "Cannot allocate memory", "can't allocate memory", "std::bad_alloc"),
    "processes": ("Resource temporarily unavailable", "can't start new thread"),  # fork/clone: EAGAIN
    "file size": ("File too large",),  # Python ignores SIGXFSZ, so the write fails with EFBIG
    "open files": ("Too many open files",),
}


def limit_hit(subject: str, returncode: int, log_tail: str, limits: Limits) -> str | None:
    """Which limit a process that failed by itself ran into, when its exit or last log line tells."""
    lines = [line for line in log_tail.splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    if "CUDA out of memory" in last:  # torch.OutOfMemoryError: the GPU's memory, not a limit of ours
        return None
    if any(sign in last for sign in _SIGNS["memory"]):
        return f"{subject} hit the memory limit of {limits.memory_bytes >> 20} MB"
    if any(sign in last for sign in _SIGNS["processes"]):
        return f"{subject} hit the process limit of {limits.processes} tasks"
    if returncode == -signal.SIGXFSZ or any(sign in last for sign in _SIGNS["file size"]):
        return f"{subject} hit the file size limit of {limits.file_size_mb} MB"
    if any(sign in last for sign in _SIGNS["open files"]):
        return f"{subject} hit the open file limit of {limits.open_files}"
    return None


def end_run(pgid: int, uid: int | None) -> None:
    """Kill the run's process group, and every process of its dedicated uid."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    if uid is not None:
        reap(uid)


def reap(uid: int) -> bool:
    """Kill every process of `uid`, in whatever process group or session. True once none is alive."""
    for _ in range(REAP_ROUNDS):
        if not any(t.uid == uid and not t.zombie for t in _processes()):
            return True
        _kill_all_as(uid)
        time.sleep(REAP_PAUSE_S)  # SIGKILLed processes take a moment to release their memory and exit
    return not any(t.uid == uid and not t.zombie for t in _processes())


def _kill_all_as(uid: int) -> None:
    """kill(-1) from a child that is `uid`: the kernel signals exactly that uid's processes, all at once,
    so a fork bomb cannot outrun a scan of /proc."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            os.kill(-1, signal.SIGKILL)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def _uid_mapped(uid: int) -> bool:
    try:
        lines = Path("/proc/self/uid_map").read_text().splitlines()
    except OSError:
        return True
    ranges = [tuple(map(int, line.split())) for line in lines if line.strip()]
    return any(inside <= uid < inside + count for inside, _, count in ranges)
