"""The harness end to end: real training processes, real exported models, honest val-bpb. Hostile train.py edits
(hangs, cheats, escapes) are rows of test_hostile.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import CPU_TARGET, make_target

from shared.target.config import load_target
from shared.target.data import prepare
from shared.target.records import Budget, Progress
from shared.target.runner import run_target

FEW_STEPS = Budget("steps", 6)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, small_corpus: Path) -> Path:
    return make_target(tmp_path_factory.mktemp("tiny"), small_corpus)


def _variant(tiny: Path, tmp_path: Path, source: str, **config: object) -> Path:
    """The tiny target with another train.py (and optionally another frozen config)."""
    corpus = load_target(tiny).config.corpus
    return make_target(tmp_path / "variant", corpus, source, **config)


def test_cpu_target_learns(data_root: Path):
    target = load_target(CPU_TARGET)
    untrained = run_target(target, budget=Budget("steps", 1))
    trained = run_target(target, budget=Budget("steps", 40))
    assert untrained.status == trained.status == "ok", (untrained.error_tail, trained.error_tail)
    manifest = prepare(target.config.corpus, target.config.tokenizer).manifest
    assert trained.corpus_sha256 == manifest["corpus_sha256"] and trained.tokenizer_id == manifest["tokenizer_id"]
    assert trained.steps == 40 and trained.tokens == 40 * 32 * target.config.seq_len
    assert 0.95 * target.config.eval_tokens < trained.eval_tokens <= target.config.eval_tokens  # separators unscored
    assert trained.val_bpb < untrained.val_bpb - 0.3, (trained.val_bpb, untrained.val_bpb)


def test_deterministic_budget_repeats_exactly(tiny: Path):
    first = run_target(load_target(tiny), budget=FEW_STEPS, seed=3)
    second = run_target(load_target(tiny), budget=FEW_STEPS, seed=3)
    assert first.status == second.status == "ok"
    assert first.val_bpb == second.val_bpb
    assert first.val_bpb > 1.0
    assert (first.steps, first.tokens) == (second.steps, second.tokens)
    assert first.code_sha256 == second.code_sha256
    other_seed = run_target(load_target(tiny), budget=FEW_STEPS, seed=4)
    assert other_seed.val_bpb != first.val_bpb


def test_progress_streams_in_order_and_the_time_budget_holds(tiny: Path):
    records: list[Progress] = []
    result = run_target(load_target(tiny), budget=Budget("seconds", 2.0), on_progress=records.append)
    assert result.status == "ok", result.error_tail
    assert 2.0 <= result.training_s < 3.0
    phases = [r.phase for r in records]
    assert phases[0] == "started" and phases[-1] == "evaluating" and "training" in phases
    steps = [r.step for r in records]
    assert steps == sorted(steps) and records[-1].step == result.steps
    assert records[-1].num_params == result.num_params > 0
    assert all(r.train_loss is None or r.train_loss > 0 for r in records)
    parts = (result.setup_s, result.startup_s, result.training_s, result.eval_s)
    assert all(part > 0 for part in parts) and sum(parts) <= result.total_s  # the rest: the model handed in


@pytest.mark.parametrize(
    ("source", "status", "error"),
    [
        ("def broken(:\n", "invalid", "does not compile"),
        ("from prepare import session\nenv = session()\n", "crashed", "without calling env.submit"),
        ("raise ValueError('boom in train.py')\n", "crashed",
         "train.py raised ValueError: boom in train.py (training process exited with code 1)"),
    ],
    ids=["syntax", "no-submit", "exception"],
)
def test_broken_train_py_is_contained_with_a_reason(tiny: Path, tmp_path: Path, source: str, status: str,
                                                    error: str):
    target = _variant(tiny, tmp_path, source, time_budget_s=1, startup_allowance_s=2, eval_allowance_s=2)
    result = run_target(load_target(target), budget=Budget("seconds", 1))
    assert result.status == status and error in result.error
    assert result.val_bpb is None
    if "boom" in source:
        assert "boom in train.py" in result.error_tail


def test_causal_shipped_target_passes_the_probe_and_reports_resources(tiny: Path):
    result = run_target(load_target(tiny), budget=FEW_STEPS)
    assert result.status == "ok" and result.error is None
    assert result.peak_mem_mb > 0 and result.startup_s > 0 and result.total_s > result.training_s


def test_garbage_on_the_progress_channel_is_ignored(tiny: Path, tmp_path: Path):
    garbage = (
        "import os\nfrom prepare import session\n"
        "fd = session()._channel.fileno()\n"
        "os.write(fd, b'\\xff\\xfe not json\\n' + b'x' * 200_000 + b'\\n{\"phase\": \"bogus\"}\\n')\n"
    )
    source = garbage + (tiny / "train.py").read_text()
    result = run_target(load_target(_variant(tiny, tmp_path, source)), budget=FEW_STEPS)
    assert result.status == "ok", result.error_tail
    assert result.steps == FEW_STEPS.amount
