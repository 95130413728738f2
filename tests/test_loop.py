"""The loop end to end: real nats-server, the three services as processes, the CPU target in
deterministic budget mode; bad events and edits on the way. (kill -9 of each service: test_faults.py.)"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import math
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from conftest import chromium, make_target
from pages import watch_live_run

from bench.executor import REPORTS, split
from bench.loop import Loop
from services.ledger.store import Ledger
from shared import queries
from shared.bus import Bus
from shared.diffs import EMPTY_SHA256, code_sha256
from shared.events import STREAM, EditOp, ProposalCreated, RunAborted, new_id, now

FINISHED = "SELECT count(*) FROM experiments WHERE finished_seq IS NOT NULL"
TRAINING = "SELECT count(*) FROM events WHERE kind = 'run.progress' AND payload->>'phase' = 'training'"
MALFORMED = {
    "proposal.created": b"{not json",
    "run.progress.r1": b"\xff\xfe invalid utf-8",
    "run.aborted.r1": b'{"event_id": 5}',
    "run.finished.r1": b"[]",
    "policy.updated": b"null",
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, small_corpus: Path) -> Path:
    return make_target(tmp_path_factory.mktemp("loop_target"), small_corpus, progress_interval_s=0.05)


async def _publish_raw(url: str, messages: dict[str, bytes]) -> None:
    bus = await Bus.connect([url], "test")
    for subject, data in messages.items():
        await bus.js.publish(subject, data, stream=STREAM)
    await bus.close()


async def _publish(url: str, event: ProposalCreated) -> None:
    bus = await Bus.connect([url], "test")
    await bus.publish(event)
    await bus.close()


async def _last_seq(url: str) -> int:
    bus = await Bus.connect([url], "test")
    last = (await bus.js.stream_info(STREAM)).state.last_seq
    await bus.close()
    return last


def assert_every_event_once(loop: Loop, url: str) -> None:
    """Every stream message is in the ledger exactly once: as an event or as a recorded bad one."""
    last = asyncio.run(_last_seq(url))
    (events, distinct_seqs, distinct_ids), = loop.sql("SELECT count(*), count(DISTINCT seq), "
                                                      "count(DISTINCT event_id) FROM events")
    (bad,), = loop.sql("SELECT count(*) FROM bad_events")
    assert events == distinct_seqs == distinct_ids
    assert events + bad == last
    doubled = loop.sql("SELECT proposal_id FROM events WHERE kind = 'run.finished' GROUP BY 1 HAVING count(*) > 1")
    assert doubled == []


def test_random_search_loop_end_to_end(nats_server, tiny: Path, tmp_path: Path):
    loop = Loop(nats_server, tiny, tmp_path, PROPOSER_MAX_EXPERIMENTS=7, EXECUTOR_SLOTS=2).start()
    baseline = (tiny / "train.py").read_text()
    try:
        loop.wait_for(lambda: loop.count("SELECT count(*) FROM experiments") >= 1, 120, "the baseline proposal")
        asyncio.run(_publish_raw(nats_server.url, MALFORMED))
        bad_reference = ProposalCreated(
            event_id=new_id(), producer="test/1", ts=now(), proposal_id="bad-line-reference",
            parent_code_sha256=code_sha256(baseline), ops=[EditOp("replace", 9999, 9999, "N_LAYER = 3\n")],
            unified_diff="", policy="test", policy_version="0")
        asyncio.run(_publish(nats_server.url, bad_reference))
        loop.wait_for(lambda: loop.count(FINISHED) >= 7, 600, "seven finished experiments")
        loop.wait_for(lambda: "TERMINATE" in loop.log("proposer"), 30, "the proposer to stop at max_experiments")
        assert all(loop.alive(name) for name in ("ledger", "executor", "proposer"))
    finally:
        loop.stop()

    assert_every_event_once(loop, nats_server.url)
    parts, duty = split(loop.sql(REPORTS))  # where each slot's time went, by its reports (bench/executor.py)
    assert len(parts) >= 7 - 2 and 1 <= len(duty) <= 2 and all(0 < share < 1 for share in duty)
    assert all(seconds >= -0.01 for experiment in parts for seconds in experiment.values()), parts  # they add up
    assert all(experiment["training"] > 0 and experiment["evaluation"] > 0 for experiment in parts
               if experiment["startup"] > 0)  # every run that started trained and was judged
    bad = dict(loop.sql("SELECT subject, reason FROM bad_events"))
    assert sorted(bad) == sorted(MALFORMED) and all(bad.values())
    assert loop.log("executor").count("skipping malformed proposal") == 1  # termed, not redelivered

    invalid, = loop.sql("SELECT status, error FROM experiments WHERE proposal_id = 'bad-line-reference'")
    assert invalid[0] == "invalid" and "9999" in invalid[1]

    rows = loop.sql("SELECT proposal_id, parent_code_sha256, status, val_bpb, is_new_best, code_sha256, purpose, "
                    "repeat_of, seed, keep, beat_by, sigma_noise FROM experiments WHERE policy = 'random-search' "
                    "ORDER BY finished_seq")
    assert len(rows) == 6
    first, = loop.sql("SELECT proposal_id, parent_code_sha256, status, code_sha256 FROM experiments "
                      "ORDER BY proposal_seq LIMIT 1")
    assert first[1:] == (EMPTY_SHA256, "ok", code_sha256(baseline))  # two slots: the baseline need not finish first
    noise = [row for row in rows if row[6] == "noise"]  # then the baseline twice more, with fresh seeds
    assert len(noise) == 2 and all(row[7] == first[0] and row[1] == row[5] == code_sha256(baseline) for row in noise)
    assert len({0, *(row[8] for row in noise)}) == 3  # neither the executor's seed 0 nor each other's
    baseline_bpbs = [row[3] for row in rows if row[0] == first[0] or row in noise]
    assert len(baseline_bpbs) == 3 and len(set(baseline_bpbs)) == 3  # another seed, another val_bpb

    ledger = Ledger(loop.data_dir / "ledger.duckdb", read_only=True)
    state = ledger.state()
    ledger.close()
    runs: dict[str, list[float]] = {}
    for code, val_bpb in loop.sql("SELECT code_sha256, val_bpb FROM experiments WHERE status = 'ok'"):
        runs.setdefault(code, []).append(val_bpb)
    spread = [values for values in runs.values() if len(values) > 1]
    squares = sum(((np.array(values) - np.mean(values)) ** 2).sum() for values in spread)
    assert state.noise_dof == sum(len(values) - 1 for values in spread) >= 2
    assert state.sigma_noise == pytest.approx(math.sqrt(squares / state.noise_dof), rel=1e-9)

    for *_, is_new_best, _, purpose, repeat_of, _, keep, beat_by, sigma in rows:  # the keep gate
        assert is_new_best == (keep in ("new best", "confirmed"))
        if purpose == "confirm":
            candidate, = [row for row in rows if row[0] == repeat_of]
            assert candidate[9] in ("unconfirmed", "confirmed", "refuted") and keep is None
        elif beat_by is not None:  # an ok search run after the first ok run
            if keep == "new best":  # a clear win
                assert sigma is not None and beat_by > state.confirm_sigmas * sigma
            elif keep is not None:  # an unconfirmed best, maybe decided since
                assert beat_by > 0 and (sigma is None or beat_by <= state.confirm_sigmas * sigma)
            else:
                assert beat_by <= 0
    champions = loop.sql("SELECT val_bpb, code_sha256 FROM champions ORDER BY finished_seq")
    values = [value for value, _ in champions]  # c* moves only on an improvement
    assert values == sorted(values, reverse=True) and len(set(values)) == len(values)
    assert champions[-1] == (state.bpb_star, state.c_star_sha256)

    for proposal_id, parent_sha, status, _, _, code_sha, purpose, *_ in rows:  # one change to its parent
        if proposal_id == first[0]:
            continue
        (parent,), = loop.sql(f"SELECT code FROM code_blobs WHERE sha256 = '{parent_sha}'")
        (ops,), = loop.sql(f"SELECT payload->'ops' FROM events WHERE proposal_id = '{proposal_id}' "
                           "AND kind = 'proposal.created'")
        if purpose != "search":  # a repeat: no change at all
            assert ops == "[]" and code_sha == parent_sha
            continue
        assert ops.count('"op"') == 1
        if status == "ok":
            (child,), = loop.sql(f"SELECT code FROM code_blobs WHERE sha256 = '{code_sha}'")
            assert child != parent

    tables = ("experiments", "champions", "candidates", "code_blobs", "history")
    before = {table: loop.sql(f"SELECT * FROM {table} ORDER BY ALL") for table in tables}
    cli_in(loop, "replay")
    assert {table: loop.sql(f"SELECT * FROM {table} ORDER BY ALL") for table in tables} == before

    query = "SELECT proposal_id, status, val_bpb, error FROM experiments ORDER BY finished_seq"  # the CLI's formats
    expected = loop.sql(query)
    lines = cli_in(loop, "sql", query).splitlines()
    assert lines[0].split() == ["proposal_id", "|", "status", "|", "val_bpb", "|", "error"]
    assert lines[-1] == f"({len(expected)} rows)" and len(lines) == len(expected) + 3
    assert "NULL" in lines[2 + expected.index(invalid_row := next(r for r in expected if r[2] is None))]
    assert invalid_row[1] != "ok"
    parsed = list(csv.reader(io.StringIO(cli_in(loop, "sql", query, "--csv"))))
    assert parsed[0] == ["proposal_id", "status", "val_bpb", "error"] and len(parsed) == len(expected) + 1
    assert [float(row[2]) for row in parsed[1:] if row[2]] == [row[2] for row in expected if row[2] is not None]
    as_json = [json.loads(line) for line in cli_in(loop, "sql", query, "--json").splitlines()]
    assert [tuple(row.values()) for row in as_json] == expected
    cli_in(loop, "report", "--out", str(tmp_path / "report"))  # the ledger file, offline
    assert "<h2>Kept edits</h2>" in (tmp_path / "report" / "report.html").read_text()


def cli_in(loop: Loop, *argv: str) -> str:
    """What an `autoresearch` command prints, run with the loop's settings."""
    result = subprocess.run([sys.executable, "-m", "shared.cli", *argv], env=loop.env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_executor_obeys_run_aborted_within_a_second_and_aborts_a_diverged_loss(nats_server, tiny: Path,
                                                                                tmp_path: Path):
    loop = Loop(nats_server, tiny, tmp_path, EXECUTOR_BUDGET_AMOUNT=100_000).start("ledger", "executor")
    baseline = (tiny / "train.py").read_text()
    lr_line = next(n for n, line in enumerate(baseline.splitlines(), 1) if line.startswith("LEARNING_RATE ="))
    long_run = ProposalCreated(event_id=new_id(), producer="test/1", ts=now(), proposal_id="long-run",
                               parent_code_sha256=EMPTY_SHA256, ops=[EditOp("insert", 1, 0, baseline)],
                               unified_diff="", policy="test", policy_version="0")
    diverging = ProposalCreated(event_id=new_id(), producer="test/1", ts=now(), proposal_id="diverging",
                                parent_code_sha256=code_sha256(baseline),
                                ops=[EditOp("replace", lr_line, lr_line, "LEARNING_RATE = 1e6\n")],
                                unified_diff="", policy="test", policy_version="0")
    try:
        loop.wait_for(lambda: loop.count("SELECT 1") == 1, 60, "the ledger (which creates the stream)")
        asyncio.run(_publish(nats_server.url, long_run))
        asyncio.run(_publish(nats_server.url, diverging))
        loop.wait_for(lambda: loop.count(TRAINING) >= 1, 180, "the long run in training")
        assert asyncio.run(_running(nats_server.url, "long-run")) == "long-run-1"  # what a redelivery asks first
        assert asyncio.run(_running(nats_server.url, "diverging")) is None  # queued: no executor answers
        with chromium() as browser:  # the dashboard's live page while the run trains
            live = watch_live_run(browser, f"http://127.0.0.1:{loop.http_port}", "long-run-1", "live-run")
        aborted_at = asyncio.run(_abort(nats_server.url, "long-run-1"))
        loop.wait_for(lambda: loop.count(FINISHED) >= 2, 300, "both runs to end")
    finally:
        loop.stop()
    (status, error, finished_at), = loop.sql("SELECT status, error, finished_at FROM experiments "
                                             "WHERE proposal_id = 'long-run'")
    assert status == "aborted" and "forecast 9.9" in error
    assert (datetime.fromisoformat(finished_at) - aborted_at).total_seconds() < 1.5
    assert live["errors"] == live["outside"] == [] and live["after"] > live["before"] >= 1
    (status, error), = loop.sql("SELECT status, error FROM experiments WHERE proposal_id = 'diverging'")
    assert status == "aborted" and ("non-finite" in error or "exploded" in error), error


async def _running(url: str, proposal_id: str) -> str | None:
    bus = await Bus.connect([url], "test")
    try:
        answer = await bus.request(queries.RUNNING, queries.RunningRequest(proposal_id), queries.RunningReply, 2.0)
        return answer.run_id
    except TimeoutError:
        return None
    finally:
        await bus.close()


async def _abort(url: str, run_id: str):
    event = RunAborted(event_id=new_id(), producer="evaluator/test", ts=now(), run_id=run_id, at_train_s=1.0,
                       forecast=9.9, forecast_low=9.0, forecast_high=10.0, threshold=2.0, statistic=5.0,
                       boundary=3.0, commentary="forecast 9.9 cannot beat 2.0")
    bus = await Bus.connect([url], "test")
    await bus.publish(event)
    await bus.close()
    return event.ts.replace(tzinfo=None)
