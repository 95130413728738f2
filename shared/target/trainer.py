"""Entry point of the training process: confine it, open the session, run train.py.

    python -m shared.target.trainer <context.json>

Runs as a child of the supervisor (runner.py), in its own process group, with the workspace as its
only writable folder, no TCP, and no way to read the val split.
"""

from __future__ import annotations

import random
import runpy
import sys
from pathlib import Path

import msgspec
import numpy as np
import torch

from shared.target import runtime
from shared.target.confine import confine_run
from shared.target.records import RunContext

NOT_SUBMITTED_EXIT = 3


def main(context_path: str) -> int:
    context = msgspec.json.decode(Path(context_path).read_bytes(), type=RunContext)
    sandbox = confine_run(context, read=[context.train_bin], write=[context.workspace])
    print(f"[harness] sandbox: {sandbox}; device: {context.device}; budget: {context.budget}", flush=True)
    torch.set_num_threads(context.cpu_threads)
    random.seed(context.seed)
    np.random.seed(context.seed)
    torch.manual_seed(context.seed)
    runtime.install(context)
    sys.path.insert(0, context.target_dir)
    runpy.run_path(f"{context.workspace}/train.py", run_name="__main__")
    if not Path(context.model_path).is_file():
        print("[harness] train.py ended without calling env.submit(model)", file=sys.stderr, flush=True)
        return NOT_SUBMITTED_EXIT
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
