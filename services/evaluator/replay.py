"""Offline replay: abort decisions on recorded complete curves, for the self-evaluator and the baselines.

Runs are replayed one after another in the order they finished. Every rule sees each run look by
look and may stop it; it learns only from runs it has seen end (a stopped run never shows it its
final val-bpb). Whether a stop was right is judged against the truth the recording knows: run i
is *good* if its final val-bpb ≤ τ_i = bpb*_i + α·σ_h,i (eq. 7) with bpb*_i and σ_h,i taken over
every run before it, and a *would-be best* if it beats bpb*_i.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import numpy as np
from scipy import stats

from services.evaluator.baselines import BASELINES, StoppingRule
from services.evaluator.calibration import Z90
from services.evaluator.decision import threshold
from services.evaluator.judge import LiveRun, SelfEvaluator, looks
from shared.config import Evaluator as Settings
from shared.curves import Curve

SIGMA_H_RUNS = 32
"""σ_h is the spread of the last K = 32 finished runs, as in the ledger's history buffer."""
SPEARMAN_LOOK = 0.4


class SelfEvaluatorRule:
    """The self-evaluator as a StoppingRule: it knows bpb* and σ_h only from the runs it let finish."""

    def __init__(self, settings: Settings, paper: bool = False):
        self.name = "paper SPRT (looks independent)" if paper else "self-evaluator"
        self.paper = paper
        self.evaluator = SelfEvaluator(settings, [])
        self.finals: list[float] = []
        self.run = LiveRun("replay-0")
        self.runs = 0

    def should_stop(self, t: np.ndarray, loss: np.ndarray, budget_s: float, fraction: float) -> bool:
        self.run.used, self.run.loss = list(np.asarray(t) / budget_s), list(loss)
        look = round(fraction / self.evaluator.settings.look_fraction) - 1
        bpb_star, sigma_h = _best_and_spread(self.finals)
        return self.evaluator.judge(self.run, look, bpb_star, sigma_h, self.paper).abort

    def observe(self, t: np.ndarray, loss: np.ndarray, budget_s: float, final_bpb: float | None,
                stopped_at: float | None) -> None:
        if final_bpb is not None:
            self.finals.append(final_bpb)
            self.evaluator.add_complete(Curve(run_id=self.run.run_id, proposal_id="", finished_seq=self.runs,
                                              status="ok", final_bpb=final_bpb, budget="1 seconds",
                                              training_s=0.0, total_s=0.0, used=list(np.asarray(t) / budget_s),
                                              loss=list(loss)), self.run)
        self.runs += 1
        self.run = LiveRun(f"replay-{self.runs}")


def _best_and_spread(finals: list[float]) -> tuple[float | None, float | None]:
    if not finals:
        return None, None
    recent = finals[-SIGMA_H_RUNS:]
    return min(finals), (statistics.stdev(recent) if len(recent) >= 2 else None)


@dataclass(frozen=True)
class Outcome:
    stopped_at: float | None
    decision_ms: list[float]


def replay_rule(rule: StoppingRule, curves: list[Curve], settings: Settings) -> list[Outcome]:
    """Feed every curve to the rule look by look, in order; what it did to each run."""
    outcomes = []
    for curve in curves:
        used, loss = np.asarray(curve.used), np.asarray(curve.loss)
        stopped_at, timings = None, []
        for at in looks(settings):
            seen = used <= at + 1e-9
            if not seen.any():
                continue
            started = time.perf_counter()
            stop = rule.should_stop(used[seen], loss[seen], 1.0, round(float(at), 9))
            timings.append((time.perf_counter() - started) * 1000)
            if stop:
                stopped_at = float(at)
                break
        reached = used <= (stopped_at if stopped_at is not None else 1.0) + 1e-9
        rule.observe(used[reached], loss[reached], 1.0, None if stopped_at is not None else curve.final_bpb,
                     stopped_at)
        outcomes.append(Outcome(stopped_at, timings))
    return outcomes


@dataclass(frozen=True)
class Truth:
    """What the recording knows about each run, whatever a rule did."""

    final: np.ndarray
    tau: np.ndarray
    bpb_star: np.ndarray

    @classmethod
    def of(cls, curves: list[Curve], alpha: float) -> Truth:
        finals = [float(c.final_bpb) for c in curves]  # type: ignore[arg-type]
        taus, bests = [], []
        for i in range(len(finals)):
            best, spread = _best_and_spread(finals[:i])
            bests.append(np.inf if best is None else best)
            taus.append(np.inf if best is None or spread is None else threshold(best, spread, alpha))
        return cls(np.array(finals), np.array(taus), np.array(bests))


def summarise(outcomes: list[Outcome], truth: Truth) -> dict[str, object]:
    """The replay's figures for one rule (eq. 9 for G, with p the fraction of runs it stopped)."""
    stopped = np.array([o.stopped_at is not None for o in outcomes])
    fractions = np.array([o.stopped_at for o in outcomes if o.stopped_at is not None])
    good = truth.final <= truth.tau
    false_aborts = int((stopped & good).sum())
    low, high = _clopper_pearson(false_aborts, int(good.sum()))
    mu_abort = float(fractions.mean()) if fractions.size else 1.0
    saved = float((1.0 - fractions).sum() / len(outcomes))
    timings = [ms for o in outcomes for ms in o.decision_ms]
    return {
        "runs": len(outcomes),
        "aborted": int(stopped.sum()),
        "aborted_fraction": round(float(stopped.mean()), 4),
        "mu_abort": round(mu_abort, 4),
        "G": round(1.0 / (1.0 - saved), 4),
        "false_aborts": false_aborts,
        "good_runs": int(good.sum()),
        "false_abort_rate": round(false_aborts / max(1, int(good.sum())), 4),
        "false_abort_rate_95": [round(low, 4), round(high, 4)],
        "aborted_would_be_best": int((stopped & (truth.final < truth.bpb_star)).sum()),
        "decision_ms_median": round(statistics.median(timings), 3) if timings else None,
        "decision_ms_p99": round(float(np.percentile(timings, 99)), 3) if timings else None,
    }


def _clopper_pearson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    tail = (1 - confidence) / 2
    low = 0.0 if k == 0 else float(stats.beta.ppf(tail, k, n - k + 1))
    high = 1.0 if k == n else float(stats.beta.ppf(1 - tail, k + 1, n - k))
    return low, high


def forecast_quality(sequences: list[list[Curve]], settings: Settings) -> dict[str, object]:
    """How good the calibrated forecast is, with every run completing and calibrating the next: MAE and
    90% interval coverage at each look, and Spearman(forecast at 40% of the budget, final)."""
    fractions = looks(settings)
    errors: dict[int, list[float]] = {k: [] for k in range(len(fractions))}
    covered: dict[int, list[bool]] = {k: [] for k in range(len(fractions))}
    at_spearman, finals_spearman = [], []
    spearman_look = int(np.argmin(np.abs(fractions - SPEARMAN_LOOK)))
    for curves in sequences:
        evaluator = SelfEvaluator(settings, [])  # each loop history starts uncalibrated
        for i, curve in enumerate(curves):
            run = LiveRun(f"quality-{i}", list(curve.used), list(curve.loss))
            for k in range(len(fractions)):
                evaluator.judge(run, k, None, None)  # computes the look's features; no decision without bpb*
                prediction = evaluator.predict(run, k)
                if prediction is None or evaluator.calibration_runs < settings.warmup_runs:
                    continue
                error = prediction.mean - float(curve.final_bpb)  # type: ignore[arg-type]
                errors[k].append(abs(error))
                covered[k].append(abs(error) <= Z90 * prediction.std)
                if k == spearman_look:
                    at_spearman.append(prediction.mean)
                    finals_spearman.append(curve.final_bpb)
            evaluator.add_complete(curve, run)
    rho = stats.spearmanr(at_spearman, finals_spearman).statistic if len(at_spearman) >= 3 else None
    return {
        "mae_by_look": {f"{fractions[k]:.1f}": round(float(np.mean(v)), 4) for k, v in errors.items() if v},
        "coverage90_by_look": {f"{fractions[k]:.1f}": round(float(np.mean(v)), 3) for k, v in covered.items() if v},
        "coverage90": round(float(np.mean(everywhere)), 3) if (everywhere := [c for v in covered.values() for c in v])
        else None,
        f"spearman_at_{SPEARMAN_LOOK:.1f}": None if rho is None else round(float(rho), 4),
    }


def rules(settings: Settings) -> list[StoppingRule]:
    return [SelfEvaluatorRule(settings), SelfEvaluatorRule(settings, paper=True),
            *(factory() for factory in BASELINES.values())]


def replay(sequences: list[list[Curve]], settings: Settings) -> dict[str, object]:
    """Every rule on the same complete curves, and the forecast's own quality. Each sequence is one loop's
    history (a recording) replayed from its start with fresh rules; the figures pool every sequence."""
    complete = [[c for c in curves if c.complete and c.used] for curves in sequences]
    truths = [Truth.of(curves, settings.alpha) for curves in complete]
    truth = Truth(*(np.concatenate([getattr(t, name) for t in truths]) for name in ("final", "tau", "bpb_star")))
    outcomes: dict[str, list[Outcome]] = {rule.name: [] for rule in rules(settings)}
    for curves in complete:
        for rule in rules(settings):  # fresh rules for each loop history
            outcomes[rule.name] += replay_rule(rule, curves, settings)
    return {"runs": len(truth.final), "sequences": len(sequences),
            "p_bad": round(float((truth.final > truth.tau).mean()), 4),
            "rules": {name: summarise(done, truth) for name, done in outcomes.items()},
            "forecast": forecast_quality(complete, settings)}
