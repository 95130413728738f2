"""Training curves of finished runs, read from the event log: what `ledger.curves` answers."""

from __future__ import annotations

import duckdb

from shared.curves import Curve, CurvesRequest


def curves_sql(limit: int, complete_only: bool) -> str:
    """Each finished run's training points, oldest run first. budget_used came with run.progress later
    than the first events; for those before it, the same fraction is computed from the run's budget."""
    only_complete = "AND e.status = 'ok' AND e.val_bpb IS NOT NULL" if complete_only else ""
    return f"""
WITH runs AS (
    SELECT e.run_id, e.proposal_id, e.finished_seq, e.status, e.val_bpb, e.training_s, e.total_s, f.budget,
           split_part(f.budget, ' ', 2) AS unit, TRY_CAST(split_part(f.budget, ' ', 1) AS DOUBLE) AS amount
    FROM experiments e JOIN finishes f ON f.seq = e.finished_seq
    WHERE e.finished_seq IS NOT NULL {only_complete}
    ORDER BY e.finished_seq DESC LIMIT {int(limit)}
), points AS (
    SELECT p.seq, p.run_id,
           coalesce(TRY_CAST(p.payload->>'budget_used' AS DOUBLE),
                    least(1.0, CASE r.unit WHEN 'seconds' THEN TRY_CAST(p.payload->>'elapsed_train_s' AS DOUBLE)
                                           WHEN 'steps' THEN TRY_CAST(p.payload->>'step' AS DOUBLE)
                                           ELSE TRY_CAST(p.payload->>'tokens' AS DOUBLE) END / r.amount)) AS used,
           TRY_CAST(p.payload->>'train_loss' AS DOUBLE) AS loss,
           coalesce(TRY_CAST(p.payload->>'nonfinite_loss' AS BOOLEAN), false) AS nonfinite
    FROM events p JOIN runs r ON r.run_id = p.run_id
    WHERE p.kind = 'run.progress' AND p.payload->>'phase' = 'training'
)
SELECT r.run_id, r.proposal_id, r.finished_seq, r.status, r.val_bpb, r.budget, r.training_s, r.total_s,
       coalesce(list(p.used ORDER BY p.seq) FILTER (WHERE p.loss IS NOT NULL), []) AS used,
       coalesce(list(p.loss ORDER BY p.seq) FILTER (WHERE p.loss IS NOT NULL), []) AS loss,
       coalesce(bool_or(p.nonfinite), false) AS diverged
FROM runs r LEFT JOIN points p ON p.run_id = r.run_id
GROUP BY ALL
ORDER BY r.finished_seq
"""


def read_curves(con: duckdb.DuckDBPyConnection, request: CurvesRequest) -> list[Curve]:
    rows = con.execute(curves_sql(request.limit, request.complete_only)).fetchall()
    return [Curve(run_id=run_id, proposal_id=proposal_id, finished_seq=seq, status=status, final_bpb=val_bpb,
                  budget=budget, training_s=training_s or 0.0, total_s=total_s or 0.0, used=used, loss=loss,
                  diverged=diverged)
            for run_id, proposal_id, seq, status, val_bpb, budget, training_s, total_s, used, loss, diverged in rows]
