"""Learner service (paper §4.2; Algorithm 1, line 24): PPO on the proposer's language-model policy, one update
every batch_size finished search experiments, each published as policy.updated with its adapter in the
object store, from where the proposer hot-loads it.

    python -m services.learner

Update k (from 0): the first batch_size pending transitions the ledger has (batches.py), learned from by the
policy of version k (update.py), saved as version v000{k+1} in data_dir/learner/<version>, packed into the
object store, and announced by policy.updated with the proposals it consumed.

Restart safety: the state is the ledger and the object store. The policy.updated events the ledger holds say
which transitions are consumed and which version is the newest; a version's local folder is a cache of its
object, fetched back when missing. A folder no policy.updated names is what a killed update left: it is
removed, and the update is redone on the same batch with the same index and seed, so it yields the same
adapter. An update counts only once its policy.updated is stored, so no transition is lost or learned twice.

With a policy that is not a language model (random search, openai-greedy) nothing is ever pending: the
learner says so once and waits for finished runs, without torch imported or a model loaded (both come with
the first batch).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
from nats.aio.msg import Msg

from shared import queries
from shared.bus import Bus
from shared.config import Config
from shared.events import RUN_FINISHED, PolicyUpdated, new_id, now
from shared.policy.adapters import pack_adapter, unpack_adapter
from shared.queries import PublishedPolicy, Transition, TransitionsReply, TransitionsRequest
from shared.service import answer_status, instance_id, run_service

if TYPE_CHECKING:
    from services.learner.ppo import RunningMoments
    from services.learner.update import Trainer

log = logging.getLogger("learner")
NICENESS = 19
POLL_S = 10.0
"""How often to ask the ledger when no run finishes (every run.finished wakes the learner at once)."""


def version_name(update_index: int) -> str:
    """v0001 for the first update, then v0002, ...: the policy_version, and the name of its folder."""
    return f"v{update_index + 1:04d}"


class LearnerService:
    def __init__(self, config: Config, bus: Bus, producer: str, halt: threading.Event):
        self.config = config
        self.settings = config.learner
        self.bus = bus
        self.producer = producer
        self.halt = halt
        self.root = config.data_dir / "learner"
        self.trainer: Trainer | None = None
        """The policy, loaded at the first update."""
        self.version: str | None = None
        """The trainer's policy version (None: the initial policy)."""
        self.moments: RunningMoments | None = None

    async def pending(self, after_seq: int, after_finished_seq: int = 0) -> TransitionsReply:
        request = TransitionsRequest(limit=self.settings.batch_size, after_finished_seq=after_finished_seq,
                                     after_seq=after_seq)
        return await queries.ask(self.bus, queries.TRANSITIONS, request, TransitionsReply)

    async def update(self, reply: TransitionsReply, after_seq: int) -> int | None:
        """The next update (reply.pending >= batch_size); returns the stream sequence of its policy.updated, or
        None if the service stopped first."""
        from services.learner.batches import select  # torch and transformers, only once there is work for them
        from services.learner.update import Halted, save_version

        batch = select(await self.first(reply, after_seq), self.settings.batch_size)
        trainer = await self.restore(reply.policies)
        published = {policy.policy_version: policy for policy in reply.policies}
        adapters = {version: await self.folder(published[version]) if version in published else None
                    for version in {transition.policy_version for transition in batch} - {self.version}}
        index = len(reply.policies)
        version = version_name(index)
        directory = self.root / version
        shutil.rmtree(directory, ignore_errors=True)  # a killed attempt at this update: no event names it
        log.info("update %d on %d transitions (proposed by %s) for %s", index, len(batch),
                 ", ".join(sorted({transition.policy_version for transition in batch})), version)
        started = time.perf_counter()
        try:
            learned = await asyncio.to_thread(trainer.learn, batch, adapters, self.version, self.moments,
                                              self.settings, index)
        except Halted:
            return None
        await asyncio.to_thread(save_version, trainer.policy, self.moments, directory)
        self.version = version
        name = f"adapter-{version}"
        data = await asyncio.to_thread(pack_adapter, directory)
        sha256 = await self.bus.put_object(name, data, self.config.nats.replicas)
        stats = msgspec.structs.replace(learned.update.stats, reference_kl=learned.update.reference_kl,
                                        learning_rate=learned.update.learning_rate)
        seq = await self.bus.publish(PolicyUpdated(
            event_id=new_id(), producer=self.producer, ts=now(), policy_version=version, adapter_name=name,
            adapter_sha256=sha256, stats=stats, update_index=index,
            proposals=[transition.proposal_id for transition in batch]))
        log.info("published %s (update %d, %d transitions, %.0f s): mean reward %+.4f, policy loss %.4f, value loss "
                 "%.4f, entropy %.3f, approx KL %.2e, clip fraction %.2f, KL to the base model %.2e, lr %.2e; "
                 "recomputed log π_old within %.1e of the proposer's", version, index, len(batch),
                 time.perf_counter() - started, stats.mean_reward, stats.policy_loss, stats.value_loss, stats.entropy,
                 stats.approx_kl, stats.clip_fraction, stats.reference_kl or 0.0, stats.learning_rate or 0.0,
                 learned.drift)
        return seq

    async def first(self, reply: TransitionsReply, after_seq: int) -> list[Transition]:
        """The first batch_size pending transitions, page after page (a reply holds what fits in one message)."""
        pending, page = list(reply.transitions), reply
        while len(pending) < self.settings.batch_size:
            page = await self.pending(after_seq, pending[-1].finished_seq)
            if not page.transitions:
                raise RuntimeError("pending transitions were consumed while this learner read them: "
                                   "is another learner publishing policy.updated?")
            pending += page.transitions
        return pending

    async def restore(self, policies: list[PublishedPolicy]) -> Trainer:
        """The trainer on the newest published version (the initial policy before any) and its reward scale."""
        from services.learner.ppo import RunningMoments
        from services.learner.update import Trainer, load_moments
        from shared.policy.default_model import resolve_model
        from shared.policy.lm import load_policy, resolve_device

        latest = policies[-1] if policies else None
        version = latest.policy_version if latest else None
        if self.trainer is not None and self.version == version:
            return self.trainer
        folder = await self.folder(latest) if latest else None
        model = await asyncio.to_thread(resolve_model, self.config.proposer.model, self.config.data_dir)
        device = resolve_device(self.config.proposer.device)
        policy = await asyncio.to_thread(load_policy, model, device, folder, self.settings.lora_r,
                                         self.settings.lora_alpha)
        self.trainer = Trainer(policy, self.config.proposer.temperature, self.halt)
        self.moments = load_moments(folder) if folder else RunningMoments()
        self.version = version
        log.info("learning on %s from %s on %s", model, f"policy {version}" if version else "the base model", device)
        return self.trainer

    async def folder(self, published: PublishedPolicy) -> Path:
        """A published version's folder, fetched from the object store if this machine does not have it."""
        directory = self.root / published.policy_version
        if not directory.is_dir():
            data = await self.bus.get_object(published.adapter_name, published.adapter_sha256)
            await asyncio.to_thread(unpack_adapter, data, directory)
            log.info("fetched %s from the object store", published.policy_version)
        return directory


def waiting(reply: TransitionsReply, batch_size: int) -> str:
    if reply.lm_proposals == 0:
        return ("nothing to learn from: no search proposal so far comes from a language-model policy "
                "([proposer] policy lm-score or lm-generate); waiting")
    return f"{reply.pending}/{batch_size} transitions for {version_name(len(reply.policies))}"


async def serve(config: Config, stop: asyncio.Event) -> None:
    producer = instance_id("learner")
    bus = await Bus.connect(config.nats.urls, producer)
    await bus.ensure_stream(config.nats.replicas)
    latest: list[TransitionsReply] = []  # the ledger's last answer: what `autoresearch status` shows

    async def lag() -> tuple[int | None, str]:
        return (latest[0].pending, waiting(latest[0], config.learner.batch_size)) if latest else (None, "starting")

    await answer_status(bus, "learner", producer, lag)
    halt, wake = threading.Event(), asyncio.Event()

    async def on_finished(_message: Msg) -> None:
        wake.set()

    async def on_stop() -> None:
        await stop.wait()
        halt.set()
        wake.set()

    finished = await bus.nc.subscribe(f"{RUN_FINISHED}.*", cb=on_finished)
    stopping = asyncio.create_task(on_stop())
    service = LearnerService(config, bus, producer, halt)
    seen = await bus.last_seq()  # a policy.updated published before a restart counts
    said = None
    try:
        while not stop.is_set():
            wake.clear()
            reply = await service.pending(seen)
            latest[:] = [reply]
            if reply.pending >= config.learner.batch_size:
                if (seq := await service.update(reply, seen)) is None:
                    log.info("stopped in the middle of an update; the next start redoes it")
                    break
                seen = seq
                continue
            if (line := waiting(reply, config.learner.batch_size)) != said:
                log.info("%s", line)
                said = line
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), POLL_S)
    finally:
        stopping.cancel()
        await finished.unsubscribe()
        await bus.close()


def yield_the_cpu() -> None:
    """Runs are timed by the wall clock: on CPU cores shared with an executor, PPO should take only what runs
    leave idle. Called before any thread starts, as Linux gives each thread its own priority and new threads
    inherit it. Linux with autogroups (the default) first shares the CPU between sessions, then between the
    processes of each, and every run is a session of its own: os.nice alone ranks the learner only within its
    session. So a learner that leads its session (as `autoresearch up` starts every service) lowers the whole
    session's priority too; one started by hand shares its terminal's session, which it leaves alone. Within
    it, the learner is SCHED_IDLE: a core running only it counts as idle when a run's thread wakes up.

    And one thread: preempted by runs, torch's OpenMP threads wait for each other at every operator. Beside the
    CPU target's runs on 2 cores, a 2-thread update took 4.6x the CPU time it takes alone and 4.7x the wall time
    a 1-thread update took there; a 1-thread update costs what it costs alone."""
    os.environ["OMP_NUM_THREADS"] = "1"  # torch reads it when imported
    if "torch" in sys.modules:  # imported already (a benchmark's process)
        sys.modules["torch"].set_num_threads(1)
    os.nice(NICENESS)
    if hasattr(os, "SCHED_IDLE"):  # Linux: a run's thread waking up preempts the learner at once
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    if os.getsid(0) == os.getpid():
        with contextlib.suppress(OSError):  # a kernel without autogroups
            Path("/proc/self/autogroup").write_text(str(NICENESS))


def main() -> None:
    yield_the_cpu()
    run_service("learner", serve)


if __name__ == "__main__":
    main()
