"""Evaluator service (paper §5): follow every run's loss curve, abort the ones that will not win.

    python -m services.evaluator

At start it takes the recent complete curves from the ledger to calibrate on, and reads the
stream back far enough (one run's hard wall-clock limit) to rebuild every run still in
flight, so a restart judges those too. Each run is judged at every look (a fixed fraction of its
budget) by judge.py; an abort goes out as `run.aborted.<run_id>` with the forecast, τ, the SPRT
statistic and a one-line commentary, and the executor stops the run within a second.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import timedelta

from nats.js.api import ConsumerConfig, DeliverPolicy

from services.evaluator.judge import LiveRun, SelfEvaluator
from shared import queries
from shared.bus import Bus
from shared.config import Config
from shared.curves import Curve, CurvesReply, CurvesRequest
from shared.events import (
    STREAM,
    BadEvent,
    ProposalCreated,
    RunAborted,
    RunFinished,
    RunProgress,
    decode,
    new_id,
    now,
)
from shared.service import answer_status, instance_id, run_service
from shared.target.config import load_target

log = logging.getLogger("evaluator")


class EvaluatorService:
    def __init__(self, bus: Bus, evaluator: SelfEvaluator, producer: str):
        self.bus = bus
        self.evaluator = evaluator
        self.producer = producer
        self.runs: dict[str, LiveRun] = {}
        self.closed: set[str] = set()
        """Runs past judging: aborted, evaluating or finished (late or redelivered progress is ignored)."""
        self.purposes: dict[str, str] = {}
        """proposal_id -> purpose, from the proposals seen (one older than the replay window counts as search)."""
        self.state: queries.LedgerState | None = None
        self.state_after = 0
        """The stream sequence the next state must include (a run finished: bpb* may have moved)."""

    async def handle(self, subject: str, data: bytes, seq: int, live: bool) -> None:
        try:
            event = decode(subject, data)
        except BadEvent as error:  # the ledger records it; here it is only skipped
            log.warning("skipping malformed event: %s", error)
            return
        if isinstance(event, ProposalCreated):
            self.purposes[event.proposal_id] = event.purpose
        elif isinstance(event, RunProgress):
            await self.on_progress(event, live)
        elif isinstance(event, RunAborted):
            self.closed.add(event.run_id)
        elif isinstance(event, RunFinished):
            self.on_finished(event, seq)

    async def on_progress(self, event: RunProgress, live: bool) -> None:
        if event.run_id in self.closed:
            return
        if event.phase == "evaluating":  # training is over: nothing left to save
            self.closed.add(event.run_id)
            return
        run = self.runs.setdefault(event.run_id, LiveRun(event.run_id,
                                                         purpose=self.purposes.get(event.proposal_id, "search")))
        run.add(event.budget_used, event.train_loss, event.nonfinite_loss)
        look = self.evaluator.due_look(run)
        if live and (look is not None or run.diverged):
            await self.judge(run, look if look is not None else max(run.judged_look, 0), event.elapsed_train_s)

    async def judge(self, run: LiveRun, look: int, at_train_s: float) -> None:
        state = await self.ledger_state()
        started = time.perf_counter()
        verdict = self.evaluator.judge(run, look, state.bpb_star, state.sigma_h)
        log.debug("%s at look %d (%.1f ms): %s", run.run_id, look, (time.perf_counter() - started) * 1000,
                  verdict.commentary)
        if not verdict.abort:
            return
        self.closed.add(run.run_id)
        low, high = verdict.interval if verdict.prediction else (None, None)
        await self.bus.publish(RunAborted(
            event_id=new_id(), producer=self.producer, ts=now(), run_id=run.run_id, at_train_s=at_train_s,
            forecast=verdict.prediction.mean if verdict.prediction else None, forecast_low=low, forecast_high=high,
            threshold=verdict.threshold, statistic=verdict.statistic, boundary=verdict.boundary,
            commentary=verdict.commentary))
        log.info("aborted %s: %s", run.run_id, verdict.commentary)

    def on_finished(self, event: RunFinished, seq: int) -> None:
        """A run that trained its whole budget and was judged becomes calibration data."""
        self.closed.add(event.run_id)
        self.state_after = max(self.state_after, seq)
        run = self.runs.pop(event.run_id, None)
        result = event.result
        if run is not None and result.status == "ok" and result.val_bpb is not None:
            self.evaluator.add_complete(Curve(
                run_id=event.run_id, proposal_id=event.proposal_id, finished_seq=seq, status=result.status,
                final_bpb=result.val_bpb, budget=result.budget, training_s=result.training_s,
                total_s=result.total_s, used=run.used, loss=run.loss), run)

    async def ledger_state(self) -> queries.LedgerState:
        """bpb* and σ_h as the ledger has them, including every run finished so far."""
        if self.state is None or self.state.cursor < self.state_after:
            self.state = await queries.ask(self.bus, queries.STATE, queries.StateRequest(after_seq=self.state_after),
                                           queries.LedgerState)
        return self.state


async def serve(config: Config, stop: asyncio.Event) -> None:
    target = load_target(config.stack.target)
    settings = config.evaluator
    producer = instance_id("evaluator")
    bus = await Bus.connect(config.nats.urls, producer)
    await bus.ensure_stream(config.nats.replicas)
    reply = await queries.ask(bus, queries.CURVES, CurvesRequest(limit=settings.calibration_runs), CurvesReply)
    evaluator = SelfEvaluator(settings, reply.curves)
    if evaluator.calibration_runs < settings.warmup_runs:
        log.info("warm-up: %d/%d complete runs to calibrate on; no run is aborted until then",
                 evaluator.calibration_runs, settings.warmup_runs)
    service = EvaluatorService(bus, evaluator, producer)

    async def detail() -> tuple[None, str]:
        return None, f"calibrated on {evaluator.calibration_runs} complete runs, following {len(service.runs)}"

    await answer_status(bus, "evaluator", producer, detail)
    window_s = target.config.wall_limit_s(config.executor.budget_unit)
    last_seq = await bus.last_seq()
    subscription = await bus.js.subscribe(
        ">", stream=STREAM, ordered_consumer=True,  # run events, and proposals for their purpose
        config=ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_TIME,
                              opt_start_time=(now() - timedelta(seconds=window_s)).isoformat()))
    log.info("%s: calibrated on %d complete runs; judging at %s of the budget", producer,
             evaluator.calibration_runs, ", ".join(f"{f:.0%}" for f in evaluator.looks))
    while not stop.is_set():
        try:
            message = await subscription.next_msg(timeout=1)
        except TimeoutError:
            continue
        seq = message.metadata.sequence.stream
        await service.handle(message.subject, message.data, seq, live=seq > last_seq)
    await subscription.unsubscribe()
    await bus.close()


def main() -> None:
    run_service("evaluator", serve)


if __name__ == "__main__":
    main()
