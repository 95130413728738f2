"""DO NOT CHANGE: this is the fixed metric every experiment is judged by.

Validation bits per byte, paper eq. (1):

    bpb = -sum_i log2 p(x_i | x_<i)  /  sum_i |x_i|_bytes

over every scored token x_i of the validation stream, where |x_i|_bytes is the token's UTF-8 byte
length. Document separators have no bytes and are left out of both sums. The stream is cut into
non-overlapping windows of seq_len + 1 tokens; each window's last seq_len tokens are scored, so
every token but the stream's first is scored exactly once, with at most seq_len tokens of context.

It runs in the evaluator process on a model exported from training (a graph of tensor operations,
no code from train.py), together with the causality probe that rejects models which look ahead.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

Model = Callable[[torch.Tensor], torch.Tensor]
"""token ids [batch, seq_len] -> next-token logits [batch, seq_len, vocab]."""

CAUSALITY_TOLERANCE = 1e-3
"""Largest change of a prefix logit (relative to the logits' scale) that still counts as unchanged."""


class EvaluationError(RuntimeError):
    """The model's output cannot be scored (wrong shape, NaN/inf)."""


@dataclass(frozen=True)
class Bpb:
    bpb: float
    nats: float
    bytes: int
    tokens: int


def val_windows(tokens: np.ndarray, seq_len: int, max_tokens: int) -> torch.Tensor:
    """[n, seq_len + 1] windows from the start of the val stream, covering at most max_tokens targets."""
    n = min(len(tokens) - 1, max_tokens) // seq_len
    if n < 1:
        raise EvaluationError(f"val split has {len(tokens)} tokens, fewer than one window of {seq_len + 1}")
    ids = np.asarray(tokens[: n * seq_len + 1], dtype=np.int64)
    index = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return torch.from_numpy(ids[index])


def _logits(model: Model, x: torch.Tensor, vocab_size: int) -> torch.Tensor:
    logits = model(x)
    if not isinstance(logits, torch.Tensor) or logits.shape != (*x.shape, vocab_size):
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise EvaluationError(f"model returned {shape}, expected logits of shape {(*x.shape, vocab_size)}")
    logits = logits.float()
    if not torch.isfinite(logits).all():
        raise EvaluationError("model produced non-finite logits")
    return logits


def _batches(windows: torch.Tensor, batch_size: int) -> list[tuple[torch.Tensor, int]]:
    """Fixed-size batches (the exported model has a fixed shape); the last is padded with repeats."""
    out = []
    for start in range(0, len(windows), batch_size):
        chunk = windows[start : start + batch_size]
        real = len(chunk)
        if real < batch_size:
            chunk = torch.cat([chunk, chunk[:1].expand(batch_size - real, -1)])
        out.append((chunk, real))
    return out


@torch.inference_mode()
def bits_per_byte(
    model: Model, windows: torch.Tensor, token_bytes: torch.Tensor, batch_size: int, device: str = "cpu"
) -> Bpb:
    """Eq. (1) over the given windows."""
    vocab_size = len(token_bytes)
    token_bytes = token_bytes.to(device=device, dtype=torch.int64)
    nats = 0.0
    nbytes = 0
    scored = 0
    for chunk, real in _batches(windows, batch_size):
        chunk = chunk.to(device)
        x, y = chunk[:, :-1], chunk[:, 1:]
        logits = _logits(model, x, vocab_size)[:real]
        y = y[:real]
        nll = F.cross_entropy(logits.reshape(-1, vocab_size), y.reshape(-1), reduction="none")
        weight = token_bytes[y.reshape(-1)]
        counted = weight > 0
        nats += float(nll[counted].double().sum())
        nbytes += int(weight.sum())
        scored += int(counted.sum())
    return Bpb(bpb=nats / (math.log(2) * nbytes), nats=nats, bytes=nbytes, tokens=scored)


@dataclass(frozen=True)
class Causality:
    causal: bool
    max_change: float
    detail: str


@torch.inference_mode()
def causality_probe(
    model: Model, windows: torch.Tensor, vocab_size: int, batch_size: int, seed: int = 0, device: str = "cpu"
) -> Causality:
    """Check that logits at position i depend only on tokens <= i of the same row.

    For a few (row, position) pairs, the tokens after the position and every other row are replaced
    with other validation text; the row's logits up to the position must not move. This catches both
    looking ahead within a sequence and reading the continuation from a neighbouring row.
    """
    if len(windows) < 2 * batch_size:
        raise EvaluationError(f"causality probe needs {2 * batch_size} val windows, found {len(windows)}")
    rng = np.random.default_rng(seed)
    seq_len = windows.shape[1] - 1
    base = windows[:batch_size, :-1].to(device)
    reference = _logits(model, base, vocab_size)
    worst = 0.0
    for position in (0, seq_len // 2, int(rng.integers(0, seq_len - 1))):
        row = int(rng.integers(batch_size))
        others = rng.choice(np.arange(batch_size, len(windows)), size=batch_size, replace=False)
        probe = windows[torch.from_numpy(others), :-1].to(device)
        probe[row, : position + 1] = base[row, : position + 1]
        changed = _logits(model, probe, vocab_size)[row, : position + 1]
        expected = reference[row, : position + 1]
        change = float((changed - expected).abs().max() / (1.0 + expected.abs().max()))
        worst = max(worst, change)
        if change > CAUSALITY_TOLERANCE:
            detail = (
                f"logits at positions <= {position} of row {row} changed by {change:.3g} (relative) when only "
                "later tokens and other rows changed: the model sees the future"
            )
            return Causality(False, worst, detail)
    return Causality(True, worst, "prefix logits unchanged under suffix and batch perturbation")
