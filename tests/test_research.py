"""The Table 1 harness (bench/research.py): its statistics on made-up arms, and a small real run of it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_target

from bench.research import Arm, ArmResult, interval, main, ordering, summarize
from services.ledger.store import Ledger


def made_up(policy: str, seed: int, best: float, evaluator: bool = True, per_hour: float = 100.0,
            g: float = 1.0) -> ArmResult:
    curve: list[float | None] = [2.0, 2.0, best]
    return ArmResult(Arm(policy, evaluator, seed), baseline_bpb=2.0, best_bpb=best, curve=curve,
                     statuses={"kept": 2, "discarded": 1}, hours=len(curve) / per_hour,
                     aborts={"G": g, "aborted": int(g > 1)}, kept_by_kind={"learning rate": 1})


def test_the_interval_is_students_t_and_absent_for_one_seed():
    assert interval([1.0, 3.0]) == {"n": 2, "mean": 2.0, "half_width": pytest.approx(12.7062, abs=1e-4)}
    assert interval([1.5]) == {"n": 1, "mean": 1.5, "half_width": None}


def test_the_ordering_is_a_one_sided_paired_test_in_the_papers_direction():
    best = {"baseline": {0: 2.0, 1: 2.1, 2: 1.9},
            "random": {0: 1.95, 1: 2.12, 2: 1.86},  # better on two seeds of three, worse on one: noise
            "llm": {0: 1.80, 1: 1.98, 2: 1.70}}  # 0.15 +- 0.01 better than random on every seed
    baseline_random, random_llm = ordering(best)
    assert (baseline_random["worse"], baseline_random["better"]) == ("baseline", "random")
    assert not baseline_random["significant"] and baseline_random["p"] > 0.05
    assert random_llm["significant"] and random_llm["p"] < 0.01
    assert random_llm["mean_difference"] == pytest.approx(-0.15, abs=0.01)
    assert random_llm["statement"].startswith("llm beats random: mean difference -0.1500 bpb")
    reversed_claim, = ordering({"random": best["llm"], "llm": best["random"]})  # the claim fails: p near 1
    assert not reversed_claim["significant"] and reversed_claim["p"] > 0.99
    one_seed, = ordering({"random": {0: 1.9}, "llm": {0: 1.8}})
    assert one_seed["p"] is None and one_seed["statement"] == "llm vs random: untestable with 1 seed(s)"


def test_the_summary_measures_g_live_as_throughput_with_over_without_the_evaluator():
    results = [made_up("random", seed, 1.9, evaluator=False, per_hour=100) for seed in (0, 1)] + [
        made_up("random", 0, 1.9, per_hour=150, g=1.4), made_up("random", 1, 1.8, per_hour=170, g=1.6)]
    summary = summarize(results)
    assert summary["ordering_tested_with_evaluator"] is True
    assert summary["table"]["random"]["mean"] == pytest.approx(1.85)  # the evaluator-on arms only
    assert summary["table"]["baseline"] == {"n": 2, "mean": 2.0, "half_width": 0.0}
    throughput = summary["throughput"]
    assert throughput["G_live"]["mean"] == pytest.approx(1.6)  # (1.5 + 1.7) / 2
    assert throughput["G_eq9"]["mean"] == pytest.approx(1.5) and throughput["aborted_runs"] == 2
    assert throughput["experiments_per_hour"]["off"]["mean"] == pytest.approx(100)
    assert summary["kept_by_kind"] == {"random": {"learning rate": 4}}


def test_a_small_research_run_side_by_side_agrees_with_its_ledgers(tmp_path: Path, small_corpus: Path):
    """The harness end to end, as `make research` runs it but small: real loops on a tiny target, one seed, random
    search and the proposing model without learning, with the evaluator on and off; three experiments each (the
    unmodified train.py, a repeat of it measuring noise, one search step)."""
    target = make_target(tmp_path / "target", small_corpus)
    out, work, experiments = tmp_path / "results", tmp_path / "work", 3
    argv = ["--policies", "random,llm", "--evaluator", "on,off", "--seeds", "1", "--experiments", str(experiments),
            "--budget", str(12 * 8 * 32), "--target", str(target), "--keep", str(work),  # 12 steps' tokens
            "--set", "PROPOSER_NOISE_REPEATS=1"]
    assert main([*argv, "--out", str(out)]) == 0
    figures = json.loads((out / "research.json").read_text())["figures"]
    assert main([*argv, "--out", str(out / "again")]) == 0  # the finished arms are read from their ledgers
    again = json.loads((out / "again" / "research.json").read_text())["figures"]
    assert again["runtime_h"] < 0.1 * figures["runtime_h"] and again["arms"] == figures["arms"]
    arms = {arm["name"]: arm for arm in figures["arms"]}
    assert sorted(arms) == ["llm/evaluator-off/seed0", "llm/evaluator-on/seed0", "random/evaluator-off/seed0",
                            "random/evaluator-on/seed0"]
    for name, arm in arms.items():
        ledger = Ledger(work / name.replace("/", "-") / "ledger.duckdb", read_only=True)
        try:
            rows = ledger.query("SELECT val_bpb, policy FROM experiments WHERE finished_seq IS NOT NULL "
                                "ORDER BY finished_seq").rows
            (c_star,), = ledger.query("SELECT val_bpb FROM champions ORDER BY finished_seq DESC LIMIT 1").rows
        finally:
            ledger.close()
        assert len(arm["curve"]) == sum(arm["statuses"].values()) == experiments <= len(rows)
        assert arm["baseline_bpb"] == rows[0][0] and arm["best_bpb"] == min(arm["curve"]) == c_star
        assert all(later <= earlier for earlier, later in zip(arm["curve"], arm["curve"][1:], strict=False))
        assert {policy for _, policy in rows[2:]} == {"random-search" if name.startswith("random") else "lm-score"}
        assert arm["experiments_per_hour"] > 0
    # Deterministic budget mode: one seed, one unmodified train.py, the same val-bpb in every arm.
    assert figures["baseline_spread"]["min"] == figures["baseline_spread"]["max"]
    assert figures["table"]["llm"] == {"n": 1, "mean": arms["llm/evaluator-on/seed0"]["best_bpb"], "half_width": None}
    assert [verdict["statement"] for verdict in figures["ordering"]] == [
        "random vs baseline: untestable with 1 seed(s)", "llm vs random: untestable with 1 seed(s)"]
    assert figures["throughput"]["G_live"]["n"] == 2
    assert (out / "research.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
