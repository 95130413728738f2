"""Executor service: take proposals from the work queue, train each in the sandbox, report the outcome.

    python -m services.executor [--slots N]

Per proposal: fetch the parent code from the ledger, apply the structured diff atomically, run the
target under its budget (shared/target/runner.py: sandbox, limits, hard wall-clock kill), stream
rate-limited `run.progress`, stop at once on `run.aborted.<run_id>` or a diverged loss, publish exactly
one `run.finished`, then ack. While it runs the proposal is kept with in-progress acks; if this process
dies, the silence makes JetStream redeliver it to another executor as a new run. A redelivery first asks
the fleet whether a run of it is still alive (a failover loses in-progress acks) and waits for that one.
A proposal with a `parse_error` (the policy's answer was no edit) is finished at once as invalid, unrun.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import time
from concurrent.futures import Future

import msgspec
import nats
import torch
from nats.aio.msg import Msg

from services.executor.runs import (
    DivergenceGuard,
    ProgressThrottle,
    memory_available,
    run_id_for,
    seed_for,
    unrun_result,
)
from shared import queries
from shared.bus import ABANDONED, UNAVAILABLE, WORK_QUEUE, Bus, ack_after
from shared.config import Config
from shared.diffs import EMPTY_SHA256, InvalidDiff, apply_ops
from shared.events import (
    RUN_ABORTED,
    STREAM,
    BadEvent,
    ProposalCreated,
    RunAborted,
    RunFinished,
    RunProgress,
    decode,
    new_id,
    now,
    run_subject,
)
from shared.service import answer_status, instance_id, run_service
from shared.target.config import Target, load_target
from shared.target.data import prepare
from shared.target.limits import Limits
from shared.target.records import Budget, Progress, RunResult
from shared.target.runner import StopRequest, resolve_device, run_target

log = logging.getLogger("executor")
MEMORY_SHARE = 0.6
SHUTDOWN_GRACE_S = 15.0
RUNNING_REPLY_S = 2.0
"""How long a redelivery waits for an executor to say it runs the proposal: silence means none does."""


class MaxDeliveries(msgspec.Struct):
    """The fields of JetStream's max-deliveries advisory that name the proposal."""

    stream_seq: int
    deliveries: int


class Executor:
    def __init__(self, bus: Bus, target: Target, config: Config):
        self.bus = bus
        self.target = target
        self.settings = config.executor
        self.instance = instance_id("executor")
        amount = self.settings.budget_amount or target.config.time_budget_s
        self.budget = Budget(self.settings.budget_unit, amount)  # type: ignore[arg-type]
        self.device = resolve_device(target.config.device)
        self.limits = Limits(memory_mb=self.settings.memory_mb or _memory_share(self.settings.slots),
                             processes=self.settings.processes, file_size_mb=self.settings.file_size_mb,
                             open_files=self.settings.open_files, disk_mb=self.settings.disk_mb,
                             files=self.settings.files)
        self.active: set[StopRequest] = set()
        self.running: dict[str, str] = {}
        """proposal_id -> run_id of the runs this process has taken and not yet reported."""
        self.runner_started: dict[str, float] = {}
        """run_id -> when its runner began (time.monotonic), for the run's prepared_s."""
        self.stopping = False

    async def slot_loop(self, slot: int, stop: asyncio.Event) -> None:
        work = await self.bus.pull(WORK_QUEUE)
        idle_since = time.monotonic()
        while not stop.is_set():
            try:
                messages = await work.fetch(1, timeout=2)
            except UNAVAILABLE:  # nothing queued, or no stream leader for the moment
                continue
            for message in messages:  # none when the pull request expired with a status reply
                await self.handle(message, slot, waited_s=time.monotonic() - idle_since)
                idle_since = time.monotonic()

    def shut_down(self) -> None:
        """Stop every run now; their proposals are handed back to the queue, not reported."""
        self.stopping = True
        for request in self.active:
            request.request("the executor is shutting down")

    async def handle(self, message: Msg, slot: int, waited_s: float) -> None:
        delivered = time.monotonic()
        seq, attempt = message.metadata.sequence.stream, message.metadata.num_delivered
        try:
            proposal = decode(message.subject, message.data)
        except BadEvent as error:
            log.warning("skipping malformed proposal at stream seq %d: %s", seq, error)
            await message.term()  # never redelivered; the ledger has recorded it with its reason
            return
        assert isinstance(proposal, ProposalCreated)
        heartbeat = asyncio.create_task(_keep_in_progress(message, self.settings.ack_wait_s / 3))
        try:
            if attempt > 1:
                await self.wait_while_running_elsewhere(proposal.proposal_id)
            if attempt > 1 and await self.already_finished(proposal.proposal_id):
                log.info("proposal %s already finished before a redelivery; acking", proposal.proposal_id)
            else:
                run_id = run_id_for(proposal.proposal_id, attempt)
                log.info("run %s (slot %d): %s", run_id, slot, proposal.rationale or "no rationale")
                self.running[proposal.proposal_id] = run_id
                try:
                    result = await self.execute(proposal, run_id, seq, slot)
                    if self.stopping:
                        await message.nak()
                        return
                    prepared_s = self.runner_started.pop(run_id, time.monotonic()) - delivered
                    await self.bus.publish_until_stored(RunFinished(
                        event_id=new_id(), producer=self.instance, ts=now(), run_id=run_id,
                        proposal_id=proposal.proposal_id, executor_id=self.instance, result=result, slot=slot,
                        waited_s=round(waited_s, 3), prepared_s=round(prepared_s, 3)))
                finally:
                    del self.running[proposal.proposal_id]
                    self.runner_started.pop(run_id, None)
                bpb = "-" if result.val_bpb is None else f"{result.val_bpb:.4f}"
                log.info("run %s %s: val_bpb %s, %d steps in %.1f s %s", run_id, result.status, bpb, result.steps,
                         result.training_s, result.error or "")
        finally:
            heartbeat.cancel()
        try:
            await ack_after(message)
        except UNAVAILABLE as error:  # redelivered after ack_wait, and then acked as already finished
            log.warning("ack of proposal %s failed (%r)", proposal.proposal_id, error)

    async def execute(self, proposal: ProposalCreated, run_id: str, seq: int, slot: int) -> RunResult:
        if proposal.parse_error is not None:  # the policy's answer is no edit: nothing to run (−p_syntax)
            return unrun_result("invalid", f"the policy's answer is not an edit: {proposal.parse_error}",
                                self.budget, seed_for(proposal, self.settings.seed))
        reporter = _Reporter(self, proposal, run_id, asyncio.get_running_loop())
        reporter.send(Progress(phase="started"))
        try:
            return await self._run(proposal, run_id, seq, slot, reporter)
        finally:
            await reporter.flush()  # every run.progress is stored before the run.finished that follows

    async def _run(self, proposal: ProposalCreated, run_id: str, seq: int, slot: int,
                   reporter: _Reporter) -> RunResult:
        seed = seed_for(proposal, self.settings.seed)
        parent = await self.parent_code(proposal, seq)
        if parent is None:
            return unrun_result("rejected", f"parent code {proposal.parent_code_sha256} is not in the ledger",
                                self.budget, seed)
        try:
            code = apply_ops(parent, proposal.ops)  # a repeat's empty ops give the parent itself
        except InvalidDiff as error:
            return unrun_result("invalid", f"the diff does not apply to its parent: {error}", self.budget, seed)
        stop = StopRequest()
        reporter.stop = stop
        aborts = await self.bus.nc.subscribe(run_subject(RUN_ABORTED, run_id), cb=_abort_handler(stop))
        self.active.add(stop)
        self.runner_started[run_id] = time.monotonic()
        try:
            return await asyncio.to_thread(
                run_target, self.target, code, budget=self.budget, seed=seed, device=self.device,
                limits=self.limits, slot=slot, stop=stop, visible_devices=self._gpu(slot), on_progress=reporter)
        finally:
            self.active.discard(stop)
            await aborts.unsubscribe()

    async def parent_code(self, proposal: ProposalCreated, seq: int) -> str | None:
        """The code the diff applies to; the ledger answers once it holds everything up to this proposal."""
        if proposal.parent_code_sha256 == EMPTY_SHA256:
            return ""
        request = queries.CodeRequest(proposal.parent_code_sha256, after_seq=seq)
        return (await queries.ask(self.bus, queries.CODE, request, queries.CodeReply)).code

    async def on_abandoned(self, advisory: Msg) -> None:
        """The queue gave up on a proposal: each of its max_deliver executors died or went silent mid-run (or the
        last one's ack was lost after its run finished: nothing to do then). It is finished as crashed, so the
        ledger and the learner see its end. Every executor of the fleet hears the advisory; the event id, made
        from the stream sequence, lets the stream store the first of them only."""
        try:
            found = msgspec.json.decode(advisory.data, type=MaxDeliveries)
            stored = await self.bus.stored(found.stream_seq)
            proposal = decode(stored.subject, stored.data)
        except (msgspec.DecodeError, BadEvent, nats.errors.Error) as error:
            log.warning("max-deliveries advisory not handled: %s", error)
            return
        assert isinstance(proposal, ProposalCreated)
        if await self.running_elsewhere(proposal.proposal_id) or await self.already_finished(proposal.proposal_id):
            return  # a live run will report (deliveries lost in failovers), or its last ack was lost, not its run
        reason = (f"abandoned after {found.deliveries} deliveries: each executor died or went silent for "
                  f"executor.ack_wait_s ({self.settings.ack_wait_s:g} s) before finishing it")
        log.warning("proposal %s %s", proposal.proposal_id, reason)
        await self.bus.publish_until_stored(RunFinished(
            event_id=f"abandoned-{found.stream_seq}", producer=self.instance, ts=now(),
            run_id=run_id_for(proposal.proposal_id, found.deliveries), proposal_id=proposal.proposal_id,
            executor_id=self.instance, result=unrun_result("crashed", reason, self.budget,
                                                           seed_for(proposal, self.settings.seed))))

    async def wait_while_running_elsewhere(self, proposal_id: str) -> None:
        """A redelivery can come while the first run is alive: JetStream redelivers after ack_wait without an
        in-progress ack, and a NATS failover loses them. Running it again would run it twice, so this delivery
        waits, kept in progress, for that run to end; if its executor dies instead, this delivery runs it."""
        other = await self.running_elsewhere(proposal_id)
        if other is not None:
            log.info("proposal %s redelivered while %s runs it on %s; waiting for that run", proposal_id,
                     other.run_id, other.executor_id)
        while other is not None:
            await asyncio.sleep(self.settings.ack_wait_s / 3)
            other = await self.running_elsewhere(proposal_id)

    async def running_elsewhere(self, proposal_id: str) -> queries.RunningReply | None:
        """The live run of the proposal on any executor of the fleet (this one included), if there is one."""
        try:
            return await self.bus.request(queries.RUNNING, queries.RunningRequest(proposal_id), queries.RunningReply,
                                          timeout=RUNNING_REPLY_S)
        except TimeoutError:
            return None

    async def answer_running(self, message: Msg) -> None:
        try:
            request = msgspec.json.decode(message.data, type=queries.RunningRequest)
        except msgspec.DecodeError:
            return
        run_id = self.running.get(request.proposal_id)
        if run_id is not None:
            await message.respond(msgspec.json.encode(queries.RunningReply(run_id, self.instance)))

    async def already_finished(self, proposal_id: str) -> bool:
        last_seq = await self.bus.last_seq()
        request = queries.FinishedRequest(proposal_id, after_seq=last_seq)
        return (await queries.ask(self.bus, queries.FINISHED, request, queries.FinishedReply)).finished

    def _gpu(self, slot: int) -> str | None:
        if self.device == "cuda" and torch.cuda.device_count() > 1:
            return str(slot % torch.cuda.device_count())
        return None


class _Reporter:
    """Progress from the run's thread to the bus: throttled, checked for divergence, kept in order."""

    def __init__(self, executor: Executor, proposal: ProposalCreated, run_id: str, loop: asyncio.AbstractEventLoop):
        self.executor = executor
        self.proposal = proposal
        self.run_id = run_id
        self.loop = loop
        self.throttle = ProgressThrottle(executor.settings.progress_interval_s, time.monotonic)
        self.guard = DivergenceGuard()
        self.stop: StopRequest | None = None
        self.sent: list[Future] = []

    def __call__(self, record: Progress) -> None:
        reason = self.guard.check(record)
        if reason and self.stop is not None:
            self.stop.request(reason)
        if self.throttle.admit(record):
            self.sent.append(asyncio.run_coroutine_threadsafe(self._publish(record), self.loop))

    def send(self, record: Progress) -> None:
        self.throttle.admit(record)
        self.sent.append(asyncio.ensure_future(self._publish(record)))  # type: ignore[arg-type]

    async def _publish(self, record: Progress) -> None:
        executor = self.executor
        event = RunProgress(event_id=new_id(), producer=executor.instance, ts=now(), run_id=self.run_id,
                            proposal_id=self.proposal.proposal_id, executor_id=executor.instance,
                            phase=record.phase, elapsed_train_s=record.elapsed_train_s,
                            budget_used=record.budget_used, step=record.step,
                            train_loss=record.train_loss, nonfinite_loss=record.nonfinite_loss, tokens=record.tokens,
                            peak_mem_mb=record.peak_mem_mb)
        try:
            await executor.bus.publish(event)
        except Exception as error:  # progress is informative; the run must not die with the bus
            log.warning("run.progress for %s not published: %s", self.run_id, error)

    async def flush(self) -> None:
        await asyncio.gather(*(asyncio.wrap_future(f) if isinstance(f, Future) else f for f in self.sent),
                             return_exceptions=True)


def _abort_handler(stop: StopRequest):
    async def on_abort(message: Msg) -> None:
        try:
            aborted = decode(message.subject, message.data)
        except BadEvent as error:
            log.warning("ignoring malformed abort: %s", error)
            return
        assert isinstance(aborted, RunAborted)
        stop.request(f"aborted by the evaluator at {aborted.at_train_s:.0f} s: {aborted.commentary}")
    return on_abort


async def _keep_in_progress(message: Msg, every_s: float) -> None:
    while True:
        await asyncio.sleep(every_s)
        try:
            await message.in_progress()
        except Exception as error:  # a reconnecting client; the next beat may land
            log.warning("in-progress ack failed: %s", error)


def _memory_share(slots: int) -> int:
    return int(memory_available() * MEMORY_SHARE / slots / 2**20)


async def serve(config: Config, stop: asyncio.Event) -> None:
    target = load_target(config.stack.target)
    log.info("preparing data for %s", target.path)
    await asyncio.to_thread(prepare, target.config.corpus, target.config.tokenizer, None, True)
    bus = await Bus.connect(config.nats.urls, instance_id("executor"))
    await bus.ensure_stream(config.nats.replicas)
    await bus.ensure_work_queue(config.executor.ack_wait_s, config.executor.max_deliver)
    executor = Executor(bus, target, config)
    log.info("%s: slot(s) %d-%d, budget %s, device %s", executor.instance, config.executor.first_slot,
             config.executor.first_slot + config.executor.slots - 1, executor.budget, executor.device)
    first = config.executor.first_slot
    await bus.nc.subscribe(ABANDONED, cb=executor.on_abandoned)
    await bus.nc.subscribe(queries.RUNNING, cb=executor.answer_running)

    async def lag() -> tuple[int, str]:
        waiting = (await bus.js.consumer_info(STREAM, WORK_QUEUE)).num_pending
        return waiting, f"{len(executor.running)}/{config.executor.slots} slots busy"

    await answer_status(bus, "executor", executor.instance, lag)
    slots = [asyncio.create_task(executor.slot_loop(slot, stop))
             for slot in range(first, first + config.executor.slots)]
    await stop.wait()
    executor.shut_down()
    _, waiting = await asyncio.wait(slots, timeout=SHUTDOWN_GRACE_S)
    for task in waiting:  # e.g. still asking an absent ledger: the proposal is redelivered after ack_wait
        task.cancel()
    await bus.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m services.executor", description=__doc__.splitlines()[0])
    parser.add_argument("--slots", type=int, help="concurrent runs (default: executor.slots of the config)")
    parser.add_argument("--first-slot", type=int, help="the first slot's number, for several executors on one "
                                                       "machine (default: executor.first_slot of the config)")
    args = parser.parse_args()
    for key, value in (("SLOTS", args.slots), ("FIRST_SLOT", args.first_slot)):
        if value is not None:
            os.environ[f"AUTORESEARCH_EXECUTOR_{key}"] = str(value)
    run_service("executor", serve)


if __name__ == "__main__":
    main()
