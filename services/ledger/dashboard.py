"""The live dashboard, served by the ledger next to its SQL API: four pages and the JSON they draw.

    /               overview: best-so-far by experiment and by hour, every run marked by outcome; c* and its lineage
    /live           runs in flight, their loss curves updating (server-sent events), the evaluator's forecast
    /runs/<id>      one experiment: side-by-side diff, train.py, curve, abort, reward and its terms, error tail
    /policy         PPO statistics per policy.updated; the kinds of edit proposed over time

The pages are one static shell (static/page.html) and one script (static/app.js) that draws SVG itself: no build
step and nothing fetched from outside, for a machine that may be offline. Everything is read from the ledger
(views.py, and the evaluator's own code for forecasts of live runs); nothing here writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import difflib
import html
import json
import threading
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from string import Template
from typing import Any

import msgspec
import numpy as np
from fastapi import APIRouter, HTTPException
from fastapi.responses import HTMLResponse, Response, StreamingResponse

from services.evaluator.judge import LiveRun, SelfEvaluator
from services.learner.rewards import Reward, reward_of
from services.ledger import views
from services.ledger.store import Ledger
from shared.config import Config
from shared.curves import CurvesRequest

STATIC = Path(__file__).parent / "static"
LIVE_EVERY_S = 1.0
"""How often the live page is sent the runs in flight."""
SILENT_S = 120.0
"""A run with no progress for this long and no run.finished is not shown live: its executor died (a partial run)."""
ENDED_SHOWN_S = 60.0
"""A run that ended stays on the live page this long, with how it ended."""
KIND_BUCKET = 10
"""Experiments per row of the edit-kinds table."""


def router(ledger: Ledger, config: Config, stop: asyncio.Event) -> APIRouter:
    api = APIRouter()
    shell = Template((STATIC / "page.html").read_text(encoding="utf-8"))
    forecasts = LiveForecasts(ledger, config)

    def page(name: str, title: str) -> HTMLResponse:
        return HTMLResponse(shell.substitute(page=name, title=title))

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    def overview_page() -> HTMLResponse:
        return page("overview", "overview")

    @api.get("/live", response_class=HTMLResponse, include_in_schema=False)
    def live_page() -> HTMLResponse:
        return page("live", "live runs")

    @api.get("/runs/{proposal_id}", response_class=HTMLResponse, include_in_schema=False)
    def run_page(proposal_id: str) -> HTMLResponse:
        return page("run", html.escape(proposal_id))

    @api.get("/policy", response_class=HTMLResponse, include_in_schema=False)
    def policy_page() -> HTMLResponse:
        return page("policy", "policy")

    @api.get("/api/overview")
    def overview_json() -> Response:
        return _json(overview(ledger.query))

    @api.get("/api/runs/{proposal_id}")
    def run_json(proposal_id: str) -> Response:
        found = run_detail(ledger, config, proposal_id)
        if found is None:
            raise HTTPException(404, f"no experiment {proposal_id} in the ledger")
        return _json(found)

    @api.get("/api/policy")
    def policy_json() -> Response:
        return _json(policy(ledger.query))

    @api.get("/api/live/stream")
    async def live_stream() -> StreamingResponse:
        return StreamingResponse(_events(forecasts, stop), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    return api


async def _events(forecasts: LiveForecasts, stop: asyncio.Event) -> AsyncIterator[bytes]:
    """Until the ledger stops (then the browser reconnects to its successor by itself)."""
    while not stop.is_set():
        runs = await asyncio.to_thread(forecasts.live_runs)  # DuckDB off the event loop
        yield b"data: " + msgspec.json.encode({"runs": runs}) + b"\n\n"
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), LIVE_EVERY_S)


# --- overview and policy -------------------------------------------------------------------------------------


def overview(query: views.Query) -> dict[str, Any]:
    found, _ = views.experiments(query)
    best = views.best_so_far(found)
    origin = found[0].proposed_at if found else None
    aborts = views.abort_figures(found)
    lineage = views.champions(query)
    hours = views.hours_between(origin, found[-1].finished_at) if found else 0.0
    scored = [e.val_bpb for e in found if e.val_bpb is not None]
    running = query("SELECT count(*) FROM experiments WHERE finished_seq IS NULL AND run_id IS NOT NULL").rows[0][0]
    current = next((b for b in reversed(best) if b is not None), None)
    baseline = lineage[0]["val_bpb"] if lineage else None
    return {
        "kpis": {"best": current, "baseline": baseline,
                 "delta": None if current is None or baseline is None else current - baseline,
                 "experiments": len(found), "per_hour": len(found) / hours if hours else None,
                 "aborted": aborts["aborted"], "trained": aborts["trained"], "G": aborts["G"], "running": running},
        "ceiling": max(scored) if scored else None,
        "experiments": [{"index": i, "hours": views.hours_between(origin, e.finished_at), "proposal_id": e.proposal_id,
                         "status": e.status, "outcome": e.outcome, "val_bpb": e.val_bpb, "best": b,
                         "policy": e.policy, "policy_version": e.policy_version, "rationale": e.rationale}
                        for i, (e, b) in enumerate(zip(found, best, strict=True), 1)],
        "lineage": lineage,
    }


def policy(query: views.Query) -> dict[str, Any]:
    found, _ = views.experiments(query)
    search = [e for e in found if e.purpose == "search"]
    buckets = []
    for start in range(0, len(search), KIND_BUCKET):
        chunk = search[start:start + KIND_BUCKET]
        counts: dict[str, int] = {}
        for e in chunk:
            counts[e.kind] = counts.get(e.kind, 0) + 1
        buckets.append({"label": f"{start + 1}-{start + len(chunk)}", "counts": counts})
    return {"updates": views.updates(query), "kinds": buckets, "bucket": KIND_BUCKET}


# --- one run -------------------------------------------------------------------------------------------------

RUN = """
SELECT e.*, p.candidates, p.action_index, pc.code AS parent_code, c.code AS code
FROM experiments e JOIN proposals p USING (proposal_id)
LEFT JOIN code_blobs pc ON pc.sha256 = e.parent_code_sha256
LEFT JOIN code_blobs c ON c.sha256 = e.code_sha256
WHERE e.proposal_id = '{id}'
"""


def run_detail(ledger: Ledger, config: Config, proposal_id: str) -> dict[str, Any] | None:
    quoted = proposal_id.replace("'", "''")
    rows = views.records(ledger.query(RUN.format(id=quoted)))
    if not rows:
        return None
    row = rows[0]
    row["action_text"] = json.loads(row["candidates"])[row["action_index"]] if row["action_index"] is not None \
        else None
    parent, code = row.pop("parent_code") or "", row.pop("code")
    transition = ledger.transition(proposal_id)
    return {
        "experiment": {k: v for k, v in row.items() if k not in ("candidates", "action_index", "action_text")},
        "kind": views.kind_of(row),
        "code": code,
        "diff": side_by_side(parent, code if code is not None else parent),
        "points": _curve(ledger.query, row["run_id"]),
        "abort": _abort(ledger.query, row["run_id"]),
        "reward": None if transition is None else _terms(reward_of(transition, config.learner)),
        "no_reward": "no reward: not a step of a language-model policy (random search, a repeat, a test)"
                     if transition is None else None,
    }


def side_by_side(old: str, new: str) -> list[dict[str, Any]]:
    """The changed regions of two codes as rows of (left line, right line), with a few lines of context."""
    left, right = old.splitlines(), new.splitlines()
    rows: list[dict[str, Any]] = []
    for group in difflib.SequenceMatcher(None, left, right, autojunk=False).get_grouped_opcodes(3):
        if rows:
            rows.append({"kind": "equal", "left": "⋯", "right": "⋯"})
        for tag, i1, i2, j1, j2 in group:
            width = max(i2 - i1, j2 - j1)
            for k in range(width):
                rows.append({"kind": tag,
                             "left": f"{i1 + k + 1:4} {left[i1 + k]}" if i1 + k < i2 else None,
                             "right": f"{j1 + k + 1:4} {right[j1 + k]}" if j1 + k < j2 else None})
    return rows


def _curve(query: views.Query, run_id: str | None) -> list[list[float]]:
    if run_id is None:
        return []
    quoted = run_id.replace("'", "''")
    rows = query("SELECT CAST(payload->>'budget_used' AS DOUBLE), CAST(payload->>'train_loss' AS DOUBLE) "
                 f"FROM events WHERE kind = 'run.progress' AND run_id = '{quoted}' "
                 "AND payload->>'train_loss' IS NOT NULL ORDER BY seq").rows
    return [[used, loss] for used, loss in rows if loss is not None and np.isfinite(loss)]


def _abort(query: views.Query, run_id: str | None) -> dict[str, Any] | None:
    if run_id is None:
        return None
    quoted = run_id.replace("'", "''")
    rows = views.records(query(
        "SELECT a.at_train_s, a.forecast, a.forecast_low, a.forecast_high, a.threshold, a.commentary, "
        "(SELECT max(CAST(v.payload->>'budget_used' AS DOUBLE)) FROM events v WHERE v.kind = 'run.progress' "
        f"AND v.run_id = a.run_id AND v.seq < a.seq) AS used FROM aborts a WHERE a.run_id = '{quoted}' "
        "ORDER BY a.seq LIMIT 1"))
    return rows[0] if rows else None


def _terms(reward: Reward) -> dict[str, float | None]:
    return {"total": reward.total, **dataclasses.asdict(reward)}


# --- live runs and the evaluator's forecasts -----------------------------------------------------------------

LIVE = """
WITH recent AS (
    SELECT run_id, any_value(proposal_id) AS proposal_id, max(ts) AS last_ts
    FROM events WHERE kind = 'run.progress' AND ts >= '{since}' GROUP BY run_id)
SELECT r.run_id, r.proposal_id, p.rationale, p.purpose, f.status, f.ts AS finished_at
FROM recent r JOIN proposals p USING (proposal_id) LEFT JOIN finishes f USING (run_id)
WHERE (f.run_id IS NULL AND r.last_ts >= '{silent}') OR f.ts >= '{ended}'
ORDER BY f.ts IS NOT NULL, f.ts DESC, r.run_id
"""
POINTS = """
SELECT run_id, CAST(payload->>'budget_used' AS DOUBLE) AS used, CAST(payload->>'train_loss' AS DOUBLE) AS loss,
       CAST(payload->>'nonfinite_loss' AS BOOLEAN) AS nonfinite, CAST(payload->>'step' AS INTEGER) AS step
FROM events WHERE kind = 'run.progress' AND run_id IN ({ids}) ORDER BY seq
"""


class LiveForecasts:
    """The evaluator's view of the runs in flight, recomputed here by its own code (services/evaluator/judge.py) on
    the same data it has: calibrated on the ledger's complete curves, judged at each look the run has passed.
    (The evaluator publishes only its aborts; this shows what it sees before it decides.)"""

    def __init__(self, ledger: Ledger, config: Config):
        self.ledger = ledger
        self.settings = config.evaluator
        self.evaluator: SelfEvaluator | None = None
        self.calibrated_on = -1
        self.runs: dict[str, tuple[LiveRun, list[dict[str, float]]]] = {}
        self.lock = threading.Lock()

    def live_runs(self) -> list[dict[str, Any]]:
        """The cards of the live page; every open page asks each second, from a thread of its own."""
        with self.lock:  # the runs followed so far are shared by them all
            return self._live_runs()

    def _live_runs(self) -> list[dict[str, Any]]:
        now = datetime.now(UTC).replace(tzinfo=None)
        moments = {name: (now - timedelta(seconds=s)).isoformat() for name, s in
                   (("since", SILENT_S + ENDED_SHOWN_S + 3600), ("silent", SILENT_S), ("ended", ENDED_SHOWN_S))}
        found = views.records(self.ledger.query(LIVE.format(**moments)))
        if not found:
            return []
        ids = ", ".join("'" + run["run_id"].replace("'", "''") + "'" for run in found)
        points: dict[str, list[dict[str, Any]]] = {}
        for point in views.records(self.ledger.query(POINTS.format(ids=ids))):
            points.setdefault(point["run_id"], []).append(point)
        state = self.ledger.state()
        evaluator = self._evaluator()
        self.runs = {run["run_id"]: self.runs.get(run["run_id"]) or (LiveRun(run["run_id"], purpose=run["purpose"]), [])
                     for run in found}
        return [self._card(run, points.get(run["run_id"], []), evaluator, state.bpb_star, state.sigma_h)
                for run in found]

    def _card(self, run: dict[str, Any], points: list[dict[str, Any]], evaluator: SelfEvaluator,
              bpb_star: float | None, sigma_h: float | None) -> dict[str, Any]:
        live, forecasts = self.runs[run["run_id"]]
        for point in points[len(live.used):]:  # only the points not seen on an earlier tick
            live.add(point["used"], point["loss"], bool(point["nonfinite"]))
        threshold = None
        note = "no forecast before the first look" if run["status"] is None else f"ended: {run['status']}"
        if run["status"] is None and (look := evaluator.due_look(live)) is not None:  # ended: its verdict is known
            verdict = evaluator.judge(live, look, bpb_star, sigma_h)
            note, threshold = verdict.commentary, verdict.threshold
            if verdict.prediction is not None:
                low, high = verdict.interval
                forecasts.append({"used": float(evaluator.looks[look]), "mean": verdict.prediction.mean,
                                  "low": low, "high": high, "verdict": verdict.commentary})
        abort = _abort(self.ledger.query, run["run_id"])
        curve = [[p["used"], p["loss"]] for p in points if p["loss"] is not None and np.isfinite(p["loss"])]
        return {"run_id": run["run_id"], "proposal_id": run["proposal_id"], "rationale": run["rationale"],
                "status": run["status"] or "training", "step": points[-1]["step"] if points else 0,
                "used": points[-1]["used"] if points else 0.0, "points": curve, "forecasts": forecasts,
                "threshold": abort["threshold"] if abort else threshold, "abort": abort, "note": note}

    def _evaluator(self) -> SelfEvaluator:
        complete = self.ledger.query("SELECT count(*) FROM experiments WHERE status = 'ok'").rows[0][0]
        if self.evaluator is None or complete != self.calibrated_on:
            curves = self.ledger.curves(CurvesRequest(limit=self.settings.calibration_runs))
            self.evaluator, self.calibrated_on = SelfEvaluator(self.settings, curves), complete
        return self.evaluator


def _json(value: Any) -> Response:
    return Response(msgspec.json.encode(value), media_type="application/json")
