"""What final val-bpb a run's curve so far predicts, calibrated on past complete runs.

The power law (eq. 6) forecasts the *train loss* at the end of the budget. The decision needs the
final *val-bpb*, and the targets' LR warm-down bends the last part of every curve below any power
law fitted earlier. So at each look k (a fixed fraction of the budget) the evaluator maps two
features of the curve so far to val-bpb with a least-squares line fitted on past complete runs:

    loss_now  the train loss level at the look (level_now) (the regression member of the ensemble)
    power     the eq. (6) forecast of the loss at the end of the budget, when a fit is accepted

A run whose power law is rejected at a look is mapped by the loss_now line alone. The calibration
keeps every past run's leave-one-out residual at every look: their spread is the forecast's
uncertainty at that look (bias is absorbed by the intercept), and their covariance across looks
is what lets the SPRT combine looks that all share one curve (decision.py). A run's own error spread is
that of the calibration runs forecast nearest to it, widened when its features lie beyond theirs.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from services.evaluator.forecast import forecast_power_law
from shared.curves import Curve

Z90 = 1.6449
"""Half-width of a central 90% Gaussian interval, in standard deviations."""
LEVEL_POINTS = 4
"""Points level_now draws its line through at least."""
NEIGHBOURS_FRACTION = 0.25
MIN_NEIGHBOURS = 10
"""The local error spread (Calibration.local_scale) is measured on this share of the calibration runs, at least
MIN_NEIGHBOURS of them."""
MIN_RUNS_PER_LINE = 6
"""Past runs a look's line needs at least: three coefficients and three degrees of freedom for the residuals
(small_sample_factor needs more than two). The evaluator's warm-up (warmup_runs) asks for more before it
aborts anything."""


@dataclass(frozen=True)
class Features:
    """A run's curve at one look, reduced to what the calibration maps to val-bpb."""

    loss_now: float
    power: float | None
    power_low: float | None
    power_high: float | None
    """The power law's 90% bootstrap interval of the end-of-budget loss."""


def features(used: np.ndarray, loss: np.ndarray, at: float, seed: str) -> Features | None:
    """The curve's features at budget fraction `at` (points with used <= at); None before its first loss.
    `seed` names the bootstrap's generator, so a run's features are the same live, after a restart and
    when it is calibrated on or replayed later."""
    seen = used <= at
    if not seen.any():
        return None
    rng = np.random.default_rng(zlib.crc32(seed.encode()))
    forecast = forecast_power_law(used[seen], loss[seen], 1.0, rng)
    level = level_now(used[seen], loss[seen])
    if forecast is None:
        return Features(level, None, None, None)
    return Features(level, forecast.mean, forecast.low, forecast.high)


def level_now(used: np.ndarray, loss: np.ndarray) -> float:
    """The loss level at the look: the mean of the last third of the curve (at least LEVEL_POINTS points).
    Minibatch losses are too noisy to read one; the mean lags the falling curve, but by much the same for
    every run at a given look, and the calibration's intercept absorbs that."""
    recent = used >= used[-1] * (2 / 3)
    if recent.sum() < LEVEL_POINTS:
        recent = np.arange(len(used)) >= len(used) - LEVEL_POINTS
    return float(np.mean(loss[recent]))


def look_seed(run_id: str, look: int) -> str:
    return f"{run_id}:{look}"


def curve_features(curve: Curve, looks: np.ndarray, known: dict[int, Features]) -> list[Features | None]:
    """The features of a complete curve at every look; those in `known` (computed while it ran) are reused."""
    used, loss = np.asarray(curve.used), np.asarray(curve.loss)
    return [known[k] if k in known else features(used, loss, float(at), look_seed(curve.run_id, k))
            for k, at in enumerate(looks)]


@dataclass(frozen=True)
class Line:
    """final val-bpb ≈ coef · (1, loss_now[, power]) at one look, with its leave-one-out residuals."""

    coef: np.ndarray
    residuals: dict[int, float]
    """Run index in the calibration set -> leave-one-out residual (observed − predicted val-bpb)."""
    inverse_gram: np.ndarray
    """(XᵀX)⁻¹ of the calibration runs' design matrix: how far a new run's features are from theirs."""
    mean_leverage: float

    def predict(self, feature: Features) -> float:
        return float(self.coef @ self._row(feature))

    def extrapolation(self, feature: Features) -> float:
        """How much wider than the calibration's typical error this run's error is, as a factor ≥ 1 on the
        standard deviation. A line's error on a new run grows with its leverage h₀ = x₀ᵀ(XᵀX)⁻¹x₀ as
        σ²(1 + h₀); the leave-one-out residuals measured σ²(1 + h̄) on average. A run heading for a new best
        has features beyond every calibration run's, and the line is least sure exactly there."""
        x = self._row(feature)
        return float(np.sqrt(max(1.0, (1.0 + x @ self.inverse_gram @ x) / (1.0 + self.mean_leverage))))

    def _row(self, feature: Features) -> np.ndarray:
        return _design_row(feature, with_power=len(self.coef) == 3)


@dataclass(frozen=True)
class Prediction:
    """A calibrated forecast of one run's final val-bpb at one look."""

    mean: float
    std: float
    look: int
    uses_power_law: bool
    spread_scale: float = 1.0
    """This run's error standard deviation relative to the calibration's at this look: the local spread of
    runs forecast near it times the line's extrapolation factor; already in `std`."""
    excess_variance: float = 0.0
    """Variance added to the calibration's at this look because this run's power law is more uncertain
    (wider bootstrap interval) than the calibration runs' typically were; already in `std`."""


class Calibration:
    """Per-look lines fitted on past complete runs, and the covariance of their errors across looks."""

    def __init__(self, looks: np.ndarray, finals: np.ndarray, table: list[list[Features | None]]):
        """`table[i][k]`: the features of past run i at look k; `finals[i]`: its final val-bpb."""
        self.looks = looks
        self.runs = len(finals)
        self.loss_lines = [_fit_line(finals, [row[k] for row in table], with_power=False) for k in range(len(looks))]
        self.power_lines = [_fit_line(finals, [row[k] for row in table], with_power=True) for k in range(len(looks))]
        self._errors, self._forecasts = self._residual_matrix(table)
        self.covariance = _pairwise_covariance(self._errors)
        if self.runs >= MIN_RUNS_PER_LINE:  # fewer runs, no line: nothing is predicted
            self.covariance *= small_sample_factor(self.runs)
        self.typical_width = [_median_width([row[k] for row in table]) for k in range(len(looks))]

    def predict(self, look: int, feature: Features) -> Prediction | None:
        line, power = self._line(look, feature)
        if line is None:
            return None
        excess = 0.0
        if power and feature.power_high is not None and feature.power_low is not None:
            # the line saw runs whose bootstrap was this wide typically; beyond that, the run is less certain
            wider = max(0.0, (feature.power_high - feature.power_low) - self.typical_width[look]) / (2 * Z90)
            excess = float(line.coef[2] * wider) ** 2
        mean = line.predict(feature)
        scale = line.extrapolation(feature) * self.local_scale(look, mean)
        return Prediction(mean, float(np.sqrt(scale**2 * self.covariance[look, look] + excess)),
                          look, power, scale, excess)

    def _line(self, look: int, feature: Features) -> tuple[Line | None, bool]:
        power_line = self.power_lines[look]
        if feature.power is not None and power_line is not None:
            return power_line, True
        return self.loss_lines[look], False

    def _residual_matrix(self, table: list[list[Features | None]]) -> tuple[np.ndarray, np.ndarray]:
        """errors[i, k]: the leave-one-out error of the line that would judge past run i at look k (NaN if none);
        forecasts[i, k]: that line's forecast for it."""
        errors = np.full((self.runs, len(self.looks)), np.nan)
        forecasts = np.full((self.runs, len(self.looks)), np.nan)
        for i, row in enumerate(table):
            for k, feature in enumerate(row):
                if feature is None:
                    continue
                line, _ = self._line(k, feature)
                if line is not None and i in line.residuals:
                    errors[i, k] = line.residuals[i]
                    forecasts[i, k] = line.predict(feature)
        return errors, forecasts

    def local_scale(self, look: int, forecast: float) -> float:
        """The error spread of the calibration runs forecast nearest to `forecast` at this look, relative to all
        runs' spread, as a factor on the standard deviation. Errors are not the same size everywhere: runs far
        above τ tend to be far above it together, runs near the best are the hardest to tell apart."""
        known = ~np.isnan(self._errors[:, look])
        count = max(MIN_NEIGHBOURS, int(NEIGHBOURS_FRACTION * known.sum()))
        nearest = np.argsort(np.abs(self._forecasts[known, look] - forecast))[:count]
        local = small_sample_factor(len(nearest)) * float(np.mean(self._errors[known, look][nearest] ** 2))
        return float(np.sqrt(local / self.covariance[look, look]))


def small_sample_factor(runs: int) -> float:
    """The error variance is estimated from `runs` residuals of lines with up to three coefficients, so a new
    run's standardised error follows a Student t with ν = runs − 3 degrees of freedom, not a Gaussian. The
    decision's Gaussian model gets the t's variance, ν/(ν − 2) times the estimate: 1.4 at 10 runs, 1.02 at 100."""
    dof = runs - 3
    if dof <= 2:
        raise ValueError(f"{runs} residuals are too few for a variance")
    return dof / (dof - 2)


def _median_width(column: list[Features | None]) -> float:
    widths = [f.power_high - f.power_low for f in column
              if f is not None and f.power_high is not None and f.power_low is not None]
    return float(np.median(widths)) if widths else 0.0


def _design_row(feature: Features, with_power: bool) -> np.ndarray:
    return np.array([1.0, feature.loss_now, feature.power] if with_power else [1.0, feature.loss_now])


def _fit_line(finals: np.ndarray, column: list[Features | None], with_power: bool) -> Line | None:
    """Least squares of final val-bpb on the look's features, and each run's leave-one-out residual
    e_i / (1 − h_ii) — the error the line makes on a run it has not seen, which is the live situation."""
    rows = [i for i, f in enumerate(column) if f is not None and np.isfinite(f.loss_now)
            and (not with_power or f.power is not None)]
    if len(rows) < MIN_RUNS_PER_LINE:
        return None
    x = np.array([_design_row(column[i], with_power) for i in rows])  # type: ignore[arg-type]
    y = finals[rows]
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    inverse_gram = np.linalg.pinv(x.T @ x)
    leverage = np.einsum("ij,jk,ik->i", x, inverse_gram, x)
    loo = (y - x @ coef) / np.clip(1.0 - leverage, 1e-6, None)
    return Line(coef, dict(zip(rows, loo.tolist(), strict=True)), inverse_gram, float(leverage.mean()))


def _pairwise_covariance(errors: np.ndarray) -> np.ndarray:
    """Second moments of the errors across looks, from every pair of looks both observed: the mean-square
    error matrix, so any bias left counts as spread. Made positive semi-definite again (pairwise estimates
    need not be) by clipping its eigenvalues."""
    looks = errors.shape[1]
    covariance = np.zeros((looks, looks))
    for j in range(looks):
        for k in range(j, looks):
            both = ~np.isnan(errors[:, j]) & ~np.isnan(errors[:, k])
            value = float(np.mean(errors[both, j] * errors[both, k])) if both.sum() >= 2 else 0.0
            covariance[j, k] = covariance[k, j] = value
    values, vectors = np.linalg.eigh(covariance)
    return (vectors * np.clip(values, 1e-12, None)) @ vectors.T
