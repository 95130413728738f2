"""What a research run looks like, read from the ledger with SQL: the models the report and the dashboard draw.

Every function takes a `query` (SQL -> QueryResult): the ledger's own read cursor (Ledger.query) inside the ledger
process and for a file offline, or a running ledger's POST /sql from the CLI; the same code path for all three.
Nothing here writes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from services.ledger.sql import QueryResult
from shared.diffs import EMPTY_SHA256
from shared.edit_kinds import BASELINE, edit_kind

Query = Callable[[str], QueryResult]
FAILED = ("crashed", "invalid", "rejected", "timeout")
ACTION_TEXT = ("CASE WHEN p.action_index IS NOT NULL THEN json_extract_string(p.candidates, "
               "'$[' || p.action_index || ']') END AS action_text")
"""A score-mode proposal's chosen catalogue action, whose first word is its kind."""
EXPERIMENTS = f"""
SELECT e.proposal_id, e.proposed_at, e.finished_at, e.status, e.val_bpb, e.is_new_best, e.keep_bpb, e.bpb_star,
       e.purpose, e.policy, e.policy_version, e.parent_code_sha256, e.unified_diff, e.rationale, {ACTION_TEXT},
       (SELECT max(CAST(v.payload->>'budget_used' AS DOUBLE)) FROM events v
        WHERE v.kind = 'run.progress' AND v.run_id = e.run_id) AS budget_used
FROM experiments e JOIN proposals p USING (proposal_id)
WHERE e.finished_seq IS NOT NULL AND e.proposed_at >= '{{since}}'
ORDER BY e.finished_seq
"""
"""Every finished experiment since `since`, in the order it finished (over /sql at most its 10 000 rows)."""
CHAMPIONS = f"""
SELECT c.proposal_id, c.finished_at, c.val_bpb, c.improvement, e.rationale, e.parent_code_sha256, e.unified_diff,
       {ACTION_TEXT}
FROM champions c JOIN experiments e USING (proposal_id) JOIN proposals p USING (proposal_id)
ORDER BY c.finished_seq
"""
POLICY_STATS = ("mean_reward", "entropy", "approx_kl", "clip_fraction", "value_loss")
UPDATES = f"SELECT update_index, policy_version, ts, {', '.join(POLICY_STATS)} FROM policy_updates ORDER BY seq"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Experiment:
    proposal_id: str
    proposed_at: datetime
    finished_at: datetime
    status: str
    val_bpb: float | None
    kept: bool
    keep_bpb: float | None
    """c*'s val-bpb once this run's code was crowned: its own, or the mean of its runs when a repeat confirmed it."""
    bpb_star: float | None
    """c*'s val-bpb when it finished (None before the baseline's)."""
    purpose: str
    policy: str
    policy_version: str
    kind: str
    rationale: str
    budget_used: float | None

    @property
    def outcome(self) -> str:
        if self.kept:
            return "kept"
        return "failed" if self.status in FAILED else "aborted" if self.status == "aborted" else "discarded"


def experiments(query: Query, since: datetime = EPOCH) -> tuple[list[Experiment], bool]:
    """The finished experiments proposed since `since`, and whether the ledger API cut them short."""
    found = query(EXPERIMENTS.format(since=since.astimezone(UTC).replace(tzinfo=None).isoformat()))
    return [_experiment(row) for row in records(found)], found.truncated


def champions(query: Query, since: datetime = EPOCH) -> list[dict[str, Any]]:
    """c* and its lineage: every kept code in order, with its kind and Δbpb against the champion before it."""
    rows = [row for row in records(query(CHAMPIONS)) if as_time(row["finished_at"]) >= since]
    for row in rows:
        row["kind"] = kind_of(row)
        for column in ("parent_code_sha256", "unified_diff", "action_text"):
            del row[column]
        row["delta"] = None if row["improvement"] is None else -row["improvement"]
    return rows


def updates(query: Query) -> list[dict[str, Any]]:
    return records(query(UPDATES))


def best_so_far(found: list[Experiment]) -> list[float | None]:
    """c*'s val-bpb after each experiment: it moves only when the keep gate crowns a code (drawn at the crowned
    run, also when a later repeat confirmed it)."""
    best = next((e.bpb_star for e in found if e.bpb_star is not None), None)
    curve = []
    for experiment in found:
        if experiment.kept:
            best = experiment.keep_bpb
        curve.append(best)
    return curve


def abort_figures(found: list[Experiment]) -> dict[str, Any]:
    """Aborts and what they bought, in training budget: `saved` is the budget fraction aborted runs did not spend,
    over every run that trained; G = 1 / (1 - saved) is eq. (9), p_bad·(1 − μ_abort) measured directly."""
    trained = [e for e in found if e.status in ("ok", "aborted")]
    stops = sorted(e.budget_used or 0.0 for e in trained if e.status == "aborted")
    saved = sum(1.0 - used for used in stops) / len(trained) if trained else 0.0
    return {"trained": len(trained), "aborted": len(stops), "saved": saved, "G": 1.0 / (1.0 - saved),
            "median_stop": stops[len(stops) // 2] if stops else None}


def discoveries(found: list[Experiment]) -> list[dict[str, Any]]:
    """Per kind of edit, the search experiments tried: how many ran, were kept, and the best Δbpb against c* of
    their time (negative: better), with that edit's rationale. Sorted by best Δbpb."""
    kinds: dict[str, dict[str, Any]] = {}
    for e in found:
        if e.purpose != "search" or e.kind == BASELINE:
            continue
        row = kinds.setdefault(e.kind, {"kind": e.kind, "tried": 0, "ok": 0, "kept": 0, "best": None, "example": ""})
        row["tried"] += 1
        row["ok"] += e.status == "ok"
        row["kept"] += e.kept
        if e.val_bpb is not None and e.bpb_star is not None and (row["best"] is None or
                                                                  e.val_bpb - e.bpb_star < row["best"]):
            row["best"], row["example"] = e.val_bpb - e.bpb_star, e.rationale
    return sorted(kinds.values(), key=lambda r: (r["best"] is None, r["best"] or 0.0, -r["tried"]))


def kind_of(row: dict[str, Any]) -> str:
    """The kind of an experiment's edit (shared/edit_kinds.py), from its row's diff, parent and action text."""
    if row["parent_code_sha256"] == EMPTY_SHA256:
        return BASELINE
    return edit_kind(row["unified_diff"] or "", row["action_text"])


def hours_between(start: datetime, end: datetime) -> float:
    return (end - start).total_seconds() / 3600


def records(result: QueryResult) -> list[dict[str, Any]]:
    return [dict(zip(result.columns, row, strict=True)) for row in result.rows]


def as_time(value: datetime | str) -> datetime:
    """Ledger times are UTC: offline they come as datetimes, over HTTP as ISO strings."""
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(value)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _experiment(row: dict[str, Any]) -> Experiment:
    return Experiment(
        proposal_id=row["proposal_id"], proposed_at=as_time(row["proposed_at"]),
        finished_at=as_time(row["finished_at"]), status=row["status"], val_bpb=row["val_bpb"],
        kept=bool(row["is_new_best"]), keep_bpb=row["keep_bpb"], bpb_star=row["bpb_star"], purpose=row["purpose"],
        policy=row["policy"], policy_version=row["policy_version"],
        kind=kind_of(row), rationale=row["rationale"] or "",
        budget_used=row["budget_used"])
