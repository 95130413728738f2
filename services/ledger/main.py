"""Ledger service: the only process that opens the DuckDB file.

    python -m services.ledger

It pulls the whole event stream through its durable consumer, appends each batch in one transaction
together with the stream sequence it reached (store.py), and acks only after the commit: a crash
anywhere loses nothing and doubles nothing. It answers the other services' questions over NATS
request-reply (shared/queries.py) and users' SQL over a read-only HTTP API (api.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import msgspec
import uvicorn
from nats.aio.msg import Msg

from services.ledger.api import create_app
from services.ledger.store import Ledger
from shared import queries
from shared.bus import LEDGER_CONSUMER, UNAVAILABLE, Bus, Delivered, ack_after
from shared.config import Config
from shared.curves import CurvesReply, CurvesRequest
from shared.service import answer_status, instance_id, run_service

log = logging.getLogger("ledger")
T = TypeVar("T")
CATCH_UP_TIMEOUT_S = 10.0
"""A question waiting for an event the ledger has not committed yet goes unanswered after this, and the asker
asks again (queries.ask): an answer from behind the asker's events could double a run or a proposal."""


class LedgerService:
    def __init__(self, ledger: Ledger, bus: Bus, batch: int):
        self.ledger = ledger
        self.bus = bus
        self.batch = batch
        # One thread owns the write connection: appends and answers never interleave mid-transaction.
        self.db = ThreadPoolExecutor(max_workers=1, thread_name_prefix="duckdb")
        self.committed = asyncio.Condition()
        self.cursor = ledger.cursor
        """The last committed stream sequence, as the event loop knows it (the file is the db thread's)."""

    async def call(self, function: Callable[..., T], *args) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.db, function, *args)

    async def ingest(self, stop: asyncio.Event) -> None:
        await self.bus.ensure_ledger_consumer(self.cursor)
        events = await self.bus.pull(LEDGER_CONSUMER)
        while not stop.is_set():
            try:
                messages = await events.fetch(self.batch, timeout=1)
            except UNAVAILABLE:  # nothing new, or no stream leader for the moment
                continue
            if not messages:  # a status reply (request expired) instead of events
                continue
            batch = [Delivered(m.metadata.sequence.stream, m.subject, m.data) for m in messages]
            report = await self.call(self.ledger.append, batch)
            try:
                await ack_after(messages[-1])  # AckPolicy.ALL: this acks the whole batch, after the commit
            except UNAVAILABLE as error:  # redelivered later, and append skips what the file already holds
                log.warning("ack of stream seq %d failed (%r); the batch comes again", report.cursor, error)
            if report.bad:
                log.warning("%d malformed event(s) recorded in bad_events", report.bad)
            async with self.committed:
                self.cursor = report.cursor
                self.committed.notify_all()

    async def caught_up(self, seq: int) -> bool:
        """Whether the file holds stream sequence `seq` within CATCH_UP_TIMEOUT_S (read-your-writes for the asker)."""
        async with self.committed:
            try:
                await asyncio.wait_for(self.committed.wait_for(lambda: self.cursor >= seq), CATCH_UP_TIMEOUT_S)
            except TimeoutError:
                return False
        return True

    async def answer(self, subject: str, request_type: type, handle: Callable) -> None:
        async def respond(message: Msg) -> None:
            try:
                request = msgspec.json.decode(message.data, type=request_type)
            except msgspec.DecodeError as error:
                log.warning("malformed %s request: %s", subject, error)
                return
            after_seq = getattr(request, "after_seq", 0)
            if not await self.caught_up(after_seq):
                log.info("%s waits for stream seq %d (the file holds %d); no answer yet", subject, after_seq,
                         self.cursor)
                return
            await message.respond(msgspec.json.encode(await handle(request)))
        await self.bus.nc.subscribe(subject, cb=respond)

    async def serve_questions(self) -> None:
        ledger = self.ledger
        await self.answer(queries.STATE, queries.StateRequest, lambda _: self.call(ledger.state))
        await self.answer(queries.CODE, queries.CodeRequest,
                          lambda r: self.call(lambda: queries.CodeReply(ledger.code(r.sha256))))
        await self.answer(queries.FINISHED, queries.FinishedRequest,
                          lambda r: self.call(lambda: queries.FinishedReply(ledger.finished(r.proposal_id))))
        await self.answer(queries.REPLAY, queries.ReplayRequest, lambda _: self.call(replay, ledger))
        await self.answer(queries.CURVES, CurvesRequest, lambda r: self.call(lambda: CurvesReply(ledger.curves(r))))
        await self.answer(queries.TRANSITIONS, queries.TransitionsRequest, lambda r: self.call(ledger.transitions, r))


def replay(ledger: Ledger) -> queries.ReplayReply:
    started = time.perf_counter()
    rows = ledger.replay()
    return queries.ReplayReply(seconds=round(time.perf_counter() - started, 3), rows=rows)


HTTP_GRACE_S = 3
"""A stopping ledger waits this long for open HTTP responses (the dashboard's live streams end with `stop`)."""


async def serve_http(ledger: Ledger, config: Config, stop: asyncio.Event) -> None:
    settings = config.ledger
    address = f"{settings.http_host}:{settings.http_port}"
    server = uvicorn.Server(uvicorn.Config(create_app(ledger, config, stop), host=settings.http_host,
                                           port=settings.http_port, log_level="warning",
                                           timeout_graceful_shutdown=HTTP_GRACE_S))
    task = asyncio.create_task(server.serve())
    await asyncio.wait([task, asyncio.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
    server.should_exit = True
    try:
        await task
    except SystemExit:  # uvicorn exits when the port is taken; the ledger itself must go on
        log.error("the HTTP API could not listen on %s; `autoresearch sql` will not reach it", address)
    else:
        log.info("HTTP API on http://%s stopped", address)


async def serve(config: Config, stop: asyncio.Event) -> None:
    config.data_dir.mkdir(parents=True, exist_ok=True)
    ledger = Ledger(config.ledger_path, confirm_sigmas=config.ledger.confirm_sigmas)
    bus = await Bus.connect(config.nats.urls, instance_id("ledger"))
    await bus.ensure_stream(config.nats.replicas)

    async def lag() -> tuple[int, str]:
        cursor = ledger.cursor
        return await bus.last_seq() - cursor, f"committed up to stream seq {cursor}"

    await answer_status(bus, "ledger", instance_id("ledger"), lag)
    service = LedgerService(ledger, bus, config.ledger.batch)
    await service.serve_questions()
    log.info("ledger %s at stream seq %d; SQL on http://%s:%d/sql%s", config.ledger_path, ledger.cursor,
             config.ledger.http_host, config.ledger.http_port, " (token required)" if config.ledger.http_token else "")
    ingest = asyncio.create_task(service.ingest(stop))
    http = asyncio.create_task(serve_http(ledger, config, stop))
    await asyncio.wait([ingest, asyncio.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
    stop.set()
    try:
        await ingest  # re-raises an ingest failure: the process exits non-zero and the stack restarts it
    finally:
        await http
        await bus.close()
        await service.call(ledger.close)


def main() -> None:
    run_service("ledger", serve)


if __name__ == "__main__":
    main()
