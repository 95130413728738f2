"""The bus: JetStream connection, the one event stream, idempotent publishing, ordered replay."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import msgspec
import nats
from nats.aio.msg import Msg
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    ObjectStoreConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BucketNotFoundError, NotFoundError
from nats.js.object_store import ObjectStore

from shared.events import MAX_EVENT_BYTES, PROPOSAL_CREATED, STREAM, STREAM_SUBJECTS, Event, encode, subject

DUPLICATE_WINDOW_S = 120.0
"""A publish retried within this window with the same event id is stored once."""
WORK_QUEUE = "executors"
"""The durable pull consumer every executor shares: each proposal goes to exactly one of them."""
ABANDONED = f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{STREAM}.{WORK_QUEUE}"
"""JetStream's advisory (core NATS) that a proposal was delivered max_deliver times and will not be again."""
T = TypeVar("T")
LEDGER_CONSUMER = "ledger"
"""The ledger's durable consumer of the whole stream."""
OBJECT_STORE = "artifacts"
"""JetStream object store bucket of artifacts too large for an event (LoRA adapters); events carry name + sha256."""
UNAVAILABLE = (TimeoutError, nats.js.errors.ServiceUnavailableError, nats.errors.NoRespondersError)
"""What a JetStream request meets while the cluster elects a leader (at start, or after a node was lost)."""
PATIENCE_S = 60.0
"""How long a JetStream request is asked again through UNAVAILABLE before the error is raised."""


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


def work_queue_config(ack_wait_s: float, max_deliver: int) -> ConsumerConfig:
    """One delivery per proposal at a time; silence for ack_wait_s means the executor died: redeliver."""
    return ConsumerConfig(
        durable_name=WORK_QUEUE,
        filter_subject=PROPOSAL_CREATED,
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=ack_wait_s,
        max_deliver=max_deliver,
        max_ack_pending=-1,
    )


def ledger_consumer_config(start_seq: int) -> ConsumerConfig:
    """Everything in stream order from start_seq; acking the last event of a batch acks the batch."""
    return ConsumerConfig(
        durable_name=LEDGER_CONSUMER,
        deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
        opt_start_seq=start_seq,
        ack_policy=AckPolicy.ALL,
        ack_wait=60.0,
        max_ack_pending=-1,
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
            await patiently(lambda: self.js.stream_info(STREAM))
        except NotFoundError:
            await patiently(lambda: self.js.add_stream(wanted))
            return
        await patiently(lambda: self.js.update_stream(wanted))

    async def ensure_work_queue(self, ack_wait_s: float, max_deliver: int) -> None:
        """Create the executors' consumer or update its limits to the current config."""
        await patiently(lambda: self.js.add_consumer(STREAM, work_queue_config(ack_wait_s, max_deliver)))

    async def last_seq(self) -> int:
        """The stream sequence of the newest stored event (0: none)."""
        return (await patiently(lambda: self.js.stream_info(STREAM))).state.last_seq

    async def ensure_ledger_consumer(self, cursor: int) -> None:
        """The ledger's consumer, positioned after `cursor`, the last sequence the ledger file holds.

        The file is the truth: a consumer that is ahead (the file was restored or deleted) or behind
        is recreated at cursor + 1, so no event is skipped and none is appended twice."""
        try:
            info = await patiently(lambda: self.js.consumer_info(STREAM, LEDGER_CONSUMER))
            if info.ack_floor.stream_seq == cursor and info.num_ack_pending == 0:
                return
            await patiently(lambda: self.js.delete_consumer(STREAM, LEDGER_CONSUMER))
        except NotFoundError:
            pass
        await patiently(lambda: self.js.add_consumer(STREAM, ledger_consumer_config(cursor + 1)))

    async def pull(self, durable: str) -> nats.js.JetStreamContext.PullSubscription:
        return await patiently(lambda: self.js.pull_subscribe_bind(durable=durable, stream=STREAM))

    async def stored(self, seq: int) -> Delivered:
        """The event at stream sequence `seq`."""
        message = await patiently(lambda: self.js.get_msg(STREAM, seq))
        return Delivered(seq, message.subject or "", message.data or b"")

    async def pending_proposals(self) -> int:
        """Proposals in the work queue that no executor has taken yet."""
        return (await patiently(lambda: self.js.consumer_info(STREAM, WORK_QUEUE))).num_pending

    async def request(self, subject_name: str, payload: msgspec.Struct, reply: type[T], timeout: float) -> T:
        """Core NATS request-reply (the ledger's state queries); raises TimeoutError if nobody answers."""
        try:
            answer = await self.nc.request(subject_name, msgspec.json.encode(payload), timeout=timeout)
        except nats.errors.NoRespondersError:
            raise TimeoutError(f"nobody answers {subject_name}") from None
        except nats.errors.TimeoutError:
            raise TimeoutError(f"no reply on {subject_name} within {timeout} s") from None
        return msgspec.json.decode(answer.data, type=reply)

    async def publish(self, event: Event) -> int:
        """Store the event once (its id is the Nats-Msg-Id, which makes every retry idempotent); returns its
        stream sequence."""
        ack = await patiently(lambda: self.js.publish(subject(event), encode(event), stream=STREAM,
                                                      headers={"Nats-Msg-Id": event.event_id}))
        return ack.seq

    async def replay(self, after_seq: int = 0) -> AsyncIterator[Delivered]:
        """Every stored event after `after_seq`, in stream order, up to the end of the log as it is now."""
        last = await self.last_seq()
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

    async def publish_until_stored(self, event: Event, retry_s: float = 1.0) -> int:
        """Publish through a server outage: the msg id makes every retry idempotent."""
        while True:
            try:
                return await self.publish(event)
            except (TimeoutError, nats.errors.Error):
                await asyncio.sleep(retry_s)

    async def put_object(self, name: str, data: bytes, replicas: int = 1) -> str:
        """Store an artifact under `name` (a new put replaces it); returns its sha256 for the event that names it."""
        await (await self._objects(replicas)).put(name, data)
        return hashlib.sha256(data).hexdigest()

    async def get_object(self, name: str, sha256: str) -> bytes:
        """The artifact an event names, checked against the sha256 the event carries."""
        data = (await (await self._objects()).get(name)).data or b""
        if hashlib.sha256(data).hexdigest() != sha256:
            raise ValueError(f"object {name} is not the one the event names (sha256 differs)")
        return data

    async def _objects(self, replicas: int = 1) -> ObjectStore:
        try:
            return await self.js.object_store(OBJECT_STORE)
        except BucketNotFoundError:
            return await self.js.create_object_store(OBJECT_STORE, ObjectStoreConfig(bucket=OBJECT_STORE,
                                                                                     replicas=replicas))

    async def close(self) -> None:
        """Close without draining: every publish was already confirmed, and draining a pull
        subscription waits out its timeout."""
        await self.nc.close()


async def patiently(request: Callable[[], Awaitable[T]], patience_s: float = PATIENCE_S) -> T:
    """The request, asked again through a leader election (UNAVAILABLE) for up to patience_s."""
    deadline = asyncio.get_running_loop().time() + patience_s
    while True:
        try:
            return await request()
        except UNAVAILABLE:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.5)


async def ack_after(message: Msg) -> None:
    """An acknowledgement the server confirmed (a lost ack would mean a second run)."""
    await message.ack_sync()

