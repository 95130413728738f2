"""The morning report: one self-contained HTML file of a research run, and its charts as PNG files beside it.

    autoresearch report [--since 12h | 2026-11-23T18:00] [--out DIR]

Everything comes from SQL on the ledger through one `query` function (views.py): the ledger file offline or a
running ledger's POST /sql, the same code path for both. The HTML needs nothing else to be read, by a colleague,
offline: inline CSS, the charts as inline SVG, no script, no external reference.

Sections: the headline (best val-bpb against the baseline, experiments, hours); best-so-far against experiment
index and against wall-clock hours (autoresearch's progress.png, runs marked by outcome); the kept edits with their
Δbpb; what the agent discovered, grouped by kind of edit (the paper's §8.4, shared/edit_kinds.py); aborts and the
throughput they bought, G (eq. 9); the policy's learning curves, one point per policy.updated.
"""

from __future__ import annotations

import html
import io
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from services.ledger import views
from services.ledger.views import Experiment, Query, abort_figures, best_so_far, discoveries

MARKS = {  # outcome -> (matplotlib marker, colour, label): kept runs stand out, the rest recede
    "kept": ("o", "#1a7f37", "kept (new c*)"),
    "discarded": ("o", "#b0b7c3", "discarded"),
    "aborted": ("v", "#d1242f", "aborted by the evaluator"),
    "failed": ("x", "#6e40c9", "crashed / invalid / rejected / timeout"),
}


def write_report(query: Query, out_dir: Path, since: datetime | None = None) -> Path:
    """Write report.html and its charts (PNG) into out_dir; returns the HTML's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    found, truncated = views.experiments(query, since or views.EPOCH)
    champions = views.champions(query, since or views.EPOCH)
    updates = views.updates(query)
    charts = {"progress": progress_chart(found)}
    if updates:
        charts["policy"] = policy_chart(updates)
    svgs = {}
    for name, figure in charts.items():
        figure.savefig(out_dir / f"{name}.png", dpi=110)
        svgs[name] = _svg(figure)
    path = out_dir / "report.html"
    path.write_text(_page(found, champions, updates, svgs, since, truncated), encoding="utf-8")
    return path


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """`12h`, `90m`, `2d` (before now) or an ISO time (UTC unless it says otherwise)."""
    if match := re.fullmatch(r"(\d+(?:\.\d+)?)([mhd])", text.strip()):
        unit = {"m": "minutes", "h": "hours", "d": "days"}[match[2]]
        return (now or datetime.now(UTC)) - timedelta(**{unit: float(match[1])})
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"--since {text!r}: give a duration (12h, 90m, 2d) or an ISO time") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


# --- figures -----------------------------------------------------------------------------------------------


def progress_chart(experiments: list[Experiment]) -> Figure:
    figure = Figure(figsize=(11, 4.2), layout="constrained")
    by_index, by_hours = figure.subplots(1, 2, sharey=True)
    origin = min((e.proposed_at for e in experiments), default=None)
    hours = [(e.finished_at - origin).total_seconds() / 3600 for e in experiments] if origin else []
    best = best_so_far(experiments)
    scored = [e.val_bpb for e in experiments if e.val_bpb is not None]
    ceiling = max(scored) if scored else 1.0
    for axes, xs, label in ((by_index, list(range(1, len(experiments) + 1)), "experiment"),
                            (by_hours, hours, "wall-clock hours")):
        for outcome, (marker, colour, name) in MARKS.items():
            points = [(x, ceiling if e.val_bpb is None else e.val_bpb)
                      for x, e in zip(xs, experiments, strict=True) if e.outcome == outcome]
            if points:
                axes.scatter(*zip(*points, strict=True), marker=marker, color=colour, s=22, label=name, zorder=3)
        steps = [(x, b) for x, b in zip(xs, best, strict=True) if b is not None]
        if steps:
            axes.step(*zip(*steps, strict=True), where="post", color="#1a7f37", linewidth=1.6, label="best so far")
        axes.set_xlabel(label)
        axes.grid(alpha=0.3)
    by_index.set_ylabel("val-bpb (lower is better; no result: top edge)")
    handles, labels = by_index.get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncols=len(labels), fontsize=8, frameon=False)
    return figure


def policy_chart(updates: list[dict[str, Any]]) -> Figure:
    figure = Figure(figsize=(11, 2.6), layout="constrained")
    index = [u["update_index"] for u in updates]
    for axes, stat in zip(figure.subplots(1, len(views.POLICY_STATS)), views.POLICY_STATS, strict=True):
        axes.plot(index, [u[stat] for u in updates], marker="o", markersize=3, color="#0969da")
        axes.set_title(stat.replace("_", " "), fontsize=9)
        axes.set_xlabel("PPO update", fontsize=8)
        axes.tick_params(labelsize=7)
        axes.grid(alpha=0.3)
    return figure


# --- HTML --------------------------------------------------------------------------------------------------

STYLE = """
body{font:15px/1.5 system-ui,-apple-system,Segoe UI,sans-serif;margin:0 auto;max-width:1100px;padding:1rem;
color:#1f2328}
h1{font-size:1.5rem;margin-bottom:.2rem}h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #d0d7de}
.meta{color:#59636e}.figures{display:flex;flex-wrap:wrap;gap:1.5rem;margin:1rem 0}
.figures div{min-width:9rem}.figures b{display:block;font-size:1.4rem}
table{border-collapse:collapse;width:100%;font-size:.9rem}th,td{text-align:left;padding:.3rem .5rem;
border-bottom:1px solid #eaeef2;vertical-align:top}.num{text-align:right;font-variant-numeric:tabular-nums}
.chart svg{width:100%;height:auto}.scroll{overflow-x:auto}
"""


def _page(experiments: list[Experiment], champions: list[dict[str, Any]], updates: list[dict[str, Any]],
          svgs: dict[str, str], since: datetime | None, truncated: bool) -> str:
    aborts = abort_figures(experiments)
    best = next((b for b in reversed(best_so_far(experiments)) if b is not None), None)
    baseline = champions[0]["val_bpb"] if champions else None
    hours = views.hours_between(experiments[0].proposed_at, experiments[-1].finished_at) if experiments else 0.0
    figures = {
        "best val-bpb (c*)": _number(best),
        "baseline": _number(baseline),
        "Δbpb against the baseline": _delta(None if best is None or baseline is None else best - baseline),
        "experiments": str(len(experiments)),
        "wall clock": f"{hours:.1f} h" if hours >= 1 else f"{hours * 60:.0f} min",
        "experiments / hour": f"{len(experiments) / hours:.1f}" if hours else "-",
        "aborted": f"{aborts['aborted']} of {aborts['trained']}",
        "G (eq. 9)": f"{aborts['G']:.2f}",
    }
    scope = f"since {since:%Y-%m-%d %H:%M} UTC" if since else "the whole ledger"
    parts = [
        f"<h1>AutoResearch-RL research report</h1><p class=meta>{html.escape(scope)}; written "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC from the ledger"
        + (" (cut at the ledger API's 10 000 rows: use a later --since)" if truncated else "") + "</p>",
        "<div class=figures>" + "".join(f"<div><b>{html.escape(v)}</b>{html.escape(k)}</div>"
                                        for k, v in figures.items()) + "</div>",
        "<h2>Best so far</h2>", f"<div class=chart>{svgs['progress']}</div>",
        "<h2>Kept edits</h2>", _kept_table(champions),
        "<h2>What the agent discovered, by kind of edit</h2>", _kinds_table(discoveries(experiments)),
        "<h2>Aborts</h2>", _aborts_text(aborts),
        "<h2>Policy learning</h2>",
        f"<div class=chart>{svgs['policy']}</div>" + _updates_text(updates) if updates else
        "<p>No policy.updated yet: the learner publishes one per PPO batch of language-model proposals.</p>",
    ]
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><meta name=viewport "
            f"content='width=device-width,initial-scale=1'><title>AutoResearch-RL report</title>"
            f"<style>{STYLE}</style></head><body>{''.join(parts)}</body></html>\n")


def _kept_table(champions: list[dict[str, Any]]) -> str:
    rows = [[row["proposal_id"], views.as_time(row["finished_at"]).strftime("%m-%d %H:%M"), row["kind"],
             row["rationale"] or "", _number(row["val_bpb"]), _delta(row["delta"])] for row in champions]
    return _table(["proposal", "kept at", "kind", "rationale", "val-bpb", "Δbpb"], rows, numeric={4, 5})


def _kinds_table(kinds: list[dict[str, Any]]) -> str:
    rows = [[k["kind"], str(k["tried"]), str(k["ok"]), str(k["kept"]), _delta(k["best"]), k["example"]]
            for k in kinds]
    return _table(["kind", "tried", "ran ok", "kept", "best Δbpb vs c* then", "that edit"], rows,
                  numeric={1, 2, 3, 4})


def _aborts_text(aborts: dict[str, Any]) -> str:
    if not aborts["trained"]:
        return "<p>No run has trained yet.</p>"
    stop = "" if aborts["median_stop"] is None else f", at a median {aborts['median_stop']:.0%} of their budget"
    return (f"<p>{aborts['aborted']} of {aborts['trained']} runs that trained were aborted{stop}. They left "
            f"{aborts['saved']:.1%} of all the training budget unspent, so the same hours hold "
            f"G = 1/(1 − {aborts['saved']:.3f}) = {aborts['G']:.2f} times the experiments (eq. 9, in training "
            "budget; process start and evaluation are not counted). Whether an abort was wrong cannot be known "
            "from a live run, whose end was never seen: <code>autoresearch evaluator replay</code> measures false "
            "aborts on recorded complete curves.</p>")


def _updates_text(updates: list[dict[str, Any]]) -> str:
    last = updates[-1]
    return (f"<p>{len(updates)} PPO update(s); the latest, {html.escape(last['policy_version'])}: mean reward "
            f"{last['mean_reward']:.3f}, entropy {last['entropy']:.3f}, approx KL {last['approx_kl']:.4f}.</p>")


def _table(header: list[str], rows: list[list[str]], numeric: set[int]) -> str:
    if not rows:
        return "<p>None yet.</p>"
    head = "".join(f"<th{' class=num' if i in numeric else ''}>{html.escape(h)}</th>" for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(f"<td{' class=num' if i in numeric else ''}>{html.escape(cell)}</td>"
                                    for i, cell in enumerate(row)) + "</tr>" for row in rows)
    return f"<div class=scroll><table><tr>{head}</tr>{body}</table></div>"


# --- plumbing ----------------------------------------------------------------------------------------------


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _delta(value: float | None) -> str:
    return "-" if value is None else f"{value:+.4f}"


def _svg(figure: Figure) -> str:
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg")
    svg = buffer.getvalue()
    return svg[svg.index("<svg"):]  # no XML prolog or doctype inside HTML

