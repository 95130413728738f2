"""The self-evaluator's decision, calibration and replay, on hand-built and synthetic curves (no bus)."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from services.evaluator.calibration import Calibration, Features, Prediction, small_sample_factor
from services.evaluator.decision import Situation, boundary, judge, naive_statistic, sprt_statistic, threshold
from services.evaluator.judge import LiveRun, SelfEvaluator, audited, looks
from services.evaluator.replay import forecast_quality, replay
from shared.config import Evaluator
from shared.curves import Curve

SETTINGS = Evaluator(warmup_runs=12)
BYTES_PER_NAT = 1 / (math.log(2) * 2.5)
"""Synthetic val-bpb: the final train loss in bits per byte at 2.5 bytes per token."""


def synthetic_curve(rng: np.random.Generator, index: int, quality: float | None = None) -> Curve:
    """A training curve in the targets' shape: a power law whose early speed and whose floor vary
    independently from run to run (so early looks know less than late ones), then a linear LR warm-down
    over the last 40% that drops the loss below it, and autocorrelated minibatch noise. `quality`
    (0 best, 1 worst) pins both for a run built on purpose."""
    speed, floor = (quality, quality) if quality is not None else rng.uniform(0.0, 1.0, size=2)
    used = np.linspace(0.035, 1.0, 28)
    clean = 3.0 + 1.5 * floor + (2.0 + speed) * (used * 30) ** -0.45
    clean -= 0.3 * np.clip((used - 0.6) / 0.4, 0, 1) ** 2  # the warm-down's late drop
    noise = np.zeros_like(used)
    for i in range(1, len(used)):
        noise[i] = 0.6 * noise[i - 1] + rng.normal(0, 0.04)
    final = float(clean[-1] * BYTES_PER_NAT + rng.normal(0, 0.01))
    return Curve(run_id=f"run-{index}", proposal_id=f"p-{index}", finished_seq=index, status="ok",
                 final_bpb=final, budget="30 seconds", training_s=30.0, total_s=45.0,
                 used=used.tolist(), loss=(clean + noise).tolist())


def synthetic_history(count: int, seed: int = 0) -> list[Curve]:
    rng = np.random.default_rng(seed)
    return [synthetic_curve(rng, i) for i in range(count)]


def test_threshold_and_boundary_are_equations_7_and_8():
    assert threshold(2.0, 0.1, 0.5) == pytest.approx(2.05)
    assert boundary(0.05) == pytest.approx(math.log(19))
    assert math.exp(-boundary(0.05)) == pytest.approx(0.05 / 0.95)  # Wald: P(false abort) <= β/(1-β)


def test_sprt_counts_correlated_looks_once_where_the_textbook_sum_counts_them_again():
    z = np.full(5, 2.3)
    one = sprt_statistic(z[:1], np.eye(1) * 0.01, tau=2.0, delta=0.2).statistic
    independent = sprt_statistic(z, np.eye(5) * 0.01, tau=2.0, delta=0.2).statistic
    correlated = sprt_statistic(z, np.full((5, 5), 0.01) + np.eye(5) * 1e-8, tau=2.0, delta=0.2).statistic
    assert independent == pytest.approx(5 * one)  # independent looks: five times the evidence
    assert correlated == pytest.approx(one, rel=1e-3)  # one error shared by every look: the same evidence
    assert naive_statistic(z, np.full(5, 0.1), 2.0, 0.2) == pytest.approx(5 * one)


def _false_abort_rate(statistic, rho: float, runs: int = 4000) -> float:
    """Runs that end exactly at τ, nine looks with equicorrelated forecast errors: how many cross A."""
    rng = np.random.default_rng(1)
    looks_n, sd, tau, delta = 9, 0.05, 2.0, 0.05
    covariance = sd**2 * (rho * np.ones((looks_n, looks_n)) + (1 - rho) * np.eye(looks_n))
    errors = rng.multivariate_normal(np.zeros(looks_n), covariance, size=runs)
    limit = boundary(0.05)
    aborted = 0
    for z in tau + errors:
        aborted += any(statistic(z[: k + 1], covariance[: k + 1, : k + 1], tau, delta) >= limit for k in range(looks_n))
    return aborted / runs


def test_the_corrected_sprt_keeps_walds_bound_on_correlated_looks_and_the_textbook_one_does_not():
    corrected = _false_abort_rate(lambda z, cov, tau, delta: sprt_statistic(z, cov, tau, delta).statistic, rho=0.9)
    textbook = _false_abort_rate(lambda z, cov, tau, delta: naive_statistic(z, np.sqrt(np.diag(cov)), tau, delta),
                                 rho=0.9)
    assert corrected <= 0.05 / 0.95 + 0.01
    assert textbook > 2 * (0.05 / 0.95)


def _situation(**overrides) -> Situation:
    values = {"fraction": 0.5, "bpb_star": 2.0, "sigma_h": 0.1, "calibration_runs": 50, "must_finish": None}
    return Situation(**(values | overrides))  # type: ignore[arg-type]


LOSER = [Prediction(2.6, 0.03, look, False) for look in range(5)]
COVARIANCE = np.full((9, 9), 0.0005) + np.eye(9) * 0.0004


def test_a_clear_loser_is_aborted_with_the_reasons_in_its_commentary():
    verdict = judge(LOSER, COVARIANCE, _situation(), SETTINGS)
    assert verdict.abort and verdict.statistic >= verdict.boundary
    assert verdict.threshold == pytest.approx(2.05)
    assert "τ 2.0500" in verdict.commentary and "2.6000" in verdict.commentary and "Λ" in verdict.commentary


@pytest.mark.parametrize(("overrides", "reason"), [
    ({"calibration_runs": 3}, "warm-up"),
    ({"bpb_star": None}, "warm-up"),
    ({"must_finish": "a confirm run"}, "must finish"),
    ({"fraction": 0.2}, "too early"),
])
def test_guards_keep_even_a_clear_loser_running(overrides, reason):
    verdict = judge(LOSER, COVARIANCE, _situation(**overrides), SETTINGS)
    assert not verdict.abort and verdict.reason == reason


def test_a_run_whose_latest_forecast_beats_the_best_is_never_aborted():
    history = [*LOSER[:4], Prediction(1.99, 0.03, 4, True)]  # four bad looks, then it turns
    verdict = judge(history, COVARIANCE, _situation(), SETTINGS)
    assert not verdict.abort and verdict.reason == "beats bpb*"


def test_a_run_near_the_threshold_is_not_aborted():
    near = [Prediction(2.06, 0.03, look, False) for look in range(5)]
    assert not judge(near, COVARIANCE, _situation(), SETTINGS).abort


def test_a_late_bloomer_is_not_aborted_on_the_combination_while_its_newest_forecast_may_reach_tau():
    # forecasts rising look after look, the early ones much less certain: the GLS combination, leaning on the
    # looks' correlation, lands beyond every forecast (2.26); the newest forecast's own interval reaches τ = 2.05
    sd = np.array([0.30, 0.20, 0.12, 0.06])
    covariance = 0.95 * np.outer(sd, sd) + np.diag(0.05 * sd**2)
    bloomer = [Prediction(z, s, look, False) for look, (z, s) in enumerate(zip([1.5, 1.8, 2.0, 2.12], sd, strict=True))]
    verdict = judge(bloomer, covariance, _situation(), SETTINGS)
    assert verdict.statistic >= verdict.boundary and not verdict.abort
    assert "newest forecast's interval still reaches τ" in verdict.commentary


def test_audit_runs_are_a_stable_share_chosen_by_run_id():
    share = np.mean([audited(f"run-{i}", SETTINGS) for i in range(20_000)])
    assert share == pytest.approx(SETTINGS.audit_fraction, abs=0.01)
    assert audited("run-7", SETTINGS) == audited("run-7", SETTINGS)


def test_self_evaluator_aborts_a_loser_and_lets_a_would_be_best_finish():
    history = synthetic_history(60)
    evaluator = SelfEvaluator(SETTINGS, history)
    finals = [c.final_bpb for c in history]
    bpb_star, sigma_h = min(finals), float(np.std(finals[-32:], ddof=1))
    rng = np.random.default_rng(99)
    verdicts = {}
    for name, quality in (("loser", 1.0), ("winner", 0.0)):
        curve = synthetic_curve(rng, 1000, quality)
        run = LiveRun(f"{name}-not-audited", list(curve.used), list(curve.loss))
        assert not audited(run.run_id, SETTINGS)
        verdicts[name] = [evaluator.judge(run, k, bpb_star, sigma_h) for k in range(len(evaluator.looks))]
    assert any(v.abort for v in verdicts["loser"])
    assert not any(v.abort for v in verdicts["winner"])
    early = [v for v, at in zip(verdicts["loser"], SelfEvaluator(SETTINGS, []).looks, strict=True)
             if at < SETTINGS.min_fraction - 1e-9]
    assert early and all(not v.abort and v.reason == "too early" for v in early)  # no decision before min_fraction


def test_a_diverged_run_is_aborted_at_once_even_in_warm_up():
    run = LiveRun("nan")
    run.add(0.05, 7.0, False)
    run.add(0.08, None, True)
    verdict = SelfEvaluator(SETTINGS, []).judge(run, 0, None, None)
    assert verdict.abort and verdict.reason == "diverged"


def test_calibrated_forecasts_are_accurate_and_their_intervals_honest():
    forecast = forecast_quality([synthetic_history(100, seed=3)], SETTINGS)
    assert forecast["mae_by_look"]["0.9"] < forecast["mae_by_look"]["0.1"]  # more curve, better forecast
    assert forecast["mae_by_look"]["0.9"] < 0.03
    assert 0.8 <= forecast["coverage90"] <= 0.98
    assert forecast["spearman_at_0.4"] > 0.8


def test_replay_reports_every_rule_on_the_same_runs():
    result = replay([synthetic_history(50, seed=5), synthetic_history(30, seed=6)], SETTINGS)
    rules = result["rules"]
    assert result["runs"] == 80 and result["sequences"] == 2
    assert set(rules) >= {"self-evaluator", "paper SPRT (looks independent)", "no abort", "ASHA η=3"}
    assert rules["no abort"]["aborted"] == 0 and rules["no abort"]["G"] == 1.0
    ours = rules["self-evaluator"]
    assert ours["runs"] == 80 and ours["aborted"] > 0 and ours["aborted_would_be_best"] == 0
    assert 0 < ours["mu_abort"] < 1 and ours["G"] > 1
    assert ours["G"] == pytest.approx(1 / (1 - ours["aborted_fraction"] * (1 - ours["mu_abort"])), rel=1e-3)
    low, high = ours["false_abort_rate_95"]
    assert low <= ours["false_abort_rate"] <= high


def test_looks_follow_the_look_fraction():
    assert looks(Evaluator(look_fraction=0.1)) == pytest.approx(np.arange(1, 10) / 10)
    assert looks(Evaluator(look_fraction=0.25)) == pytest.approx([0.25, 0.5, 0.75])


def test_a_run_whose_power_law_is_unusually_uncertain_gets_a_wider_forecast():
    evaluator = SelfEvaluator(SETTINGS, synthetic_history(40))
    look = 6
    typical = evaluator.calibration.typical_width[look]
    curve = synthetic_curve(np.random.default_rng(5), 500, 0.5)
    run = LiveRun("wide", list(curve.used), list(curve.loss))
    evaluator.judge(run, look, None, None)
    feature = run.features[look]
    assert feature.power is not None and typical > 0
    narrow = evaluator.calibration.predict(look, replace(feature, power_low=feature.power, power_high=feature.power))
    wide = evaluator.calibration.predict(look, replace(feature, power_low=feature.power - 5 * typical,
                                                       power_high=feature.power + 5 * typical))
    assert narrow.excess_variance == 0 and wide.excess_variance > 0 and wide.std > narrow.std
    assert wide.mean == narrow.mean


def test_small_calibration_sets_widen_the_forecast_like_a_student_t():
    assert small_sample_factor(10) == pytest.approx(7 / 5)
    assert small_sample_factor(1000) == pytest.approx(1.0, abs=0.01)
    with pytest.raises(ValueError):
        small_sample_factor(5)


def _one_look_calibration(losses: np.ndarray, finals: np.ndarray) -> Calibration:
    return Calibration(np.array([0.5]), finals, [[Features(float(x), None, None, None)] for x in losses])


def test_a_run_beyond_every_calibration_run_gets_a_wider_forecast():
    rng = np.random.default_rng(3)
    losses = rng.uniform(5.0, 6.0, 80)
    calibration = _one_look_calibration(losses, 0.4 * losses + rng.normal(0, 0.05, 80))
    line = calibration.loss_lines[0]
    inside, beyond = Features(5.5, None, None, None), Features(3.0, None, None, None)
    assert line.extrapolation(inside) == pytest.approx(1.0)
    assert line.extrapolation(beyond) > 1.3
    assert calibration.predict(0, beyond).std > calibration.predict(0, inside).std


def test_the_forecast_spread_follows_how_well_runs_like_this_one_were_forecast():
    rng = np.random.default_rng(4)
    losses = rng.uniform(5.0, 7.0, 120)
    noise = np.where(losses < 6.0, 0.2, 0.02)  # runs heading for low val-bpb are the hard ones to forecast
    calibration = _one_look_calibration(losses, 0.4 * losses + rng.normal(0, 1, 120) * noise)
    hard = calibration.predict(0, Features(5.4, None, None, None))
    easy = calibration.predict(0, Features(6.6, None, None, None))
    assert hard.std > 3 * easy.std
    assert hard.spread_scale > 1 > easy.spread_scale
