"""Questions services ask the ledger over core NATS request-reply, and the answers' shapes.

The ledger is the only process that opens the DuckDB file; everyone else asks it. A request may
carry `after_seq`: the ledger answers only once it has committed that stream sequence, so a
service that has just seen an event reads a state that includes it.
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


class ReplayRequest(msgspec.Struct, frozen=True):
    pass


class ReplayReply(msgspec.Struct, frozen=True):
    seconds: float
    rows: dict[str, int]
    """Rows per projection table after the rebuild."""


async def ask(bus: Bus, subject: str, request: msgspec.Struct, reply: type[T], timeout: float = 15.0) -> T:
    """Ask the ledger, waiting out a restart of it: the answer matters more than the delay."""
    while True:
        try:
            return await bus.request(subject, request, reply, timeout=timeout)
        except TimeoutError as error:
            log.warning("%s; asking again in %.0f s", error, RETRY_S)
            await asyncio.sleep(RETRY_S)
