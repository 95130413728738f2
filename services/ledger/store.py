"""The ledger file: every event exactly once in DuckDB, the projections replayed from them, and the
questions the other services ask (state s_t, code by sha, has a proposal finished).

Exactly once: a batch, the projections it changes and the stream sequence it reached (`cursor`)
commit in one transaction. A redelivered batch is skipped by sequence, and an event published twice
(a retried publish stored at a second sequence) is stored once by its event id.

Threads: the owner of the Ledger (the ledger service's one database thread) appends through the main
connection; every read opens its own cursor, so readers from other threads (the HTTP API) see the last
commit and never a batch half-way.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import msgspec

from services.ledger import projections
from services.ledger import sql as user_sql
from services.ledger.curves import read_curves
from services.ledger.gate import sigma
from services.ledger.projections import DEFAULT_RECENT, DEFAULT_TOP, KIND, insert_rows, utc_naive
from services.ledger.sql import QueryResult
from services.ledger.transitions import read_transition, read_transitions
from shared.bus import Delivered
from shared.config import Ledger as Settings
from shared.curves import Curve, CurvesRequest
from shared.diffs import EMPTY_SHA256
from shared.events import (
    MAX_EVENT_BYTES,
    AnyEvent,
    BadEvent,
    ProposalCreated,
    RunAborted,
    RunFinished,
    RunProgress,
    decode,
)
from shared.queries import Candidate, HistoryEntry, LedgerState, Transition, TransitionsReply, TransitionsRequest

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS events (
        seq BIGINT NOT NULL,           -- JetStream stream sequence
        event_id VARCHAR PRIMARY KEY,  -- a retried publish is stored once
        subject VARCHAR NOT NULL,
        kind VARCHAR NOT NULL,         -- the subject without the run id: filter on it before touching payload
        ts TIMESTAMP NOT NULL,         -- UTC
        producer VARCHAR NOT NULL,
        run_id VARCHAR,
        proposal_id VARCHAR,
        payload JSON NOT NULL          -- the message as it was published
    )""",
    """CREATE TABLE IF NOT EXISTS bad_events (
        seq BIGINT NOT NULL,
        subject VARCHAR NOT NULL,
        reason VARCHAR NOT NULL,
        payload BLOB NOT NULL,
        received_at TIMESTAMP NOT NULL  -- UTC
    )""",
    "CREATE TABLE IF NOT EXISTS cursor (seq BIGINT NOT NULL)  -- the last stream sequence committed",
    "CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR NOT NULL)",
]
CONFIG = {
    "enable_external_access": False,  # no file, network or extension access, for any query
    "lock_configuration": True,  # so no statement can SET it back
    "python_enable_replacements": False,  # a table name never resolves to a variable of this process
    "autoload_known_extensions": False,
    "autoinstall_known_extensions": False,
}
FINGERPRINT_KEY = "projections"
"""meta row holding projections.fingerprint() of the code and gate that built the projection tables."""
GATE_KEY = "confirm_sigmas"
"""meta row holding the keep gate's confirm_sigmas the projection tables were judged with."""
_COUNTS = """SELECT count(*), count(finished_seq), min(proposed_at), count(*) FILTER (WHERE purpose = 'noise'),
                    arg_min(proposal_id, proposal_seq) FROM experiments"""
_CHAMPION = "SELECT code_sha256, val_bpb, finished_seq FROM champions ORDER BY finished_seq DESC LIMIT 1"
"""c*, bpb*: the last code the keep gate made c*."""
_FINISHED_AFTER = "SELECT count(*) FROM experiments WHERE finished_seq > $1"
"""Finished experiments since the last new best (the plateau rule)."""
_LEARNING = """SELECT (SELECT count(*) FROM experiments WHERE status = 'aborted'),
    (SELECT policy_version FROM policy_updates ORDER BY seq DESC LIMIT 1), (SELECT count(*) FROM policy_updates)"""
_NOISE = "SELECT noise_ss, noise_dof FROM experiments WHERE finished_seq IS NOT NULL ORDER BY finished_seq DESC LIMIT 1"
"""The pooled sums behind σ_noise, as the last finished run left them."""
_CANDIDATES = """
SELECT e.proposal_id, e.code_sha256, e.val_bpb, e.beat_by, e.sigma_noise, count(c.proposal_id),
       count(c.finished_seq)
FROM experiments e
LEFT JOIN experiments c ON c.repeat_of = e.proposal_id AND c.purpose = 'confirm' AND c.code_sha256 = e.code_sha256
WHERE e.keep = 'unconfirmed'
GROUP BY e.proposal_id, e.code_sha256, e.val_bpb, e.beat_by, e.sigma_noise, e.finished_seq
ORDER BY e.finished_seq"""
"""The unconfirmed bests still waiting, oldest first, with their confirmation runs (proposed, finished):
a confirmation counts only if it runs the candidate's code, as in gate.py."""


class AppendReport(msgspec.Struct, frozen=True):
    appended: int
    """Events stored by this batch."""
    duplicates: int
    """Events whose id was already stored (a retried publish at a later sequence)."""
    bad: int
    """Messages that are not valid events, recorded in bad_events."""
    cursor: int


class Ledger:
    def __init__(self, path: Path, *, read_only: bool = False, confirm_sigmas: float | None = None):
        """Open (and, if writable, create or upgrade) the ledger file, with file access off for the whole
        database and the configuration locked (CONFIG): user SQL can neither read the disk nor undo that.

        confirm_sigmas is the keep gate (shared.config.Ledger): a writable open with another value than
        the file was judged with replays it. None keeps the file's (a new file gets the default), so that
        a tool opening the file (`autoresearch replay`) never changes the gate the ledger service set."""
        self.path = Path(path)
        self.read_only = read_only
        self._con = duckdb.connect(str(self.path), read_only=read_only, config=CONFIG)
        self._readers = self._con.cursor()
        """Parent of every reader's cursor, so that reader threads never touch the appender's connection."""
        self._opening = threading.Lock()
        if not read_only:
            self._migrate(confirm_sigmas)
        with self._snapshot() as con:
            self._cursor = _read_cursor(con)
            self.confirm_sigmas = _gate(con)

    @property
    def cursor(self) -> int:
        """The last stream sequence committed."""
        return self._cursor

    # -- writing ---------------------------------------------------------------------------------

    def append(self, batch: Sequence[Delivered]) -> AppendReport:
        """Store a batch of deliveries and update the projections, all in one transaction."""
        fresh = sorted({d.seq: d for d in reversed(batch) if d.seq > self._cursor}.values(), key=lambda d: d.seq)
        if not fresh:
            return AppendReport(0, 0, 0, self._cursor)
        good, bad = _decode(fresh)
        try:
            appended = self._commit(good, bad, fresh[-1].seq, skip_known=False)
        except duckdb.ConstraintException:  # an event id stored before (a publish retried late): the slow path
            appended = self._commit(good, bad, fresh[-1].seq, skip_known=True)
        self._cursor = fresh[-1].seq
        return AppendReport(appended, len(good) - appended, len(bad), self._cursor)

    def _commit(self, good: list[tuple[Delivered, AnyEvent]], bad: list[tuple[Any, ...]], last: int,
                skip_known: bool) -> int:
        """One transaction: the events, the bad messages, the projections, the cursor."""
        with self._transaction() as con:
            appended = _insert_events(con, good, skip_known)
            insert_rows(con, "bad_events", bad)
            if appended and projections.project(con, self._cursor, last):
                projections.refresh_derived(con, self._cursor, last, self.confirm_sigmas)
            con.execute("UPDATE cursor SET seq = $1", [last])
        return appended

    def replay(self) -> dict[str, int]:
        """Drop the projection tables and rebuild them from `events`; returns rows per table."""
        with self._transaction() as con:
            rows = projections.replay(con, self._cursor, self.confirm_sigmas)
            _set_meta(con, FINGERPRINT_KEY, projections.fingerprint(self.confirm_sigmas))
        return rows

    def _migrate(self, confirm_sigmas: float | None) -> None:
        """Create what is missing; replay if the projections were built by different code or gate."""
        with self._transaction() as con:
            for ddl in SCHEMA:
                con.execute(ddl)
            if con.execute("SELECT count(*) FROM cursor").fetchone()[0] == 0:
                con.execute("INSERT INTO cursor VALUES (0)")
            gate = _gate(con) if confirm_sigmas is None else float(confirm_sigmas)
            _set_meta(con, GATE_KEY, repr(gate))
            if _meta(con, FINGERPRINT_KEY) != projections.fingerprint(gate):
                projections.replay(con, _read_cursor(con), gate)
                _set_meta(con, FINGERPRINT_KEY, projections.fingerprint(gate))

    @contextmanager
    def _transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        self._con.begin()
        try:
            yield self._con
        except BaseException:
            self._con.rollback()
            raise
        self._con.commit()

    # -- reading ---------------------------------------------------------------------------------

    @contextmanager
    def _snapshot(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A cursor of its own in a read transaction: several queries see one commit."""
        with self._opening:
            con = self._readers.cursor()
        try:
            con.begin()
            yield con
        finally:
            con.rollback()
            con.close()

    def state(self, recent: int = DEFAULT_RECENT, top: int = DEFAULT_TOP) -> LedgerState:
        """s_t as the proposer needs it: c*, bpb*, σ_h, σ_noise and the candidates awaiting confirmation,
        the history buffer h, and the counts."""
        with self._snapshot() as con:
            experiments, finished, first_proposed_at, noise_runs, baseline = con.execute(_COUNTS).fetchone()
            c_star, bpb_star, best_seq = con.execute(_CHAMPION).fetchone() or (None, None, 0)
            noise_ss, noise_dof = con.execute(_NOISE).fetchone() or (0.0, 0)
            aborted, policy_version, policy_updates = con.execute(_LEARNING).fetchone()
            return LedgerState(
                cursor=_read_cursor(con), experiments=experiments, finished=finished,
                outstanding=experiments - finished, c_star_sha256=c_star,
                c_star_code=_code(con, c_star) if c_star else None, bpb_star=bpb_star,
                sigma_h=con.execute(projections.sigma_h_sql(recent)).fetchone()[0],
                since_best=con.execute(_FINISHED_AFTER, [best_seq]).fetchone()[0],
                first_proposed_at=first_proposed_at.replace(tzinfo=UTC) if first_proposed_at else None,
                history=[HistoryEntry(proposal_id=row[0], status=row[2], val_bpb=row[3], unified_diff=row[4],
                                      abort_commentary=row[5], why=row[6])
                         for row in con.execute(projections.history_sql(recent, top)).fetchall()],
                confirm_sigmas=_gate(con), sigma_noise=sigma(noise_ss, noise_dof), noise_dof=noise_dof,
                baseline_proposal_id=baseline, noise_runs=noise_runs, aborted=aborted,
                policy_version=policy_version, policy_updates=policy_updates,
                candidates=[Candidate(proposal_id=row[0], code_sha256=row[1], val_bpb=row[2], beat_by=row[3],
                                      sigma_noise=row[4], confirmations=row[5], failed=row[6])
                            for row in con.execute(_CANDIDATES).fetchall()])

    def code(self, sha256: str) -> str | None:
        """The code with this sha (the empty file for EMPTY_SHA256), or None if no proposal produced it."""
        with self._snapshot() as con:
            return _code(con, sha256)

    def curves(self, request: CurvesRequest) -> list[Curve]:
        """Finished runs' training curves, oldest first (the evaluator's calibration set)."""
        with self._snapshot() as con:
            return read_curves(con, request)

    def transitions(self, request: TransitionsRequest) -> TransitionsReply:
        """The learner's pending PPO transitions, one page, with the counts and the published versions."""
        with self._snapshot() as con:
            return read_transitions(con, request)

    def transition(self, proposal_id: str) -> Transition | None:
        """One experiment as the learner sees it (with the context its reward is measured in), if it is a step
        of a language-model policy."""
        with self._snapshot() as con:
            return read_transition(con, proposal_id)

    def finished(self, proposal_id: str) -> bool:
        """Whether a run.finished exists for this proposal (a redelivered proposal must not run again)."""
        with self._snapshot() as con:
            return con.execute("SELECT count(*) > 0 FROM finishes WHERE proposal_id = $1", [proposal_id]).fetchone()[0]

    def experiments(self, limit: int = 100) -> list[dict[str, Any]]:
        """The latest experiments, newest first, as JSON-ready dicts."""
        with self._snapshot() as con:
            result = con.execute("SELECT * FROM experiments ORDER BY proposal_seq DESC LIMIT $1", [limit])
            names = [column[0] for column in result.description]
            return [{name: user_sql.jsonable(value) for name, value in zip(names, row, strict=True)}
                    for row in result.fetchall()]

    def query(self, sql: str, max_rows: int = 10_000, timeout_s: float = user_sql.DEFAULT_TIMEOUT_S) -> QueryResult:
        """A user's read-only SQL (services/ledger/sql.py says how it is fenced)."""
        with self._opening:
            con = self._readers.cursor()
        try:
            return user_sql.run(con, sql, max_rows, timeout_s)
        finally:
            con.close()

    def close(self) -> None:
        self._readers.close()
        self._con.close()


def _decode(fresh: Sequence[Delivered]) -> tuple[list[tuple[Delivered, AnyEvent]], list[tuple[Any, ...]]]:
    """(delivery, event) pairs, and bad_events rows for the messages that are not events."""
    good, bad = [], []
    received_at = utc_naive(datetime.now(UTC))
    for delivered in fresh:
        try:
            good.append((delivered, decode(delivered.subject, delivered.data)))
        except BadEvent as error:
            bad.append((delivered.seq, delivered.subject, str(error), delivered.data[:MAX_EVENT_BYTES], received_at))
    return good, bad


def _insert_events(con: duckdb.DuckDBPyConnection, good: list[tuple[Delivered, AnyEvent]], skip_known: bool) -> int:
    """Insert in one statement; an event id seen earlier in the batch is skipped, and one already in the
    file raises ConstraintException unless skip_known. (ON CONFLICT DO NOTHING is correct but about 15x
    slower once the table holds millions of rows, so it is kept for the rare batch that needs it.)"""
    first: dict[str, tuple[Delivered, AnyEvent]] = {}
    for delivered, event in good:
        first.setdefault(event.event_id, (delivered, event))
    rows = [_event_row(delivered, event) for delivered, event in first.values()]
    return insert_rows(con, "events", rows, on_conflict=skip_known)


def _event_row(delivered: Delivered, event: AnyEvent) -> tuple[Any, ...]:
    run_id = event.run_id if isinstance(event, RunProgress | RunAborted | RunFinished) else None
    proposal_id = event.proposal_id if isinstance(event, ProposalCreated | RunProgress | RunFinished) else None
    return (delivered.seq, event.event_id, delivered.subject, KIND[type(event)], utc_naive(event.ts), event.producer,
            run_id, proposal_id, delivered.data.decode())


def _read_cursor(con: duckdb.DuckDBPyConnection) -> int:
    row = con.execute("SELECT max(seq) FROM cursor").fetchone()
    return row[0] or 0


def _code(con: duckdb.DuckDBPyConnection, sha256: str) -> str | None:
    if sha256 == EMPTY_SHA256:
        return ""
    row = con.execute("SELECT code FROM code_blobs WHERE sha256 = $1", [sha256]).fetchone()
    return row[0] if row else None


def _meta(con: duckdb.DuckDBPyConnection, key: str) -> str | None:
    row = con.execute("SELECT value FROM meta WHERE key = $1", [key]).fetchone()
    return row[0] if row else None


def _set_meta(con: duckdb.DuckDBPyConnection, key: str, value: str) -> None:
    con.execute("INSERT OR REPLACE INTO meta VALUES ($1, $2)", [key, value])


def _gate(con: duckdb.DuckDBPyConnection) -> float:
    """The confirm_sigmas the file's verdicts were judged with (the default for a file from before the gate)."""
    stored = _meta(con, GATE_KEY)
    return Settings().confirm_sigmas if stored is None else float(stored)
