"""Which paths the trainer and evaluator processes may touch (see sandbox.py for the mechanism)."""

from __future__ import annotations

import sys
from pathlib import Path

from shared.target.records import RunContext
from shared.target.sandbox import confine

SYSTEM_ROOTS = ("/usr", "/lib", "/lib64", "/bin", "/sbin", "/etc", "/proc", "/sys", "/opt")


def python_roots() -> list[Path]:
    """The interpreter, its standard library and every import path."""
    roots = {Path(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, *sys.path) if p}
    return sorted(p for p in roots if p.exists())


def confine_run(context: RunContext, read: list[str], write: list[str]) -> str:
    """Confine this run process: read the system, Python and `read`; write devices and `write`; no TCP."""
    readable = [*map(Path, SYSTEM_ROOTS), *python_roots(), *map(Path, context.readable), *map(Path, read)]
    # CUDA writes to the process's own /proc entry when it starts (without it, on an H100,
    # cudaGetDeviceCount fails with error 304); /proc/self resolves to this process only.
    writable = [Path("/dev"), Path("/proc/self"), *map(Path, write)]
    return confine(readable, writable, hidden=[Path(p) for p in context.hidden])
