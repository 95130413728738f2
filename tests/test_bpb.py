"""The fixed metric (eq. 1) and the causality probe, on hand-built models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from shared.target.bpb import EvaluationError, bits_per_byte, causality_probe, val_windows

PROBS = torch.tensor([0.1, 0.2, 0.3, 0.4])
TOKEN_BYTES = torch.tensor([0, 1, 2, 3])  # token 0 is the document separator: no bytes


def constant_model(x: torch.Tensor) -> torch.Tensor:
    return PROBS.log().expand(*x.shape, 4)


def test_bpb_matches_a_hand_computed_value():
    windows = val_windows(np.array([1, 2, 0, 3, 1]), seq_len=4, max_tokens=100)
    assert windows.tolist() == [[1, 2, 0, 3, 1]]
    result = bits_per_byte(constant_model, windows, TOKEN_BYTES, batch_size=2)
    # Targets are 2, 0, 3, 1; the separator (0) has no bytes and is left out of both sums.
    bits = -(math.log2(0.3) + math.log2(0.4) + math.log2(0.2))
    assert result.bytes == 2 + 3 + 1
    assert result.tokens == 3
    assert result.bpb == pytest.approx(bits / 6, rel=1e-6)


def test_windows_score_every_token_once_and_batches_pad_without_counting_twice():
    tokens = np.arange(1, 42) % 3 + 1
    windows = val_windows(tokens, seq_len=4, max_tokens=1000)
    assert len(windows) == 10 and windows[1, 0] == windows[0, -1]
    whole = bits_per_byte(constant_model, windows, TOKEN_BYTES, batch_size=10)
    padded = bits_per_byte(constant_model, windows, TOKEN_BYTES, batch_size=3)  # 3+3+3+1 (padded)
    assert padded.bytes == whole.bytes == int(TOKEN_BYTES[torch.from_numpy(tokens[1:41])].sum())
    assert padded.bpb == pytest.approx(whole.bpb)


def test_non_finite_or_misshapen_logits_are_errors():
    windows = val_windows(np.array([1, 2, 3, 1, 2]), seq_len=4, max_tokens=100)
    with pytest.raises(EvaluationError, match="non-finite"):
        bits_per_byte(lambda x: torch.full((*x.shape, 4), float("nan")), windows, TOKEN_BYTES, 1)
    with pytest.raises(EvaluationError, match="expected logits of shape"):
        bits_per_byte(lambda x: torch.zeros(*x.shape, 5), windows, TOKEN_BYTES, 1)


def _windows(n: int = 40, seq_len: int = 16, vocab: int = 50) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(0).integers(1, vocab, size=(n, seq_len + 1)))


def _prefix_model(x: torch.Tensor) -> torch.Tensor:
    """Causal: logits at i depend on tokens 0..i of the row (a cumulative one-hot count)."""
    return torch.nn.functional.one_hot(x, 50).float().cumsum(dim=1)


def test_probe_passes_a_causal_model():
    assert causality_probe(_prefix_model, _windows(), vocab_size=50, batch_size=8).causal


def test_probe_rejects_a_model_that_reads_the_next_token():
    def peeking(x: torch.Tensor) -> torch.Tensor:
        return _prefix_model(torch.roll(x, shifts=-1, dims=1))

    result = causality_probe(peeking, _windows(), vocab_size=50, batch_size=8)
    assert not result.causal and "sees the future" in result.detail


def test_probe_rejects_a_model_that_reads_the_neighbouring_row():
    def cross_row(x: torch.Tensor) -> torch.Tensor:
        return _prefix_model(x) + _prefix_model(torch.roll(x, shifts=-1, dims=0))[:, :1]

    assert not causality_probe(cross_row, _windows(), vocab_size=50, batch_size=8).causal
