"""The frozen side of a training run, as train.py sees it: data, the clock, progress, hand-in.

    env = session()
    for x, y in env.batches(BATCH_SIZE):      # stops by itself when the budget is spent
        lr = LR * schedule(env.progress())    # progress in [0, 1], the same in every budget mode
        ...
        env.log(loss)
    env.submit(model)                          # model(idx) -> logits; exported, then judged elsewhere

The clock charges the time between successive batch requests, except for the first
`excluded_warmup_steps` steps (compilation, lazy initialisation). The supervisor enforces its own
outer wall-clock limit, so a train.py that tampers with this object gains nothing but a timeout.
"""

from __future__ import annotations

import math
import os
import resource
import time
from collections.abc import Iterator

import msgspec
import numpy as np
import torch
from torch import nn

from shared.target.records import Progress, RunContext

_current: Session | None = None


def session() -> Session:
    """The run's session; train.py must be started by the harness (`autoresearch target run`)."""
    if _current is None:
        raise RuntimeError("train.py runs under the harness: use `autoresearch target run <target folder>`")
    return _current


class Session:
    def __init__(self, context: RunContext):
        self._context = context
        self.device = context.device
        self.seq_len = context.seq_len
        self.vocab_size = context.vocab_size
        self.seed = context.seed
        self._train = np.memmap(context.train_bin, dtype=np.dtype(context.dtype), mode="r")
        self._channel = os.fdopen(context.progress_fd, "wb", buffering=0)
        self._generator = torch.Generator().manual_seed(context.seed)
        self._steps = 0
        self._tokens = 0
        self._train_s = 0.0
        self._step_started: float | None = None
        self._last_report = -math.inf
        self._loss: torch.Tensor | float | None = None
        self._submitted = False
        self._emit(Progress(phase="started"))

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Random windows of the train split: x [batch, seq_len] and targets y shifted by one."""
        if batch_size < 1:
            raise ValueError("batch_size must be positive")
        while True:
            self._close_step()
            if self.progress() >= 1.0 or self._submitted:
                self._step_started = None
                return
            starts = torch.randint(len(self._train) - self.seq_len - 1, (batch_size,), generator=self._generator)
            rows = np.stack([self._train[s : s + self.seq_len + 1] for s in starts.tolist()]).astype(np.int64)
            chunk = torch.from_numpy(rows)
            if self.device == "cuda":
                chunk = chunk.pin_memory().to(self.device, non_blocking=True)
            if self._steps == 0:
                self._report(force=True)
            self._steps += 1
            self._tokens += batch_size * self.seq_len
            self._step_started = time.monotonic()
            yield chunk[:, :-1], chunk[:, 1:]

    def progress(self) -> float:
        """Fraction of the budget spent: training seconds, steps or tokens over the budget."""
        budget = self._context.budget
        used = {"seconds": self._train_s, "steps": self._steps, "tokens": self._tokens}[budget.unit]
        return min(1.0, used / budget.amount)

    def log(self, loss: torch.Tensor | float) -> None:
        """Record the latest train loss; a progress record goes out at most every progress_interval_s."""
        self._loss = loss.detach() if isinstance(loss, torch.Tensor) else loss
        self._report()

    def submit(self, model: nn.Module) -> None:
        """Hand in the trained model: stop the clock, export model(idx) -> logits for the evaluator."""
        if self._submitted:
            raise RuntimeError("submit() may be called once")
        self._close_step()
        self._step_started = None
        self._submitted = True
        module = getattr(model, "_orig_mod", model)  # unwrap torch.compile
        num_params = sum(p.numel() for p in module.parameters())
        self._emit(self._progress("evaluating", num_params))
        module.eval()
        example = torch.zeros((self._context.eval_batch, self.seq_len), dtype=torch.long, device=self.device)
        with torch.no_grad():
            exported = torch.export.export(_Logits(module), (example,))
        torch.export.save(exported, self._context.model_path)

    def _close_step(self) -> None:
        if self._step_started is not None and self._steps > self._context.excluded_warmup_steps:
            self._train_s += time.monotonic() - self._step_started

    def _report(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last_report >= self._context.progress_interval_s:
            self._last_report = now
            self._emit(self._progress("training"))

    def _progress(self, phase: str, num_params: int | None = None) -> Progress:
        loss = None if self._loss is None else float(self._loss)
        return Progress(
            phase=phase,  # type: ignore[arg-type]
            elapsed_train_s=round(self._train_s, 3),
            budget_used=round(self.progress(), 5),
            step=self._steps,
            train_loss=loss if loss is not None and math.isfinite(loss) else None,
            nonfinite_loss=loss is not None and not math.isfinite(loss),
            tokens=self._tokens,
            peak_mem_mb=round(peak_memory_mb(self.device), 1),
            num_params=num_params,
        )

    def _emit(self, record: Progress) -> None:
        self._channel.write(msgspec.json.encode(record) + b"\n")


class _Logits(nn.Module):
    """Pins the exported signature to one input: token ids -> logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)


def peak_memory_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def install(context: RunContext) -> Session:
    global _current
    _current = Session(context)
    return _current
