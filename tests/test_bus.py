"""The bus on a real nats-server: one stream, idempotent publishes, ordered replay, config kept current."""

from __future__ import annotations

import dataclasses

from nats.js.api import StreamConfig

from shared.bus import Bus, stream_config
from shared.events import STREAM, RunProgress, decode, new_id, now


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
