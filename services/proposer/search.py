"""Random search, the policy before the learner exists: what to propose next, and when to stop.

Pure functions of the ledger's state, so a restarted proposer continues exactly where it stopped:
the k-th proposal's mutation is drawn from a generator seeded by (seed, k).
"""

from __future__ import annotations

import random
from datetime import datetime

from services.proposer.grid import mutate
from shared.config import Proposer as Settings
from shared.diffs import EMPTY_SHA256, apply_ops, code_sha256, unified_diff
from shared.events import EditOp, ProposalCreated, new_id, now
from shared.queries import LedgerState

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


def next_proposal(state: LedgerState, baseline_code: str, seed: int, producer: str) -> ProposalCreated:
    """The human baseline first (inserted into the empty file), then one grid mutation of c*."""
    if state.experiments == 0:
        return _proposal(producer, EMPTY_SHA256, "", baseline_code,
                         [EditOp("insert", 1, 0, baseline_code)], "the unmodified train.py: the human baseline")
    parent = state.c_star_code if state.c_star_code is not None else baseline_code
    mutation = mutate(parent, random.Random(f"{seed}:{state.experiments}"))
    return _proposal(producer, code_sha256(parent), parent, apply_ops(parent, mutation.ops), mutation.ops,
                     mutation.description)


def _proposal(producer: str, parent_sha: str, parent: str, child: str, ops: list[EditOp],
              rationale: str) -> ProposalCreated:
    return ProposalCreated(event_id=new_id(), producer=producer, ts=now(), proposal_id=new_id(),
                           parent_code_sha256=parent_sha, ops=ops, unified_diff=unified_diff(parent, child),
                           policy=POLICY, policy_version=POLICY_VERSION, rationale=rationale)
