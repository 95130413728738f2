"""The reward of a finished experiment (services/learner/rewards.py): each term on hand-built cases."""

from __future__ import annotations

import math
import random
import time

import pytest

from services.learner.rewards import Context, Outcome, Reward, d_edit, levenshtein, reward
from shared.config import Learner
from shared.diffs import unified_diff
from shared.edit_kinds import changed_lines

SETTINGS = Learner()
CODE = "".join(f"x{i} = {i}\n" for i in range(100))
LR_DIFF = unified_diff(CODE, CODE.replace("x10 = 10\n", "x10 = 11\n"))
"""A one-line edit of a 100-line file: 2 changed lines."""


def _outcome(status: str = "ok", val_bpb: float | None = 1.9, tokens: int = 1000, training_s: float = 10.0,
             diff: str = LR_DIFF) -> Outcome:
    return Outcome(status=status, val_bpb=val_bpb, tokens=tokens, training_s=training_s, unified_diff=diff)


def _context(bpb_star: float | None = 2.0, throughput: float | None = 100.0, history: tuple[str, ...] = (LR_DIFF,),
             file_lines: int = 100) -> Context:
    """By default the run's throughput equals c*'s (η = 0) and its diff was tried before (novelty 0)."""
    return Context(bpb_star=bpb_star, throughput=throughput, history=history, file_lines=file_lines)


# ---------------------------------------------------------------------------------------------
# Improvement and penalties
# ---------------------------------------------------------------------------------------------


def test_an_improvement_is_paid_its_bpb():
    r = reward(_outcome(val_bpb=1.9), _context(bpb_star=2.0), SETTINGS)
    assert r == Reward(improvement=pytest.approx(0.1), eta=0.0, d_edit=0.0)
    assert r.total == pytest.approx(0.1)


def test_a_regression_costs_its_bpb_but_never_more_than_an_abort():
    assert reward(_outcome(val_bpb=2.02), _context(), SETTINGS).total == pytest.approx(-0.02)
    assert reward(_outcome(val_bpb=2.7), _context(), SETTINGS).total == pytest.approx(-SETTINGS.p_waste)


def test_the_baseline_has_nothing_to_beat():
    assert reward(_outcome(), _context(bpb_star=None), SETTINGS).improvement == 0.0


@pytest.mark.parametrize("status, penalty", [
    ("invalid", SETTINGS.p_syntax), ("rejected", SETTINGS.p_syntax), ("aborted", SETTINGS.p_waste),
    ("crashed", SETTINGS.p_crash), ("timeout", SETTINGS.p_crash),
])
def test_a_failed_run_gets_its_penalty_and_nothing_else(status: str, penalty: float):
    novel = unified_diff(CODE, CODE + "".join(f"y{i} = {i}\n" for i in range(50)))
    r = reward(_outcome(status=status, val_bpb=None, tokens=10**6, diff=novel), _context(), SETTINGS)
    assert r == Reward(penalty=-penalty) and r.total == -penalty


def test_penalties_come_from_the_settings():
    settings = Learner(p_syntax=0.3, p_waste=0.2, p_crash=0.25)
    assert [reward(_outcome(status=s, val_bpb=None), _context(), settings).total
            for s in ("invalid", "aborted", "crashed")] == [-0.3, -0.2, -0.25]


@pytest.mark.parametrize("status, val_bpb", [("ok", None), ("running", None), ("queued", None)])
def test_no_reward_for_an_unfinished_or_unmeasured_run(status: str, val_bpb: float | None):
    with pytest.raises(ValueError, match=status):
        reward(_outcome(status=status, val_bpb=val_bpb), _context(), SETTINGS)


# ---------------------------------------------------------------------------------------------
# Efficiency: log throughput against c*'s, clipped
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tokens, reference, eta", [
    (2000, 100.0, math.log(2)),  # twice c*'s tokens per second
    (500, 100.0, -math.log(2)),  # half: the same weight, the other sign
    (10_000, 100.0, 1.0),  # ten times: clipped, the bonus is at most λ_eff
    (1000, None, 0.0),  # c*'s throughput unknown
])
def test_efficiency_is_the_clipped_log_throughput_ratio(tokens: int, reference: float | None, eta: float):
    r = reward(_outcome(tokens=tokens, training_s=10.0), _context(throughput=reference), SETTINGS)
    assert r.eta == pytest.approx(eta) and r.efficiency == pytest.approx(SETTINGS.lambda_eff * eta)
    assert r.total == pytest.approx(0.1 + SETTINGS.lambda_eff * eta)


# ---------------------------------------------------------------------------------------------
# Novelty: ξ·d/(1 + d), d = line edit distance to the closest tried diff per line of the file
# ---------------------------------------------------------------------------------------------


def test_an_exact_repeat_gets_no_novelty_even_at_shifted_lines():
    shifted_parent = "import os\n" * 7 + CODE  # the same edit, seven lines further down
    shifted = unified_diff(shifted_parent, shifted_parent.replace("x10 = 10\n", "x10 = 11\n"))
    assert shifted != LR_DIFF and changed_lines(shifted) == changed_lines(LR_DIFF) == ["-x10 = 10", "+x10 = 11"]
    r = reward(_outcome(diff=shifted), _context(history=(unified_diff(CODE, CODE + "z = 0\n"), LR_DIFF)), SETTINGS)
    assert (r.d_edit, r.novelty) == (0.0, 0.0)


def test_a_near_repeat_is_measured_against_the_closest_tried_diff():
    near = unified_diff(CODE, CODE.replace("x10 = 10\n", "x10 = 12\n"))  # the same line, another value
    far = unified_diff(CODE, CODE.replace("x50 = 50\n", "y = 1\nz = 2\n"))
    assert d_edit(near, [far, LR_DIFF], 100) == pytest.approx(1 / 100)  # one substituted line
    assert d_edit(near, [far], 100) == pytest.approx(2 / 100)  # as far as from not editing at all
    assert d_edit(near, [], 100) == pytest.approx(2 / 100)


def test_the_edit_distance_is_normalised_by_the_file_length():
    new = unified_diff(CODE, CODE.replace("x3 = 3\n", "x3 = 4\n"))
    assert d_edit(new, [LR_DIFF], 100) == pytest.approx(2 / 100)
    assert d_edit(new, [LR_DIFF], 400) == pytest.approx(2 / 400)
    assert d_edit(new, [LR_DIFF], 0) == 2  # the baseline's empty parent counts as one line


def test_a_very_different_diff_gets_close_to_xi():
    small = "".join(f"a{i} = {i}\n" for i in range(10))
    rewrite = unified_diff(small, "".join(f"b{i} = {i}\n" for i in range(200)))  # 210 changed lines
    tried = unified_diff(small, small + "c = 0\n")
    r = reward(_outcome(diff=rewrite), _context(history=(tried,), file_lines=10), SETTINGS)
    assert r.d_edit == pytest.approx(21.0)
    assert r.novelty == pytest.approx(SETTINGS.xi * 21 / 22) and r.novelty > 0.95 * SETTINGS.xi


def test_a_typical_new_edit_gets_a_small_bonus():
    """The scale the defaults were chosen for: a new one-line edit of a 100-line file."""
    r = reward(_outcome(diff=unified_diff(CODE, CODE.replace("x3 = 3\n", "x3 = 4\n"))), _context(), SETTINGS)
    assert r.novelty == pytest.approx(SETTINGS.xi * 0.02 / 1.02) and r.total == pytest.approx(0.1 + r.novelty)


# ---------------------------------------------------------------------------------------------
# The edit distance itself
# ---------------------------------------------------------------------------------------------


def _table_levenshtein(a: list[str], b: list[str]) -> int:
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def test_levenshtein_matches_the_dynamic_programming_table():
    assert levenshtein(list("kitten"), list("sitting")) == 3
    assert levenshtein([], ["a", "b"]) == 2 and levenshtein(["a"], []) == 1
    rng = random.Random(0)
    for _ in range(500):
        a = [rng.choice("abcd") for _ in range(rng.randint(0, 80))]  # past 64 lines: more than one machine word
        b = [rng.choice("abcde") for _ in range(rng.randint(0, 80))]
        assert levenshtein(a, b) == _table_levenshtein(a, b)


def test_a_whole_file_rewrite_against_a_full_history_is_cheap():
    lines = 500
    parent = "".join(f"line_{i} = {i}\n" for i in range(lines))
    history = [unified_diff(parent, "".join(f"v{k}_{i} = {i}\n" for i in range(lines))) for k in range(37)]
    rewrite = unified_diff(parent, "".join(f"w_{i} = {i}\n" for i in range(lines)))
    start = time.perf_counter()
    assert d_edit(rewrite, history, lines) == pytest.approx(1.0)  # 1,000 changed lines; the 500 removed are shared
    assert time.perf_counter() - start < 2.0
