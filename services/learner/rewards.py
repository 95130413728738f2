"""The reward of one finished experiment, with every term of it (paper §3.1, Algorithm 1, §6.3).

    ok        r = improvement + λ_eff·η + novelty
              improvement = max(bpb* − bpb_{t+1}, −p_waste)      (Algorithm 1, line 17; floored, see below)
              η           = clip(ln(throughput / throughput of c*), −1, 1)
              novelty     = ξ·d_edit / (1 + d_edit)
    invalid   r = −p_syntax    (the edit does not apply or compile; also `rejected`: a model the frozen
                               evaluation refuses, e.g. one that looks at future tokens)
    aborted   r = −p_waste     (the self-evaluator stopped it, Algorithm 1 line 13)
    crashed   r = −p_crash     (and timeout: the run broke, after spending up to the whole budget)

Choices the paper leaves open, and why:

- bpb* is the *confirmed* best before this run finished (the ledger's keep gate): a noisy false win must
  not become the bar every later run is paid against. §3.1 writes −Δbpb with Δbpb = bpb_{t−1} − bpb_t,
  which would pay for getting worse; Algorithm 1's bpb* − bpb_{t+1} is the intended sign.
- The improvement is floored at −p_waste: a finished run never costs more than aborting it would have.
  The warm-up and audit runs are never aborted, so without the floor the same bad edit would cost −0.05
  or −0.7 depending on the evaluator's dice, and one such outlier would dominate a PPO batch and the
  running reward scale for a long time.
- η, compute efficiency: training throughput (tokens per training second) against c*'s run, on a log
  scale so that twice as fast and twice as slow weigh the same, clipped so that the bonus is at most
  λ_eff. Under a seconds budget every run costs the same compute, so "budget not needed" would always
  be 0; throughput is what a run gets out of that compute (a faster step leaves headroom a later edit can
  spend on a bigger model or more tokens). Under a steps or tokens budget the ratio is the time saved.
- d_edit (§6.3): the line edit distance between this run's diff and the closest diff in the history
  buffer, per line of train.py. Diffs are compared by their changed lines only (the + and − lines, not
  headers, hunk positions or context), so the same change made at a shifted line is a repeat. Not
  editing at all (the empty diff) is always among the known edits: d_edit is defined with an empty
  history and is never more than the edit's own size. Typical edits touch a few lines of a few hundred,
  so d_edit is usually 0.005-0.1 and the bonus about ξ·d_edit: a tie-breaker below the run-to-run noise.
- The paper writes the bonus as ξ/(1 + d_edit), which pays most for repeating a tried edit, against its
  own stated aim ("promoting genuine exploration"). We keep the functional form and follow the aim:
  ξ·d_edit/(1 + d_edit) = ξ − ξ/(1 + d_edit): 0 for an exact repeat, approaching ξ for an edit far from
  everything tried.
- Efficiency and novelty are paid on ok runs only (as in Algorithm 1, a penalty is the whole reward):
  a novel edit that breaks the run earns nothing for its novelty.

Only search proposals are actions of the policy; noise and confirmation repeats get no reward.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from shared.config import Learner
from shared.edit_kinds import changed_lines
from shared.queries import Transition


@dataclass(frozen=True)
class Outcome:
    """One finished experiment, as the reward reads it (columns of the ledger's `experiments` row)."""

    status: str
    """A RunResult status: ok, invalid, crashed, timeout, aborted, rejected."""
    val_bpb: float | None
    tokens: int
    training_s: float
    unified_diff: str


@dataclass(frozen=True)
class Context:
    """What was known when the run finished, and that its reward is measured against."""

    bpb_star: float | None
    """The confirmed best val-bpb before this run finished; None before the baseline has finished."""
    throughput: float | None
    """Training tokens per second of c*'s run(s); None if unknown."""
    history: Sequence[str]
    """The unified diffs of the history buffer h (the last K finished experiments and the top ones)."""
    file_lines: int
    """Lines of the train.py the diff was made on (c*)."""


@dataclass(frozen=True)
class Reward:
    """A reward and the terms it is the sum of, so that every reward can be audited."""

    improvement: float = 0.0
    """bpb* − bpb_{t+1}, floored at −p_waste."""
    efficiency: float = 0.0
    """λ_eff·η."""
    novelty: float = 0.0
    """ξ·d_edit/(1 + d_edit)."""
    penalty: float = 0.0
    """−p_syntax, −p_waste or −p_crash; 0 for an ok run."""
    eta: float | None = None
    """η, the clipped log throughput ratio (ok runs only)."""
    d_edit: float | None = None
    """The normalised edit distance to the closest tried diff (ok runs only)."""

    @property
    def total(self) -> float:
        return self.improvement + self.efficiency + self.novelty + self.penalty


def reward_of(transition: Transition, settings: Learner) -> Reward:
    """r_t with its terms, from what the ledger held when the experiment finished."""
    outcome = Outcome(transition.status, transition.val_bpb, transition.tokens, transition.training_s,
                      transition.unified_diff)
    context = Context(transition.bpb_star, transition.throughput, transition.history, transition.file_lines)
    return reward(outcome, context, settings)


def reward(outcome: Outcome, context: Context, settings: Learner) -> Reward:
    """The reward of one finished experiment; ValueError for a status that is not a finished run's."""
    match outcome.status:
        case "invalid" | "rejected":
            return Reward(penalty=-settings.p_syntax)
        case "aborted":
            return Reward(penalty=-settings.p_waste)
        case "crashed" | "timeout":
            return Reward(penalty=-settings.p_crash)
        case "ok" if outcome.val_bpb is not None:
            eta = efficiency(outcome, context.throughput)
            d = d_edit(outcome.unified_diff, context.history, context.file_lines)
            return Reward(improvement=improvement(outcome.val_bpb, context.bpb_star, settings.p_waste),
                          efficiency=settings.lambda_eff * eta,
                          novelty=settings.xi * d / (1 + d),
                          eta=eta, d_edit=d)
    raise ValueError(f"no reward for a run with status {outcome.status!r} and val_bpb {outcome.val_bpb!r}")


def improvement(val_bpb: float, bpb_star: float | None, p_waste: float) -> float:
    """bpb* − bpb_{t+1} (Algorithm 1, line 17), at least −p_waste; 0 for the baseline (nothing to beat)."""
    if bpb_star is None:
        return 0.0
    return max(bpb_star - val_bpb, -p_waste)


def efficiency(outcome: Outcome, reference: float | None) -> float:
    """η = ln(tokens per training second / c*'s), clipped to [−1, 1]; 0 when either is unknown."""
    if reference is None or reference <= 0 or outcome.tokens <= 0 or outcome.training_s <= 0:
        return 0.0
    return max(-1.0, min(1.0, math.log(outcome.tokens / outcome.training_s / reference)))


def d_edit(diff: str, history: Sequence[str], file_lines: int) -> float:
    """§6.3: line edit distance from `diff` to the closest diff in `history` (or to not editing at all),
    per line of the file."""
    mine = changed_lines(diff)
    closest = min(levenshtein(mine, changed_lines(other)) for other in [*history, ""])
    return closest / max(file_lines, 1)


def levenshtein(a: Sequence[str], b: Sequence[str]) -> int:
    """Edit distance between two sequences of lines (insert, delete or substitute one line, cost 1).

    Hyyrö's bit-parallel form of Myers' algorithm (Hyyrö 2001, "Explaining and extending the bit-parallel
    approximate string matching algorithm of Myers"): column j of the dynamic-programming table is held as
    its vertical deltas (+1: bits of pv, −1: bits of mv) in two integers of len(a) bits, so each line of b
    costs a few big-integer operations instead of len(a) Python steps. Two 1,000-line diffs take about a
    millisecond, where the plain table takes a second: a reward compares one diff with ~37.
    """
    if not a:
        return len(b)
    peq: dict[str, int] = {}  # for each distinct line, the bit set of its positions in a
    for i, line in enumerate(a):
        peq[line] = peq.get(line, 0) | 1 << i
    mask, top = (1 << len(a)) - 1, 1 << (len(a) - 1)
    pv, mv, score = mask, 0, len(a)  # column 0: D[i][0] = i, every vertical delta +1
    for line in b:
        eq = peq.get(line, 0)
        xv = eq | mv
        xh = (((eq & pv) + pv) ^ pv) | eq
        ph = (mv | ~(xh | pv)) & mask  # horizontal deltas +1
        mh = pv & xh  # horizontal deltas −1
        if ph & top:
            score += 1  # score tracks D[len(a)][j], the bottom row
        elif mh & top:
            score -= 1
        ph = ((ph << 1) | 1) & mask  # | 1: D[0][j] = j, the top row rises by one per line of b
        mh = (mh << 1) & mask
        pv = (mh | ~(xv | ph)) & mask
        mv = ph & xv
    return score
