"""learner_cost: what one PPO update costs on the CPU, and what the learner costs the runs beside it.

First the real loop (ledger, executor, evaluator, proposer as processes; lm-score on the embedded default model;
the CPU target at a 10 s budget) makes batch_size search experiments after the baseline: the transitions the
ledger then gives the learner are the batch.

update: one update on that batch (update.Trainer.learn, the [learner] defaults) timed on the idle machine, and
the two passes it is made of (lm.score without and with a backward pass), on the first transition.

interference: the CPU target's own 30 s run (run_target, seed 0), alone and beside updates running back to back
at nice 19 as services/learner runs them, alternately: steps trained within the budget, val-bpb, and the CPU
time the learner got meanwhile.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import msgspec
import torch

from bench.loop import REPO, Loop
from services.learner.main import yield_the_cpu
from services.learner.ppo import RunningMoments
from services.learner.update import Trainer
from services.ledger.store import Ledger
from shared.config import Learner, Proposer
from shared.nats_server import EmbeddedServer
from shared.policy.default_model import build_default_model
from shared.policy.lm import load_policy, score
from shared.queries import Transition, TransitionsRequest
from shared.target.config import load_target
from shared.target.runner import run_target

UPDATE_BUDGET_S = 10
INTERFERENCE_PAIRS = 3


def transitions(folder: Path, settings: Learner) -> list[Transition]:
    """batch_size lm-score transitions from the real loop, as the learner gets them."""
    server = EmbeddedServer(folder / "nats").start()
    loop = Loop(server, REPO / "targets" / "cpu_gpt", folder, PROPOSER_POLICY="lm-score", PROPOSER_NOISE_REPEATS=0,
                EXECUTOR_BUDGET_UNIT="seconds", EXECUTOR_BUDGET_AMOUNT=UPDATE_BUDGET_S, PROPOSER_MAX_EXPERIMENTS=0)
    try:
        loop.start("ledger", "executor", "evaluator", "proposer")
        steps = ("SELECT count(*) FROM experiments WHERE policy = 'lm-score' AND purpose = 'search' "
                 "AND finished_seq IS NOT NULL")  # not the confirmation repeats the keep gate asks for
        loop.wait_for(lambda: loop.count(steps) >= settings.batch_size, 300 + 150 * settings.batch_size,
                      "a batch of experiments")
    finally:
        loop.stop()
        server.stop()
    ledger = Ledger(folder / "ledger.duckdb", read_only=True)
    try:
        return ledger.transitions(TransitionsRequest(limit=settings.batch_size)).transitions
    finally:
        ledger.close()


def learner_cost() -> dict[str, object]:
    with tempfile.TemporaryDirectory() as folder:
        batch = transitions(Path(folder), Learner())
        return {"update": update_cost(batch, Path(folder)), "interference": interference(batch, Path(folder))}


def update_cost(batch: list[Transition], folder: Path) -> dict[str, object]:
    settings, proposer = Learner(), Proposer()
    model = build_default_model(folder / "models" / "default")
    trainer = Trainer(load_policy(str(model), "cpu"), proposer.temperature, threading.Event())
    step = batch[0]
    assert step.candidates is not None
    passes: dict[str, list[float]] = {"score_s": [], "score_with_backward_s": []}
    for _ in range(3):
        started = time.perf_counter()
        score(trainer.policy, step.prompt, step.candidates)
        passes["score_s"].append(time.perf_counter() - started)
        started = time.perf_counter()
        scores = score(trainer.policy, step.prompt, step.candidates, grad=True)
        (scores.log_pi[0] + scores.entropy).backward()
        passes["score_with_backward_s"].append(time.perf_counter() - started)
    trainer.policy.model.zero_grad()
    started = time.perf_counter()
    learned = trainer.learn(batch, {}, "base", RunningMoments(), settings, 0)
    update_s = time.perf_counter() - started
    tokens = [len(trainer.policy.tokenizer(t.prompt)["input_ids"]) for t in batch]
    return {
        "batch_size": len(batch), "epochs": settings.epochs, "minibatch_size": settings.minibatch_size,
        "candidates": len(step.candidates), "token_limit": proposer.token_limit,
        "prompt_tokens_median": statistics.median(tokens), "threads": torch.get_num_threads(),
        "update_s": round(update_s, 1), "update_s_per_transition": round(update_s / len(batch), 2),
        **{f"{name}_median": round(statistics.median(times), 2) for name, times in passes.items()},
        "drift": learned.drift, "mean_reward": learned.update.stats.mean_reward,
    }


def interference(batch: list[Transition], folder: Path, pairs: int = INTERFERENCE_PAIRS) -> dict[str, object]:
    """Runs alone and beside a nice-19 learner, alternately (alone, beside, alone, ...), so drift in the machine's
    speed falls on both."""
    target = load_target(REPO / "targets" / "cpu_gpt")
    saved = folder / "transitions.json"
    saved.write_bytes(msgspec.json.encode(batch))
    alone, beside, learner_cpu = [], [], []
    for _ in range(pairs):
        alone.append(run_target(target, seed=0))
        worker = subprocess.Popen([sys.executable, "-m", "bench.learner", str(saved), str(folder)], cwd=REPO,
                                  start_new_session=True)  # as `autoresearch up` starts the learner
        try:
            time.sleep(20)  # the model loaded and the first update under way
            before = _cpu_seconds(worker.pid)
            beside.append(run_target(target, seed=0))
            learner_cpu.append(round(_cpu_seconds(worker.pid) - before, 1))
        finally:
            worker.kill()
            worker.wait()
    steps_alone, steps_beside = [r.steps for r in alone], [r.steps for r in beside]
    return {
        "pairs": pairs, "budget": alone[0].budget,
        "steps_alone": steps_alone, "steps_beside_learner": steps_beside,
        "steps_ratio_median": round(statistics.median(steps_beside) / statistics.median(steps_alone), 3),
        "val_bpb_alone": [r.val_bpb for r in alone], "val_bpb_beside_learner": [r.val_bpb for r in beside],
        "learner_cpu_s_during_run": learner_cpu,
    }


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a running process and its threads (/proc/<pid>/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _updates_forever(saved: Path, folder: Path) -> None:
    """The background learner of `interference`: updates on the saved batch, back to back, until killed."""
    yield_the_cpu()
    batch = msgspec.json.decode(saved.read_bytes(), type=list[Transition])
    model = build_default_model(folder / "models" / "default")
    trainer = Trainer(load_policy(str(model), "cpu"), Proposer().temperature, threading.Event())
    for index in range(1_000_000):
        trainer.learn(batch, {}, "base", RunningMoments(), Learner(), index)


if __name__ == "__main__":
    _updates_forever(Path(sys.argv[1]), Path(sys.argv[2]))
