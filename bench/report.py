"""Where benchmark figures go: one JSON file per benchmark, with the machine and commit they came from."""

from __future__ import annotations

import os
import platform
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import torch

RESULTS = Path(__file__).parent / "results"


def machine() -> dict[str, object]:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": str(torch.__version__),
            "platform": platform.platform(), "gpu": gpu}


def commit() -> str:
    found = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                           cwd=Path(__file__).parent)
    return found.stdout.strip() or "unknown"


def write(name: str, figures: dict[str, object], folder: Path = RESULTS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    record = {"benchmark": name, "at": datetime.now(UTC).isoformat(timespec="seconds"), "commit": commit(),
              "machine": machine(), "figures": figures}
    path.write_bytes(msgspec.json.format(msgspec.json.encode(record)) + b"\n")
    print(f"{name}: {figures}\n  -> {path}")
    return path
