"""The evaluator on the real bus: calibrated on the runs before, it aborts a deliberately bad edit,
the executor stops it, and the ledger's record of the run says why."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from conftest import chromium, make_target
from pages import live_card

from bench.loop import Loop
from services.ledger.store import Ledger
from shared.bus import Bus
from shared.curves import CurvesRequest, read_curves, write_curves
from shared.diffs import EMPTY_SHA256, code_sha256, ops_between, unified_diff
from shared.events import EditOp, ProposalCreated, new_id, now

STEPS = 240
LEARNING_RATES = (5e-4, 1e-3, 2e-3, 3e-3, 4.5e-3, 6e-3, 9e-3, 1.2e-2, 2e-2)
"""With the baseline's, the runs the evaluator calibrates on before the bad edit: the default warm-up's ten.
(With fewer, down to calibration.MIN_RUNS_PER_LINE, the Student-t factor widens every forecast a lot.)"""
CALIBRATION_RUNS = len(LEARNING_RATES) + 1


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, small_corpus: Path) -> Path:
    # One slot of two threads: a run trains its 240 steps in about 1.5 s, the window in which the evaluator must
    # abort the bad edit (with 120 steps, 0.5-0.8 s, it twice finished before the abort landed in a full suite).
    return make_target(tmp_path_factory.mktemp("evaluator_target"), small_corpus, progress_interval_s=0.02,
                       cpu_threads=2)


def _edit(parent: str, learning_rate: float) -> ProposalCreated:
    child = "\n".join(f"LEARNING_RATE = {learning_rate!r}  # edited" if line.startswith("LEARNING_RATE = ")
                      else line for line in parent.split("\n"))
    return ProposalCreated(event_id=new_id(), producer="test/1", ts=now(), proposal_id=new_id(),
                           parent_code_sha256=code_sha256(parent), ops=ops_between(parent, child),
                           unified_diff=unified_diff(parent, child), policy="test", policy_version="0",
                           rationale=f"LEARNING_RATE {learning_rate}")


async def _publish(url: str, *events: ProposalCreated) -> None:
    bus = await Bus.connect([url], "test")
    for event in events:
        await bus.publish(event)
    await bus.close()


def test_a_bad_edit_is_aborted_and_the_ledger_says_why(nats_server, tiny: Path, tmp_path: Path):
    loop = Loop(nats_server, tiny, tmp_path, EXECUTOR_BUDGET_AMOUNT=STEPS, EXECUTOR_PROGRESS_INTERVAL_S=0.02,
                EVALUATOR_WARMUP_RUNS=CALIBRATION_RUNS, EVALUATOR_AUDIT_FRACTION=0)
    baseline = (tiny / "train.py").read_text()
    loop.start("ledger", "executor", "evaluator")
    try:
        loop.wait_for(lambda: loop.count("SELECT 0") == 0, 60, "the ledger (and the stream)")
        first = ProposalCreated(  # the baseline first, so that the edits have a parent the ledger knows
            event_id=new_id(), producer="test/1", ts=now(), proposal_id="baseline", parent_code_sha256=EMPTY_SHA256,
            ops=[EditOp("insert", 1, 0, baseline)], unified_diff="", policy="test", policy_version="0")
        asyncio.run(_publish(nats_server.url, first, *(_edit(baseline, lr) for lr in LEARNING_RATES)))
        ok = "SELECT count(*) FROM experiments WHERE status = 'ok'"
        loop.wait_for(lambda: loop.count(ok) >= CALIBRATION_RUNS, 600, f"{CALIBRATION_RUNS} complete runs")
        bad = _edit(baseline, 0.0)  # no learning at all: the loss stays where it started
        asyncio.run(_publish(nats_server.url, bad))
        finished = f"SELECT count(*) FROM experiments WHERE proposal_id = '{bad.proposal_id}' AND finished_seq > 0"
        loop.wait_for(lambda: loop.count(finished) == 1, 180, "the bad edit to finish")
        with chromium() as browser:  # the dashboard's live page keeps an ended run a minute
            card = live_card(browser, f"http://127.0.0.1:{loop.http_port}", f"{bad.proposal_id}-1", "live-abort")
    finally:
        loop.stop()

    (status, commentary, training_s), = loop.sql(
        f"SELECT status, abort_commentary, training_s FROM experiments WHERE proposal_id = '{bad.proposal_id}'")
    assert status == "aborted"
    assert "τ" in commentary and "Λ" in commentary and "forecast val-bpb" in commentary
    (forecast, threshold, statistic, boundary, at), = loop.sql(
        "SELECT forecast, threshold, statistic, boundary, at_train_s FROM aborts")
    assert forecast > threshold and statistic >= boundary
    assert loop.sql("SELECT count(*) FROM experiments WHERE status = 'aborted'") == [(1,)]  # the good ones ran
    assert "aborted" in loop.log("evaluator")
    assert card["errors"] == card["outside"] == [] and card["curve"] == card["abort"] == card["threshold"] == 1
    assert card["forecasts"] == card["interval"] == 1 and "aborted: " + commentary[:20] in card["text"]  # its forecast

    ledger = Ledger(tmp_path / "ledger.duckdb", read_only=True)
    curves = ledger.curves(CurvesRequest(complete_only=False))
    ledger.close()
    assert [c.complete for c in curves] == [True] * CALIBRATION_RUNS + [False]  # the aborted run is not complete
    for curve in curves:
        assert len(curve.used) == len(curve.loss) >= 10 and curve.used == sorted(curve.used)
        assert curve.used[0] >= 0 and curve.used[-1] <= 1
    # stopped before its budget ran out; with ten calibration runs the Student-t factor and the outlier's leverage
    # widen the forecast, so when (40-80% of the budget) varies with the timing of the progress points
    assert curves[-1].status == "aborted" and curves[-1].used[-1] < 0.95
    write_curves(tmp_path / "curves.jsonl", curves)
    assert read_curves(tmp_path / "curves.jsonl") == curves

