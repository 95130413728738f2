"""The ledger's projections: every table and view here is a pure function of the `events` table.

Three layers, so that a refresh after each batch stays cheap however many run.progress rows exist:

1. Fact tables, append-only, one row per event of a kind (first-wins where an id repeats). They are
   filled from the events of a stream-sequence range (lo, hi]: the same function serves a batch just
   appended (lo = the old cursor) and a replay (windows from 0), so both build identical rows. Events
   are appended in sequence order, so DuckDB's zone maps on `seq` skip every old row group, and the
   kind filter runs before any payload is decoded. Of run.progress only the first event of each run
   is kept (`run_starts`): the experiment table needs nothing else of the millions of progress rows.
   Payloads are decoded with shared.events (never re-parsed in SQL), and the columns are generated
   from the event classes, so a field added there appears here without a second definition.
2. `experiments`, a table derived by SQL from the fact tables. After a batch only the rows its facts
   touch are redone (refresh_derived); a replay redoes them all with the same statements. The keep gate
   (gate.py) then judges, in Python, the runs finished from the earliest of them on, resuming from the
   state the rows before hold (judge): its verdict columns depend on the order runs finished in.
3. `champions`, `candidates` and `history`, views over `experiments`: a few dozen rows, computed when read.
   (Materialized and rewritten after every batch, `history` triggered "Corrupted uncompressed string
   segment" failures at checkpoints in DuckDB 2.0.0; as views they need no rewriting at all.)
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cached_property
from typing import Any

import duckdb
import msgspec
import msgspec.inspect as mi

from services.ledger.gate import Finished, Gate, Verdict
from shared import progress
from shared.diffs import EMPTY_SHA256, InvalidDiff, apply_ops, code_sha256
from shared.events import (
    POLICY_UPDATED,
    PROPOSAL_CREATED,
    RUN_ABORTED,
    RUN_FINISHED,
    RUN_PROGRESS,
    AnyEvent,
    Event,
    PolicyUpdated,
    ProposalCreated,
    RunAborted,
    RunFinished,
    RunProgress,
    decode,
)

DEFAULT_RECENT = 32
"""K: the last finished experiments in the history buffer h (paper §3)."""
DEFAULT_TOP = 5
"""The best ok experiments ever, also in h."""
LOGIC_VERSION = 2
"""Bump when the Python side of a projection changes (row building, code blobs, the keep gate of gate.py):
the next open replays."""
REPLAY_WINDOW = 200_000
"""Stream sequences projected per step of a replay (bounds the payloads held in memory at once)."""

_EPOCH = datetime(1970, 1, 1)
_MICROSECOND = timedelta(microseconds=1)

KIND: dict[type[Event], str] = {
    ProposalCreated: PROPOSAL_CREATED,
    RunProgress: RUN_PROGRESS,
    RunAborted: RUN_ABORTED,
    RunFinished: RUN_FINISHED,
    PolicyUpdated: POLICY_UPDATED,
}
"""The `events.kind` of each event class: its subject without the run id."""

# ---------------------------------------------------------------------------------------------
# Fact tables: columns generated from the event classes
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Column:
    name: str
    sql_type: str
    path: tuple[str, ...]
    """Attribute path in the event (nested structs such as RunFinished.result are flattened)."""


def _sql_type(info: mi.Type) -> str:
    if isinstance(info, mi.UnionType):
        inner = [member for member in info.types if not isinstance(member, mi.NoneType)]
        return _sql_type(inner[0]) if len(inner) == 1 else "JSON"
    simple = {mi.IntType: "BIGINT", mi.FloatType: "DOUBLE", mi.BoolType: "BOOLEAN", mi.StrType: "VARCHAR",
              mi.LiteralType: "VARCHAR", mi.DateTimeType: "TIMESTAMP"}
    return simple.get(type(info), "JSON")


def _columns(info: mi.StructType, prefix: tuple[str, ...] = ()) -> Iterator[Column]:
    for field in info.fields:
        if isinstance(field.type, mi.StructType):
            yield from _columns(field.type, (*prefix, field.name))
        else:
            yield Column(field.name, _sql_type(field.type), (*prefix, field.name))


@dataclass(frozen=True)
class FactTable:
    """One row per stored event of a kind. `key`, if set, is the primary key: only the first event per
    value gets a row (decided before the insert: _proposal_rows for proposals, _FACTS_SQL for runs)."""

    name: str
    event: type[Event]
    key: str | None = None
    extra: tuple[tuple[str, str], ...] = ()
    """Columns the ledger computes (not in the event), filled by the row builder."""

    @cached_property
    def columns(self) -> list[Column]:
        columns = [Column("seq", "BIGINT", ()), *_columns(mi.type_info(self.event))]
        names = [column.name for column in columns]
        assert len(names) == len(set(names)), f"flattening {self.event.__name__} gives duplicate columns"
        return columns

    def ddl(self) -> str:
        columns = [f'"{c.name}" {c.sql_type}' + (" PRIMARY KEY" if c.name == self.key else "") for c in self.columns]
        columns += [f'"{name}" {sql_type}' for name, sql_type in self.extra]
        return f"CREATE TABLE IF NOT EXISTS {self.name} ({', '.join(columns)})"

    def row(self, seq: int, event: Event) -> list[Any]:
        return [seq, *(_value(event, column.path) for column in self.columns[1:])]


def _value(event: Event, path: tuple[str, ...]) -> Any:
    value: Any = event
    for name in path:
        value = getattr(value, name)
    if isinstance(value, datetime):
        return utc_naive(value)
    if isinstance(value, list | dict | msgspec.Struct):
        return msgspec.json.encode(value).decode()
    return value


def utc_naive(moment: datetime) -> datetime:
    """Timestamps are stored as UTC TIMESTAMP: TIMESTAMPTZ needs ICU and pytz, which the ledger avoids."""
    return moment.astimezone(UTC).replace(tzinfo=None) if moment.tzinfo else moment


PROPOSALS = FactTable("proposals", ProposalCreated, key="proposal_id",
                      extra=(("code_sha256", "VARCHAR"), ("code_error", "VARCHAR")))
"""code_sha256: the sha of the code the diff produces (its blob); code_error: why there is no blob."""
RUN_STARTS = FactTable("run_starts", RunProgress, key="run_id")
"""The first run.progress of each run: it says the run started, on which executor."""
FINISHES = FactTable("finishes", RunFinished)
ABORTS = FactTable("aborts", RunAborted)
POLICY_UPDATES = FactTable("policy_updates", PolicyUpdated)
FACT_TABLES = (PROPOSALS, RUN_STARTS, FINISHES, ABORTS, POLICY_UPDATES)

CODE_BLOBS_DDL = "CREATE TABLE IF NOT EXISTS code_blobs (sha256 VARCHAR PRIMARY KEY, code VARCHAR NOT NULL)"

VERDICT_COLUMNS = [Column("is_new_best", "BOOLEAN", ("is_new_best",)), *_columns(mi.type_info(Verdict))]
"""The keep gate's columns of `experiments`, generated from gate.Verdict: set by judge(), not by SQL."""

# ---------------------------------------------------------------------------------------------
# Derived tables: SQL over the fact tables
# ---------------------------------------------------------------------------------------------

AFFECTED_SQL = """
SELECT proposal_id FROM proposals WHERE seq > {lo} AND seq <= {hi}
UNION SELECT proposal_id FROM run_starts WHERE seq > {lo} AND seq <= {hi}
UNION SELECT proposal_id FROM finishes WHERE seq > {lo} AND seq <= {hi}
UNION SELECT runs.proposal_id FROM aborts
      JOIN (SELECT run_id, proposal_id FROM run_starts UNION SELECT run_id, proposal_id FROM finishes) runs
      USING (run_id)
      WHERE aborts.seq > {lo} AND aborts.seq <= {hi}
"""
"""The proposals whose facts arrived with stream sequences in (lo, hi]: the experiment rows to redo."""

EXPERIMENT_ROWS_SQL = f"""
WITH scope AS (SELECT unnest($1::VARCHAR[]) AS proposal_id),
first_finish AS (  -- a proposal redelivered after its run finished may finish twice: the first counts
    SELECT * FROM finishes WHERE proposal_id IN (FROM scope)
    QUALIFY row_number() OVER (PARTITION BY proposal_id ORDER BY seq) = 1
), latest_start AS (  -- a redelivered proposal runs again under a new run id: the latest is the live one
    SELECT * FROM run_starts WHERE proposal_id IN (FROM scope)
    QUALIFY row_number() OVER (PARTITION BY proposal_id ORDER BY seq DESC) = 1
), first_abort AS (
    SELECT * FROM aborts WHERE run_id IN (SELECT run_id FROM first_finish UNION SELECT run_id FROM latest_start)
    QUALIFY row_number() OVER (PARTITION BY run_id ORDER BY seq) = 1
)
SELECT p.proposal_id, p.seq AS proposal_seq, p.ts AS proposed_at, p.policy, p.policy_version,
       p.parent_code_sha256, p.unified_diff, p.rationale, p.logprob, p.value, p.purpose, p.repeat_of,
       coalesce(f.seed, p.seed) AS seed,
       coalesce(f.run_id, s.run_id) AS run_id,
       coalesce(f.executor_id, s.executor_id) AS executor_id,
       CASE WHEN f.seq IS NOT NULL THEN f.status WHEN s.seq IS NOT NULL THEN 'running' ELSE 'queued' END AS status,
       f.val_bpb, f.training_s, f.startup_s, f.total_s, f.steps, f.tokens, f.peak_mem_mb,
       coalesce(nullif(f.code_sha256, ''), p.code_sha256) AS code_sha256,
       f.error, f.error_tail, f.seq AS finished_seq, f.ts AS finished_at,
       a.commentary AS abort_commentary,
       {", ".join(f"NULL::{column.sql_type} AS {column.name}" for column in VERDICT_COLUMNS)}
FROM proposals p
LEFT JOIN first_finish f ON f.proposal_id = p.proposal_id
LEFT JOIN latest_start s ON s.proposal_id = p.proposal_id
LEFT JOIN first_abort a ON a.run_id = coalesce(f.run_id, s.run_id)
WHERE p.proposal_id IN (FROM scope)
"""
"""One experiment row per proposal in $1, from the fact tables alone."""

CHAMPIONS_SQL = """
SELECT e.keep_seq AS finished_seq, d.finished_at, e.proposal_id, e.run_id, e.keep_bpb AS val_bpb, e.code_sha256,
       e.keep, lag(e.keep_bpb) OVER (ORDER BY e.keep_seq) - e.keep_bpb AS improvement
FROM experiments e
JOIN experiments d ON d.finished_seq = e.keep_seq
WHERE e.is_new_best
ORDER BY e.keep_seq
"""
"""The keep decisions: every code that became c*, when (finished_seq, finished_at: its own run's finish for a
new best, its confirmation's for a confirmed one) and at which bpb* (val_bpb). c* is the last row."""

CANDIDATES_SQL = """
SELECT finished_seq, finished_at, proposal_id, run_id, val_bpb, beat_by, sigma_noise, code_sha256, keep,
       keep_seq, keep_bpb
FROM experiments
WHERE keep IN ('unconfirmed', 'confirmed', 'refuted')
ORDER BY finished_seq
"""
"""Every unconfirmed best (a search run that beat bpb* by less than the gate's margin) and what its
confirmation decided: keep is unconfirmed while it waits, then confirmed or refuted (keep_bpb: the mean of
its code's ok runs then)."""


def history_sql(recent: int, top: int) -> str:
    """h: the last `recent` finished experiments and the `top` best ok ones, oldest first."""
    return f"""
WITH recent AS (
    SELECT proposal_id FROM experiments WHERE finished_seq IS NOT NULL ORDER BY finished_seq DESC LIMIT {int(recent)}
), top AS (
    SELECT proposal_id FROM experiments WHERE status = 'ok' AND val_bpb IS NOT NULL
    ORDER BY val_bpb, finished_seq LIMIT {int(top)}
)
SELECT e.proposal_id, e.finished_seq, e.status, e.val_bpb, e.unified_diff, e.abort_commentary,
       CASE WHEN r.proposal_id IS NULL THEN 'top' WHEN t.proposal_id IS NULL THEN 'recent' ELSE 'both' END AS why
FROM experiments e
LEFT JOIN recent r ON r.proposal_id = e.proposal_id
LEFT JOIN top t ON t.proposal_id = e.proposal_id
WHERE r.proposal_id IS NOT NULL OR t.proposal_id IS NOT NULL
ORDER BY e.finished_seq
"""


def sigma_h_sql(recent: int) -> str:
    """σ_h: sample standard deviation of the ok val_bpb among the last `recent` finished (NULL under 2)."""
    return f"""
SELECT stddev_samp(val_bpb) FILTER (WHERE status = 'ok')
FROM (SELECT status, val_bpb FROM experiments WHERE finished_seq IS NOT NULL
      ORDER BY finished_seq DESC LIMIT {int(recent)})
"""


HISTORY_SQL = history_sql(DEFAULT_RECENT, DEFAULT_TOP)
VIEWS = {"champions": CHAMPIONS_SQL, "candidates": CANDIDATES_SQL, "history": HISTORY_SQL}
PROJECTION_TABLES = [table.name for table in FACT_TABLES] + ["code_blobs", "experiments", *VIEWS]
"""Everything replay rebuilds (the views need no rebuilding, but are compared all the same)."""


def fingerprint(confirm_sigmas: float) -> str:
    """Changes whenever a projection's definition or the keep gate's setting does, so that a ledger opened
    by upgraded code, or with another gate, knows to replay."""
    sql = [CODE_BLOBS_DDL, AFFECTED_SQL, EXPERIMENT_ROWS_SQL, *GATE_SQL, *VIEWS.values()]
    text = "\n".join([str(LOGIC_VERSION), f"confirm_sigmas = {float(confirm_sigmas)!r}",
                      *(table.ddl() for table in FACT_TABLES), *sql])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def create(con: duckdb.DuckDBPyConnection) -> None:
    """Create the projection tables that do not exist yet (empty), and the views."""
    for table in FACT_TABLES:
        con.execute(table.ddl())
    con.execute(CODE_BLOBS_DDL)
    con.execute(f"CREATE TABLE IF NOT EXISTS experiments AS {EXPERIMENT_ROWS_SQL}", [[]])
    for name, sql in VIEWS.items():
        con.execute(f"CREATE OR REPLACE VIEW {name} AS {sql}")


def drop(con: duckdb.DuckDBPyConnection) -> None:
    """Drop every projection, views first (they read the tables), whatever kind an older build made it."""
    kinds = dict(con.execute("SELECT view_name, 'VIEW' FROM duckdb_views() WHERE NOT internal "
                             "UNION ALL SELECT table_name, 'TABLE' FROM duckdb_tables()").fetchall())
    for name in sorted(PROJECTION_TABLES, key=lambda name: kinds.get(name) != "VIEW"):
        if name in kinds:
            con.execute(f"DROP {kinds[name]} {name}")


# ---------------------------------------------------------------------------------------------
# Refresh
# ---------------------------------------------------------------------------------------------


def project(con: duckdb.DuckDBPyConnection, lo: int, hi: int) -> bool:
    """Add the facts of the stored events with lo < seq <= hi; True if any fact table changed."""
    events = _facts(con, lo, hi)
    proposals = [(seq, event) for seq, event in events if isinstance(event, ProposalCreated)]
    added = _insert(con, PROPOSALS, _proposal_rows(con, proposals))
    for table in (RUN_STARTS, FINISHES, ABORTS, POLICY_UPDATES):
        added += _insert(con, table, [table.row(seq, event) for seq, event in events if isinstance(event, table.event)])
    return added > 0


def refresh_derived(con: duckdb.DuckDBPyConnection, lo: int, hi: int, confirm_sigmas: float) -> None:
    """Redo the experiment rows that the facts of (lo, hi] are about, then the keep gate's verdicts
    from the earliest of them that finished: the cost follows the batch, not the length of the log."""
    affected = [row[0] for row in con.execute(AFFECTED_SQL.format(lo=int(lo), hi=int(hi))).fetchall()]
    if not affected:
        return
    con.execute("DELETE FROM experiments WHERE proposal_id IN (SELECT unnest($1::VARCHAR[]))", [affected])
    con.execute(f"INSERT INTO experiments {EXPERIMENT_ROWS_SQL}", [affected])
    (since,) = con.execute("SELECT min(finished_seq) FROM experiments WHERE proposal_id IN "
                           "(SELECT unnest($1::VARCHAR[]))", [affected]).fetchone()
    if since is not None:
        judge(con, since, confirm_sigmas)


def replay(con: duckdb.DuckDBPyConnection, cursor: int, confirm_sigmas: float) -> dict[str, int]:
    """Drop and rebuild every projection from `events` with the same code the appends use."""
    drop(con)
    create(con)
    windows = range(0, cursor, REPLAY_WINDOW)
    for lo in progress.bar(windows, desc="replaying the event log", unit="window", leave=False):
        project(con, lo, min(lo + REPLAY_WINDOW, cursor))
    refresh_derived(con, 0, cursor, confirm_sigmas)
    return {name: con.execute(f"SELECT count(*) FROM {name}").fetchone()[0] for name in PROJECTION_TABLES}


# ---------------------------------------------------------------------------------------------
# The keep gate, resumed where a batch needs it
# ---------------------------------------------------------------------------------------------

_RUN = ", ".join(Finished.__struct_fields__)
_VERDICT = ", ".join(Verdict.__struct_fields__)
_RUNS_SQL = f"""
SELECT {_RUN}, {_VERDICT} FROM experiments
WHERE finished_seq >= coalesce((SELECT max(finished_seq) FROM experiments WHERE finished_seq < {{since}}), 0)
ORDER BY finished_seq"""
"""The runs finished at stream sequence `since` or later, after the last one before them (whose verdict
holds bpb* and the pooled sums then). Literal bounds, as in _FACTS_SQL, so that zone maps prune."""
_CODE_RUNS_SQL = f"""
SELECT {_RUN}, {_VERDICT} FROM experiments
WHERE finished_seq < {{before}} AND list_contains($1::VARCHAR[], code_sha256)
ORDER BY finished_seq"""
"""The runs of the codes in $1 finished before `before`."""
_VERDICTS_SQL = f"""
UPDATE experiments SET {", ".join(f"{column.name} = v.{column.name}" for column in VERDICT_COLUMNS)}
FROM (SELECT unnest($1::VARCHAR[]) AS proposal_id,
             {", ".join(f"unnest(${i}::{c.sql_type}[]) AS {c.name}" for i, c in enumerate(VERDICT_COLUMNS, 2))}) v
WHERE experiments.proposal_id = v.proposal_id"""
GATE_SQL = (_RUNS_SQL, _CODE_RUNS_SQL, _VERDICTS_SQL)


def judge(con: duckdb.DuckDBPyConnection, since: int, confirm_sigmas: float) -> None:
    """Judge again every run finished at stream sequence `since` or later, in finished order, from the
    gate's state just before (gate.Gate.resume): the same verdicts a judgement of the whole log gives.
    Two reads and one write, whatever the length of the log: each statement costs milliseconds."""
    rows = _judged(con, _RUNS_SQL.format(since=int(since)))
    before = rows[:1] if rows and rows[0][0].finished_seq < since else []
    runs = [run for run, _ in rows[len(before):]]
    if before:
        codes = sorted({run.code_sha256 for run in runs if run.code_sha256})
        before = _judged(con, _CODE_RUNS_SQL.format(before=before[0][0].finished_seq), [codes]) + before
    gate = Gate.resume(confirm_sigmas, before, runs)
    for run in runs:
        gate.judge(run)
    columns = [[_value(verdict, column.path) for verdict in gate.verdicts.values()] for column in VERDICT_COLUMNS]
    con.execute(_VERDICTS_SQL, [list(gate.verdicts), *columns])


def _judged(con: duckdb.DuckDBPyConnection, sql: str,
            params: list[Any] | None = None) -> list[tuple[Finished, Verdict]]:
    """Rows of (_RUN, _VERDICT) columns as runs with their verdicts."""
    width = len(Finished.__struct_fields__)
    return [(Finished(*row[:width]), Verdict(**dict(zip(Verdict.__struct_fields__, row[width:], strict=True))))
            for row in con.execute(sql, params).fetchall()]


_FACTS_SQL = f"""
SELECT seq, subject, payload FROM events
WHERE seq > {{lo}} AND seq <= {{hi}}
  AND (kind <> '{RUN_PROGRESS}' OR run_id NOT IN (SELECT run_id FROM run_starts))
QUALIFY kind <> '{RUN_PROGRESS}' OR row_number() OVER (PARTITION BY kind, run_id ORDER BY seq) = 1
ORDER BY seq"""
"""The events that can add a fact: all but run.progress, and the first progress of a run not seen before.
The seq range comes first so that zone maps skip every old row group; the bounds are literals, not
parameters, so the planner prunes by the table's statistics (twice as fast)."""


def _facts(con: duckdb.DuckDBPyConnection, lo: int, hi: int) -> list[tuple[int, AnyEvent]]:
    rows = con.execute(_FACTS_SQL.format(lo=int(lo), hi=int(hi))).fetchall()
    return [(seq, decode(subject, payload.encode())) for seq, subject, payload in rows]


def _proposal_rows(con: duckdb.DuckDBPyConnection, proposals: list[tuple[int, ProposalCreated]]) -> list[list[Any]]:
    """Proposal rows with the code each one produces; new code goes into code_blobs on the way."""
    if not proposals:
        return []
    known = {row[0] for row in con.execute("SELECT proposal_id FROM proposals WHERE proposal_id IN "
                                           "(SELECT unnest($1))", [[p.proposal_id for _, p in proposals]]).fetchall()}
    blobs: dict[str, str] = {}
    rows = []
    for seq, proposal in proposals:
        if proposal.proposal_id in known:  # the same proposal id published again: the first one counts
            continue
        known.add(proposal.proposal_id)
        sha, error = _child_code(proposal, lambda sha: blobs[sha] if sha in blobs else _blob(con, sha), blobs)
        rows.append([*PROPOSALS.row(seq, proposal), sha, error])
    _insert_blobs(con, blobs)
    return rows


def _child_code(proposal: ProposalCreated, lookup: Callable[[str], str | None],
                blobs: dict[str, str]) -> tuple[str | None, str | None]:
    """(sha, None) with the code added to `blobs`, or (None, why not)."""
    parent = "" if proposal.parent_code_sha256 == EMPTY_SHA256 else lookup(proposal.parent_code_sha256)
    if parent is None:
        return None, f"unknown parent code {proposal.parent_code_sha256}"
    try:
        code = apply_ops(parent, proposal.ops)
    except InvalidDiff as error:
        return None, f"invalid diff: {error}"
    sha = code_sha256(code)
    blobs[sha] = code
    return sha, None


def _blob(con: duckdb.DuckDBPyConnection, sha: str) -> str | None:
    row = con.execute("SELECT code FROM code_blobs WHERE sha256 = $1", [sha]).fetchone()
    return row[0] if row else None


def _insert_blobs(con: duckdb.DuckDBPyConnection, blobs: dict[str, str]) -> None:
    if blobs:
        con.execute("INSERT INTO code_blobs SELECT unnest($1), unnest($2) ON CONFLICT DO NOTHING",
                    [list(blobs), list(blobs.values())])


def _insert(con: duckdb.DuckDBPyConnection, table: FactTable, rows: Sequence[Sequence[Any]]) -> int:
    """Rows are new by construction (first-wins is decided before), so no ON CONFLICT clause: it costs
    ~5 ms a statement; the key, if any, still refuses a second row."""
    return insert_rows(con, table.name, rows)


def insert_rows(con: duckdb.DuckDBPyConnection, table: str, rows: Sequence[Sequence[Any]],
                on_conflict: bool = False) -> int:
    """INSERT ... SELECT unnest($1), unnest($2), ... with one list per column: one statement for the whole
    batch (executemany runs a statement per row, about 50x slower). Returns the number of rows inserted."""
    if not rows:
        return 0
    columns, selects = [], []
    for i, column in enumerate(zip(*rows, strict=True)):
        if any(isinstance(value, datetime) for value in column):  # naive UTC, sent as microseconds:
            column = tuple(None if v is None else (v - _EPOCH) // _MICROSECOND for v in column)  # 3x cheaper
            selects.append(f"make_timestamp(unnest(${i + 1}))")
        else:
            selects.append(f"unnest(${i + 1})")
        columns.append(list(column))
    conflict = " ON CONFLICT DO NOTHING" if on_conflict else ""
    return con.execute(f"INSERT INTO {table} SELECT {', '.join(selects)}{conflict}", columns).fetchone()[0]
