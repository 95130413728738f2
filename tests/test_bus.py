"""The bus on a real nats-server: one stream, idempotent publishes, ordered replay, config kept current."""

from __future__ import annotations

import dataclasses

import pytest
from nats.js.api import StreamConfig

from shared.bus import LEDGER_CONSUMER, WORK_QUEUE, Bus, ack_after, stream_config
from shared.events import STREAM, ProposalCreated, RunProgress, decode, new_id, now


def progress(run_id: str, step: int, event_id: str | None = None) -> RunProgress:
    return RunProgress(event_id=event_id or new_id(), producer="test/1", ts=now(), run_id=run_id, proposal_id="p",
                       executor_id="e", phase="training", elapsed_train_s=float(step), step=step, train_loss=1.0,
                       tokens=step * 10, peak_mem_mb=1.0)


async def test_a_retried_publish_is_stored_once_and_replay_is_ordered(nats_server):
    bus = await Bus.connect([nats_server.url], "test")
    await bus.ensure_stream()
    events = [progress("r1", step) for step in range(20)]
    seqs = [await bus.publish(event) for event in events]
    assert await bus.publish(events[5]) == seqs[5]  # same event id: the stream keeps the first copy
    replayed = [item async for item in bus.replay()]
    assert [item.seq for item in replayed] == seqs == list(range(1, 21))
    assert [decode(item.subject, item.data) for item in replayed] == events
    tail = [item.seq async for item in bus.replay(after_seq=17)]
    assert tail == [18, 19, 20]
    assert [item async for item in bus.replay(after_seq=20)] == []
    await bus.close()


async def test_the_stream_survives_a_server_restart(nats_server):
    bus = await Bus.connect([nats_server.url], "test")
    await bus.ensure_stream()
    await bus.publish(progress("r1", 1))
    await bus.close()
    nats_server.stop()
    nats_server.start()
    bus = await Bus.connect([nats_server.url], "test")
    await bus.ensure_stream()
    assert [item.seq async for item in bus.replay()] == [1]
    await bus.close()


async def test_a_stale_stream_config_is_updated_at_start(nats_server):
    bus = await Bus.connect([nats_server.url], "test")
    stale = dataclasses.replace(stream_config(), subjects=["run.>"], duplicate_window=5.0)
    await bus.js.add_stream(StreamConfig.from_response(stale.as_dict()))
    await bus.ensure_stream()
    info = await bus.js.stream_info(STREAM)
    assert sorted(info.config.subjects) == sorted(stream_config().subjects)
    assert info.config.duplicate_window == stream_config().duplicate_window
    await bus.close()


def proposal(proposal_id: str) -> ProposalCreated:
    return ProposalCreated(event_id=new_id(), producer="test/1", ts=now(), proposal_id=proposal_id,
                           parent_code_sha256="", ops=[], unified_diff="", policy="test", policy_version="0")


async def test_work_queue_gives_each_proposal_to_one_executor_and_redelivers_a_silent_one(nats_server):
    bus = await Bus.connect([nats_server.url], "test")
    await bus.ensure_stream()
    await bus.ensure_work_queue(ack_wait_s=1.0, max_deliver=2)
    first, second = await bus.pull(WORK_QUEUE), await bus.pull(WORK_QUEUE)
    for name in ("a", "b", "c"):
        await bus.publish(proposal(name))
    await bus.publish(progress("r1", 1))  # not a proposal: never reaches the queue
    assert await bus.pending_proposals() == 3
    got_a, = await first.fetch(1, timeout=2)
    got_b, = await second.fetch(1, timeout=2)
    got_c, = await second.fetch(1, timeout=2)
    assert {decode(m.subject, m.data).proposal_id for m in (got_a, got_b, got_c)} == {"a", "b", "c"}
    await ack_after(got_a)
    await got_b.term()
    # c is neither acked nor kept in progress: the executor "died"; it comes back after ack_wait.
    again, = await first.fetch(1, timeout=5)
    assert again.data == got_c.data and again.metadata.num_delivered == 2
    with pytest.raises(TimeoutError):  # max_deliver = 2 and a and b are settled: nothing more
        await first.fetch(1, timeout=2.5)
    await bus.ensure_work_queue(ack_wait_s=7.0, max_deliver=5)  # a changed config is applied, not ignored
    info = await bus.js.consumer_info(STREAM, WORK_QUEUE)
    assert (info.config.ack_wait, info.config.max_deliver) == (7.0, 5)
    await bus.close()


async def test_ledger_consumer_follows_the_ledger_files_cursor(nats_server):
    bus = await Bus.connect([nats_server.url], "test")
    await bus.ensure_stream()
    for step in range(5):
        await bus.publish(progress("r1", step))
    await bus.ensure_ledger_consumer(cursor=0)
    events = await bus.pull(LEDGER_CONSUMER)
    batch = await events.fetch(3, timeout=2)
    await ack_after(batch[-1])  # AckPolicy.ALL: the whole batch
    info = await bus.js.consumer_info(STREAM, LEDGER_CONSUMER)
    assert info.ack_floor.stream_seq == 3 and info.num_ack_pending == 0
    await bus.ensure_ledger_consumer(cursor=3)  # in step: kept
    await bus.ensure_ledger_consumer(cursor=1)  # the file is behind (restored from a backup): start at 2
    events = await bus.pull(LEDGER_CONSUMER)
    assert [m.metadata.sequence.stream for m in await events.fetch(10, timeout=2)] == [2, 3, 4, 5]
    await bus.close()


async def test_an_artifact_goes_to_the_object_store_and_comes_back_only_as_named(nats_server):
    bus = await Bus.connect([nats_server.url], "test")
    adapter = bytes(range(256)) * 8192  # 2 MiB: more than an event may carry, so in chunks
    sha256 = await bus.put_object("adapter-v0001", adapter)
    assert await bus.get_object("adapter-v0001", sha256) == adapter
    with pytest.raises(ValueError, match="sha256 differs"):
        await bus.get_object("adapter-v0001", "0" * 64)
    await bus.close()
