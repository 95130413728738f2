"""What a run reports while it trains, and the result record it ends with."""

from __future__ import annotations

from typing import Literal

import msgspec

Phase = Literal["started", "training", "evaluating"]
Status = Literal["ok", "invalid", "crashed", "timeout", "aborted", "rejected"]
"""ok: judged; invalid: the edit or code is unusable; crashed: training failed or broke a limit;
timeout: the hard wall-clock kill; aborted: stopped early (forecast or divergence); rejected: refused unrun."""


class Budget(msgspec.Struct, frozen=True):
    """How much training a run gets: wall-clock seconds (the real loop) or a deterministic count."""

    unit: Literal["seconds", "steps", "tokens"]
    amount: float

    def __post_init__(self) -> None:
        if not self.amount > 0:
            raise ValueError(f"a budget must be positive, got {self.amount} {self.unit}")

    def __str__(self) -> str:
        return f"{self.amount:g} {self.unit}"


class Progress(msgspec.Struct, frozen=True, kw_only=True):
    """One line on the progress channel. train_loss is None before the first loss and when non-finite;
    nonfinite_loss says which (JSON has no NaN)."""

    phase: Phase
    elapsed_train_s: float = 0.0
    budget_used: float = 0.0
    """Fraction of the budget spent, in [0, 1], whatever its unit (the clock the LR schedules follow)."""
    step: int = 0
    train_loss: float | None = None
    nonfinite_loss: bool = False
    tokens: int = 0
    peak_mem_mb: float = 0.0
    num_params: int | None = None


class RunResult(msgspec.Struct, frozen=True, kw_only=True):
    """The final record of one training run; val_bpb comes only from the frozen evaluation."""

    status: Status
    val_bpb: float | None
    training_s: float
    startup_s: float
    total_s: float
    steps: int
    tokens: int
    peak_mem_mb: float
    num_params: int | None
    code_sha256: str
    corpus_sha256: str
    tokenizer_id: str
    eval_tokens: int
    budget: str
    seed: int
    device: str
    sandbox: str
    error: str | None = None
    error_tail: str | None = None
    setup_s: float = 0.0
    """The runner's own work before the training process: the data check, the compile check, the workspace, and any
    wait for the slot's uid (held by a run not yet reaped)."""
    eval_s: float = 0.0
    """The frozen evaluation: from the training process's exit to val-bpb (a process of its own: start, imports,
    the handed-in model loaded, eq. (1)). What remains of total_s beyond setup, startup, training and this is the
    trainer's time outside the charged budget (handing its model in)."""


class RunContext(msgspec.Struct, frozen=True, kw_only=True):
    """Everything the supervisor hands to the trainer and evaluator processes of one run."""

    workspace: str
    target_dir: str
    train_bin: str
    val_bin: str
    token_bytes: str
    dtype: str
    vocab_size: int
    seq_len: int
    device: str
    cpu_threads: int
    seed: int
    budget: Budget
    excluded_warmup_steps: int
    progress_interval_s: float
    progress_fd: int
    eval_batch: int
    eval_tokens: int
    readable: list[str]
    """Paths both run processes may read besides the Python installation (the target folder, code)."""
    hidden: list[str]
    """Paths neither process may read even inside a readable root (the data root: val split, other runs)."""

    @property
    def model_path(self) -> str:
        return f"{self.workspace}/model.pt2"
