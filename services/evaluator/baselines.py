"""services.evaluator.baselines: the standard early-stopping rules our evaluator's abort rule is compared against.

An offline replay feeds recorded training curves, one finished run after another, to each rule. So that the rules
compare the same thing, every rule sees a run only through `value_at` (its smoothed train loss) at evenly spaced looks
(every `look_fraction` of the budget), and none may stop a run before `grace_fraction` of it. Ray Tune's
MedianStoppingRule and ASHAScheduler and Optuna's PatientPruner(MedianPruner) are re-implemented here from their
documented semantics and source (neither library is a dependency): one reported result (Ray) or step (Optuna) of the
original is one look, and its time is the look's fraction of the budget.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

LOOK_FRACTION = 0.1  # a rule may stop a run only at multiples of this fraction of the budget
GRACE_FRACTION = 0.2  # and never before this fraction
SMOOTHING_FRACTION = 0.1  # value_at averages the losses of this last fraction of the elapsed time
MIN_SMOOTHING_POINTS = 3  # but at least this many losses
_EPS = 1e-9  # float slack when putting fractions onto the look grid


@runtime_checkable
class StoppingRule(Protocol):
    """An early-stopping rule as the replay drives it: asked at every look of a run, told how each run ended."""

    name: str

    def should_stop(self, t: np.ndarray, loss: np.ndarray, budget_s: float, fraction: float) -> bool:
        """Called at each look with the run's curve so far (t <= fraction*budget_s). True = abort now."""
        ...

    def observe(
        self, t: np.ndarray, loss: np.ndarray, budget_s: float, final_bpb: float | None, stopped_at: float | None
    ) -> None:
        """After a run ends: its curve as far as it ran, its final val-bpb (None if it was stopped), and the fraction
        at which it was stopped (None if it completed). Rules learn from history only through this."""
        ...


def value_at(t: np.ndarray, loss: np.ndarray, at_t: float) -> float:
    """The run's smoothed train loss at elapsed time `at_t`: the one intermediate value every rule compares.

    Single minibatch losses are too noisy to rank runs on, so this is the mean of the losses with t in the last
    SMOOTHING_FRACTION of the elapsed time, [0.9·at_t, at_t], widened to the last MIN_SMOOTHING_POINTS points at or
    before at_t when that window holds fewer (early looks, sparse logging). `t` is ascending. A non-finite mean (a
    diverged run) is +inf, so every rule ranks it worst rather than letting NaN compare as neither better nor worse.
    Raises ValueError when no loss was logged at or before at_t.
    """
    seen = np.asarray(t) <= at_t
    times, losses = np.asarray(t)[seen], np.asarray(loss, dtype=float)[seen]
    if losses.size == 0:
        raise ValueError(f"no loss logged at or before t={at_t}")
    window = times >= (1.0 - SMOOTHING_FRACTION) * at_t
    if np.count_nonzero(window) < MIN_SMOOTHING_POINTS:
        window = np.arange(losses.size) >= losses.size - MIN_SMOOTHING_POINTS
    mean = float(np.mean(losses[window]))
    return mean if math.isfinite(mean) else math.inf


def look_index(fraction: float, look_fraction: float = LOOK_FRACTION) -> int:
    """The look number k with fraction = k·look_fraction; ValueError off the grid, since rules decide only at looks."""
    k = round(fraction / look_fraction)
    if abs(k * look_fraction - fraction) > 1e-6:
        raise ValueError(f"fraction {fraction} is not a look (a multiple of {look_fraction})")
    return k


def _first_look(grace_fraction: float, look_fraction: float) -> int:
    """The first look at or after the grace fraction: no rule may stop a run before it."""
    return max(1, math.ceil(grace_fraction / look_fraction - _EPS))


def _last_look(look_fraction: float) -> int:
    """The last look strictly before the end of the budget: a run that gets to the end has completed, not stopped."""
    return math.ceil(1.0 / look_fraction - _EPS) - 1


def _look_time(k: int, look_fraction: float, budget_s: float) -> float:
    """Elapsed seconds at look k, rounded so that 3·0.1·30 s is 9 s and not 9.000000000000002 s."""
    return round(k * look_fraction * budget_s, 9)


def look_values(t: np.ndarray, loss: np.ndarray, budget_s: float, last: int, look_fraction: float) -> dict[int, float]:
    """The run's smoothed loss at looks 1..last, keyed by look number: its reported results (Ray) or intermediate
    values (Optuna). A look before the run's first logged loss is absent, as a trial that has not reported yet."""
    t = np.asarray(t)
    times = {k: _look_time(k, look_fraction, budget_s) for k in range(1, last + 1)}
    return {k: value_at(t, loss, at) for k, at in times.items() if t.size and t[0] <= at}


def _reached_look(t: np.ndarray, budget_s: float, stopped_at: float | None, look_fraction: float) -> int:
    """The last look a finished run reached: where it was stopped, else the last look its curve covers (a completed
    run covers all looks; a crashed one only those before it crashed)."""
    if stopped_at is not None:
        return look_index(stopped_at, look_fraction)
    if np.asarray(t).size == 0:
        return 0
    return min(math.floor(float(t[-1]) / (look_fraction * budget_s) + _EPS), _last_look(look_fraction))


@dataclass(frozen=True)
class _Run:
    """A finished run as the rules remember it: its smoothed loss at each look it reached, and whether it completed
    (produced a final val-bpb; Optuna's COMPLETE, as opposed to pruned or failed)."""

    values: dict[int, float]
    completed: bool


class _LookRule:
    """The look grid, the grace look and the memory of finished runs, shared by the rules that learn from history."""

    name: str

    def __init__(self, grace_fraction: float, look_fraction: float) -> None:
        if grace_fraction <= 0 or look_fraction <= 0:
            raise ValueError("grace_fraction and look_fraction must be positive")
        self.look_fraction = look_fraction
        self.first_look = _first_look(grace_fraction, look_fraction)
        self.history: list[_Run] = []

    def _current(
        self, t: np.ndarray, loss: np.ndarray, budget_s: float, fraction: float
    ) -> tuple[int, dict[int, float]]:
        """The look being made and the running run's values at every look so far, itself included."""
        k = look_index(fraction, self.look_fraction)
        return k, look_values(t, loss, budget_s, k, self.look_fraction)

    def observe(
        self, t: np.ndarray, loss: np.ndarray, budget_s: float, final_bpb: float | None, stopped_at: float | None
    ) -> None:
        """Remember the run's values at the looks it reached, and whether it completed."""
        last = _reached_look(t, budget_s, stopped_at, self.look_fraction)
        self.history.append(_Run(look_values(t, loss, budget_s, last, self.look_fraction), final_bpb is not None))


class NoAbort:
    """Never stops a run: every run trains for the whole budget. The reference that the others' savings and false
    aborts are measured against."""

    name = "no abort"

    def should_stop(self, t: np.ndarray, loss: np.ndarray, budget_s: float, fraction: float) -> bool:
        """Never: the reference trains everything."""
        return False

    def observe(
        self, t: np.ndarray, loss: np.ndarray, budget_s: float, final_bpb: float | None, stopped_at: float | None
    ) -> None:
        """Nothing to learn."""


class MedianStopping(_LookRule):
    """Ray Tune's MedianStoppingRule: the median stopping rule of Google Vizier (Golovin et al., KDD 2017).

    Ray (ray/tune/schedulers/median_stopping_rule.py, on_trial_result), mode="min": a trial at least grace_period old
    is stopped if its best result so far (over all its results, those before grace_period too) is strictly worse than
    the median, over the other trials whose latest result is at least as old, of each one's running mean of its results
    with grace_period <= time <= now; with fewer than min_samples_required such trials it continues. As in Ray's code
    (its docstring says "completed trials"), those trials include earlier runs that were stopped at or after this look,
    each over the results it had. Here time = look fraction and grace_period = grace_fraction of the budget. Ray's
    defaults kept: min_samples_required=3, hard_stop=True (stop, not pause). min_time_slice only lets concurrent trials
    yield to waiting ones and means nothing when runs are sequential; Ray's grace_period default (60 s) is replaced by
    grace_fraction.
    """

    name = "median stopping (Ray Tune)"

    def __init__(
        self,
        grace_fraction: float = GRACE_FRACTION,
        min_samples_required: int = 3,
        look_fraction: float = LOOK_FRACTION,
    ) -> None:
        super().__init__(grace_fraction, look_fraction)
        self.min_samples_required = min_samples_required

    def should_stop(self, t: np.ndarray, loss: np.ndarray, budget_s: float, fraction: float) -> bool:
        """Stop if the run's best value so far is worse than the median running mean of the runs that got this far."""
        k, values = self._current(t, loss, budget_s, fraction)
        if k < self.first_look or not values:
            return False
        peers = [run.values for run in self.history if k in run.values]
        if len(peers) < self.min_samples_required:
            return False
        median = float(np.median([self._running_mean(peer, k) for peer in peers]))
        return min(values.values()) > median

    def _running_mean(self, values: dict[int, float], k: int) -> float:
        """Mean of a run's values from the grace look up to look k (Ray's running mean from grace_period to now)."""
        return float(np.mean([v for j, v in values.items() if self.first_look <= j <= k]))


def _rung_looks(grace_fraction: float, reduction_factor: float, look_fraction: float) -> tuple[int, ...]:
    """Ray's rung milestones min_t·η^k (k = 0, 1, … while below max_t) with min_t = grace_fraction, each moved to the
    nearest look (never before the grace look); a rung that rounds onto the end of the budget is dropped, since a run
    there completes rather than being judged."""
    first, last = _first_look(grace_fraction, look_fraction), _last_look(look_fraction)
    looks: set[int] = set()
    rung = grace_fraction
    while rung < 1.0 - _EPS:
        looks.add(max(first, math.floor(rung / look_fraction + 0.5)))
        rung *= reduction_factor
    return tuple(sorted(k for k in looks if k <= last))


class ASHA(_LookRule):
    """Asynchronous successive halving (Li et al., 2018, arXiv:1810.05934), as Ray Tune's ASHAScheduler runs it.

    Ray (ray/tune/schedulers/async_hyperband.py, _Bracket.on_result): rungs at min_t·η^k for k = 0, 1, … below max_t,
    min_t = grace_period. When a trial first reaches a rung it is stopped if its reward is strictly below the
    (1 − 1/η)·100 percentile (numpy, linear interpolation) of the rewards already recorded at that rung by other
    trials, its own not included; with none recorded it continues (so the second trial to arrive is already judged
    against the first); either way its reward is then recorded there. With mode="min" the reward is −loss. Here max_t
    is the budget, min_t = grace_fraction of it, and each rung is moved to the nearest look, never before grace (no
    move for the defaults: η=3 → looks 0.2, 0.6; η=4 → 0.2, 0.8). A run's reward at a rung is its value at that look,
    recorded (through observe) at every rung it reached, including the one it was stopped at. Ray's defaults kept:
    brackets=1, stop_last_trials=True (moot: reaching the budget is completion, not a stop); Ray's default η is 4.
    """

    def __init__(
        self, reduction_factor: float, grace_fraction: float = GRACE_FRACTION, look_fraction: float = LOOK_FRACTION
    ) -> None:
        if reduction_factor <= 1:
            raise ValueError(f"reduction_factor must exceed 1, got {reduction_factor}")
        super().__init__(grace_fraction, look_fraction)
        self.reduction_factor = reduction_factor
        self.rung_looks = _rung_looks(grace_fraction, reduction_factor, look_fraction)
        self.name = f"ASHA η={reduction_factor:g}"

    def should_stop(self, t: np.ndarray, loss: np.ndarray, budget_s: float, fraction: float) -> bool:
        """At a rung, stop unless the run's reward reaches Ray's cutoff over the rewards recorded there before it."""
        k, values = self._current(t, loss, budget_s, fraction)
        if k not in self.rung_looks or k not in values:
            return False
        recorded = [-run.values[k] for run in self.history if k in run.values]
        if not recorded:
            return False
        cutoff = float(np.percentile(recorded, 100 * (1 - 1 / self.reduction_factor)))
        return -values[k] < cutoff


class PatientMedian(_LookRule):
    """Optuna's PatientPruner(MedianPruner(n_startup_trials=5, n_warmup_steps=<grace look>), patience=1, min_delta=0).

    Step = look number, intermediate value = the smoothed loss at that look, reported at every look; minimize.
    PatientPruner (optuna/pruners/_patient.py): never prunes while the trial has at most patience+1 values; otherwise
    it hands over to the wrapped pruner only if the trial stagnated, i.e. min(values before the last patience+1)
    + min_delta < min(last patience+1 values): its best over the last patience+1 looks is strictly worse than its best
    before them. With min_delta=0 a run that merely stays flat has not stagnated; it must get worse.
    MedianPruner = PercentilePruner(50) (optuna/pruners/_percentile.py): no pruning until n_startup_trials trials have
    COMPLETED (pruned or failed ones do not count), nor at a step < n_warmup_steps; then prune if the trial's best
    value so far (not its latest) is strictly worse than the median of the completed trials' values at this step
    (interval_steps=1, n_min_trials=1 are Optuna's defaults). Looks start at step 1 (no loss at t=0), so the warm-up is
    the grace look; with patience=1 the earliest prune is at the third look (0.3 of the budget with the defaults).
    """

    name = "PatientPruner(MedianPruner) (Optuna)"

    def __init__(
        self,
        grace_fraction: float = GRACE_FRACTION,
        n_startup_trials: int = 5,
        patience: int = 1,
        min_delta: float = 0.0,
        look_fraction: float = LOOK_FRACTION,
    ) -> None:
        super().__init__(grace_fraction, look_fraction)
        self.n_startup_trials = n_startup_trials
        self.patience = patience
        self.min_delta = min_delta

    def should_stop(self, t: np.ndarray, loss: np.ndarray, budget_s: float, fraction: float) -> bool:
        """Prune a run that stagnated and whose best so far is worse than the completed runs' median at this look."""
        k, values = self._current(t, loss, budget_s, fraction)
        return self._stagnated(values) and self._median_prunes(values, k)

    def _stagnated(self, values: dict[int, float]) -> bool:
        """PatientPruner's test: the best of the last patience+1 values is worse than the best before them."""
        ordered = [values[step] for step in sorted(values)]
        if len(ordered) <= self.patience + 1:
            return False
        split = len(ordered) - self.patience - 1
        return min(ordered[:split]) + self.min_delta < min(ordered[split:])

    def _median_prunes(self, values: dict[int, float], k: int) -> bool:
        """MedianPruner's test at look k, after its startup-trial and warm-up-step guards."""
        completed = [run.values for run in self.history if run.completed]
        if k < self.first_look or len(completed) < self.n_startup_trials:
            return False
        at_step = [run[k] for run in completed if k in run]
        return bool(at_step) and min(values.values()) > float(np.median(at_step))


BASELINES: dict[str, Callable[[], StoppingRule]] = {
    NoAbort.name: NoAbort,
    MedianStopping.name: MedianStopping,
    "ASHA η=3": lambda: ASHA(3),
    "ASHA η=4": lambda: ASHA(4),
    PatientMedian.name: PatientMedian,
}
