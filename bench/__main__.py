"""python -m bench [name ...]: run the benchmarks (all by default) and write bench/results/<name>.json."""

from __future__ import annotations

import sys

from bench import evaluator, executor, learner, ledger
from bench.report import write

BENCHMARKS = {
    "ledger_append": ledger.append_rate,
    "ledger_nats_ingest": ledger.nats_ingest_rate,
    "ledger_commit_latency": ledger.commit_latency,
    "ledger_replay_1m": ledger.replay_time,
    "executor_overhead": executor.overhead,
    "evaluator_replay": evaluator.replay_figures,
    "abort_latency": evaluator.abort_latency,
    "learner_cost": learner.learner_cost,
}


def main(names: list[str]) -> int:
    unknown = set(names) - set(BENCHMARKS)
    if unknown:
        print(f"unknown benchmark(s) {sorted(unknown)}; known: {sorted(BENCHMARKS)}", file=sys.stderr)
        return 2
    for name in names or BENCHMARKS:
        write(name, BENCHMARKS[name]())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
