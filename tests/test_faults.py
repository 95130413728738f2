"""The fault suite (bench/faults.py) in its bounded form: one kill -9 of each service at a random moment of a running
loop, an executor of the fleet killed mid-run, and a NATS node lost from a 3-node cluster. `make faults` runs the
long form and writes bench/results/faults.json."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest
from conftest import make_target

from bench.faults import (
    SERVICES,
    audit,
    kill_an_executor_mid_run,
    kill_services,
    lose_a_node,
    publish_garbage,
    start_cluster,
    start_services,
)
from bench.loop import Loop
from services.executor.main import Executor
from shared.bus import ABANDONED, WORK_QUEUE, Bus
from shared.config import load_config
from shared.diffs import EMPTY_SHA256
from shared.events import RUN_FINISHED, ProposalCreated, decode, new_id, now
from shared.target.config import load_target


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, small_corpus: Path) -> Path:
    return make_target(tmp_path_factory.mktemp("faults_target"), small_corpus, progress_interval_s=0.05)


def assert_nothing_lost_or_doubled(loop: Loop, url: str, bad_events: int = 0) -> None:
    result = audit(loop, url)
    assert result.bad_events == bad_events
    assert result.lost == 0 and result.stream_messages > 0
    assert result.doubled_events == result.doubled_runs == result.doubled_experiments == 0
    assert result.doubled_scheduled == result.doubled_updates == 0
    assert result.replay_matches


def skipped(loop: Loop) -> int:
    return sum(loop.log(name).count("skipping malformed proposal") for name in ("executor", "executor#2"))


def test_kill_9_of_any_service_or_of_a_busy_executor_loses_nothing_and_doubles_nothing(nats_server, tiny: Path,
                                                                                      tmp_path: Path):
    loop = Loop(nats_server, tiny, tmp_path, PROPOSER_MAX_EXPERIMENTS=0)
    try:
        start_services(loop)
        kills = kill_services(loop, nats_server.url, len(SERVICES), random.Random(0))
        garbage = publish_garbage(loop, nats_server.url, random.Random(0))
        loop.wait_for(lambda: skipped(loop) >= 4, 120, "the executors to reach the bad proposals")
        fleet = kill_an_executor_mid_run(loop)  # every service still up: the garbage killed none
    finally:
        loop.stop()
    assert [kill.process.partition("#")[0] for kill in kills] == list(SERVICES)
    assert all(kill.resume_s < 60 for kill in kills)
    delivery = lambda run_id: int(run_id.rpartition("-")[2])  # noqa: E731
    assert delivery(fleet["finished_run"]) == delivery(fleet["killed_run"]) + 1  # the next delivery, elsewhere
    assert garbage == {"stored": 20, "refused": 5}  # four kinds of garbage on each subject; the oversized refused
    assert_nothing_lost_or_doubled(loop, nats_server.url, bad_events=20)
    assert skipped(loop) == 4  # each once: terminated, not redelivered


def test_the_loop_goes_on_without_a_lost_nats_node_which_catches_up_when_back(tiny: Path, tmp_path: Path):
    nodes = start_cluster(tmp_path / "cluster")
    try:
        loop = Loop(nodes, tiny, tmp_path, NATS_REPLICAS=3, PROPOSER_MAX_EXPERIMENTS=0)
        try:
            start_services(loop)
            lost = lose_a_node(loop, nodes, random.Random(0))
        finally:
            loop.stop()
        assert lost["finished_while_down"] >= 1
        assert_nothing_lost_or_doubled(loop, nodes[0].url)
    finally:
        for node in nodes:
            node.stop()


async def test_a_proposal_no_executor_lived_through_is_finished_once_as_crashed(nats_server, tiny: Path):
    config = load_config(environ={"AUTORESEARCH_EXECUTOR_MAX_DELIVER": "1"})
    bus = await Bus.connect([nats_server.url], "test")
    await bus.ensure_stream()
    await bus.ensure_work_queue(ack_wait_s=1.0, max_deliver=1)
    for _ in range(2):  # a fleet of two: both hear the advisory
        await bus.nc.subscribe(ABANDONED, cb=Executor(bus, load_target(tiny), config).on_abandoned)
    proposal = ProposalCreated(event_id=new_id(), producer="test/1", ts=now(), proposal_id="doomed",
                               parent_code_sha256=EMPTY_SHA256, ops=[], unified_diff="", policy="test",
                               policy_version="0")
    await bus.publish(proposal)
    work = await bus.pull(WORK_QUEUE)
    await work.fetch(1, timeout=2)  # taken, then never acked nor kept in progress: its executor died
    finished = []
    for _ in range(50):
        finished = [item async for item in bus.replay() if item.subject.startswith(RUN_FINISHED)]
        if finished:
            break
        await asyncio.sleep(0.2)
    await asyncio.sleep(1.0)  # time for the second executor's copy, which the stream must refuse
    finished = [decode(item.subject, item.data) async for item in bus.replay() if item.subject.startswith(RUN_FINISHED)]
    await bus.close()
    (event,) = finished
    assert event.proposal_id == "doomed" and event.run_id == "doomed-1" and event.result.status == "crashed"
    assert "abandoned after 1 deliveries" in event.result.error
