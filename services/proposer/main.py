"""Proposer service (random search): keep one proposal waiting in the work queue, always against c*.

    python -m services.proposer

State comes from the ledger at every step (c*, experiment count, σ_noise, candidates awaiting
confirmation), so a restart resumes the search, its noise repeats and its confirmations.
The work queue is kept exactly one proposal deep beyond what the executors hold: as soon as no
proposal is waiting, the next is made, whatever the number of executors or slots.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from services.proposer.grid import GridError
from services.proposer.search import next_proposal, termination_reason
from shared import queries
from shared.bus import Bus
from shared.config import Config
from shared.events import RUN_FINISHED, now
from shared.service import instance_id, run_service
from shared.target.config import load_target

log = logging.getLogger("proposer")
POLL_S = 1.0
"""How often to look at the queue when no run finishes (an executor may have taken the waiting proposal)."""


async def serve(config: Config, stop: asyncio.Event) -> None:
    target = load_target(config.stack.target)
    baseline = target.train_py.read_text()
    producer = instance_id("proposer")
    bus = await Bus.connect(config.nats.urls, producer)
    await bus.ensure_stream(config.nats.replicas)
    await bus.ensure_work_queue(config.executor.ack_wait_s, config.executor.max_deliver)
    wake = asyncio.Event()

    async def on_finished(_message) -> None:
        wake.set()

    finished = await bus.nc.subscribe(f"{RUN_FINISHED}.*", cb=on_finished)
    seen_seq, terminated = 0, None
    while not stop.is_set():
        state = await queries.ask(bus, queries.STATE, queries.StateRequest(after_seq=seen_seq), queries.LedgerState)
        reason = termination_reason(state, config.proposer, now())
        if reason != terminated and reason is not None:
            log.info("TERMINATE: %s; no more proposals (the queued ones still run)", reason)
        terminated = reason
        if reason is None and await bus.pending_proposals() < 1:
            try:
                proposal = next_proposal(state, baseline, config.proposer, config.executor.seed, producer)
            except GridError as error:  # c* has no constant left to move: nothing to search
                log.error("TERMINATE: random search cannot mutate c*: %s", error)
                await stop.wait()
                break
            seen_seq = await bus.publish(proposal)
            log.info("proposed %s: %s", proposal.proposal_id, proposal.rationale)
            continue
        wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(_first(wake, stop), timeout=POLL_S)
    await finished.unsubscribe()
    await bus.close()


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
