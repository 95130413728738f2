"""Random search as pure functions of the ledger state: baseline first, its noise repeats, then mutations
of c* with every candidate's confirmation first; TERMINATE."""

from __future__ import annotations

from datetime import timedelta

import msgspec
from conftest import CPU_TARGET

from services.proposer.search import next_proposal, termination_reason
from shared.config import Proposer
from shared.diffs import EMPTY_SHA256, apply_ops, code_sha256
from shared.events import ProposalCreated, now
from shared.queries import Candidate, LedgerState

BASELINE = (CPU_TARGET / "train.py").read_text()
SEARCHING = dict(noise_runs=2, baseline_proposal_id="baseline")
"""The state once the baseline's two noise repeats are proposed."""


def state(experiments: int = 0, c_star: str | None = None, bpb_star: float | None = None, since_best: int = 0,
          hours_ago: float | None = None, **gate) -> LedgerState:
    return LedgerState(cursor=0, experiments=experiments, finished=experiments, outstanding=0,
                       c_star_sha256=c_star and code_sha256(c_star), c_star_code=c_star, bpb_star=bpb_star,
                       sigma_h=None, since_best=since_best, history=[],
                       first_proposed_at=None if hours_ago is None else now() - timedelta(hours=hours_ago),
                       **{"confirm_sigmas": 2.0} | gate)


def propose(at: LedgerState, executor_seed: int = 0) -> ProposalCreated:
    return next_proposal(at, BASELINE, Proposer(), executor_seed, producer="proposer/t")


def test_the_first_experiment_is_the_unmodified_train_py():
    baseline = propose(state())
    assert baseline.parent_code_sha256 == EMPTY_SHA256 and baseline.purpose == "search" and baseline.seed is None
    assert apply_ops("", baseline.ops) == BASELINE


def test_then_the_baseline_runs_again_with_fresh_seeds_to_measure_the_noise():
    repeats = [propose(state(k, noise_runs=k - 1, baseline_proposal_id="baseline"), executor_seed=5)
               for k in (1, 2)]
    for repeat in repeats:
        assert (repeat.purpose, repeat.repeat_of, repeat.ops, repeat.unified_diff) == ("noise", "baseline", [], "")
        assert repeat.parent_code_sha256 == code_sha256(BASELINE)
        assert apply_ops(BASELINE, repeat.ops) == BASELINE  # no ops: the parent as it is
    assert [repeat.seed for repeat in repeats] == [6, 7]  # never the executor's own seed 5, never twice the same
    assert "noise repeat 2 of 2" in repeats[1].rationale
    assert propose(state(3, **SEARCHING)).purpose == "search"
    assert next_proposal(state(1, baseline_proposal_id="b"), BASELINE, Proposer(noise_repeats=0), 0, "p").ops


def test_a_candidate_is_confirmed_before_the_search_goes_on():
    waiting = Candidate(proposal_id="lucky", code_sha256="c" * 64, val_bpb=2.3988, beat_by=0.0012,
                        sigma_noise=0.0015, confirmations=0, failed=0)
    confirmation = propose(state(6, BASELINE, 2.4, candidates=[waiting], **SEARCHING))
    assert (confirmation.purpose, confirmation.repeat_of, confirmation.parent_code_sha256, confirmation.ops) == (
        "confirm", "lucky", "c" * 64, [])
    assert confirmation.seed == 6
    assert confirmation.rationale == "confirmation of lucky (beat bpb* by 0.0012 < 2σ_noise = 0.0030; seed 6)"
    in_flight = msgspec.structs.replace(waiting, confirmations=1)
    assert propose(state(7, BASELINE, 2.4, candidates=[in_flight], **SEARCHING)).purpose == "search"
    crashed = msgspec.structs.replace(waiting, confirmations=1, failed=1, sigma_noise=None)
    retry = propose(state(8, BASELINE, 2.4, candidates=[in_flight, crashed], **SEARCHING))
    assert retry.purpose == "confirm" and retry.seed == 8
    assert retry.rationale == "confirmation of lucky, attempt 2 (beat bpb* by 0.0012; σ_noise not known yet; seed 8)"


def test_mutations_change_one_constant_of_c_star_and_repeat_for_the_same_seed_and_count():
    c_star = BASELINE.replace("LEARNING_RATE = 3e-3", "LEARNING_RATE = 6e-3")
    first = propose(state(3, c_star, 2.4, **SEARCHING))
    again = propose(state(3, c_star, 2.4, **SEARCHING))
    later = [propose(state(k, c_star, 2.4, **SEARCHING)) for k in range(4, 12)]
    assert first.parent_code_sha256 == code_sha256(c_star)
    assert (first.ops, first.rationale) == (again.ops, again.rationale) and first.proposal_id != again.proposal_id
    assert len({proposal.rationale for proposal in later}) > 1
    child = apply_ops(c_star, first.ops)
    changed = [line for line in child.splitlines() if line not in c_star.splitlines()]
    assert len(first.ops) == 1 and len(changed) == 1 and first.unified_diff.count("\n+") == 2  # header + line
    without_c_star = propose(state(3, **SEARCHING))  # the baseline has not finished yet
    assert without_c_star.parent_code_sha256 == code_sha256(BASELINE)


def test_terminate_options():
    at = now()
    assert termination_reason(state(500, BASELINE, 1.0, 400, hours_ago=100), Proposer(), at) is None  # forever
    assert "target" in termination_reason(state(5, BASELINE, 1.9), Proposer(target_bpb=2.0), at)
    assert termination_reason(state(5, BASELINE, 2.1), Proposer(target_bpb=2.0), at) is None
    assert "max_experiments" in termination_reason(state(10), Proposer(max_experiments=10), at)
    assert "max_hours" in termination_reason(state(3, hours_ago=2.5), Proposer(max_hours=2), at)
    assert termination_reason(state(3, hours_ago=1.5), Proposer(max_hours=2), at) is None
    assert "plateau" in termination_reason(state(60, since_best=50), Proposer(plateau=50), at)
