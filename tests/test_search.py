"""Random search as pure functions of the ledger state: baseline first, then mutations of c*; TERMINATE."""

from __future__ import annotations

from datetime import timedelta

from conftest import CPU_TARGET

from services.proposer.search import next_proposal, termination_reason
from shared.config import Proposer
from shared.diffs import EMPTY_SHA256, apply_ops, code_sha256
from shared.events import now
from shared.queries import LedgerState

BASELINE = (CPU_TARGET / "train.py").read_text()


def state(experiments: int = 0, c_star: str | None = None, bpb_star: float | None = None, since_best: int = 0,
          hours_ago: float | None = None) -> LedgerState:
    return LedgerState(cursor=0, experiments=experiments, finished=experiments, outstanding=0,
                       c_star_sha256=c_star and code_sha256(c_star), c_star_code=c_star, bpb_star=bpb_star,
                       sigma_h=None, since_best=since_best, history=[],
                       first_proposed_at=None if hours_ago is None else now() - timedelta(hours=hours_ago))


def test_the_first_experiment_is_the_unmodified_train_py():
    baseline = next_proposal(state(), BASELINE, seed=0, producer="proposer/t")
    assert baseline.parent_code_sha256 == EMPTY_SHA256
    assert apply_ops("", baseline.ops) == BASELINE


def test_mutations_change_one_constant_of_c_star_and_repeat_for_the_same_seed_and_count():
    c_star = BASELINE.replace("LEARNING_RATE = 3e-3", "LEARNING_RATE = 6e-3")
    first = next_proposal(state(3, c_star, 2.4), BASELINE, seed=0, producer="proposer/t")
    again = next_proposal(state(3, c_star, 2.4), BASELINE, seed=0, producer="proposer/t")
    later = [next_proposal(state(k, c_star, 2.4), BASELINE, seed=0, producer="proposer/t") for k in range(4, 12)]
    assert first.parent_code_sha256 == code_sha256(c_star)
    assert (first.ops, first.rationale) == (again.ops, again.rationale) and first.proposal_id != again.proposal_id
    assert len({proposal.rationale for proposal in later}) > 1
    child = apply_ops(c_star, first.ops)
    changed = [line for line in child.splitlines() if line not in c_star.splitlines()]
    assert len(first.ops) == 1 and len(changed) == 1 and first.unified_diff.count("\n+") == 2  # header + line
    without_c_star = next_proposal(state(1), BASELINE, seed=0, producer="proposer/t")  # the baseline is running
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
