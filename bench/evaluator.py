"""The self-evaluator's figures.

evaluator_replay   its decisions and the baselines' replayed on the recorded complete curves of the
                   CPU target (bench/data/curves_*.jsonl, written by `autoresearch evaluator record`)
abort_latency      run.aborted published -> the run's run.finished published, on the real bus: the
                   executor publishes run.finished only after every process of the run is gone
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
from datetime import datetime
from pathlib import Path

from bench.loop import REPO, Loop
from services.evaluator.replay import replay
from shared.bus import Bus
from shared.config import Evaluator
from shared.curves import read_curves
from shared.diffs import EMPTY_SHA256
from shared.events import EditOp, ProposalCreated, RunAborted, new_id, now
from shared.nats_server import EmbeddedServer

DATA = Path(__file__).parent / "data"
"""Curves files `curves_*.jsonl`: each one recording, one loop's history from its baseline."""
ABORTS = 20


def replay_figures() -> dict[str, object]:
    """Every rule on the recorded curves with the evaluator's default settings."""
    settings = Evaluator()
    files = sorted(DATA.glob("curves_*.jsonl"))
    return {"curves": [str(path.relative_to(REPO)) for path in files],
            "settings": {name: getattr(settings, name) for name in settings.__struct_fields__},
            } | replay([read_curves(path) for path in files], settings)


def abort_latency(aborts: int = ABORTS) -> dict[str, object]:
    target = REPO / "targets" / "cpu_gpt"
    code = (target / "train.py").read_text()
    with tempfile.TemporaryDirectory() as folder:
        server = EmbeddedServer(Path(folder) / "nats").start()
        loop = Loop(server, target, Path(folder), EXECUTOR_BUDGET_UNIT="seconds").start("ledger", "executor")
        latencies = []
        try:
            loop.wait_for(lambda: loop.count("SELECT 0") == 0, 60, "the ledger")
            for index in range(aborts):
                run_id = f"abort-{index}-1"
                asyncio.run(_publish(server.url, ProposalCreated(
                    event_id=new_id(), producer="bench/1", ts=now(), proposal_id=f"abort-{index}",
                    parent_code_sha256=EMPTY_SHA256, ops=[EditOp("insert", 1, 0, code)], unified_diff="",
                    policy="bench", policy_version="0")))
                training = (f"SELECT count(*) FROM events WHERE run_id = '{run_id}' AND kind = 'run.progress' "
                            "AND payload->>'phase' = 'training'")
                loop.wait_for(lambda q=training: loop.count(q) >= 1, 300, "training")
                aborted_at = asyncio.run(_publish(server.url, RunAborted(
                    event_id=new_id(), producer="bench/1", ts=now(), run_id=run_id, at_train_s=0.0, forecast=None,
                    forecast_low=None, forecast_high=None, threshold=None, statistic=None, boundary=None,
                    commentary="abort latency benchmark")))
                finished = f"SELECT ts FROM events WHERE run_id = '{run_id}' AND kind = 'run.finished'"
                loop.wait_for(lambda q=finished: bool(loop.live_sql(q)), 120, "run.finished")
                finished_at = datetime.fromisoformat(loop.live_sql(finished)[0][0])
                latencies.append((finished_at - aborted_at).total_seconds())
        finally:
            loop.stop()
            server.stop()
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    return {"aborts": len(latencies), "latency_s_p50": round(cuts[49], 3), "latency_s_p99": round(cuts[98], 3),
            "latency_s_max": round(max(latencies), 3), "latency_s_all": [round(x, 3) for x in latencies]}


async def _publish(url: str, event: ProposalCreated | RunAborted) -> datetime:
    bus = await Bus.connect([url], "bench")
    await bus.publish(event)
    await bus.close()
    return event.ts.replace(tzinfo=None)
