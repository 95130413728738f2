"""The bus: JetStream connection, the one event stream, idempotent publishing, ordered replay."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import nats
from nats.js.api import ConsumerConfig, DeliverPolicy, DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError

from shared.events import MAX_EVENT_BYTES, STREAM, STREAM_SUBJECTS, Event, encode, subject

DUPLICATE_WINDOW_S = 120.0
"""A publish retried within this window with the same event id is stored once."""


def stream_config(replicas: int = 1) -> StreamConfig:
    return StreamConfig(
        name=STREAM,
        subjects=STREAM_SUBJECTS,
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        discard=DiscardPolicy.OLD,
        max_msg_size=MAX_EVENT_BYTES,
        duplicate_window=DUPLICATE_WINDOW_S,
        num_replicas=replicas,
    )


@dataclass(frozen=True)
class Delivered:
    """One stored event as it comes back from the stream."""

    seq: int
    subject: str
    data: bytes


class Bus:
    def __init__(self, nc: nats.NATS):
        self.nc = nc
        self.js = nc.jetstream()

    @classmethod
    async def connect(cls, servers: list[str], name: str) -> Bus:
        return cls(await nats.connect(servers=servers, name=name, max_reconnect_attempts=-1))

    async def ensure_stream(self, replicas: int = 1) -> None:
        """Create the event stream, or bring an existing one's config up to date."""
        wanted = stream_config(replicas)
        try:
            await self.js.stream_info(STREAM)
        except NotFoundError:
            await self.js.add_stream(wanted)
            return
        await self.js.update_stream(wanted)

    async def publish(self, event: Event) -> int:
        """Store the event once (its id is the Nats-Msg-Id); returns its stream sequence."""
        ack = await self.js.publish(subject(event), encode(event), stream=STREAM,
                                    headers={"Nats-Msg-Id": event.event_id})
        return ack.seq

    async def replay(self, after_seq: int = 0) -> AsyncIterator[Delivered]:
        """Every stored event after `after_seq`, in stream order, up to the end of the log as it is now."""
        info = await self.js.stream_info(STREAM)
        last = info.state.last_seq
        if last <= after_seq:
            return
        subscription = await self.js.subscribe(">", stream=STREAM, ordered_consumer=True,
                                               config=ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                                                                     opt_start_seq=after_seq + 1))
        try:
            while True:
                message = await subscription.next_msg(timeout=10)
                seq = message.metadata.sequence.stream
                yield Delivered(seq, message.subject, message.data)
                if seq >= last:
                    return
        finally:
            await subscription.unsubscribe()

    async def close(self) -> None:
        await self.nc.drain()

