"""The five events of the loop, one definition each, and the subjects they travel on.

Every service encodes and decodes events only through this module. Payloads are JSON (msgspec),
readable as they are with `nats sub 'run.>'`.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, Literal

import msgspec

from shared.target.records import Phase, RunResult

SCHEMA_VERSION = 2
"""Raised when a field is added (always with a default, so that every older event still decodes, and the stream
stays replayable); an event from a newer build is refused, so upgrade every service before any publishes."""
STREAM = "EVENTS"
RUN_EVENTS = "run.>"
"""Every run's progress, aborts and results (`autoresearch tail 'run.>'`)."""
STREAM_SUBJECTS = ["proposal.>", RUN_EVENTS, "policy.>"]
MAX_EVENT_BYTES = 1 << 20
"""Events larger than this are refused (code blobs and adapters go to the object store)."""


Id = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
"""Ids become subject tokens (run.progress.<run_id>), so no dots, wildcards or spaces."""
Sha256 = Annotated[str, msgspec.Meta(pattern=r"^([0-9a-f]{64})?$")]


def new_id() -> str:
    return uuid.uuid4().hex


def now() -> datetime:
    return datetime.now(UTC)


class Event(msgspec.Struct, frozen=True, kw_only=True):
    event_id: Id
    producer: str
    """service/instance, e.g. executor/host-1234."""
    ts: datetime
    schema_version: int = SCHEMA_VERSION


class EditOp(msgspec.Struct, frozen=True):
    """One edit of train.py. Lines are 1-based; `replace`/`delete` cover [start, end] inclusive,
    `insert` puts `text` before line `start` (start = number of lines + 1 appends)."""

    op: Literal["insert", "replace", "delete"]
    start: int
    end: int
    text: str = ""


Purpose = Literal["search", "noise", "confirm"]
"""Why a proposal runs: search (an edit to judge), noise (a repeat of the baseline that measures
σ_noise), confirm (a repeat of an unconfirmed best that decides whether it is kept)."""


class ProposalCreated(Event, frozen=True, kw_only=True):
    """An edit of train.py to run. A repeat (noise, confirm) has no ops: its parent is the code it re-runs.
    The last three fields have defaults so that proposals logged before they existed still decode."""

    proposal_id: Id
    parent_code_sha256: Sha256
    ops: list[EditOp]
    unified_diff: str
    policy: str
    policy_version: str
    logprob: float | None = None
    value: float | None = None
    rationale: str | None = None
    seed: int | None = None
    """The run's seed; None: the executor's configured seed."""
    repeat_of: Id | None = None
    """The proposal whose code this run re-runs (a repeat), else None."""
    purpose: Purpose = "search"
    prompt: str | None = None
    """The state s_t as the language-model policy read it (paper §4.1); None for other policies."""
    candidates: list[str] | None = None
    """Score mode: the text of every candidate action scored; the chosen one is candidates[action_index]."""
    action_index: int | None = None
    completion_token_ids: list[int] | None = None
    """Generate mode: the tokens the model wrote (`logprob` is their sum), for per-token PPO ratios."""
    parse_error: str | None = None
    """Generate mode: why the model's answer is not an edit (then `ops` is empty). The executor records the
    proposal as invalid with this reason, without running it, so the penalty −p_syntax has its transition."""


class RunProgress(Event, frozen=True, kw_only=True):
    run_id: Id
    proposal_id: Id
    executor_id: str
    phase: Phase
    elapsed_train_s: float
    budget_used: float = 0.0
    """Fraction of the run's budget spent, in [0, 1] (the evaluator's clock in every budget unit)."""
    step: int
    train_loss: float | None
    nonfinite_loss: bool = False
    tokens: int
    peak_mem_mb: float


class RunAborted(Event, frozen=True, kw_only=True):
    """The evaluator's abort: its forecast of the final val-bpb with a 90% interval, the threshold τ (eq. 7),
    the SPRT statistic and boundary (eq. 8), and one line saying why. A diverged run has no forecast (None)."""

    run_id: Id
    at_train_s: float
    forecast: float | None
    forecast_low: float | None
    forecast_high: float | None
    threshold: float | None
    statistic: float | None
    boundary: float | None
    commentary: str


class RunFinished(Event, frozen=True, kw_only=True):
    run_id: Id
    proposal_id: Id
    executor_id: str
    result: RunResult
    slot: int | None = None
    """The executor slot that ran it (from schema 2 on, as the two fields below)."""
    waited_s: float | None = None
    """The slot idle before this proposal came: since it acked its previous one, or since the executor started."""
    prepared_s: float | None = None
    """From the delivery to the runner: the redelivery checks, the parent code from the ledger, the diff applied.
    With result's setup/startup/training/eval and these, a slot's duty cycle (bench/executor.py)."""


class PPOStats(msgspec.Struct, frozen=True, kw_only=True):
    policy_loss: float
    value_loss: float
    entropy: float
    approx_kl: float
    clip_fraction: float
    mean_reward: float
    reference_kl: float | None = None
    """KL(π_θ ‖ π_ref), π_ref the model with the adapter disabled."""
    learning_rate: float | None = None


class PolicyUpdated(Event, frozen=True, kw_only=True):
    policy_version: str
    adapter_name: str
    """The adapter's object in the object store (shared.bus.OBJECT_STORE)."""
    adapter_sha256: str
    stats: PPOStats
    update_index: int = 0
    proposals: list[Id] = []
    """The proposals whose transitions this update learned from: a restarted learner skips them."""


AnyEvent = ProposalCreated | RunProgress | RunAborted | RunFinished | PolicyUpdated

PROPOSAL_CREATED = "proposal.created"
RUN_PROGRESS = "run.progress"
RUN_ABORTED = "run.aborted"
RUN_FINISHED = "run.finished"
POLICY_UPDATED = "policy.updated"
_BY_PREFIX: dict[str, type[Event]] = {
    PROPOSAL_CREATED: ProposalCreated,
    RUN_PROGRESS: RunProgress,
    RUN_ABORTED: RunAborted,
    RUN_FINISHED: RunFinished,
    POLICY_UPDATED: PolicyUpdated,
}


def run_subject(prefix: str, run_id: str) -> str:
    """`run.aborted.<run_id>` and the like: one run's subject (`prefix.*` matches every run)."""
    return f"{prefix}.{run_id}"


def subject(event: Event) -> str:
    """`proposal.created`, `policy.updated`, or `run.<kind>.<run_id>` so that `run.>` tails every run."""
    prefix = next(p for p, kind in _BY_PREFIX.items() if type(event) is kind)
    return run_subject(prefix, event.run_id) if prefix.startswith("run.") else prefix  # type: ignore[attr-defined]


class BadEvent(ValueError):
    """A message that is not a valid event of its subject; the reason says why."""


def encode(event: Event) -> bytes:
    return msgspec.json.encode(event)


def decode(subject_name: str, data: bytes) -> AnyEvent:
    """The event on a subject, or BadEvent with a reason (never another exception)."""
    if len(data) > MAX_EVENT_BYTES:
        raise BadEvent(f"{len(data)} bytes on {subject_name} is over the {MAX_EVENT_BYTES}-byte limit")
    parts = subject_name.split(".")
    kind = _BY_PREFIX.get(".".join(parts[:2]))
    if kind is None or (parts[0] == "run") != (len(parts) == 3):
        raise BadEvent(f"no event is defined for subject {subject_name!r}")
    try:
        event = msgspec.json.decode(data, type=kind)
    except (msgspec.DecodeError, UnicodeDecodeError) as error:
        raise BadEvent(f"malformed {kind.__name__} on {subject_name}: {error}") from None
    if not 1 <= event.schema_version <= SCHEMA_VERSION:  # older ones decode: a schema only gains defaulted fields
        raise BadEvent(f"{kind.__name__} has schema_version {event.schema_version}, this build reads 1 to "
                       f"{SCHEMA_VERSION}")
    if parts[0] == "run" and parts[2] != event.run_id:  # type: ignore[attr-defined]
        raise BadEvent(f"subject {subject_name} does not match run_id {event.run_id!r}")  # type: ignore[attr-defined]
    return event  # type: ignore[return-value]
