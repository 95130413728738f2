"""The paper's Table 1 on this project's own target: policies side by side, at the same number of experiments.

    python -m bench.research [--experiments N] [--seeds S] [--policies random,llm,llm+ppo] [--evaluator on,off]
                             [--budget AMOUNT --budget-unit tokens|steps]
                             (make research) -> bench/results/research.json, research.png

Each arm is one research run of the whole loop, every service a process on its own nats-server as `make up` runs
them, in deterministic budget mode, stopped once N experiments have finished. The budget is in tokens by default:
every experiment trains on as many tokens, whatever its batch size. (A budget in steps rewards bigger batches: in a
first run on steps, random search's first win was BATCH_SIZE 32 -> 64, twice the compute.)
Arms: policy x self-evaluator on/off x seed; the seed is the proposer's draws, the training runs' seed and the
learner's. Policies:
- baseline: the unmodified train.py, the first experiment of every arm (not an arm of its own);
- random: uniform draws from the grid of train.py's constants;
- llm: the proposing model without learning (lm-score; no learner runs);
- llm+ppo: the same, with the learner's PPO updates hot-loaded as they come;
- greedy-llm: a chat endpoint at temperature 0, only where `[proposer] endpoint` is configured.

Per policy: the best val-bpb after N experiments (mean and 95% t-interval over seeds), best-so-far curves, what was
kept by kind of edit; per evaluator setting: experiments per hour, and G both live (experiments per hour with the
evaluator over without it, the same policy and seed) and by eq. (9) from the budget the aborts saved. Whether the
paper's ordering holds is tested pairwise, paired by seed (one-sided t-test on the seeds' differences).
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from scipy import stats

from bench.loop import REPO, Loop
from bench.report import RESULTS, write
from services.ledger import views
from services.ledger.store import Ledger
from shared.config import load_config
from shared.edit_kinds import BASELINE
from shared.nats_server import EmbeddedServer
from shared.target.records import Budget

POLICIES = {
    "random": {"PROPOSER_POLICY": "random"},
    "llm": {"PROPOSER_POLICY": "lm-score"},
    "llm+ppo": {"PROPOSER_POLICY": "lm-score"},
    "greedy-llm": {"PROPOSER_POLICY": "openai-greedy", "PROPOSER_TEMPERATURE": 0},
}
LEARNS = {"llm+ppo"}
ORDER = ("baseline", "random", "greedy-llm", "llm", "llm+ppo")
"""The paper's claim, worst to best: each policy beats the ones before it (Table 1; llm is ours, between the two)."""
ALPHA = 0.05
FINISHED = "SELECT count(*) FROM experiments WHERE finished_seq IS NOT NULL"
LEDGER_FILE = "ledger.duckdb"


@dataclass(frozen=True)
class Arm:
    policy: str
    evaluator: bool
    seed: int

    @property
    def name(self) -> str:
        return f"{self.policy}/evaluator-{'on' if self.evaluator else 'off'}/seed{self.seed}"


@dataclass
class ArmResult:
    arm: Arm
    baseline_bpb: float
    best_bpb: float
    curve: list[float | None]
    """c*'s val-bpb after each experiment (views.best_so_far)."""
    statuses: dict[str, int]
    hours: float
    """From the first proposal to the last finished run: the loop's time, not its processes' start-up."""
    aborts: dict[str, object]
    kept_by_kind: dict[str, int] = field(default_factory=dict)

    @property
    def experiments_per_hour(self) -> float:
        return len(self.curve) / self.hours


def arms(policies: Iterable[str], evaluator: Iterable[bool], seeds: Iterable[int]) -> list[Arm]:
    return [Arm(policy, on, seed) for seed in seeds for policy in policies for on in evaluator]


def run_arm(arm: Arm, target: Path, experiments: int, budget: Budget, work: Path,
            settings: dict[str, object]) -> ArmResult:
    """One research run: start the stack, wait for `experiments` finished runs, stop it, read its ledger. An arm
    that an earlier invocation finished in `work` (--keep) is read, not run again; one it left unfinished is run
    again from scratch (its experiments per hour would not compare)."""
    if (work / LEDGER_FILE).exists():
        found = _experiments(work)
        if len(found) >= experiments:
            return read_arm(arm, found[:experiments])
        shutil.rmtree(work)
    work.mkdir(parents=True)
    server = EmbeddedServer(work / "nats").start()
    loop = Loop(server, target, work, **(POLICIES[arm.policy] | {
        "PROPOSER_MAX_EXPERIMENTS": experiments, "PROPOSER_SEED": arm.seed, "EXECUTOR_SEED": arm.seed,
        "LEARNER_SEED": arm.seed, "EXECUTOR_BUDGET_UNIT": budget.unit, "EXECUTOR_BUDGET_AMOUNT": budget.amount,
        "EXECUTOR_ACK_WAIT_S": 30, "EXECUTOR_PROGRESS_INTERVAL_S": 1.0} | settings))
    services = ["ledger", "executor", *(["evaluator"] if arm.evaluator else []),
                *(["learner"] if arm.policy in LEARNS else []), "proposer"]
    try:
        loop.start(*services)
        loop.wait_for(lambda: loop.count(FINISHED) >= experiments, 3600 + 600 * experiments,
                      f"{arm.name}'s {experiments} experiments")
    finally:
        loop.stop()
        server.stop()
    return read_arm(arm, _experiments(work)[:experiments])


def _experiments(work: Path) -> list[views.Experiment]:
    ledger = Ledger(work / LEDGER_FILE, read_only=True)
    try:
        return views.experiments(ledger.query)[0]
    finally:
        ledger.close()


def read_arm(arm: Arm, found: list[views.Experiment]) -> ArmResult:
    baseline = next(e for e in found if e.kind == BASELINE and e.purpose == "search")
    if baseline.val_bpb is None:
        raise RuntimeError(f"{arm.name}: the unmodified train.py did not finish ({baseline.status})")
    curve = views.best_so_far(found)
    statuses: dict[str, int] = {}
    kept: dict[str, int] = {}
    for e in found:
        statuses[e.outcome] = statuses.get(e.outcome, 0) + 1
        if e.kept and e.kind != BASELINE:
            kept[e.kind] = kept.get(e.kind, 0) + 1
    hours = views.hours_between(min(e.proposed_at for e in found), max(e.finished_at for e in found))
    return ArmResult(arm, baseline.val_bpb, min(b for b in curve if b is not None), curve, statuses, hours,
                     views.abort_figures(found), kept)


def interval(values: Sequence[float]) -> dict[str, float | int | None]:
    """Mean and the half-width of its 95% Student-t interval (None from one value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return {"n": len(values), "mean": mean, "half_width": None}
    half = stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5
    return {"n": len(values), "mean": mean, "half_width": float(half)}


def ordering(best: dict[str, dict[int, float]]) -> list[dict[str, object]]:
    """For each pair of policies next to each other in the paper's ORDER (among those run): does the later one
    reach a lower best val-bpb? A one-sided paired t-test on the per-seed differences, said in words."""
    present = [policy for policy in ORDER if policy in best]
    verdicts = []
    for worse, better in zip(present, present[1:], strict=False):
        seeds = sorted(set(best[worse]) & set(best[better]))
        differences = [best[better][seed] - best[worse][seed] for seed in seeds]
        verdict: dict[str, object] = {"better": better, "worse": worse, "seeds": len(seeds),
                                      "mean_difference": statistics.fmean(differences) if differences else None}
        if len(seeds) < 2:
            verdict |= {"p": None, "significant": False,
                        "statement": f"{better} vs {worse}: untestable with {len(seeds)} seed(s)"}
        elif statistics.pstdev(differences) == 0:
            verdict |= {"p": None, "significant": False,
                        "statement": f"{better} vs {worse}: identical differences on every seed; no test"}
        else:
            p = float(stats.ttest_rel([best[better][s] for s in seeds], [best[worse][s] for s in seeds],
                                      alternative="less").pvalue)
            significant = p < ALPHA
            verdict |= {"p": p, "significant": significant, "statement": (
                f"{better} {'beats' if significant else 'does not significantly beat'} {worse}: "
                f"mean difference {verdict['mean_difference']:+.4f} bpb, p = {p:.3g} "
                f"(one-sided paired t over {len(seeds)} seeds)")}
        verdicts.append(verdict)
    return verdicts


def summarize(results: list[ArmResult]) -> dict[str, object]:
    """Table 1 and the throughput figures from the arms' results."""
    settings = sorted({r.arm.evaluator for r in results}, reverse=True)
    tested = settings[0]  # the evaluator's setting the ordering is tested on: on where it ran
    best: dict[str, dict[int, float]] = {"baseline": {}}
    for r in results:
        if r.arm.evaluator == tested:
            best.setdefault(r.arm.policy, {})[r.arm.seed] = r.best_bpb
            best["baseline"].setdefault(r.arm.seed, r.baseline_bpb)
    table = {policy: interval(list(by_seed.values())) for policy, by_seed in best.items()}
    return {
        "table": table, "ordering_tested_with_evaluator": tested, "ordering": ordering(best),
        "throughput": throughput(results), "kept_by_kind": kept_by_kind(results),
        "baseline_spread": _spread([r.baseline_bpb for r in results]),
    }


def throughput(results: list[ArmResult]) -> dict[str, object]:
    """Experiments per hour per evaluator setting, and G: live (on over off, same policy and seed) and eq. (9)."""
    by_setting = {
        ("on" if on else "off"): interval([r.experiments_per_hour for r in results if r.arm.evaluator == on])
        for on in sorted({r.arm.evaluator for r in results}, reverse=True)}
    arms_off = {(r.arm.policy, r.arm.seed): r for r in results if not r.arm.evaluator}
    live = [r.experiments_per_hour / arms_off[r.arm.policy, r.arm.seed].experiments_per_hour
            for r in results if r.arm.evaluator and (r.arm.policy, r.arm.seed) in arms_off]
    eq9 = [float(r.aborts["G"]) for r in results if r.arm.evaluator]
    aborted = sum(int(r.aborts["aborted"]) for r in results if r.arm.evaluator)
    return {"experiments_per_hour": by_setting, "G_live": interval(live) if live else None,
            "G_eq9": interval(eq9) if eq9 else None, "aborted_runs": aborted}


def kept_by_kind(results: list[ArmResult]) -> dict[str, dict[str, int]]:
    """What each policy discovered: kept edits per kind, over its arms (the paper's §8.4)."""
    kinds: dict[str, dict[str, int]] = {}
    for r in results:
        for kind, count in r.kept_by_kind.items():
            kinds.setdefault(r.arm.policy, {})[kind] = kinds.get(r.arm.policy, {}).get(kind, 0) + count
    return kinds


def _spread(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "max": max(values)}


def chart(results: list[ArmResult], path: Path) -> Path:
    """Best-so-far val-bpb against experiment index: per policy and evaluator setting, the mean over seeds."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 4.5), layout="constrained")
    axes = figure.add_subplot()
    lines: dict[tuple[str, bool], list[list[float | None]]] = {}
    for r in results:
        lines.setdefault((r.arm.policy, r.arm.evaluator), []).append(r.curve)
    for (policy, on), curves in sorted(lines.items()):
        mean = [statistics.fmean(points) if (points := [c[i] for c in curves if c[i] is not None]) else None
                for i in range(min(len(c) for c in curves))]
        axes.plot(range(1, len(mean) + 1), [float("nan") if m is None else m for m in mean],
                  linestyle="-" if on else "--", label=f"{policy}, evaluator {'on' if on else 'off'} "
                                                     f"({len(curves)} seed{'s' * (len(curves) > 1)})")
    axes.set(xlabel="experiment", ylabel="best val-bpb so far (mean over seeds)", title="Research runs side by side")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.savefig(path, dpi=120)
    return path


def research(target: Path, arms_to_run: list[Arm], experiments: int, budget: Budget, work: Path,
             settings: dict[str, object]) -> list[ArmResult]:
    """Every arm, one after the other (side by side they would share the CPU and slow each other)."""
    results = []
    for arm in arms_to_run:
        results.append(result := run_arm(arm, target, experiments, budget, work / arm.name.replace("/", "-"),
                                         settings))
        print(f"{arm.name}: best {result.best_bpb:.4f} (baseline {result.baseline_bpb:.4f}), "
              f"{result.experiments_per_hour:.0f} experiments/h, {result.statuses}", file=sys.stderr, flush=True)
    return results


def _setting(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. EVALUATOR_WARMUP_RUNS=5), got {text!r}")
    return key.upper(), value


def _choices(allowed: Iterable[str]):
    allowed = list(allowed)

    def parse(text: str) -> list[str]:
        chosen = [item.strip() for item in text.split(",") if item.strip()]
        if not chosen or set(chosen) - set(allowed):
            raise argparse.ArgumentTypeError(f"choose among {', '.join(allowed)}; got {text!r}")
        return chosen
    return parse


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.research", description=__doc__.splitlines()[0])
    greedy = ["greedy-llm"] if load_config().proposer.endpoint else []
    parser.add_argument("--policies", type=_choices(POLICIES), default=["random", "llm", "llm+ppo", *greedy],
                        help="comma-separated (default: random,llm,llm+ppo, and greedy-llm with an endpoint)")
    parser.add_argument("--evaluator", type=_choices(["on", "off"]), default=["on", "off"])
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..S-1 (default 3)")
    parser.add_argument("--experiments", type=int, default=30, help="finished experiments per arm (default 30)")
    parser.add_argument("--budget", type=int, default=122_880,
                        help="training budget per experiment (default 122880 tokens: the CPU target's 30 steps)")
    parser.add_argument("--budget-unit", choices=["tokens", "steps"], default="tokens")
    parser.add_argument("--target", type=Path, default=REPO / "targets" / "cpu_gpt")
    parser.add_argument("--set", type=_setting, action="append", default=[], metavar="KEY=VALUE",
                        help="a loop setting for every arm, as AUTORESEARCH_<KEY> (e.g. EVALUATOR_WARMUP_RUNS=5)")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (ledgers, logs); run again "
                        "with the same folder, the arms it finished are read, not run again")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where research.json and research.png go")
    return parser


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    budget = Budget(args.budget_unit, args.budget)
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        work = args.keep or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="research-")))
        results = research(args.target.resolve(), arms(args.policies, [e == "on" for e in args.evaluator],
                                                       range(args.seeds)),
                           args.experiments, budget, work, dict(args.set))
    args.out.mkdir(parents=True, exist_ok=True)
    chart(results, args.out / "research.png")
    write("research", {"target": str(args.target), "experiments": args.experiments, "budget": str(budget),
                      "seeds": args.seeds, "settings": dict(args.set), "runtime_h": (time.monotonic() - started) / 3600,
                      **summarize(results), "arms": [record(r) for r in results]}, args.out)
    return 0


def record(result: ArmResult) -> dict[str, object]:
    return asdict(result) | {"name": result.arm.name, "experiments_per_hour": result.experiments_per_hour}


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
