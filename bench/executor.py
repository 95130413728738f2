"""Executor overhead per experiment on the CPU target: everything that is not the charged training time.

The real loop runs (ledger, executor, proposer as processes on an embedded nats-server) with the CPU
target at a short wall-clock budget; per experiment, from the ledger's events:
    wall     = run.finished ts - the run's `started` progress ts   (the executor's whole handling)
    overhead = wall - training_s                                   (start-up, export, evaluation, bus)
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

from bench.loop import REPO, Loop
from shared.nats_server import EmbeddedServer

BUDGET_S = 10
EXPERIMENTS = 5


def overhead(budget_s: float = BUDGET_S, experiments: int = EXPERIMENTS) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as folder:
        server = EmbeddedServer(Path(folder) / "nats").start()
        loop = Loop(server, REPO / "targets" / "cpu_gpt", Path(folder), EXECUTOR_BUDGET_UNIT="seconds",
                    EXECUTOR_BUDGET_AMOUNT=budget_s, PROPOSER_MAX_EXPERIMENTS=experiments).start()
        try:
            finished = "SELECT count(*) FROM experiments WHERE finished_seq IS NOT NULL"
            loop.wait_for(lambda: loop.count(finished) >= experiments, 600 + 120 * experiments, "the experiments")
        finally:
            loop.stop()
            server.stop()
        rows = loop.sql("""
            WITH started AS (  -- the executor's own `started`, before it fetches the parent code
                SELECT run_id, min(ts) AS ts FROM events
                WHERE kind = 'run.progress' AND payload->>'phase' = 'started' GROUP BY run_id)
            SELECT epoch(f.ts) - epoch(s.ts) AS wall_s, e.training_s, e.startup_s, e.total_s
            FROM experiments e
            JOIN started s ON s.run_id = e.run_id
            JOIN events f ON f.run_id = e.run_id AND f.kind = 'run.finished'
            WHERE e.status = 'ok' ORDER BY e.finished_seq""")
    walls = [row[0] for row in rows]
    overheads = [wall - training for wall, training, *_ in rows]
    return {
        "budget_s": budget_s, "experiments_ok": len(rows),
        "wall_s_median": round(statistics.median(walls), 2),
        "overhead_s_median": round(statistics.median(overheads), 2),
        "overhead_over_budget_median": round(statistics.median(o / budget_s for o in overheads), 3),
        "startup_s_median": round(statistics.median(row[2] for row in rows), 2),
        "eval_and_export_s_median": round(statistics.median(row[3] - row[1] - row[2] for row in rows), 2),
        "outside_runner_s_median": round(statistics.median(row[0] - row[3] for row in rows), 3),
    }
