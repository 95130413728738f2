"""What a research target is: its frozen constants, and how a target folder is loaded.

A target folder holds `prepare.py` (frozen: it defines `CONFIG = TargetConfig(...)`), `train.py`
(the one file the agent edits) and `program.md` (the research agenda the policy reads).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import msgspec

STEP_BUDGET_WALL_FACTOR = 10
"""In step/token budget mode the outer limit is this many times T_max (compute is not metered)."""


class TargetConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Frozen constants of one research target. The agent never sees a way to change these."""

    time_budget_s: float
    """T_max: seconds of training per experiment, excluding start-up/compile and final evaluation."""
    seq_len: int
    """Tokens per training and evaluation window (the model sees at most this much context)."""
    corpus: str = "stdlib"
    """`stdlib` (the offline default) or a folder of text files / parquet shards with a `text` column."""
    tokenizer: str = "bpe:2048"
    """`byte` or `bpe:<vocab size>` (BPE trained locally on the train split)."""
    device: str = "auto"
    """`cpu`, `cuda` or `auto` (cuda when available)."""
    cpu_threads: int = 2
    """torch threads on CPU; fixed so deterministic-budget runs repeat exactly."""
    eval_tokens: int = 131_072
    """Validation tokens scored by eq. (1); fewer if the val split is smaller."""
    eval_batch: int = 32
    """Windows per evaluation forward pass (the exported model's fixed batch shape)."""
    excluded_warmup_steps: int = 1
    """Leading steps whose time is not charged to the budget (compilation, lazy initialisation)."""
    startup_allowance_s: float = 60.0
    """Wall-clock allowed before the first training step and for the steps excluded above."""
    eval_allowance_s: float = 300.0
    """Wall-clock allowed for exporting the model and for the frozen evaluation."""
    progress_interval_s: float = 1.0
    """Minimum seconds between progress records."""

    def wall_limit_s(self, budget_unit: str) -> float:
        """The hard wall-clock limit of one run: no run lives longer than this."""
        training = self.time_budget_s * (1 if budget_unit == "seconds" else STEP_BUDGET_WALL_FACTOR)
        return self.startup_allowance_s + training + self.eval_allowance_s


@dataclass(frozen=True)
class Target:
    """A loaded target folder."""

    path: Path
    config: TargetConfig

    @property
    def train_py(self) -> Path:
        return self.path / "train.py"


class TargetError(ValueError):
    """A target folder that does not follow the contract."""


def load_target(path: str | os.PathLike[str]) -> Target:
    folder = Path(path).resolve()
    for required in ("prepare.py", "train.py", "program.md"):
        if not (folder / required).is_file():
            raise TargetError(f"{folder} is not a research target: {required} is missing (see targets/README.md)")
    spec = importlib.util.spec_from_file_location(f"_target_prepare_{folder.name}", folder / "prepare.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = getattr(module, "CONFIG", None)
    if not isinstance(config, TargetConfig):
        raise TargetError(f"{folder}/prepare.py must define CONFIG = TargetConfig(...)")
    return Target(folder, config)
