"""Users' SQL against the ledger: one read-only statement, answered as JSON-ready rows.

Three fences (the first and the last each keep writes out on their own):
1. `guard` lets through exactly one SELECT (or EXPLAIN of a SELECT: EXPLAIN ANALYZE runs its
   statement, so the EXPLAIN type alone is not enough) whose parse tree holds no writing query
   (DuckDB accepts `WITH d AS (DELETE ... RETURNING *) SELECT ...` as a SELECT), all judged by
   DuckDB's own parser.
2. The database was opened with enable_external_access=false and lock_configuration=true (store.py):
   no read_csv('/etc/passwd'), glob, ATTACH, COPY, INSTALL or LOAD, and no SET can undo that.
3. The query runs in a transaction that is always rolled back, on its own cursor, under a time limit.
"""

from __future__ import annotations

import datetime as dt
import decimal
import math
import re
import threading
import uuid
from typing import Any

import duckdb
import msgspec

ALLOWED = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}
READING_NODES = {"SELECT_NODE", "SET_OPERATION_NODE", "RECURSIVE_CTE_NODE", "CTE_NODE"}
"""Query nodes of json_serialize_sql's tree that only read; anything else (DELETE_QUERY_NODE ...) is refused."""
_EXPLAIN = re.compile(r"^\s*explain(\s+analy[sz]e)?\s+", re.IGNORECASE)
_ZONED = "TIMESTAMP WITH TIME ZONE"
"""Fetching this type needs pytz (absent): such columns are sent as text."""
DEFAULT_TIMEOUT_S = 30.0


class QueryRefused(ValueError):
    """The SQL is not one read-only statement; the message says why."""


class QueryResult(msgspec.Struct, frozen=True):
    columns: list[str]
    rows: list[list[Any]]
    truncated: bool
    """True if there were more than max_rows rows (the rest are not sent)."""


def guard(con: duckdb.DuckDBPyConnection, sql: str) -> str:
    """The one statement to run, or QueryRefused."""
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as error:
        raise QueryRefused(f"the SQL does not parse: {error}") from None
    if len(statements) != 1:
        raise QueryRefused(f"one statement per query, got {len(statements)}")
    statement = statements[0]
    if statement.type not in ALLOWED:
        raise QueryRefused(f"only SELECT (or EXPLAIN SELECT) is allowed, got {statement.type.name}")
    select = statement.query if statement.type == duckdb.StatementType.SELECT else _explained(con, statement.query)
    _refuse_writes(con, select)
    return statement.query


def _explained(con: duckdb.DuckDBPyConnection, query: str) -> str:
    """The SELECT under EXPLAIN [ANALYZE] (which runs it), or QueryRefused."""
    match = _EXPLAIN.match(query)
    inner = con.extract_statements(query[match.end():]) if match else []
    if len(inner) != 1 or inner[0].type != duckdb.StatementType.SELECT:
        raise QueryRefused("EXPLAIN [ANALYZE] is allowed only of a SELECT")
    return inner[0].query


def _refuse_writes(con: duckdb.DuckDBPyConnection, select: str) -> None:
    """A SELECT can still write through a common table expression (WITH d AS (DELETE ... RETURNING *)
    SELECT ...): look at every query node of DuckDB's own parse tree."""
    tree = msgspec.json.decode(con.execute("SELECT json_serialize_sql($1)", [select]).fetchone()[0])
    if tree.get("error"):
        raise QueryRefused(f"the SELECT cannot be checked: {tree.get('error_message')}")
    writing = _query_nodes(tree) - READING_NODES
    if writing:
        raise QueryRefused(f"the SELECT contains a statement that is not a read: {', '.join(sorted(writing))}")


def _query_nodes(tree: Any) -> set[str]:
    if isinstance(tree, list):
        return set().union(*(_query_nodes(item) for item in tree))
    if not isinstance(tree, dict):
        return set()
    kind = tree.get("type")
    found = {kind} if isinstance(kind, str) and kind.endswith("_NODE") else set()
    return found.union(*(_query_nodes(value) for value in tree.values()))


def run(con: duckdb.DuckDBPyConnection, sql: str, max_rows: int = 10_000,
        timeout_s: float = DEFAULT_TIMEOUT_S) -> QueryResult:
    """Run guarded user SQL on `con` (a cursor of its own). Raises QueryRefused, TimeoutError, or
    duckdb.Error for a query that fails (a typo, an unknown table, a denied file)."""
    statement = guard(con, sql)
    timer = threading.Timer(timeout_s, con.interrupt)
    con.begin()
    timer.start()
    try:
        relation = con.sql(statement)
        columns, kinds = list(relation.columns), [str(kind) for kind in relation.types]
        if _ZONED in kinds:
            relation = relation.project(", ".join(map(_as_text, columns, kinds)))
        rows = relation.limit(max_rows + 1).fetchall()
    except duckdb.InterruptException:
        raise TimeoutError(f"the query ran over {timeout_s:g} s and was stopped") from None
    finally:
        timer.cancel()
        con.rollback()
    return QueryResult(columns, [[jsonable(value) for value in row] for row in rows[:max_rows]],
                       len(rows) > max_rows)


def _as_text(name: str, kind: str) -> str:
    quoted = '"' + name.replace('"', '""') + '"'
    return f"{quoted}::VARCHAR AS {quoted}" if kind == _ZONED else quoted


def jsonable(value: Any) -> Any:
    """A DuckDB value as JSON can carry it: times as ISO text, decimals as floats, NaN as null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return jsonable(float(value))
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", errors="replace")
    if isinstance(value, dict):
        return {str(key): jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(item) for item in value]
    if isinstance(value, uuid.UUID):
        return str(value)
    return str(value)
