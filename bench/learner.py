"""learner_cost: what one PPO update costs on the CPU, and what the learner costs the runs beside it.

First the real loop (ledger, executor, evaluator, proposer as processes; lm-score on the embedded default model;
the CPU target at a 10 s budget) makes batch_size search experiments after the baseline: the transitions the
ledger then gives the learner are the batch.

Both measures run the updates in a learner process that yields the CPU as services/learner does (SCHED_IDLE,
nice 19, its own session's autogroup, one thread):

update: one update on that batch (update.Trainer.learn, the [learner] defaults) on the idle machine, and the two
passes it is made of (lm.score without and with a backward pass), on the first transition.

interference: the CPU target's own 30 s run (run_target, seed 0), alone and beside the learner, alternately, so
drift in the machine's speed falls on both; the learner, updating back to back, is stopped (SIGSTOP) during
the runs alone. Steps trained within the budget, val-bpb, the CPU time the learner got meanwhile, and how
long an update takes when all it gets is what runs leave idle: its wall time beside runs, in runs.
"""

from __future__ import annotations

import json
import os
import signal
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
from shared.target.records import RunResult
from shared.target.runner import run_target

UPDATE_BUDGET_S = 10
INTERFERENCE_PAIRS = 3
"""At least; then more pairs until the learner has finished an update beside runs."""
MAX_PAIRS = 15


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
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        saved = folder / "transitions.json"
        saved.write_bytes(msgspec.json.encode(transitions(folder, Learner())))
        return {"update": update_cost(saved, folder), "interference": interference(saved, folder)}


def update_cost(saved: Path, folder: Path) -> dict[str, object]:
    done = subprocess.run([sys.executable, "-m", "bench.learner", "once", str(saved), str(folder)], cwd=REPO,
                          capture_output=True, text=True, check=True, start_new_session=True)
    return json.loads(done.stdout.splitlines()[-1])


def interference(saved: Path, folder: Path) -> dict[str, object]:
    target = load_target(REPO / "targets" / "cpu_gpt")
    finished = folder / "updates.jsonl"
    worker = subprocess.Popen([sys.executable, "-m", "bench.learner", "forever", str(saved), str(folder)],
                              cwd=REPO, start_new_session=True)  # as `autoresearch up` starts the learner
    alone: list[RunResult] = []
    beside: list[RunResult] = []
    learner_cpu, resumed, run_wall = [], [], []
    try:
        _wait_until_stopped(worker.pid)  # it stops itself once its model is loaded
        while len(beside) < INTERFERENCE_PAIRS or (not finished.exists() and len(beside) < MAX_PAIRS):
            alone.append(run_target(target, seed=0))
            before, started = _cpu_seconds(worker.pid), time.time()
            os.killpg(worker.pid, signal.SIGCONT)
            beside.append(run_target(target, seed=0))
            os.killpg(worker.pid, signal.SIGSTOP)
            resumed.append((started, time.time()))
            run_wall.append(resumed[-1][1] - started)
            learner_cpu.append(round(_cpu_seconds(worker.pid) - before, 1))
    finally:
        worker.kill()
        worker.wait()
    first = json.loads(finished.read_text().splitlines()[0]) if finished.exists() else None
    wall = sum(max(0.0, min(end, first["finished_at"]) - start) for start, end in resumed) if first else None
    steps_alone, steps_beside = [r.steps for r in alone], [r.steps for r in beside]
    return {
        "pairs": len(beside), "budget": alone[0].budget,
        "steps_alone": steps_alone, "steps_beside_learner": steps_beside,
        "steps_ratio_median": round(statistics.median(steps_beside) / statistics.median(steps_alone), 3),
        "val_bpb_alone": [r.val_bpb for r in alone], "val_bpb_beside_learner": [r.val_bpb for r in beside],
        "learner_cpu_s_during_run": learner_cpu,
        "run_wall_s_median": round(statistics.median(run_wall), 1),
        "first_update_cpu_s": first["cpu_s"] if first else None,
        "first_update_wall_s_beside_runs": round(wall, 1) if wall else None,
        "first_update_in_runs": round(wall / statistics.median(run_wall), 2) if wall else None,
    }


def _wait_until_stopped(pid: int, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while _stat(pid)[0] != "T":
        if time.monotonic() > deadline:
            raise TimeoutError("the learner did not load its model")
        time.sleep(0.2)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its threads (/proc/<pid>/stat fields 14 and 15)."""
    fields = _stat(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str]:
    """/proc/<pid>/stat from field 3 (the state) on."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _trainer(saved: Path, folder: Path) -> tuple[list[Transition], Trainer]:
    """The batch, and a Trainer on the default model in a process that yields the CPU as the service does."""
    yield_the_cpu()
    batch = msgspec.json.decode(saved.read_bytes(), type=list[Transition])
    model = build_default_model(folder / "models" / "default")
    return batch, Trainer(load_policy(str(model), "cpu"), Proposer().temperature, threading.Event())


def _update_once(saved: Path, folder: Path) -> dict[str, object]:
    batch, trainer = _trainer(saved, folder)
    settings, proposer = Learner(), Proposer()
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
    started, cpu = time.perf_counter(), time.process_time()
    learned = trainer.learn(batch, {}, "base", RunningMoments(), settings, 0)
    update_s, update_cpu_s = time.perf_counter() - started, time.process_time() - cpu
    tokens = [len(trainer.policy.tokenizer(t.prompt)["input_ids"]) for t in batch]
    return {
        "batch_size": len(batch), "epochs": settings.epochs, "minibatch_size": settings.minibatch_size,
        "candidates": len(step.candidates), "token_limit": proposer.token_limit,
        "prompt_tokens_median": statistics.median(tokens), "threads": torch.get_num_threads(),
        "update_s": round(update_s, 1), "update_cpu_s": round(update_cpu_s, 1),
        "update_s_per_transition": round(update_s / len(batch), 2),
        **{f"{name}_median": round(statistics.median(times), 2) for name, times in passes.items()},
        "drift": learned.drift, "mean_reward": learned.update.stats.mean_reward,
    }


def _updates_forever(saved: Path, folder: Path) -> None:
    """The learner of `interference`: stops itself once loaded, then updates back to back until killed,
    appending each update's CPU time and end to updates.jsonl."""
    batch, trainer = _trainer(saved, folder)
    os.kill(os.getpid(), signal.SIGSTOP)
    for index in range(1_000_000):
        cpu = time.process_time()
        trainer.learn(batch, {}, "base", RunningMoments(), Learner(), index)
        line = json.dumps({"cpu_s": round(time.process_time() - cpu, 1), "finished_at": time.time()})
        with (folder / "updates.jsonl").open("a") as log:
            log.write(line + "\n")


if __name__ == "__main__":
    mode, saved_path, folder_path = sys.argv[1:]
    if mode == "once":
        print(json.dumps(_update_once(Path(saved_path), Path(folder_path))))
    else:
        _updates_forever(Path(saved_path), Path(folder_path))
