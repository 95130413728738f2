"""The `autoresearch` commands, as a user runs them (the loop's own in tests/test_loop.py)."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
from conftest import make_target

from services.executor.runs import unrun_result
from shared.cli import describe, main, table
from shared.diffs import EMPTY_SHA256
from shared.events import (
    PolicyUpdated,
    PPOStats,
    ProposalCreated,
    RunAborted,
    RunFinished,
    RunProgress,
    encode,
    new_id,
    now,
    subject,
)
from shared.target.records import Budget, RunResult


def test_target_run_prints_the_result_record(small_corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    target = make_target(tmp_path / "t", small_corpus)
    assert main(["target", "run", str(target), "--budget-steps", "3", "--seed", "1"]) == 0
    captured = capsys.readouterr()
    result = msgspec.json.decode(captured.out, type=RunResult)
    assert result.status == "ok" and result.steps == 3 and result.seed == 1 and result.budget == "3 steps"
    assert "training" in captured.err and "evaluating" in captured.err


def test_errors_are_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture):
    assert main(["target", "run", str(tmp_path)]) == 2
    assert "is not a research target: prepare.py is missing" in capsys.readouterr().err
    assert main(["target", "run", "targets/cpu_gpt", "--budget-steps", "0"]) == 2
    assert "a budget must be positive" in capsys.readouterr().err


def test_tail_prints_one_readable_line_per_event_and_names_a_malformed_one():
    made = {"event_id": new_id(), "producer": "test/1", "ts": now()}
    finished = RunFinished(**made, run_id="p1-1", proposal_id="p1", executor_id="e/1",
                           result=unrun_result("crashed", "train.py raised\nKeyError: 'x'", Budget("steps", 12), 0))
    events = [
        ProposalCreated(**made, proposal_id="p1", parent_code_sha256=EMPTY_SHA256, ops=[], unified_diff="",
                        policy="lm-score", policy_version="v0003", rationale="halve the learning rate"),
        RunProgress(**made, run_id="p1-1", proposal_id="p1", executor_id="e/1", phase="training",
                    elapsed_train_s=3.0, budget_used=0.25, step=30, train_loss=2.5, tokens=100, peak_mem_mb=1.0),
        RunAborted(**made, run_id="p1-1", at_train_s=3.0, forecast=1.61, forecast_low=1.5, forecast_high=1.7,
                   threshold=1.42, statistic=5.0, boundary=2.9, commentary="cannot beat c*"),
        finished,
        PolicyUpdated(**made, policy_version="v0004", adapter_name="a", adapter_sha256="0" * 64,
                      stats=PPOStats(policy_loss=0.1, value_loss=0.2, entropy=1.5, approx_kl=0.01,
                                     clip_fraction=0.1, mean_reward=-0.25)),
    ]
    lines = [describe(subject(event), encode(event)) for event in events]
    assert [line.split()[1] for line in lines] == ["proposal", "progress", "ABORTED", "finished", "policy"]
    assert "p1  lm-score v0003 search: halve the learning rate" in lines[0]
    assert "p1-1  training step 30 loss 2.5000 25% of budget" in lines[1]
    assert "forecast 1.6100 vs threshold 1.4200; cannot beat c*" in lines[2]
    assert "crashed val_bpb - after 0.0 s training: train.py raised KeyError: 'x'" in lines[3]  # one line
    assert "v0004  mean reward -0.250 entropy 1.500" in lines[4]
    malformed = describe("run.finished.p1-1", b"{truncated")
    assert "malformed" in malformed and "run.finished.p1-1" in malformed


def test_sql_tables_align_numbers_right_and_say_null():
    lines = table(["name", "val_bpb"], [["baseline", 1.5], ["a much longer name" * 4, None]], width=20).splitlines()
    assert lines[0] == "        name         | val_bpb"
    assert lines[2] == "baseline             |     1.5"
    assert lines[3] == "a much longer namea… |    NULL" and lines[-1] == "(2 rows)"
