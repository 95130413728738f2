"""The decision to abort a run: threshold τ (eq. 7), the SPRT (eq. 8), and the guards around them.

The SPRT tests H0: the run's final val-bpb μ = τ against H1: μ = τ + δ, with one calibrated
forecast z_j of μ per look so far. The forecasts all come from one curve, so their errors are
strongly correlated; summing per-look log-likelihood ratios as if they were independent (the
textbook SPRT, `naive_statistic`) counts the same evidence again at every look and overshoots its
bound. Here the errors are modelled jointly, z ~ N(μ·1, Σ) with Σ the calibration's error matrix
across looks, and the statistic is the exact log-likelihood ratio of that model:

    Λ_k = (δ / v)·(m − τ − δ/2),   m = 1ᵀΣ⁻¹z / 1ᵀΣ⁻¹1,   v = 1 / 1ᵀΣ⁻¹1

(m is the generalised-least-squares combination of the forecasts, v its variance). The run is
aborted once Λ_k ≥ A = log((1 − β)/β). Because Λ_k is the likelihood ratio of the joint model,
exp(Λ_k) is a martingale under H0 and Wald's inequality gives, for a run that finishes at τ or
below, P(false abort) ≤ e^(−A) = β/(1 − β) (eq. 8) — under the calibration's Gaussian error model.
How well that model holds is measured, not assumed: the offline replay reports the realised rate.
One guard narrows the test further and so keeps the bound: no abort while the newest forecast's own 90%
interval still reaches τ (the combination can overshoot for a run whose errors break the calibration's
correlations).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from services.evaluator.calibration import Z90, Prediction
from shared.config import Evaluator as Settings

JITTER = 1e-10
"""Added to Σ's diagonal before solving: looks can be almost perfectly correlated."""


def threshold(bpb_star: float, sigma_h: float, alpha: float) -> float:
    """τ = bpb* + α·σ_h (eq. 7): a run is worth finishing while it may end at or below this."""
    return bpb_star + alpha * sigma_h


def boundary(beta: float) -> float:
    """A = log((1 − β)/β): Wald's bound then gives P(false abort) ≤ β/(1 − β) (eq. 8)."""
    return math.log((1.0 - beta) / beta)


@dataclass(frozen=True)
class Evidence:
    statistic: float
    combined: float
    """m: the forecasts of every look so far combined by generalised least squares."""
    combined_std: float


def sprt_statistic(z: np.ndarray, covariance: np.ndarray, tau: float, delta: float) -> Evidence:
    """Λ_k for correlated Gaussian forecasts z ~ N(μ·1, Σ), H1: μ = τ + δ against H0: μ = τ."""
    ones = np.ones(len(z))
    weights = np.linalg.solve(covariance + JITTER * np.eye(len(z)), ones)
    variance = 1.0 / float(ones @ weights)
    combined = variance * float(weights @ z)
    return Evidence((delta / variance) * (combined - tau - delta / 2.0), combined, math.sqrt(variance))


def naive_statistic(z: np.ndarray, std: np.ndarray, tau: float, delta: float) -> float:
    """The SPRT as the paper writes it: per-look log-likelihood ratios summed as if independent."""
    return float(np.sum(delta * (z - tau - delta / 2.0) / std**2))


@dataclass(frozen=True)
class Verdict:
    abort: bool
    reason: str
    """diverged, warm-up, must finish, too early, no forecast, beats bpb*, continue or abort."""
    commentary: str
    prediction: Prediction | None = None
    threshold: float | None = None
    statistic: float | None = None
    boundary: float | None = None

    @property
    def interval(self) -> tuple[float, float]:
        """The calibrated 90% interval of the forecast."""
        assert self.prediction is not None
        half = Z90 * self.prediction.std
        return self.prediction.mean - half, self.prediction.mean + half


@dataclass(frozen=True)
class Situation:
    """What the decision at one look knows besides the run's forecasts."""

    fraction: float
    bpb_star: float | None
    sigma_h: float | None
    calibration_runs: int
    must_finish: str | None
    """Why this run is never aborted, if it is not: an audit run (complete curves of every kind keep
    coming for the calibration), or a repeat that measures noise or confirms a best."""


def judge(predictions: list[Prediction], covariance: np.ndarray, situation: Situation,
          settings: Settings) -> Verdict:
    """Continue or abort at this look. `predictions`: this run's calibrated forecast at every look so far
    that has one (oldest first); `covariance`: the calibration's error matrix, indexed by look."""
    if situation.calibration_runs < settings.warmup_runs or situation.bpb_star is None or not situation.sigma_h:
        return Verdict(False, "warm-up", f"warm-up: {situation.calibration_runs}/{settings.warmup_runs} complete "
                                         "runs to calibrate on; no run is aborted yet")
    if situation.must_finish:
        return Verdict(False, "must finish", f"{situation.must_finish}: never aborted")
    if situation.fraction < settings.min_fraction - 1e-9:
        return Verdict(False, "too early", f"no decision before {settings.min_fraction:.0%} of the budget")
    if not predictions:
        return Verdict(False, "no forecast", "no forecast yet")
    latest = predictions[-1]
    tau = threshold(situation.bpb_star, situation.sigma_h, settings.alpha)
    if latest.mean <= situation.bpb_star:
        return Verdict(False, "beats bpb*", f"forecast {latest.mean:.4f} beats bpb* {situation.bpb_star:.4f}",
                       latest, tau)
    looks = [p.look for p in predictions]
    z = np.array([p.mean for p in predictions])
    scale = np.array([p.spread_scale for p in predictions])
    run_covariance = np.outer(scale, scale) * covariance[np.ix_(looks, looks)] \
        + np.diag([p.excess_variance for p in predictions])
    evidence = sprt_statistic(z, run_covariance, tau, settings.delta_sigma_h * situation.sigma_h)
    limit = boundary(settings.beta)
    # The combination can land beyond every single forecast when this run's errors do not follow the
    # calibration's correlations (a late bloomer): then the newest forecast, the best single one, has the last word.
    newest_reaches_tau = latest.mean - Z90 * latest.std <= tau
    abort = evidence.statistic >= limit and not newest_reaches_tau
    verdict = Verdict(abort, "abort" if abort else "continue", "", latest, tau, evidence.statistic, limit)
    return Verdict(abort, verdict.reason, _commentary(verdict, situation, evidence), latest, tau,
                   evidence.statistic, limit)


def _commentary(verdict: Verdict, situation: Situation, evidence: Evidence) -> str:
    """One line a researcher (and the policy, in its history) reads to know why."""
    low, high = verdict.interval
    assert verdict.threshold is not None and verdict.statistic is not None and verdict.boundary is not None
    head = "aborted" if verdict.abort else "continuing"
    crossed = verdict.statistic >= verdict.boundary
    relation = "≥" if crossed else "<"
    return (f"{head} at {situation.fraction:.0%} of the budget: forecast val-bpb {verdict.prediction.mean:.4f} "
            f"(90% {low:.4f}–{high:.4f}; all looks combined {evidence.combined:.4f} ± {evidence.combined_std:.4f}) "
            f"vs τ {verdict.threshold:.4f} (bpb* {situation.bpb_star:.4f}); SPRT Λ {verdict.statistic:.2f} "
            f"{relation} {verdict.boundary:.2f}"
            + ("; the newest forecast's interval still reaches τ" if crossed and not verdict.abort else ""))
