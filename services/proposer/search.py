"""What to propose next besides the policy's search step, when to stop, and random search itself.

Pure functions of the ledger's state, so a restarted proposer continues exactly where it stopped:
the k-th proposal's mutation is drawn from a generator seeded by (seed, k), a repeat's run seed is
derived from k too. Whatever the policy (services/proposer/policy.py), the same runs come first
(scheduled_proposal): the human baseline, the noise repeats of it that measure σ_noise for the keep gate
(services/ledger/gate.py), and the confirmation of every unconfirmed best, which decides whether it
becomes c*. They are recorded as random search's, since no policy chose them. Only the search step
changes by policy; random search's is grid_proposal (the fourth policy, the one before any learning).
"""

from __future__ import annotations

import random
from datetime import datetime
from typing import Any

from services.proposer.grid import mutate
from shared.config import Proposer as Settings
from shared.diffs import apply_ops, code_sha256, unified_diff
from shared.events import EditOp, ProposalCreated, Purpose, new_id, now
from shared.queries import Candidate, LedgerState

POLICY = "random-search"
POLICY_VERSION = "grid-v1"


def termination_reason(state: LedgerState, settings: Settings, at: datetime) -> str | None:
    """The TERMINATE condition that holds, if any; with every option off the loop runs forever."""
    if settings.target_bpb and state.bpb_star is not None and state.bpb_star <= settings.target_bpb:
        return f"bpb* {state.bpb_star:.4f} reached the target {settings.target_bpb}"
    if settings.max_experiments and state.experiments >= settings.max_experiments:
        return f"{state.experiments} experiments proposed (max_experiments = {settings.max_experiments})"
    if settings.max_hours and state.first_proposed_at is not None:
        hours = (at - state.first_proposed_at).total_seconds() / 3600
        if hours >= settings.max_hours:
            return f"{hours:.2f} hours since the first experiment (max_hours = {settings.max_hours})"
    if settings.plateau and state.since_best >= settings.plateau:
        return f"{state.since_best} finished experiments without a new best (plateau = {settings.plateau})"
    return None


def next_proposal(state: LedgerState, baseline_code: str, settings: Settings, executor_seed: int,
                  producer: str) -> ProposalCreated:
    """Random search from the first experiment on: every scheduled run, else one grid mutation of c*."""
    scheduled = scheduled_proposal(state, baseline_code, settings, executor_seed, producer)
    return scheduled or grid_proposal(state, parent_code(state, baseline_code), settings, producer)


def scheduled_proposal(state: LedgerState, baseline_code: str, settings: Settings, executor_seed: int,
                       producer: str) -> ProposalCreated | None:
    """The runs that come before any policy's search step, whatever the policy: the human baseline first
    (inserted into the empty file), then its noise repeats, then the confirmation of a candidate waiting for
    one. None: the search step is due (services/proposer/policy.py)."""
    if state.experiments == 0:
        return edit_proposal(producer, "", [EditOp("insert", 1, 0, baseline_code)],
                             "the unmodified train.py: the human baseline")
    seed = fresh_seed(executor_seed, state.experiments)
    if state.noise_runs < settings.noise_repeats:
        return _repeat(producer, code_sha256(baseline_code), state.baseline_proposal_id, "noise", seed,
                       f"noise repeat {state.noise_runs + 1} of {settings.noise_repeats} of the baseline "
                       f"(seed {seed}): measures σ_noise for the keep gate")
    candidate = next((c for c in state.candidates if c.confirmations == c.failed), None)
    if candidate is not None:
        return _repeat(producer, candidate.code_sha256, candidate.proposal_id, "confirm", seed,
                       confirmation_rationale(candidate, state.confirm_sigmas, seed))
    return None


def parent_code(state: LedgerState, baseline_code: str) -> str:
    """The code a search step edits: c*, or the baseline while no run has finished ok."""
    return state.c_star_code if state.c_star_code is not None else baseline_code


def grid_proposal(state: LedgerState, parent: str, settings: Settings, producer: str) -> ProposalCreated:
    """The random search step: one constant of `parent` moved one step of the grid, drawn from a generator
    seeded by (seed, experiment count); grid.GridError when no constant can move."""
    mutation = mutate(parent, random.Random(f"{settings.seed}:{state.experiments}"))
    return edit_proposal(producer, parent, mutation.ops, mutation.description)


def fresh_seed(executor_seed: int, experiments: int) -> int:
    """The seed of a repeat proposed as experiment number `experiments` + 1: the executor's seed plus that
    count (at least 1), so never the seed the searched runs use, and never the same for two repeats."""
    return executor_seed + experiments


def confirmation_rationale(candidate: Candidate, confirm_sigmas: float, seed: int) -> str:
    """e.g. "confirmation of <id> (beat bpb* by 0.0012 < 2σ_noise = 0.0030; seed 7)"."""
    attempt = f", attempt {candidate.failed + 1}" if candidate.failed else ""
    if candidate.sigma_noise is None:
        why = f"beat bpb* by {candidate.beat_by:.4f}; σ_noise not known yet"
    else:
        why = (f"beat bpb* by {candidate.beat_by:.4f} < {confirm_sigmas:g}σ_noise = "
               f"{confirm_sigmas * candidate.sigma_noise:.4f}")
    return f"confirmation of {candidate.proposal_id}{attempt} ({why}; seed {seed})"


def _repeat(producer: str, code_sha: str, of: str | None, purpose: Purpose, seed: int,
            rationale: str) -> ProposalCreated:
    """A run of existing code with another seed: no ops, the code itself as the parent."""
    return ProposalCreated(event_id=new_id(), producer=producer, ts=now(), proposal_id=new_id(),
                           parent_code_sha256=code_sha, ops=[], unified_diff="", policy=POLICY,
                           policy_version=POLICY_VERSION, rationale=rationale, seed=seed, repeat_of=of,
                           purpose=purpose)


def edit_proposal(producer: str, parent: str, ops: list[EditOp], rationale: str, policy: str = POLICY,
                  policy_version: str = POLICY_VERSION, **fields: Any) -> ProposalCreated:
    """A proposal of `ops` against `parent`, with its unified diff; `fields` are the policy's own (logprob,
    prompt, ...; shared/events.py). Empty ops with a parse_error: an answer that is not an edit."""
    return ProposalCreated(event_id=new_id(), producer=producer, ts=now(), proposal_id=new_id(),
                           parent_code_sha256=code_sha256(parent), ops=ops,
                           unified_diff=unified_diff(parent, apply_ops(parent, ops)), policy=policy,
                           policy_version=policy_version, rationale=rationale, **fields)
