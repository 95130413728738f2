"""The fault suite (bench/faults.py) in its bounded form: on a 3-node NATS cluster, one kill -9 of each service and of
a node at random moments of a running loop, garbage on every subject, and an executor of the fleet killed mid-run;
then a proposal redelivered under a live run, and one that no executor lived through. `make faults` runs the long
form (bench/results/faults.json)."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import msgspec
import pytest
from conftest import make_target

from bench.faults import (
    INSTANCES,
    VICTIMS,
    audit,
    fault_loop,
    kill_an_executor_mid_run,
    kill_anything,
    publish_garbage,
    start_cluster,
    start_services,
)
from bench.loop import Loop
from services.executor.main import Executor
from services.executor.runs import unrun_result
from shared import queries
from shared.bus import ABANDONED, WORK_QUEUE, Bus
from shared.config import Config, load_config
from shared.diffs import EMPTY_SHA256
from shared.events import RUN_FINISHED, ProposalCreated, RunFinished, decode, new_id, now
from shared.target.config import load_target
from shared.target.records import Budget


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, small_corpus: Path) -> Path:
    return make_target(tmp_path_factory.mktemp("faults_target"), small_corpus, progress_interval_s=0.05)


def skipped(loop: Loop) -> int:
    return sum(loop.log(name).count("skipping malformed proposal") for name in INSTANCES["executor"])


def test_kill_9_of_anything_loses_nothing_and_doubles_nothing(tiny: Path, tmp_path: Path):
    nodes = start_cluster(tmp_path / "cluster")
    urls = [node.url for node in nodes]
    try:
        loop = fault_loop(nodes, tiny, tmp_path)
        try:
            start_services(loop)
            kills = kill_anything(loop, nodes, len(VICTIMS), random.Random(0))
            garbage = publish_garbage(loop, urls, random.Random(0))
            loop.wait_for(lambda: skipped(loop) >= 4, 120, "the executors to reach the bad proposals")
            fleet = kill_an_executor_mid_run(loop)  # every service still up: the garbage killed none
        finally:
            loop.stop()
        result = audit(loop, urls)
    finally:
        for node in nodes:
            node.stop()
    assert [kill.process.partition("#")[0] for kill in kills] == list(VICTIMS)
    assert all(kill.resume_s < 60 for kill in kills) and kills[-1].catch_up_s is not None
    delivery = lambda run_id: int(run_id.rpartition("-")[2])  # noqa: E731
    assert delivery(fleet["finished_run"]) == delivery(fleet["killed_run"]) + 1  # the next delivery, elsewhere
    assert garbage == {"stored": 20, "refused": 5}  # four kinds of garbage on each subject; the oversized refused
    assert skipped(loop) == 4  # each bad proposal once: terminated, not redelivered
    assert result.lost == 0 and result.stream_messages > 0 and result.bad_events == 20
    assert result.doubled_events == result.doubled_runs == result.doubled_experiments == 0
    assert result.doubled_scheduled == result.doubled_updates == 0
    assert result.replay_matches


async def test_a_proposal_redelivered_under_a_live_run_waits_for_that_run_instead_of_running_twice(
        nats_server, tiny: Path, tmp_path: Path):
    """What a NATS failover does to a running proposal (its in-progress acks lost, it is redelivered after
    ack_wait), played with the test as the executor of the live run, which never acks it."""
    loop = Loop(nats_server, tiny, tmp_path, EXECUTOR_ACK_WAIT_S=1).start("ledger")
    bus = await Bus.connect([nats_server.url], "test")
    try:
        await bus.ensure_stream()
        await bus.ensure_work_queue(ack_wait_s=1.0, max_deliver=5)
        await bus.publish(_proposal("alive"))
        work = await bus.pull(WORK_QUEUE)
        await work.fetch(1, timeout=2)  # delivery 1: the live run

        async def answer(message) -> None:  # as every executor does for the runs it holds
            if msgspec.json.decode(message.data, type=queries.RunningRequest).proposal_id == "alive":
                await message.respond(msgspec.json.encode(queries.RunningReply("alive-1", "test/1")))
        live = await bus.nc.subscribe(queries.RUNNING, cb=answer)
        loop.start("executor")
        await asyncio.to_thread(loop.wait_for, lambda: "waiting for that run" in loop.log("executor"), 120,
                                "the redelivery to find the live run")
        await asyncio.sleep(2.0)  # a while of waiting, and nothing run
        await bus.publish(RunFinished(event_id=new_id(), producer="test/1", ts=now(), run_id="alive-1",
                                      proposal_id="alive", executor_id="test/1",
                                      result=unrun_result("ok", "", Budget("steps", 1), 0)))
        await live.unsubscribe()  # the live run has ended
        await asyncio.to_thread(loop.wait_for, lambda: "already finished before a redelivery" in loop.log("executor"),
                                60, "the redelivery to see the run finished")
        finished = [decode(item.subject, item.data) async for item in bus.replay()
                    if item.subject.startswith(RUN_FINISHED)]
    finally:
        await bus.close()
        await asyncio.to_thread(loop.stop)
    assert [event.run_id for event in finished] == ["alive-1"]
    assert "run alive-" not in loop.log("executor")  # never started a run of its own


def _proposal(proposal_id: str) -> ProposalCreated:
    return ProposalCreated(event_id=new_id(), producer="test/1", ts=now(), proposal_id=proposal_id,
                           parent_code_sha256=EMPTY_SHA256, ops=[], unified_diff="", policy="test", policy_version="0")


async def test_a_proposal_no_executor_lived_through_is_finished_once_as_crashed(nats_server, tiny: Path,
                                                                                 tmp_path: Path):
    config = load_config(environ={"AUTORESEARCH_EXECUTOR_MAX_DELIVER": "1"})
    ledger = Loop(nats_server, tiny, tmp_path).start("ledger")  # the executors ask it whether the run finished
    try:
        finished = await _abandon(nats_server.url, tiny, config)
    finally:
        await asyncio.to_thread(ledger.stop)  # it asks the stream, from a loop of its own
    (event,) = finished
    assert event.proposal_id == "doomed" and event.run_id == "doomed-1" and event.result.status == "crashed"
    assert "abandoned after 1 deliveries" in event.result.error


async def _abandon(url: str, tiny: Path, config: Config) -> list[RunFinished]:
    """A proposal taken by an executor that dies before its run ends, with max_deliver 1; the run.finished
    events the stream then holds."""
    bus = await Bus.connect([url], "test")
    await bus.ensure_stream()
    await bus.ensure_work_queue(ack_wait_s=1.0, max_deliver=1)
    for _ in range(2):  # a fleet of two: both hear the advisory
        await bus.nc.subscribe(ABANDONED, cb=Executor(bus, load_target(tiny), config).on_abandoned)
    await bus.publish(_proposal("doomed"))
    work = await bus.pull(WORK_QUEUE)
    await work.fetch(1, timeout=2)  # taken, then never acked nor kept in progress: its executor died

    async def finished() -> list[RunFinished]:
        return [decode(item.subject, item.data) async for item in bus.replay() if item.subject.startswith(RUN_FINISHED)]

    for _ in range(100):  # the advisory comes once ack_wait is over
        if await finished():
            break
        await asyncio.sleep(0.2)
    await asyncio.sleep(1.0)  # time for the second executor's copy, which the stream must refuse
    events = await finished()
    await bus.close()
    return events
