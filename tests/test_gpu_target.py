"""The GPU target's train.py, run for real on CPU at toy size (only its constants change)."""

from __future__ import annotations

from pathlib import Path

from conftest import REPO, make_target, shrink

from shared.target.config import load_target
from shared.target.records import Budget
from shared.target.runner import run_target

GPU_TARGET = REPO / "targets" / "gpu_nanochat"
TOY = dict(DEPTH=2, ASPECT_RATIO=32, HEAD_DIM=32, DEVICE_BATCH_SIZE=8, GRAD_ACCUM_STEPS=2, COMPILE=False)


def test_gpu_target_frozen_config_matches_the_paper_setup():
    config = load_target(GPU_TARGET).config
    assert (config.time_budget_s, config.seq_len, config.tokenizer) == (300, 512, "bpe:8192")
    assert config.device == "cuda" and config.excluded_warmup_steps > 0


def test_gpu_train_py_learns_at_toy_size_on_cpu(small_corpus: Path, tmp_path: Path):
    source = shrink((GPU_TARGET / "train.py").read_text(), **TOY)
    target = load_target(make_target(tmp_path / "gpu_toy", small_corpus, source, seq_len=64, eval_tokens=8192))
    untrained = run_target(target, budget=Budget("steps", 1))  # one micro-batch: no optimizer step yet
    trained = run_target(target, budget=Budget("steps", 60))  # 30 Muon + AdamW steps
    assert untrained.status == trained.status == "ok", (untrained.error_tail, trained.error_tail)
    assert untrained.val_bpb > 7.5  # zero-initialised head: uniform over 257 byte tokens, log2(257) = 8.006
    assert trained.val_bpb < untrained.val_bpb - 2.0, (trained.val_bpb, untrained.val_bpb)
