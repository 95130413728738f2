"""Questions services ask over core NATS request-reply, and the answers' shapes.

Most are for the ledger: it is the only process that opens the DuckDB file; everyone else asks it.
A request may carry `after_seq`: the ledger answers only once it has committed that stream
sequence, so a service that has just seen an event reads a state that includes it. One is for the
executors (RUNNING): nothing is stored, only a live executor can answer it.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime
from typing import TYPE_CHECKING, TypeVar

import msgspec

if TYPE_CHECKING:
    from shared.bus import Bus

log = logging.getLogger("queries")
T = TypeVar("T")
RETRY_S = 2.0

STATE = "ledger.state"
CODE = "ledger.code"
FINISHED = "ledger.finished"
REPLAY = "ledger.replay"
CURVES = "ledger.curves"
"""Training curves of finished runs (shared/curves.py): what the evaluator calibrates on."""
TRANSITIONS = "ledger.transitions"
"""The learner's PPO transitions not learned from yet, and the policy versions published so far."""
STATUS = "service.status"
"""Every live service answers: what `autoresearch status` shows of it (ServiceStatus)."""
RUNNING = "executor.running"
"""Which run of a proposal is alive on some executor: asked before running a redelivered proposal, whose
first delivery may still be running (a NATS failover can redeliver a proposal under a live run)."""


class StateRequest(msgspec.Struct, frozen=True):
    after_seq: int = 0


class HistoryEntry(msgspec.Struct, frozen=True, kw_only=True):
    """One experiment of the history buffer h in the policy's state s_t."""

    proposal_id: str
    status: str
    val_bpb: float | None
    unified_diff: str
    abort_commentary: str | None
    why: str
    """recent (one of the last K), top (one of the best 5), or both."""


class Candidate(msgspec.Struct, frozen=True, kw_only=True):
    """An unconfirmed best: a search run that beat bpb* by less than confirm_sigmas·σ_noise (or while
    σ_noise was unknown), waiting for a confirmation run of its code to decide whether it becomes c*."""

    proposal_id: str
    code_sha256: str
    val_bpb: float
    beat_by: float
    """bpb* − val_bpb when it finished."""
    sigma_noise: float | None
    """σ_noise when it finished (None: not known yet)."""
    confirmations: int
    """Confirmation runs proposed so far."""
    failed: int
    """Of those, the ones that finished without a val_bpb (one is tried again, two refute it)."""


class LedgerState(msgspec.Struct, frozen=True, kw_only=True):
    """What the proposer (and later the evaluator and learner) need of the history, as of `cursor`.

    c* and bpb* are the keep gate's confirmed best (services/ledger/gate.py says how a run gets there)."""

    cursor: int
    experiments: int
    finished: int
    outstanding: int
    c_star_sha256: str | None
    c_star_code: str | None
    bpb_star: float | None
    sigma_h: float | None
    since_best: int
    """Finished experiments since the last new best (for the plateau rule)."""
    first_proposed_at: datetime | None
    history: list[HistoryEntry]
    confirm_sigmas: float = 0.0
    """The keep gate's margin in σ_noise (0: off, every strict improvement is kept)."""
    sigma_noise: float | None = None
    """Pooled within-code standard deviation of ok val_bpb (None until some code has two ok runs)."""
    noise_dof: int = 0
    """Its degrees of freedom: Σ (ok runs − 1) over the codes."""
    baseline_proposal_id: str | None = None
    """The first proposal: the human baseline, which the noise repeats re-run."""
    noise_runs: int = 0
    """Noise repeats proposed so far."""
    candidates: list[Candidate] = []
    """Unconfirmed bests waiting for their confirmation, oldest first."""
    aborted: int = 0
    """Experiments the evaluator aborted."""
    policy_version: str | None = None
    """The newest adapter the learner published (None: the base policy, no PPO update yet)."""
    policy_updates: int = 0


class CodeRequest(msgspec.Struct, frozen=True):
    sha256: str
    after_seq: int = 0


class CodeReply(msgspec.Struct, frozen=True):
    code: str | None


class FinishedRequest(msgspec.Struct, frozen=True):
    proposal_id: str
    after_seq: int = 0


class FinishedReply(msgspec.Struct, frozen=True):
    finished: bool


class ServiceStatus(msgspec.Struct, frozen=True, kw_only=True):
    service: str
    instance: str
    version: str
    """The package version and, in a git checkout, its commit."""
    started_at: datetime
    lag: int | None
    """Work waiting for this service: stream events the ledger has not committed; proposals queued for the
    executors; finished experiments the learner has not learned from. None where nothing waits on it in that
    sense (the proposer, the evaluator)."""
    detail: str = ""


class RunningRequest(msgspec.Struct, frozen=True):
    proposal_id: str


class RunningReply(msgspec.Struct, frozen=True):
    """Sent only by the executor that runs the proposal; the others stay silent."""

    run_id: str
    executor_id: str


class ReplayRequest(msgspec.Struct, frozen=True):
    pass


class ReplayReply(msgspec.Struct, frozen=True):
    seconds: float
    rows: dict[str, int]
    """Rows per projection table after the rebuild."""


class TransitionsRequest(msgspec.Struct, frozen=True, kw_only=True):
    limit: int
    """Transitions at most in the reply (fewer if more would not fit in one NATS message)."""
    after_finished_seq: int = 0
    """Only transitions that finished after this stream sequence: the next page."""
    after_seq: int = 0


class Transition(msgspec.Struct, frozen=True, kw_only=True):
    """One step (s_t, a_t, r_t) of the research MDP (paper §3.1): a finished search experiment proposed by a
    language-model policy, with what its reward (services/learner/rewards.py) and PPO need. Every field is
    fixed once the experiment has finished: the context is what the ledger held then."""

    proposal_id: str
    proposal_seq: int
    finished_seq: int
    policy: str
    policy_version: str
    """The adapter version that proposed it: PPO's π_θold."""
    prompt: str
    """s_t as the policy read it."""
    candidates: list[str] | None
    """Score mode: every candidate action's text; a_t is candidates[action_index]."""
    action_index: int | None
    completion_token_ids: list[int] | None
    """Generate mode: the tokens the policy wrote (a_t token by token), also when they did not parse."""
    parse_error: str | None
    logprob: float
    """log π_θold(a_t|s_t) as the proposer computed it (the learner recomputes it, and V(s_t))."""
    unified_diff: str
    status: str
    val_bpb: float | None
    tokens: int
    training_s: float
    bpb_star: float | None
    """The confirmed best val-bpb before this experiment finished (None before the baseline's)."""
    throughput: float | None
    """Training tokens per second of c*'s ok runs finished before this one (None: unknown)."""
    history: list[str]
    """The unified diffs of the history buffer h when this experiment finished (the last K finished
    experiments and the top 5), for the novelty bonus (§6.3)."""
    file_lines: int
    """Lines of the code the edit was made on (its parent, c* when proposed)."""


class PublishedPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """A policy.updated event: an adapter version the learner published."""

    policy_version: str
    adapter_name: str
    adapter_sha256: str
    update_index: int


class TransitionsReply(msgspec.Struct, frozen=True, kw_only=True):
    pending: int
    """Transitions finished and not learned from yet (every page of them)."""
    lm_proposals: int
    """Search proposals of language-model policies so far, finished or not (0: nothing will ever be learned)."""
    transitions: list[Transition]
    """The first `limit` pending transitions after `after_finished_seq`, in the order they finished."""
    policies: list[PublishedPolicy]
    """Every version published, oldest first; their `proposals` are the transitions not pending."""


async def ask(bus: Bus, subject: str, request: msgspec.Struct, reply: type[T], timeout: float = 15.0) -> T:
    """Ask the ledger, waiting out a restart of it: the answer matters more than the delay."""
    while True:
        try:
            return await bus.request(subject, request, reply, timeout=timeout)
        except TimeoutError as error:
            log.warning("%s; asking again in %.0f s", error, RETRY_S)
            await asyncio.sleep(RETRY_S)
