"""The fault suite: kill -9 anything in a running loop, and check that nothing was lost or doubled.

    python -m bench.faults [--kills N] [--slots S] [--seed S]      (make faults) -> bench/results/faults.json

The loop runs as processes (bench/loop.py) on a 3-node NATS cluster made from deploy/nats-cluster (streams with 3
replicas), with two executor processes pulling from the one work queue, on a tiny CPU target in deterministic step
budgets. Then:

- `kill_anything`: kill -9 of one process at a time, at a random moment (KILL_GAP_S after the loop resumed from the
  previous kill): each service in turn, with a random instance of it, and a random NATS node. A service restarts
  at once, as compose or Kubernetes would restart it; a node stays down until the loop has resumed without it, then
  comes back and must catch up (every replica current, no lag). Resume time: from the restart (a node: from its
  loss) until the ledger holds an event published after it.
- `publish_garbage`: bad messages on every subject, which must end as bad_events rows and kill nothing.
- `kill_an_executor_mid_run`: the fleet's promise, checked on a run in training.
- `audit`: with everything stopped, the ledger file against the stream and against a fresh replay of itself.

tests/test_faults.py runs it with one kill of each (`make test`); `make faults` with many.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import msgspec
import nats

from bench.loop import Loop, last_seq, make_target, write_small_corpus
from services.ledger.projections import PROJECTION_TABLES
from shared.bus import Bus
from shared.diffs import EMPTY_SHA256
from shared.events import (
    MAX_EVENT_BYTES,
    POLICY_UPDATED,
    PROPOSAL_CREATED,
    RUN_ABORTED,
    RUN_FINISHED,
    RUN_PROGRESS,
    STREAM,
    PolicyUpdated,
    PPOStats,
    RunAborted,
    new_id,
    now,
    run_subject,
)
from shared.nats_server import EmbeddedServer, free_port
from shared.service import instance_id

REPO = Path(__file__).resolve().parent.parent
CLUSTER_CONFIGS = REPO / "deploy" / "nats-cluster"
SERVICES = ("ledger", "executor", "evaluator", "learner", "proposer")
VICTIMS = (*SERVICES, "nats")
INSTANCES = {"executor": ("executor", "executor#2")}
"""Two executors (disjoint slots: as root each slot is a uid of its own)."""
ACK_WAIT_S = 15.0
"""Above a NATS node's failover (make faults measured resumes up to 12 s): with the harness's usual 3 s, a run whose
executor was reconnecting was redelivered while it still ran, and ran twice."""
KILL_GAP_S = (0.5, 4.0)
RESUME_LIMIT_S = 120.0
FINISHED = "SELECT count(*) FROM experiments WHERE finished_seq IS NOT NULL"


@dataclass(frozen=True)
class Kill:
    process: str
    at_s: float
    """Seconds into the loop."""
    resume_s: float
    """From the restart (a NATS node: from its loss) until the ledger held an event published after it."""
    catch_up_s: float | None = None
    """A NATS node: from its restart until every replica of the stream was current."""


@dataclass(frozen=True)
class Audit:
    """The ledger file against the stream, once every process has stopped."""

    stream_messages: int
    lost: int
    """Stream messages the ledger has neither as an event nor as a recorded bad one."""
    doubled_events: int
    """Ledger rows beyond one per stream message or event id."""
    doubled_runs: int
    """Proposals with more than one run.finished."""
    doubled_experiments: int
    """Experiment rows beyond one per proposal."""
    doubled_scheduled: int
    """Scheduled repeats beyond one each (the baseline, its noise repeats, each confirmation's seed): a restarted
    proposer repeating its predecessor's last proposal. (Search proposals cannot be told from a chance repeat.)"""
    doubled_updates: int
    """PPO updates published more than once for one update index."""
    bad_events: int
    """Stream messages the ledger recorded as bad, each with its reason."""
    experiments: int
    finished: int
    partial_runs: int
    """Deliveries cut short by a kill (progress but no run.finished): their progress stays in `events`."""
    replay_matches: bool
    """The projections the ledger built live equal those a fresh replay of its event log builds."""


def fault_loop(nodes: list[EmbeddedServer], target: Path, data_dir: Path) -> Loop:
    """The loop on the cluster, proposing for ever, its proposals' leases above a failover."""
    return Loop(nodes, target, data_dir, NATS_REPLICAS=len(nodes), PROPOSER_MAX_EXPERIMENTS=0,
                EXECUTOR_ACK_WAIT_S=ACK_WAIT_S)


def start_services(loop: Loop, slots: int = 1) -> None:
    """Every service, with two executors of `slots` slots each."""
    loop.start("ledger", "evaluator", "learner", "proposer")
    loop.start("executor", EXECUTOR_SLOTS=slots, EXECUTOR_FIRST_SLOT=0)
    loop.start("executor#2", EXECUTOR_SLOTS=slots, EXECUTOR_FIRST_SLOT=slots)


def kill_anything(loop: Loop, nodes: list[EmbeddedServer], kills: int, rng: random.Random) -> list[Kill]:
    """kill -9 `kills` times, VICTIMS in turn; returns each kill with its resume time."""
    urls = [node.url for node in nodes]
    started, done = time.monotonic(), []
    loop.wait_for(lambda: loop.count(FINISHED) >= 1, 300, "the baseline to finish")
    for index in range(kills):
        time.sleep(rng.uniform(*KILL_GAP_S))
        victim = VICTIMS[index % len(VICTIMS)]
        at_s = time.monotonic() - started
        if victim == "nats":
            node = rng.randrange(len(nodes))
            nodes[node].kill()
            resume_s = _resumed(loop, urls, f"nats node {node + 1}")
            nodes[node].start()
            back = time.monotonic()
            loop.wait_for(lambda: asyncio.run(replicas_current(urls)), 120, f"nats node {node + 1} to catch up")
            done.append(Kill(f"nats#{node + 1}", round(at_s, 1), resume_s, round(time.monotonic() - back, 2)))
        else:
            process = rng.choice(INSTANCES.get(victim, (victim,)))
            loop.kill(process)
            loop.start(process)
            done.append(Kill(process, round(at_s, 1), _resumed(loop, urls, process)))
    return done


def _resumed(loop: Loop, urls: list[str], victim: str) -> float:
    """Seconds until the ledger holds an event the stream stored after this call."""
    since, last = time.monotonic(), last_seq(urls)
    loop.wait_for(lambda: loop.count("SELECT max(seq) FROM events") > last, RESUME_LIMIT_S,
                  f"the loop to resume after kill -9 of {victim}")
    return round(time.monotonic() - since, 2)


def kill_an_executor_mid_run(loop: Loop, tries: int = 3) -> dict[str, object]:
    """The fleet's promise: kill -9 the executor of a run in training; another executor runs its proposal (as a new
    run, `<proposal>-2`), and the proposal ends with one finished run. The killed one restarts afterwards.

    The ledger shows a run in training a moment after it is: a run that finished before the kill landed proves
    nothing, and another run is tried."""
    for attempt in range(1, tries + 1):
        killed_run, proposal_id, executor_id, victim = _kill_a_running_executor(loop)
        killed = time.monotonic()
        finished = f"SELECT run_id, executor_id FROM finishes WHERE proposal_id = '{proposal_id}'"
        loop.wait_for(lambda query=finished: bool(loop.live_sql(query)), 300, f"{proposal_id} to finish")
        finished_after_s = time.monotonic() - killed
        loop.start(victim)
        (finished_run, finished_by), = loop.live_sql(finished)
        if finished_run != killed_run:
            assert finished_by != executor_id, "the proposal was not run again by another executor"
            return {"killed_run": killed_run, "finished_run": finished_run,
                    "finished_after_s": round(finished_after_s, 1), "attempts": attempt}
    raise AssertionError(f"each of {tries} runs finished before the kill of its executor landed")


def _kill_a_running_executor(loop: Loop) -> tuple[str, str, str, str]:
    """kill -9 of the executor of the newest run in training: its run id, proposal, executor id and process name."""
    pids = {instance_id("executor", loop.processes[name].pid): name for name in INSTANCES["executor"]}
    runs: list[tuple] = []

    def running() -> bool:
        runs[:] = [row for row in loop.live_sql(RUNNING_BY) if row[2] in pids]
        return bool(runs)

    loop.wait_for(running, 300, "a run in training")
    run_id, proposal_id, executor_id = runs[0]
    loop.kill(pids[executor_id])
    return run_id, proposal_id, executor_id, pids[executor_id]


RUNNING_BY = ("SELECT run_id, proposal_id, producer FROM events WHERE kind = 'run.progress' "
              "AND payload->>'phase' = 'training' AND run_id NOT IN "
              "(SELECT run_id FROM events WHERE kind IN ('run.finished', 'run.aborted')) ORDER BY seq DESC LIMIT 1")


def publish_garbage(loop: Loop, urls: list[str], rng: random.Random) -> dict[str, int]:
    """On every subject: a truncated event, bytes that are not UTF-8, JSON of the wrong shape, a real event of the
    running loop re-published with schema_version 99, and one over the size limit. Returns how many the stream
    stored (each must become a bad_events row with its reason, and no service may die or redeliver it forever)
    and how many it refused (the oversized ones)."""
    real = {kind: msgspec.json.decode(payload) for kind, payload in loop.live_sql(
        "SELECT kind, arg_max(payload, seq) FROM events GROUP BY kind")}
    made = {"event_id": new_id(), "producer": "faults", "ts": now()}  # kinds the loop has not published yet
    real.setdefault(RUN_ABORTED, msgspec.to_builtins(RunAborted(
        **made, run_id="garbage", at_train_s=0, forecast=None, forecast_low=None, forecast_high=None, threshold=None,
        statistic=None, boundary=None, commentary="")))
    real.setdefault(POLICY_UPDATED, msgspec.to_builtins(PolicyUpdated(
        **made, policy_version="v9999", adapter_name="adapter-v9999", adapter_sha256="0" * 64,
        stats=PPOStats(policy_loss=0, value_loss=0, entropy=0, approx_kl=0, clip_fraction=0, mean_reward=0))))
    messages: list[tuple[str, bytes]] = []
    for kind in (PROPOSAL_CREATED, RUN_PROGRESS, RUN_ABORTED, RUN_FINISHED, POLICY_UPDATED):
        name = run_subject(kind, "garbage") if kind.startswith("run.") else kind
        newer = real[kind] | {"event_id": new_id(), "schema_version": 99}
        if "run_id" in newer:
            newer["run_id"] = "garbage"
        valid = msgspec.json.encode(real[kind])
        messages += [(name, valid[:rng.randrange(1, len(valid))]), (name, b"\xff\xfe" + rng.randbytes(64)),
                     (name, b"[]"), (name, msgspec.json.encode(newer)), (name, b" " * (MAX_EVENT_BYTES + 1))]

    async def publish() -> dict[str, int]:
        bus = await Bus.connect(urls, "faults")
        stored = refused = 0
        for name, data in messages:
            try:
                await bus.js.publish(name, data, stream=STREAM)
                stored += 1
            except nats.errors.Error:  # over the server's max payload or the stream's max_msg_size
                refused += 1
        await bus.close()
        return {"stored": stored, "refused": refused}
    return asyncio.run(publish())


def audit(loop: Loop, urls: list[str]) -> Audit:
    """Call with every process stopped (it reads the ledger file, then replays it)."""
    stream = last_seq(urls)

    def one(query: str) -> int:
        return loop.sql(query)[0][0]

    def projections() -> dict[str, list[tuple]]:
        return {table: loop.sql(f"SELECT * FROM {table} ORDER BY ALL") for table in PROJECTION_TABLES}

    events, seqs, ids = loop.sql("SELECT count(*), count(DISTINCT seq), count(DISTINCT event_id) FROM events")[0]
    seen = one("SELECT count(DISTINCT seq) FROM (SELECT seq FROM events UNION ALL SELECT seq FROM bad_events)")
    before = projections()
    replayed = subprocess.run([sys.executable, "-m", "shared.cli", "replay"], env=loop.env, cwd=REPO,
                              capture_output=True, text=True)
    assert replayed.returncode == 0, replayed.stderr
    return Audit(
        stream_messages=stream,
        lost=stream - seen,
        doubled_events=events - min(seqs, ids),
        doubled_runs=one("SELECT count(*) FROM (SELECT proposal_id FROM events WHERE kind = 'run.finished' "
                         "GROUP BY 1 HAVING count(*) > 1)"),
        doubled_experiments=one("SELECT count(*) - count(DISTINCT proposal_id) FROM experiments"),
        doubled_scheduled=one(f"SELECT (SELECT count(*) - 1 FROM proposals WHERE parent_code_sha256 = '{EMPTY_SHA256}')"
                              " + (SELECT count(*) - count(DISTINCT (repeat_of, seed)) FROM proposals "
                              "WHERE purpose != 'search')"),
        doubled_updates=one("SELECT count(*) - count(DISTINCT update_index) FROM policy_updates"),
        bad_events=one("SELECT count(*) FROM bad_events WHERE reason != ''"),
        experiments=one("SELECT count(*) FROM experiments"),
        finished=one(FINISHED),
        partial_runs=one("SELECT count(DISTINCT run_id) FROM events WHERE kind = 'run.progress' AND run_id NOT IN "
                         "(SELECT run_id FROM events WHERE kind = 'run.finished')"),
        replay_matches=before == projections(),
    )


def start_cluster(root: Path) -> list[EmbeddedServer]:
    """deploy/nats-cluster's three nodes on loopback: each file as it is but for its store, which moves under root,
    and its ports and routes, which the command line overrides."""
    routes = [free_port() for _ in range(3)]
    route_urls = ",".join(f"nats://127.0.0.1:{port}" for port in routes)
    nodes = []
    for index, port in enumerate(routes):
        store = root / f"node{index + 1}"
        store.mkdir(parents=True, exist_ok=True)
        source = (CLUSTER_CONFIGS / f"node{index + 1}.conf").read_text()
        config = store / "node.conf"
        config.write_text(_with_store(source, store / "jetstream"))
        nodes.append(EmbeddedServer(store, config=config, args=["--cluster", f"nats://127.0.0.1:{port}",
                                                                "--routes", route_urls]))
    return [node.start() for node in nodes]


def _with_store(config: str, store: Path) -> str:
    lines = config.splitlines()
    found = [i for i, line in enumerate(lines) if line.strip().startswith("store_dir:")]
    assert len(found) == 1, "a node's config names its JetStream store once"
    lines[found[0]] = f"  store_dir: {store}"
    return "\n".join(lines) + "\n"


async def replicas_current(urls: list[str]) -> bool:
    """Every replica of the event stream is current and has no lag (a node that came back has caught up)."""
    bus = await Bus.connect(urls, "faults")
    try:
        cluster = (await bus.js.stream_info(STREAM)).cluster
        replicas = cluster.replicas or [] if cluster else []
        return len(replicas) == 2 and all(peer.current and not peer.lag for peer in replicas)
    finally:
        await bus.close()


def summary(kills: list[Kill]) -> dict[str, object]:
    by_victim = {}
    for victim in VICTIMS:
        times = [kill.resume_s for kill in kills if kill.process.partition("#")[0] == victim]
        if times:
            by_victim[victim] = {"kills": len(times), "median_resume_s": statistics.median(times),
                                 "worst_resume_s": max(times)}
    catch_up = [kill.catch_up_s for kill in kills if kill.catch_up_s is not None]
    times = [kill.resume_s for kill in kills]
    return {"kills": len(kills), "median_resume_s": statistics.median(times), "worst_resume_s": max(times),
            "by_victim": by_victim, "nats_worst_catch_up_s": max(catch_up, default=None)}


def run(work: Path, kills: int, slots: int, seed: int, target: Path) -> dict[str, object]:
    """The whole suite; returns its figures."""
    rng = random.Random(seed)
    nodes = start_cluster(work / "cluster")
    urls = [node.url for node in nodes]
    try:
        loop = fault_loop(nodes, target, _folder(work / "services"))
        try:
            start_services(loop, slots)
            done = kill_anything(loop, nodes, kills, rng)
            garbage = publish_garbage(loop, urls, rng)
            fleet = kill_an_executor_mid_run(loop)
        finally:
            loop.stop()
        return {"seed": seed, "executors": len(INSTANCES["executor"]), "slots_each": slots,
                "audit": asdict(audit(loop, urls)), **summary(done), "garbage": garbage,
                "executor_mid_run": fleet, "trials": [asdict(kill) for kill in done]}
    finally:
        for node in nodes:
            node.stop()


def _folder(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def main(argv: list[str]) -> int:
    from bench.report import write

    parser = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=60, help="kill -9s, VICTIMS in turn (default 60)")
    parser.add_argument("--slots", type=int, default=2, help="slots of each of the two executors (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, help="work in this new folder and keep it (logs, ledger, NATS stores)")
    args = parser.parse_args(argv)
    with contextlib.ExitStack() as stack:
        work = args.keep or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="faults-")))
        target = make_target(work / "target", write_small_corpus(_folder(work / "corpus")), progress_interval_s=0.05)
        figures = run(work, args.kills, args.slots, args.seed, target)
    write("faults", figures)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
