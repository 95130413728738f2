"""services.evaluator.baselines: each standard early-stopping rule makes the decision its original would."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest

from services.evaluator.baselines import (
    ASHA,
    BASELINES,
    MedianStopping,
    NoAbort,
    PatientMedian,
    StoppingRule,
    value_at,
)

pytestmark = pytest.mark.filterwarnings("error")  # e.g. numpy's mean of an empty slice: a rule computed on no data

BUDGET = 30.0
T = np.arange(1.0, BUDGET + 1.0)  # one loss a second
FRACTIONS = [k / 10 for k in range(1, 10)]  # the looks
Curve = tuple[np.ndarray, np.ndarray]


def curve(*levels: float) -> Curve:
    """A curve whose smoothed loss at look k (t = 3k s) is levels[k-1] exactly: the loss is constant over the 3 s
    before each look (the last level holds to the end)."""
    padded = list(levels) + [levels[-1]] * (10 - len(levels))
    return T, np.repeat(np.asarray(padded, dtype=float), 3)


def until(c: Curve, fraction: float) -> Curve:
    """The curve as far as a run has got at `fraction` of the budget."""
    t, loss = c
    keep = t <= fraction * BUDGET + 1e-9
    return t[keep], loss[keep]


def complete(rule: StoppingRule, c: Curve, times: int = 1) -> None:
    """Tell the rule that run(s) with this curve trained to the end."""
    for _ in range(times):
        rule.observe(*c, BUDGET, 1.0, None)


def stopped(rule: StoppingRule, c: Curve, fraction: float) -> None:
    """Tell the rule that a run with this curve was stopped at `fraction`."""
    rule.observe(*until(c, fraction), BUDGET, None, fraction)


def stops_at(rule: StoppingRule, c: Curve) -> float | None:
    """The look at which the rule stops this run, asked at every look as the replay asks (the run is not observed)."""
    return next((f for f in FRACTIONS if rule.should_stop(*until(c, f), BUDGET, f)), None)


def looks_stopping(rule: StoppingRule, c: Curve) -> list[float]:
    """Every look at which the rule would stop this run, each asked on its own."""
    return [f for f in FRACTIONS if rule.should_stop(*until(c, f), BUDGET, f)]


GOOD, TERRIBLE = curve(3.0), curve(9.0, 10.0, 11.0, 12.0, 13.0)  # TERRIBLE also gets worse: it stagnates for Optuna


# value_at


def test_value_at_is_the_mean_over_the_last_tenth_of_the_elapsed_time() -> None:
    t = np.arange(1.0, 101.0)
    assert value_at(t, t, 100.0) == pytest.approx(95.0)  # t in [90, 100]
    assert value_at(t, t, 50.0) == pytest.approx(47.5)  # t in [45, 50]: later points are not seen


def test_value_at_widens_to_the_last_three_points() -> None:
    t = np.arange(1.0, 31.0)
    assert value_at(t, t, 5.0) == pytest.approx(4.0)  # [4.5, 5] holds only t=5: use 3, 4, 5
    assert value_at(np.array([1.0, 2.0, 10.0]), np.array([5.0, 6.0, 7.0]), 10.0) == pytest.approx(6.0)
    assert value_at(np.array([1.0, 2.0]), np.array([5.0, 7.0]), 10.0) == pytest.approx(6.0)


def test_value_at_ranks_a_diverged_run_worst_and_needs_a_logged_loss() -> None:
    assert value_at(np.array([1.0, 2.0, 3.0]), np.array([4.0, np.nan, 5.0]), 3.0) == math.inf
    with pytest.raises(ValueError):
        value_at(np.array([5.0, 6.0]), np.array([1.0, 1.0]), 4.0)


# every rule


def test_baselines_are_fresh_stopping_rules_named_as_listed() -> None:
    for name, factory in BASELINES.items():
        rule = factory()
        assert isinstance(rule, StoppingRule)
        assert rule.name == name
        assert factory() is not rule


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("no abort", None),
        ("median stopping (Ray Tune)", 0.2),
        ("ASHA η=3", 0.2),
        ("ASHA η=4", 0.2),
        ("PatientPruner(MedianPruner) (Optuna)", 0.3),  # patience=1 needs three values
    ],
)
def test_after_good_runs_a_terrible_run_is_stopped_at_the_first_look_allowed(name: str, expected: float | None) -> None:
    rule = BASELINES[name]()
    complete(rule, GOOD, times=5)
    assert stops_at(rule, TERRIBLE) == expected


@pytest.mark.parametrize(
    "make",
    [
        lambda: MedianStopping(grace_fraction=0.4),
        lambda: ASHA(3, grace_fraction=0.4),
        lambda: ASHA(4, grace_fraction=0.4),
        lambda: PatientMedian(grace_fraction=0.4),
    ],
)
def test_no_rule_stops_before_its_grace_fraction(make: Callable[[], StoppingRule]) -> None:
    rule = make()
    complete(rule, GOOD, times=5)
    assert stops_at(rule, TERRIBLE) == 0.4


def test_no_abort_never_stops() -> None:
    rule = NoAbort()
    complete(rule, GOOD, times=10)
    assert looks_stopping(rule, TERRIBLE) == []


def test_rules_decide_only_at_looks() -> None:
    with pytest.raises(ValueError):
        MedianStopping().should_stop(*until(GOOD, 0.25), BUDGET, 0.25)


# median stopping (Ray Tune)


def test_median_stopping_spares_a_run_at_the_median_and_stops_one_just_worse() -> None:
    rule = MedianStopping()
    for level in (3.0, 3.25, 3.5, 3.75, 4.0):  # exact in binary, so the tie below is exact
        complete(rule, curve(level))
    assert stops_at(rule, curve(3.5)) is None  # equal to the median: not strictly worse
    assert stops_at(rule, curve(3.625)) == 0.2


def test_median_stopping_needs_min_samples_that_reached_the_look() -> None:
    rule = MedianStopping()
    complete(rule, GOOD, times=2)
    assert stops_at(rule, TERRIBLE) is None
    stopped(rule, GOOD, 0.2)  # reached 0.2, not 0.3
    assert looks_stopping(rule, TERRIBLE) == [0.2]


def test_median_stopping_compares_with_running_means_from_grace() -> None:
    rule = MedianStopping()
    complete(rule, curve(10.0, 8.0, 4.0), times=3)  # running mean over looks 0.2..0.3 is 6, latest value 4
    assert not rule.should_stop(*until(curve(9.0, 7.0, 5.0), 0.3), BUDGET, 0.3)  # 5 < 6, though worse than 4
    assert rule.should_stop(*until(curve(9.0, 7.0, 6.5), 0.3), BUDGET, 0.3)  # 6.5 > 6 (mean from 0.1 would be 7.3)


def test_median_stopping_judges_the_best_result_so_far_even_before_grace() -> None:
    rule = MedianStopping()
    complete(rule, curve(5.0), times=3)
    assert stops_at(rule, curve(4.0, 6.0)) is None  # best 4 at look 0.1 stays below the median 5
    assert stops_at(rule, curve(6.0)) == 0.2


# ASHA (Ray Tune)


def test_asha_rungs_are_grace_times_powers_of_eta_on_the_nearest_look() -> None:
    assert ASHA(3).rung_looks == (2, 6)
    assert ASHA(4).rung_looks == (2, 8)
    assert ASHA(3, grace_fraction=0.1).rung_looks == (1, 3, 9)
    assert ASHA(3, grace_fraction=0.12).rung_looks == (2, 4)  # 0.12 → grace look 0.2, 0.36 → 0.4, 1.08 past the end


@pytest.mark.parametrize(("eta", "rungs"), [(3, [0.2, 0.6]), (4, [0.2, 0.8])])
def test_asha_stops_only_at_rungs(eta: int, rungs: list[float]) -> None:
    rule = ASHA(eta)
    complete(rule, GOOD, times=5)
    assert looks_stopping(rule, TERRIBLE) == rungs


@pytest.mark.parametrize("eta", [3, 4])
def test_asha_keeps_the_top_one_over_eta_at_a_rung(eta: int) -> None:
    rule = ASHA(eta)
    for level in range(1, 3 * eta + 2):  # losses 1..3η+1 recorded: the 1/η quantile is 4
        complete(rule, curve(float(level)))
    candidates = [k + 0.5 for k in range(1, 3 * eta + 1)]
    kept = [c for c in candidates if not rule.should_stop(*until(curve(c), 0.2), BUDGET, 0.2)]
    assert kept == [1.5, 2.5, 3.5]  # 3 of 3η


def test_asha_cutoff_is_over_the_earlier_arrivals_only() -> None:
    rule = ASHA(3)
    complete(rule, curve(1.0))
    assert stops_at(rule, curve(0.5)) is None
    assert stops_at(rule, curve(1.5)) == 0.2  # Ray: the second arrival is judged against the first, no minimum count
    complete(rule, curve(2.0))
    assert stops_at(rule, curve(1.3)) is None  # 1/3 quantile of {1, 2} is 4/3 (with its own 1.3 added it would be 1.2)
    assert stops_at(rule, curve(1.4)) == 0.2


def test_asha_records_a_run_only_at_the_rungs_it_reached() -> None:
    rule = ASHA(3)
    complete(rule, curve(1.0))
    stopped(rule, curve(0.1), 0.2)  # recorded at rung 0.2, never reached 0.6
    assert looks_stopping(rule, curve(0.5)) == [0.2]  # 0.2: 1/3 quantile of {0.1, 1} is 0.4; 0.6: cutoff 1


# PatientPruner(MedianPruner) (Optuna)


def test_patient_median_waits_for_patience_plus_two_values() -> None:
    rule = PatientMedian()
    complete(rule, GOOD, times=5)
    assert looks_stopping(rule, TERRIBLE) == FRACTIONS[2:]  # not at 0.2, though past warm-up and worse than median


def test_patient_median_does_not_prune_an_improving_run_worse_than_the_median() -> None:
    rule = PatientMedian()
    complete(rule, GOOD, times=5)
    assert looks_stopping(rule, curve(9.0, 8.5, 8.0, 7.5, 7.0, 6.5, 6.0, 5.5, 5.0)) == []
    assert looks_stopping(rule, curve(6.0)) == []  # flat: with min_delta=0 not stagnating


def test_patient_median_min_delta_tolerates_small_worsening() -> None:
    rising = curve(6.0, 6.1, 6.2, 6.3, 6.4, 6.5, 6.6, 6.7, 6.8)
    strict, tolerant = PatientMedian(), PatientMedian(min_delta=0.5)
    for rule in (strict, tolerant):
        complete(rule, GOOD, times=5)
    assert stops_at(strict, rising) == 0.3
    assert stops_at(tolerant, rising) == 0.8  # its last two looks (6.6, 6.7) first both exceed 6.0 + 0.5 there


def test_patient_median_counts_only_completed_runs_towards_startup() -> None:
    rule = PatientMedian()
    complete(rule, GOOD, times=4)
    stopped(rule, GOOD, 0.5)
    stopped(rule, GOOD, 0.9)
    assert stops_at(rule, TERRIBLE) is None
    complete(rule, GOOD)
    assert stops_at(rule, TERRIBLE) == 0.3


def test_patient_median_judges_the_best_value_so_far() -> None:
    rule = PatientMedian()
    complete(rule, GOOD, times=5)
    assert stops_at(rule, curve(2.0, 5.0, 6.0, 7.0)) is None  # stagnating and now above 3, but its best 2 is below
