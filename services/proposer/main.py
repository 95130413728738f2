"""Proposer service: keep one proposal waiting in the work queue, always against c*.

    python -m services.proposer

State comes from the ledger at every step (c*, experiment count, σ_noise, candidates awaiting
confirmation, the history h), so a restart resumes the search, its noise repeats and its confirmations.
The work queue is kept exactly one proposal deep beyond what the executors hold: as soon as no
proposal is waiting, the next is made, whatever the number of executors or slots. The scheduled runs
come first (search.scheduled_proposal); otherwise the configured policy takes its search step
(policy.py) in a worker thread, since a language model or an HTTP request blocks. A language-model
policy follows policy.updated and hot-loads every new adapter (AdapterFollower).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
from nats.aio.msg import Msg
from nats.js.errors import NotFoundError

from services.proposer.policy import (
    CannotPropose,
    LanguageModelPolicy,
    PolicyUnavailable,
    SearchPolicy,
    Step,
    make_policy,
)
from services.proposer.search import parent_code, scheduled_proposal, termination_reason
from shared import queries
from shared.bus import Bus
from shared.config import Config
from shared.config import Proposer as Settings
from shared.events import POLICY_UPDATED, RUN_FINISHED, STREAM, BadEvent, PolicyUpdated, ProposalCreated, decode, now
from shared.policy.adapters import unpack_adapter
from shared.service import answer_status, instance_id, run_service
from shared.target.config import load_target

log = logging.getLogger("proposer")
POLL_S = 1.0
"""How often to look at the queue when no run finishes (an executor may have taken the waiting proposal)."""
RETRY_S = (1.0, 60.0)
"""A failed policy server is asked again after 1 s, then twice as long each time, at most 60 s."""
VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
"""A policy version names the folder its adapter is unpacked to: no separators, no dot-dot."""


async def serve(config: Config, stop: asyncio.Event) -> None:
    target = load_target(config.stack.target)
    baseline = target.train_py.read_text()
    producer = instance_id("proposer")
    bus = await Bus.connect(config.nats.urls, producer)
    await bus.ensure_stream(config.nats.replicas)
    await bus.ensure_work_queue(config.executor.ack_wait_s, config.executor.max_deliver)
    await answer_status(bus, "proposer", producer)
    try:
        policy = await asyncio.to_thread(make_policy, config.proposer, (target.path / "program.md").read_text(),
                                         config.data_dir, config.learner.lora_r)
    except CannotPropose as error:
        log.error("TERMINATE: %s; no proposals", error)
        await stop.wait()
        await bus.close()
        return
    follower = AdapterFollower(bus, policy, config.data_dir / "policy") if isinstance(
        policy, LanguageModelPolicy) else None
    if follower is not None:
        await follower.start()
    wake = asyncio.Event()

    async def on_finished(_message: Msg) -> None:
        wake.set()

    finished = await bus.nc.subscribe(f"{RUN_FINISHED}.*", cb=on_finished)
    # the first state includes everything stored before this start, such as the last proposal of a killed
    # predecessor that the ledger has not read yet: proposing again from older state would double it
    seen_seq, terminated, retry_s = await bus.last_seq(), None, RETRY_S[0]
    while not stop.is_set():
        state = await queries.ask(bus, queries.STATE, queries.StateRequest(after_seq=seen_seq), queries.LedgerState)
        reason = termination_reason(state, config.proposer, now())
        if reason != terminated and reason is not None:
            log.info("TERMINATE: %s; no more proposals (the queued ones still run)", reason)
        terminated = reason
        if reason is None and await bus.pending_proposals() < 1:
            scheduled = scheduled_proposal(state, baseline, config.proposer, config.executor.seed, producer)
            if scheduled is not None:
                seen_seq = await bus.publish(scheduled)
                log.info("proposed %s: %s", scheduled.proposal_id, scheduled.rationale)
                continue
            step = Step(state, parent_code(state, baseline), producer, now())
            try:
                async for seq in take_step(policy, step, bus, config.proposer):
                    seen_seq = seq
                retry_s = RETRY_S[0]
            except PolicyUnavailable as error:
                log.error("%s; asking again in %.0f s", error, retry_s)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=retry_s)
                retry_s = min(2 * retry_s, RETRY_S[1])
            except CannotPropose as error:
                log.error("TERMINATE: %s; no more proposals", error)
                await stop.wait()
            continue
        wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(_first(wake, stop), timeout=POLL_S)
    if follower is not None:
        await follower.stop()
    await finished.unsubscribe()
    await bus.close()


async def take_step(policy: SearchPolicy, step: Step, bus: Bus, settings: Settings) -> AsyncIterator[int]:
    """Publish the step's proposals as the policy makes them (bad answers first, each one stored before the
    next sample), until a TERMINATE condition the step's own proposals reach (max_experiments); yields the
    stream sequence of each, so that one published before the policy fails still counts."""
    proposals = policy.propose(step)
    made = 0
    try:
        while not termination_reason(_advanced(step, made), settings, now()):
            proposal = await asyncio.to_thread(next, proposals, None)
            if proposal is None:
                return
            seq, made = await bus.publish(proposal), made + 1
            _log(proposal)
            yield seq
    finally:
        proposals.close()


def _advanced(step: Step, made: int) -> queries.LedgerState:
    return msgspec.structs.replace(step.state, experiments=step.state.experiments + made)


def _log(proposal: ProposalCreated) -> None:
    by = f"{proposal.policy} {proposal.policy_version}"
    if proposal.parse_error is not None:
        log.info("proposed %s (%s), not an edit: %s", proposal.proposal_id, by, proposal.parse_error)
    else:
        log.info("proposed %s (%s): %s", proposal.proposal_id, by, proposal.rationale)


class AdapterFollower:
    """Keeps a language-model policy on the newest adapter the learner published: every policy.updated as it
    comes (core NATS), and on start the last one in the stream, so that a restarted proposer goes on with
    the newest adapter. Each is fetched from the object store, unpacked to data_dir/policy/<version> and
    loaded; the next step samples with it. One that fails to load is logged and skipped: the policy keeps
    the version it has, which still works."""

    def __init__(self, bus: Bus, policy: LanguageModelPolicy, folder: Path) -> None:
        self.bus = bus
        self.policy = policy
        self.folder = folder
        self.latest: PolicyUpdated | None = None
        self.lock = asyncio.Lock()
        self.subscription = None

    async def start(self) -> None:
        """Subscribe first, then load the stream's last update unless a newer one came meanwhile."""
        self.subscription = await self.bus.nc.subscribe(POLICY_UPDATED, cb=self.on_message)
        try:
            last = await self.bus.js.get_last_msg(STREAM, POLICY_UPDATED)
        except NotFoundError:
            log.info("no policy.updated yet: proposing with the base model (version %s)", self.policy.version)
            return
        if self.latest is None:
            await self.offer(last.subject or POLICY_UPDATED, last.data or b"")

    async def stop(self) -> None:
        if self.subscription is not None:
            await self.subscription.unsubscribe()

    async def on_message(self, message: Msg) -> None:
        await self.offer(message.subject, message.data)

    async def offer(self, subject: str, data: bytes) -> None:
        """Load this update unless a newer one arrived while an earlier load ran, or it is the current one."""
        try:
            update = decode(subject, data)
        except BadEvent as error:
            log.warning("ignoring a malformed policy.updated: %s", error)
            return
        assert isinstance(update, PolicyUpdated)
        self.latest = update
        async with self.lock:
            if update is not self.latest or update.policy_version == self.policy.version:
                return
            try:
                directory = await self.fetch(update)
                await asyncio.to_thread(self.policy.load, directory, update.policy_version)
            except Exception as error:  # whatever failed, the adapter in use still works
                log.error("adapter %s (update %d) not loaded, still proposing with %s: %s: %s",
                          update.policy_version, update.update_index, self.policy.version, type(error).__name__,
                          error)
                return
        log.info("now proposing with adapter %s (update %d, mean reward %.4g)", update.policy_version,
                 update.update_index, update.stats.mean_reward)

    async def fetch(self, update: PolicyUpdated) -> Path:
        if not VERSION.match(update.policy_version):
            raise ValueError(f"policy_version {update.policy_version!r} cannot name a folder")
        data = await self.bus.get_object(update.adapter_name, update.adapter_sha256)
        return await asyncio.to_thread(unpack_adapter, data, self.folder / update.policy_version)


async def _first(*events: asyncio.Event) -> None:
    waits = [asyncio.create_task(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


def main() -> None:
    run_service("proposer", serve)


if __name__ == "__main__":
    main()
