"""The ledger file: exactly-once appends, projections equal to their replay, c* and h, fenced SQL, HTTP API."""

from __future__ import annotations

import statistics
from pathlib import Path

import duckdb
import pytest
from fastapi.testclient import TestClient

from services.ledger.api import create_app
from services.ledger.projections import PROJECTION_TABLES
from services.ledger.sql import QueryRefused
from services.ledger.store import Ledger
from shared.bus import Delivered
from shared.diffs import EMPTY_SHA256, code_sha256
from shared.events import (
    EditOp,
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
from shared.target.records import RunResult, Status

BASELINE = "lr = 0.1\nsteps = 10\n"


def variant(n: int) -> str:
    return f"lr = 0.{n}\nsteps = 10\n"


class Log:
    """Events of shared/events.py delivered in stream order (seq 1, 2, ...), as the ledger receives them."""

    def __init__(self) -> None:
        self.seq = 0

    def deliver(self, *events) -> list[Delivered]:
        out = []
        for event in events:
            self.seq += 1
            out.append(Delivered(self.seq, subject(event), encode(event)))
        return out

    @staticmethod
    def propose(parent: str, child: str, ops: list[EditOp] | None = None, parent_sha: str | None = None,
                proposal_id: str | None = None) -> ProposalCreated:
        if ops is None:  # the whole file: inserted into the empty file, or replacing every parent line
            ops = [EditOp("insert", 1, 0, child)] if not parent else [EditOp("replace", 1, parent.count("\n"), child)]
        sha = parent_sha if parent_sha is not None else (code_sha256(parent) if parent else EMPTY_SHA256)
        return ProposalCreated(event_id=new_id(), producer="proposer/test", ts=now(),
                               proposal_id=proposal_id or new_id(), parent_code_sha256=sha, ops=ops,
                               unified_diff=f"-{parent!r}\n+{child!r}", policy="test", policy_version="v0",
                               logprob=-1.5, value=0.25, rationale="because")

    @staticmethod
    def progress(proposal: ProposalCreated, run_id: str, step: int = 0) -> RunProgress:
        return RunProgress(event_id=new_id(), producer="executor/test", ts=now(), run_id=run_id,
                           proposal_id=proposal.proposal_id, executor_id="executor/test", phase="training",
                           elapsed_train_s=step * 0.5, step=step, train_loss=3.0 - step * 0.01, tokens=step * 64,
                           peak_mem_mb=100.0)

    @staticmethod
    def finish(proposal: ProposalCreated, run_id: str, code: str, status: Status = "ok",
               val_bpb: float | None = 1.5) -> RunFinished:
        result = RunResult(status=status, val_bpb=val_bpb if status == "ok" else None, training_s=30.0, startup_s=2.0,
                           total_s=35.0, steps=100, tokens=6400, peak_mem_mb=120.0, num_params=1000,
                           code_sha256=code_sha256(code), corpus_sha256="c" * 64, tokenizer_id="byte", eval_tokens=4096,
                           budget="30 seconds", seed=0, device="cpu", sandbox="none",
                           error=None if status == "ok" else f"{status}!", error_tail=None)
        return RunFinished(event_id=new_id(), producer="executor/test", ts=now(), run_id=run_id,
                           proposal_id=proposal.proposal_id, executor_id="executor/test", result=result)

    @staticmethod
    def abort(run_id: str, commentary: str = "forecast 1.61 ± 0.02 cannot beat τ 1.52") -> RunAborted:
        return RunAborted(event_id=new_id(), producer="evaluator/test", ts=now(), run_id=run_id, at_train_s=10.0,
                          forecast=1.61, forecast_low=1.59, forecast_high=1.63, threshold=1.52, statistic=3.1,
                          boundary=2.5, commentary=commentary)

    def experiment(self, parent: str, child: str, status: Status = "ok", val_bpb: float | None = 1.5,
                   progress: int = 3) -> tuple[ProposalCreated, list[Delivered]]:
        """A whole experiment: proposal, some progress, the end (and the abort before an aborted end)."""
        proposal = self.propose(parent, child)
        run_id = f"{proposal.proposal_id[:8]}-1"
        events = [proposal, *(self.progress(proposal, run_id, step) for step in range(progress))]
        if status == "aborted":
            events.append(self.abort(run_id))
        events.append(self.finish(proposal, run_id, child, status, val_bpb))
        return proposal, self.deliver(*events)


@pytest.fixture
def ledger(tmp_path: Path):
    ledger = Ledger(tmp_path / "ledger.duckdb")
    yield ledger
    ledger.close()


def tables(ledger: Ledger) -> dict[str, list[tuple]]:
    """Every projection table, sorted, for row-for-row comparison."""
    con = ledger._con.cursor()
    try:
        return {name: sorted(con.execute(f"SELECT * FROM {name}").fetchall(), key=repr) for name in PROJECTION_TABLES}
    finally:
        con.close()


# -- exactly once --------------------------------------------------------------------------------


def test_append_is_exactly_once(ledger: Ledger):
    log = Log()
    _, batch = log.experiment("", BASELINE)
    first = ledger.append(batch)
    assert (first.appended, first.duplicates, first.bad, first.cursor) == (len(batch), 0, 0, log.seq)

    again = ledger.append(batch)  # a redelivered batch: every seq is <= cursor
    assert (again.appended, again.duplicates, again.cursor) == (0, 0, log.seq)

    proposal = Log.propose("", "x = 1\n")
    retried = log.deliver(proposal, proposal)  # a publish retried after the duplicate window: two seqs, one id
    report = ledger.append(retried)
    assert (report.appended, report.duplicates, report.cursor) == (1, 1, log.seq)
    later = ledger.append(log.deliver(proposal))  # ... or the retry lands in a later batch (the slow path)
    assert (later.appended, later.duplicates, later.cursor) == (0, 1, log.seq)

    stale = Delivered(1, subject(proposal), encode(Log.propose("", "y = 2\n")))  # below the cursor: skipped
    assert ledger.append([stale]).appended == 0
    count = ledger.query("SELECT count(*), count(DISTINCT event_id) FROM events").rows[0]
    assert count == [len(batch) + 1, len(batch) + 1]
    assert ledger.state().experiments == 2


def test_cursor_survives_reopen_and_reads_only(tmp_path: Path):
    path = tmp_path / "ledger.duckdb"
    log = Log()
    writer = Ledger(path)
    writer.append(log.experiment("", BASELINE, val_bpb=1.7)[1])
    expected = writer.state()
    writer.close()

    reader = Ledger(path, read_only=True)
    try:
        assert reader.cursor == log.seq
        assert reader.state() == expected
        assert reader.code(expected.c_star_sha256) == BASELINE
        with pytest.raises(duckdb.Error):
            reader.append(log.experiment(BASELINE, variant(2))[1])
        assert reader.query("SELECT count(*) FROM experiments").rows == [[1]]
    finally:
        reader.close()


def test_bad_payloads_are_recorded_not_raised(ledger: Ledger):
    log = Log()
    proposal = Log.propose("", BASELINE)
    progress = Log.progress(proposal, "run-1")
    batch = [
        Delivered(1, "proposal.created", b"{not json"),
        Delivered(2, "run.progress.other-run", encode(progress)),  # subject and run_id disagree
        Delivered(3, "nonsense.subject", b"{}"),
        Delivered(4, "proposal.created", b"\xff\xfe"),
    ]
    log.seq = 4
    batch += log.deliver(proposal)
    report = ledger.append(batch)
    assert (report.appended, report.bad, report.cursor) == (1, 4, 5)
    bad = ledger.query("SELECT seq, subject, reason FROM bad_events ORDER BY seq").rows
    assert [row[0] for row in bad] == [1, 2, 3, 4]
    assert "malformed ProposalCreated" in bad[0][2]
    assert "does not match run_id" in bad[1][2]
    assert "no event is defined" in bad[2][2]
    assert all(row[2] for row in bad)


# -- c*, history, sigma_h ------------------------------------------------------------------------


def test_c_star_moves_only_on_strict_improvement(ledger: Ledger):
    log = Log()
    assert ledger.state().c_star_sha256 is None
    ledger.append(log.experiment("", BASELINE, val_bpb=1.50)[1])
    state = ledger.state()
    assert (state.bpb_star, state.c_star_code, state.since_best) == (1.50, BASELINE, 0)

    steps = [(variant(2), "ok", 1.60, 1.50, BASELINE),       # worse: revert
             (variant(3), "ok", 1.40, 1.40, variant(3)),      # better: keep
             (variant(4), "crashed", None, 1.40, variant(3)),  # crashed: revert
             (variant(5), "aborted", None, 1.40, variant(3)),  # aborted by the evaluator: revert
             (variant(6), "ok", 1.40, 1.40, variant(3))]      # equal: not strictly better, revert
    for child, status, bpb, bpb_star, c_star in steps:
        parent = ledger.state().c_star_code
        ledger.append(log.experiment(parent, child, status, bpb)[1])
        state = ledger.state()
        assert (state.bpb_star, state.c_star_code) == (bpb_star, c_star), child
        assert state.c_star_sha256 == code_sha256(c_star)
    assert state.since_best == 3 and state.finished == 6 and state.outstanding == 0
    champions = ledger.query("SELECT val_bpb, improvement FROM champions ORDER BY finished_seq").rows
    assert champions[0] == [1.50, None] and champions[1][0] == 1.40
    assert champions[1][1] == pytest.approx(0.10)
    statuses = ledger.query("SELECT status, abort_commentary IS NOT NULL FROM experiments ORDER BY proposal_seq").rows
    assert [s for s, _ in statuses] == ["ok", "ok", "ok", "crashed", "aborted", "ok"]
    assert [a for _, a in statuses] == [False, False, False, False, True, False]


def test_status_queued_running_and_first_finish_wins(ledger: Ledger):
    log = Log()
    proposal = Log.propose("", BASELINE)
    ledger.append(log.deliver(proposal))
    assert _status(ledger, proposal) == ("queued", None)
    assert ledger.state().outstanding == 1 and not ledger.finished(proposal.proposal_id)

    ledger.append(log.deliver(Log.progress(proposal, "run-1")))
    assert _status(ledger, proposal) == ("running", "run-1")
    ledger.append(log.deliver(Log.progress(proposal, "run-2")))  # redelivered to another executor
    assert _status(ledger, proposal) == ("running", "run-2")

    ledger.append(log.deliver(Log.finish(proposal, "run-2", BASELINE, "crashed"),
                              Log.finish(proposal, "run-1", BASELINE, "ok", 1.2)))
    assert _status(ledger, proposal) == ("crashed", "run-2")
    assert ledger.finished(proposal.proposal_id) and ledger.state().c_star_sha256 is None


def _status(ledger: Ledger, proposal: ProposalCreated) -> tuple:
    rows = ledger.query(f"SELECT status, run_id FROM experiments WHERE proposal_id = '{proposal.proposal_id}'").rows
    return tuple(rows[0])


def test_history_buffer_top5_and_sigma_h(ledger: Ledger):
    log = Log()
    ledger.append(log.experiment("", BASELINE, val_bpb=2.0)[1])
    assert ledger.state().sigma_h is None  # one ok run: no spread yet
    bpbs = [2.0]
    for n in range(1, 41):  # val_bpb goes 1.0 (best, early) ... up; every 7th run crashes
        status: Status = "crashed" if n % 7 == 0 else "ok"
        bpb = 1.0 + n * 0.01 if n < 6 else 1.5 + (n % 5) * 0.01
        ledger.append(log.experiment(BASELINE, variant(n), status, bpb)[1])
        bpbs.append(bpb if status == "ok" else None)
    state = ledger.state()
    assert state.finished == 41
    recent = bpbs[-32:]
    assert state.sigma_h == pytest.approx(statistics.stdev([b for b in recent if b is not None]))

    whys = [entry.why for entry in state.history]
    assert whys.count("recent") + whys.count("both") == 32
    top = sorted((entry for entry in state.history if entry.why in ("top", "both")), key=lambda e: e.val_bpb)
    assert [entry.val_bpb for entry in top] == pytest.approx([1.01, 1.02, 1.03, 1.04, 1.05])
    assert len(state.history) == 37  # the five best finished before the last 32
    assert all(entry.unified_diff for entry in state.history)
    assert [entry.status for entry in state.history].count("crashed") == sum(b is None for b in recent)

    small = ledger.state(recent=4, top=2)
    assert len(small.history) == 6 and [e.why for e in small.history][:2] == ["top", "top"]
    assert ledger.query("SELECT count(*) FROM history").rows == [[37]]


def test_no_code_blob_for_unknown_parent_or_invalid_diff(ledger: Ledger):
    log = Log()
    baseline, batch = log.experiment("", BASELINE)
    unknown = Log.propose("x = 1\n", "x = 2\n")  # nobody ever produced the parent
    invalid = Log.propose(BASELINE, variant(9), ops=[EditOp("replace", 40, 50, "nope\n")])
    good = Log.propose(BASELINE, variant(8))
    ledger.append(batch + log.deliver(unknown, invalid, good))
    rows = dict((r[0], r[1:]) for r in ledger.query("SELECT proposal_id, code_sha256, code_error FROM proposals").rows)
    assert rows[unknown.proposal_id][0] is None and "unknown parent" in rows[unknown.proposal_id][1]
    assert rows[invalid.proposal_id][0] is None and "invalid diff" in rows[invalid.proposal_id][1]
    assert rows[good.proposal_id] == [code_sha256(variant(8)), None]
    assert ledger.code(code_sha256(variant(8))) == variant(8)
    assert ledger.code(code_sha256("x = 2\n")) is None
    assert ledger.code(EMPTY_SHA256) == ""
    assert ledger.query("SELECT count(*) FROM code_blobs").rows == [[2]]


# -- replay --------------------------------------------------------------------------------------


def busy_log() -> list[Delivered]:
    """Every kind of event and every awkward case: duplicates, redeliveries, bad messages, aborts."""
    log = Log()
    baseline, out = log.experiment("", BASELINE, val_bpb=1.5)
    for n, (status, bpb) in enumerate([("ok", 1.6), ("ok", 1.4), ("aborted", None), ("crashed", None),
                                       ("ok", 1.4), ("ok", 1.3), ("invalid", None)], start=1):
        out += log.experiment(BASELINE, variant(n), status, bpb, progress=n)[1]
    again = Log.propose(BASELINE, variant(20))
    out += log.deliver(again, Log.progress(again, "a-1"), Log.progress(again, "a-2"),  # redelivered: two runs
                       Log.finish(again, "a-1", variant(20), "ok", 1.2),
                       Log.finish(again, "a-2", variant(20), "ok", 1.1))
    out += log.deliver(again)  # the same event id at a later sequence
    out += log.deliver(Log.propose(BASELINE, variant(21), proposal_id=again.proposal_id))  # same proposal id, new event
    out += log.deliver(Log.propose(BASELINE, variant(22)), Log.propose("z\n", "zz\n"))  # queued; unknown parent
    out += log.deliver(PolicyUpdated(event_id=new_id(), producer="learner/test", ts=now(), policy_version="v1",
                                     adapter_name="adapter-v1", adapter_sha256="a" * 64,
                                     stats=PPOStats(policy_loss=0.1, value_loss=0.2, entropy=1.0, approx_kl=0.01,
                                                    clip_fraction=0.1, mean_reward=0.05)))
    out += log.deliver(Log.abort(f"{baseline.proposal_id[:8]}-1", "late"))  # about the first run, long finished
    log.seq += 1
    out.append(Delivered(log.seq, "run.finished.x", b"{}"))
    return out


@pytest.mark.parametrize("batch_size", [1, 7, 1000])
def test_replay_rebuilds_identical_tables(tmp_path: Path, batch_size: int):
    deliveries = busy_log()
    ledger = Ledger(tmp_path / "ledger.duckdb")
    try:
        for start in range(0, len(deliveries), batch_size):
            ledger.append(deliveries[start:start + batch_size])
        incremental, state = tables(ledger), ledger.state()
        assert incremental["experiments"] and incremental["champions"] and incremental["policy_updates"]
        assert ledger.query("SELECT abort_commentary FROM experiments ORDER BY proposal_seq LIMIT 1").rows == [["late"]]
        rows = ledger.replay()
        assert tables(ledger) == incremental
        assert ledger.state() == state
        assert rows == {name: len(incremental[name]) for name in PROJECTION_TABLES}
    finally:
        ledger.close()
    assert state.bpb_star == 1.2 and state.outstanding == 2


def test_changed_projection_code_replays_on_open(tmp_path: Path):
    path = tmp_path / "ledger.duckdb"
    ledger = Ledger(path)
    ledger.append(busy_log())
    expected = tables(ledger)
    ledger._con.execute("DELETE FROM experiments")
    ledger._con.execute("UPDATE meta SET value = 'built-by-older-code'")
    ledger.close()
    reopened = Ledger(path)
    try:
        assert tables(reopened) == expected
    finally:
        reopened.close()


# -- user SQL ------------------------------------------------------------------------------------


@pytest.mark.parametrize("sql", [
    "INSERT INTO events VALUES (1, 'x', 'y', 'z', now()::timestamp, 'p', NULL, NULL, '{}')",
    "UPDATE cursor SET seq = 0",
    "DELETE FROM events",
    "CREATE TABLE t (a INT)",
    "DROP TABLE events",
    "ATTACH '/tmp/other.duckdb' AS other",
    "COPY events TO '/tmp/events.csv'",
    "EXPORT DATABASE '/tmp/dump'",
    "INSTALL httpfs",
    "LOAD httpfs",
    "SET enable_external_access = true",
    "RESET lock_configuration",
    "PRAGMA enable_profiling",
    "CALL pragma_version()",
    "CHECKPOINT",
    "EXPLAIN ANALYZE DELETE FROM events",
    "WITH d AS (DELETE FROM events RETURNING *) SELECT count(*) FROM d",
    "SELECT * FROM events WHERE seq IN (WITH d AS (DELETE FROM events RETURNING seq) SELECT seq FROM d)",
    "EXPLAIN ANALYZE WITH d AS (UPDATE cursor SET seq = 0 RETURNING *) SELECT * FROM d",
    "WITH d AS (INSERT INTO meta VALUES ('a', 'b') RETURNING *) SELECT * FROM d",
    "SELECT 1; DELETE FROM events",
    "SELECT 1; SELECT 2",
    "",
    "SELEC 1",
])
def test_sql_refusals(ledger: Ledger, sql: str):
    ledger.append(Log().experiment("", BASELINE)[1])
    with pytest.raises(QueryRefused):
        ledger.query(sql)
    assert ledger.query("SELECT count(*) FROM events").rows == [[5]]


@pytest.mark.parametrize("sql", [
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM read_text('/etc/passwd')",
    "SELECT * FROM glob('/etc/*')",
    "SELECT * FROM read_parquet('/tmp/x.parquet')",
    "SELECT * FROM '/etc/passwd'",
])
def test_sql_cannot_touch_files(ledger: Ledger, sql: str):
    with pytest.raises(duckdb.Error) as refusal:  # PermissionException; a bare path is not even looked up
        ledger.query(sql)
    assert isinstance(refusal.value, duckdb.PermissionException | duckdb.CatalogException)
    assert "root:" not in str(refusal.value)


def test_sql_cannot_turn_file_access_back_on(ledger: Ledger):
    with pytest.raises(duckdb.Error):
        ledger._con.execute("SET enable_external_access = true")  # locked even for the ledger's own connection
    settings = ledger.query("SELECT name, value FROM duckdb_settings() "
                            "WHERE name IN ('enable_external_access', 'lock_configuration') ORDER BY name").rows
    assert settings == [["enable_external_access", "false"], ["lock_configuration", "true"]]


def test_select_answers_json_ready_rows(ledger: Ledger):
    ledger.append(Log().experiment("", BASELINE, val_bpb=1.25)[1])
    result = ledger.query("SELECT proposal_id, status, val_bpb, proposed_at, 1.5::DECIMAL(4, 2) AS d, "
                          "now() AS zoned, 'nan'::DOUBLE AS n FROM experiments")
    assert result.columns == ["proposal_id", "status", "val_bpb", "proposed_at", "d", "zoned", "n"]
    (row,) = result.rows
    assert row[1:3] == ["ok", 1.25] and row[4] == 1.5 and row[6] is None
    assert isinstance(row[3], str) and row[3][:4].isdigit() and isinstance(row[5], str)
    assert not result.truncated
    many = ledger.query("SELECT * FROM range(50)", max_rows=10)
    assert many.truncated and len(many.rows) == 10
    assert ledger.query("EXPLAIN SELECT * FROM events").columns
    assert ledger.query("WITH x AS (SELECT 2 AS a) FROM x").rows == [[2]]


def test_sql_time_limit(ledger: Ledger):
    with pytest.raises(TimeoutError):
        ledger.query("SELECT count(*) FROM range(10000000000) a", timeout_s=0.2)
    assert ledger.query("SELECT 1").rows == [[1]]


# -- HTTP ----------------------------------------------------------------------------------------


def test_http_api(ledger: Ledger):
    ledger.append(Log().experiment("", BASELINE, val_bpb=1.25)[1])
    client = TestClient(create_app(ledger))
    assert client.get("/health").json() == {"ok": True, "cursor": 5}
    state = client.get("/state").json()
    assert state["bpb_star"] == 1.25 and state["c_star_code"] == BASELINE and len(state["history"]) == 1
    (experiment,) = client.get("/experiments").json()
    assert experiment["status"] == "ok" and experiment["is_new_best"] is True
    answer = client.post("/sql", json={"sql": "SELECT kind, count(*) AS n FROM events GROUP BY kind ORDER BY kind"})
    assert answer.status_code == 200
    assert answer.json() == {"columns": ["kind", "n"], "truncated": False,
                             "rows": [["proposal.created", 1], ["run.finished", 1], ["run.progress", 3]]}
    refused = client.post("/sql", json={"sql": "DROP TABLE events"})
    assert refused.status_code == 400 and "only SELECT" in refused.json()["detail"]
    failing = client.post("/sql", json={"sql": "SELECT * FROM no_such_table"})
    assert failing.status_code == 400 and "no_such_table" in failing.json()["detail"]
    denied = client.post("/sql", json={"sql": "SELECT * FROM read_csv('/etc/passwd')"})
    assert denied.status_code == 400
    assert client.get("/experiments", params={"limit": 0}).status_code == 422


def test_sql_rolls_back_whatever_passes_the_guard(ledger: Ledger, monkeypatch: pytest.MonkeyPatch):
    """The third fence alone: with the guard switched off, a write still leaves no trace."""
    from services.ledger import sql

    ledger.append(Log().experiment("", BASELINE)[1])
    monkeypatch.setattr(sql, "guard", lambda con, text: text)
    deleted = ledger.query("WITH d AS (DELETE FROM events RETURNING *) SELECT count(*) FROM d")
    assert deleted.rows == [[5]]
    assert ledger.query("SELECT count(*) FROM events").rows == [[5]]


def test_readers_on_other_threads_never_see_half_a_batch(ledger: Ledger):
    import threading

    log, problems, done = Log(), [], threading.Event()

    def read() -> None:
        while not done.is_set():
            (row,) = ledger.query("SELECT (SELECT seq FROM cursor), (SELECT coalesce(max(seq), 0) FROM events), "
                                  "(SELECT count(*) FROM events), (SELECT coalesce(sum(steps), 0) FROM finishes)").rows
            if not (row[0] == row[1] == row[2] and row[3] * 5 == row[2] * 100):  # 5 events and 100 steps each
                problems.append(row)
            ledger.state()

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for n in range(40):
            ledger.append(log.experiment(BASELINE if n else "", variant(n + 1), val_bpb=2 - n / 100)[1])
    finally:
        done.set()
        reader.join()
    assert not problems
    assert ledger.state().finished == 40
