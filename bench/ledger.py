"""Ledger figures: append rate of the store, ingest rate through NATS, publish-to-commit latency of run.progress,
replay time of a 1M-event log and the memory it takes.

The synthetic log has the shape of the real one: per experiment one proposal, PROGRESS_PER_RUN
run.progress events (a 60 s run reporting every 2 s) and one run.finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import resource
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

from services.ledger.main import LedgerService
from services.ledger.store import Ledger
from shared.bus import Bus, Delivered
from shared.diffs import EMPTY_SHA256, code_sha256
from shared.events import EditOp, ProposalCreated, RunFinished, RunProgress, encode, new_id, now, subject
from shared.nats_server import EmbeddedServer
from shared.target.records import RunResult

PROGRESS_PER_RUN = 30
BATCH = 500


def synthetic_events(count: int, seed: int = 0) -> Iterator[tuple[str, bytes]]:
    """(subject, payload) of `count` events, experiment after experiment."""
    rng = random.Random(seed)
    made = 0
    while made < count:
        code = f"LEARNING_RATE = {rng.random():.6f}\n"
        proposal_id, run_id = new_id(), new_id()
        chain = [ProposalCreated(event_id=new_id(), producer="bench/1", ts=now(), proposal_id=proposal_id,
                                 parent_code_sha256=EMPTY_SHA256, ops=[EditOp("insert", 1, 0, code)],
                                 unified_diff=f"+{code}", policy="bench", policy_version="0")]
        chain += [RunProgress(event_id=new_id(), producer="bench/1", ts=now(), run_id=run_id, proposal_id=proposal_id,
                              executor_id="bench/1", phase="training", elapsed_train_s=2.0 * step, step=10 * step,
                              train_loss=5.0 - step / 10, tokens=4096 * step, peak_mem_mb=512.0)
                  for step in range(PROGRESS_PER_RUN)]
        result = RunResult(status="ok", val_bpb=2.0 + rng.random(), training_s=60.0, startup_s=2.0, total_s=70.0,
                           steps=300, tokens=1_228_800, peak_mem_mb=512.0, num_params=1_000_000,
                           code_sha256=code_sha256(code), corpus_sha256="c", tokenizer_id="t", eval_tokens=65536,
                           budget="60 seconds", seed=0, device="cpu", sandbox="bench")
        chain.append(RunFinished(event_id=new_id(), producer="bench/1", ts=now(), run_id=run_id,
                                 proposal_id=proposal_id, executor_id="bench/1", result=result))
        for event in chain[: count - made]:
            yield subject(event), encode(event)
        made += len(chain)


def append_rate(count: int = 100_000) -> dict[str, float]:
    deliveries = [Delivered(seq, name, data) for seq, (name, data) in enumerate(synthetic_events(count), 1)]
    with tempfile.TemporaryDirectory() as folder:
        ledger = Ledger(Path(folder) / "bench.duckdb")
        rates = []
        for start in range(0, count, BATCH):
            batch = deliveries[start:start + BATCH]
            began = time.perf_counter()
            ledger.append(batch)
            rates.append(len(batch) / (time.perf_counter() - began))
        ledger.close()
    return {"events": count, "batch": BATCH, "append_events_per_s_median": round(statistics.median(rates)),
            "append_events_per_s_last_10pct": round(statistics.median(rates[-len(rates) // 10:]))}


@contextlib.asynccontextmanager
async def _ledger_on_nats() -> AsyncIterator[tuple[Bus, LedgerService]]:
    """A fresh nats-server with the stream, and a ledger service (in this process) on a fresh file, not ingesting."""
    with tempfile.TemporaryDirectory() as folder:
        server = EmbeddedServer(Path(folder) / "nats").start()
        try:
            bus = await Bus.connect([server.url], "bench")
            await bus.ensure_stream()
            ledger = Ledger(Path(folder) / "bench.duckdb")
            try:
                yield bus, LedgerService(ledger, bus, BATCH)
            finally:
                await bus.close()
                ledger.close()
        finally:
            server.stop()


@contextlib.asynccontextmanager
async def _ingesting(service: LedgerService) -> AsyncIterator[None]:
    stop = asyncio.Event()
    ingest = asyncio.create_task(service.ingest(stop))
    try:
        yield
    finally:
        stop.set()
        await ingest


async def _nats_ingest(count: int) -> float:
    async with _ledger_on_nats() as (bus, service):
        for name, data in synthetic_events(count):
            await bus.js.publish(name, data)
        began = time.perf_counter()
        async with _ingesting(service):
            while service.cursor < count:
                await asyncio.sleep(0.01)
            return time.perf_counter() - began


def nats_ingest_rate(count: int = 50_000) -> dict[str, float]:
    seconds = asyncio.run(_nats_ingest(count))
    return {"events": count, "seconds": round(seconds, 2), "nats_ingest_events_per_s": round(count / seconds)}


async def _commit_latency(count: int, rate: float) -> list[float]:
    """Each event's seconds from its publish to the ledger's commit of it, events published at `rate` a second
    (the ledger service in this process, as the NATS ingest above: its commit is observed, not polled)."""
    published: dict[int, float] = {}
    committed: dict[int, float] = {}
    async with _ledger_on_nats() as (bus, service), _ingesting(service):

        async def watch() -> None:
            async with service.committed:
                while len(committed) < count:
                    await service.committed.wait()
                    at = time.perf_counter()
                    committed.update((seq, at) for seq in range(len(committed) + 1, service.cursor + 1))

        watcher = asyncio.create_task(watch())
        for name, data in synthetic_events(count):
            began = time.perf_counter()
            published[(await bus.js.publish(name, data)).seq] = began
            await asyncio.sleep(1 / rate)
        await asyncio.wait_for(watcher, 60)
    return [committed[seq] - at for seq, at in published.items()]


def commit_latency(count: int = 5000, rate: float = 500.0) -> dict[str, object]:
    latencies = asyncio.run(_commit_latency(count, rate))
    cuts = statistics.quantiles(latencies, n=100)
    return {"events": count, "published_per_s": rate, "latency_s_p50": round(cuts[49], 4),
            "latency_s_p99": round(cuts[98], 4), "latency_s_max": round(max(latencies), 4)}


def replay_time(count: int = 1_000_000, repeats: int = 3) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as folder:
        ledger = Ledger(Path(folder) / "bench.duckdb")
        began = time.perf_counter()
        batch: list[Delivered] = []
        for seq, (name, data) in enumerate(synthetic_events(count), 1):
            batch.append(Delivered(seq, name, data))
            if len(batch) == 5000:
                ledger.append(batch)
                batch = []
        ledger.append(batch)
        build_s = time.perf_counter() - began
        times, rows = [], {}
        for _ in range(repeats):
            began = time.perf_counter()
            rows = ledger.replay()
            times.append(time.perf_counter() - began)
        ledger.close()
    return {"events": count, "build_s": round(build_s, 1), "replay_s_median": round(statistics.median(times), 2),
            "replay_s_all": [round(t, 2) for t in times], "rows": rows,
            "peak_rss_mb_build_and_replay": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
