"""`autoresearch`: the command line.

    autoresearch up                                          NATS + every service; Ctrl-C stops them
    autoresearch down | status                               stop the stack / where the loop stands
    autoresearch tail ['run.>'] [--json]                     print events as they are published
    autoresearch sql "SELECT * FROM experiments" [--csv | --json]   read-only SQL on the ledger
    autoresearch replay                                      rebuild the ledger's projections from its log
    autoresearch report [--since 12h] [--out DIR]             the research run as one self-contained HTML file
    autoresearch evaluator record --runs 200                 record complete curves (no aborts) to a file
    autoresearch evaluator replay bench/data/curves_cpu_gpt.jsonl   abort decisions replayed, with baselines
    autoresearch target prepare targets/cpu_gpt              build the tokenized data (cached)
    autoresearch target run targets/cpu_gpt [--budget-steps N | --budget-tokens N | --budget-seconds S]
    autoresearch target download climbmix --shards 8        fetch parquet shards (needs internet)

Long operations (prepare, replay, download) draw a progress bar on stderr when it is a terminal; --progress
draws it anyway, --no-progress never.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import msgspec
import nats
from nats.aio.msg import Msg

from services.ledger.main import replay
from services.ledger.sql import QueryResult
from services.ledger.store import Ledger
from shared import progress, queries, stack
from shared.bus import Bus
from shared.config import Config, ConfigError, load_config
from shared.curves import CurvesRequest, read_curves, write_curves
from shared.events import (
    STREAM_SUBJECTS,
    AnyEvent,
    BadEvent,
    PolicyUpdated,
    ProposalCreated,
    RunAborted,
    RunFinished,
    RunProgress,
    decode,
)
from shared.target.config import TargetError, load_target
from shared.target.data import DOWNLOADABLE, download, prepare
from shared.target.records import Budget, Progress
from shared.target.runner import run_target

T = TypeVar("T")
EVENT_ROOTS = {pattern.split(".")[0] for pattern in STREAM_SUBJECTS}
"""A message under these is meant to be an event: one that does not decode is malformed."""


def _budget(args: argparse.Namespace) -> Budget | None:
    for unit in ("steps", "tokens", "seconds"):
        amount = getattr(args, f"budget_{unit}")
        if amount is not None:
            return Budget(unit, amount)  # type: ignore[arg-type]
    return None


def _print_progress(record: Progress) -> None:
    loss = "-" if record.train_loss is None else f"{record.train_loss:.4f}"
    print(f"  {record.phase:<10} step {record.step:>6}  train {record.elapsed_train_s:7.1f}s  "
          f"loss {loss:>7}  tokens {record.tokens:>10,}  mem {record.peak_mem_mb:7.0f} MB", file=sys.stderr)


def cmd_run(args: argparse.Namespace) -> int:
    target = load_target(args.target)
    source = Path(args.train_py).read_text() if args.train_py else None
    result = run_target(target, source, budget=_budget(args), seed=args.seed, device=args.device,
                        on_progress=None if args.quiet else _print_progress)
    sys.stdout.buffer.write(msgspec.json.format(msgspec.json.encode(result)) + b"\n")
    return 0 if result.status == "ok" else 1


def cmd_prepare(args: argparse.Namespace) -> int:
    config = load_target(args.target).config
    data = prepare(config.corpus, config.tokenizer)
    print(msgspec.json.format(msgspec.json.encode(data.manifest)).decode())
    print(f"prepared under {data.folder}", file=sys.stderr)
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    folder = download(args.dataset, args.shards, Path(args.dest) if args.dest else None, args.base_url)
    print(f"{args.shards} shards in {folder}; point a target's CONFIG.corpus at this folder")
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    return stack.up(load_config())


def cmd_down(args: argparse.Namespace) -> int:
    return stack.down(load_config())


def cmd_status(args: argparse.Namespace) -> int:
    config = load_config()
    running = stack.running_stack(config)
    urls = running.nats_urls if running else config.nats.urls
    answers = asyncio.run(_statuses(urls))
    where = f"up (pid {running.pid})" if running else "not started here"
    print(f"stack: {where}; NATS {', '.join(urls)}" + ("" if answers is not None else " (unreachable)"))
    print(services_table(answers or [], datetime.now(UTC)))
    ledger_up = any(answer.service == "ledger" for answer in answers or [])
    if ledger_up:
        state = asyncio.run(_ask(urls, queries.STATE, queries.StateRequest(), queries.LedgerState, 10))
    elif config.ledger_path.is_file():
        with contextlib.closing(_offline_ledger(config)) as ledger:
            state = ledger.state()
    else:
        print(f"no ledger answers and none at {config.ledger_path}")
        return 0
    best = "-" if state.bpb_star is None else f"{state.bpb_star:.4f} (c* {state.c_star_sha256[:12]})"
    sigma = "-" if state.sigma_h is None else f"{state.sigma_h:.4f}"
    print(f"experiments: {state.experiments} proposed, {state.finished} finished, {state.outstanding} outstanding")
    print(f"best val-bpb: {best}; sigma_h {sigma}; {state.since_best} finished since the last new best")
    noise = "unknown yet" if state.sigma_noise is None else f"{state.sigma_noise:.4f} ({state.noise_dof} dof)"
    print(f"noise floor sigma_noise {noise}; {len(state.candidates)} unconfirmed best(s) awaiting confirmation")
    policy = state.policy_version or "the base model (no PPO update yet)"
    print(f"aborted by the evaluator: {state.aborted}; policy: {policy}, {state.policy_updates} update(s)")
    print(f"ledger at stream seq {state.cursor}")
    return 0


STATUS_WAIT_S = 1.0
"""How long `status` listens for the services' answers."""


async def _statuses(urls: list[str]) -> list[queries.ServiceStatus] | None:
    """Every live service's answer to one question (None: NATS is not there)."""
    try:
        nc = await nats.connect(servers=urls, name="cli/status", connect_timeout=2, allow_reconnect=False)
    except (OSError, nats.errors.Error):
        return None
    answers: list[queries.ServiceStatus] = []

    async def collect(message: Msg) -> None:
        with contextlib.suppress(msgspec.DecodeError):
            answers.append(msgspec.json.decode(message.data, type=queries.ServiceStatus))

    inbox = nc.new_inbox()
    await nc.subscribe(inbox, cb=collect)
    await nc.publish(queries.STATUS, b"{}", reply=inbox)
    await asyncio.sleep(STATUS_WAIT_S)
    await nc.close()
    return answers


def services_table(answers: list[queries.ServiceStatus], now: datetime) -> str:
    """One row per live instance, and one per service that no instance answers for (down)."""
    rows = [[a.service, a.instance, a.version, _for(now - a.started_at), "-" if a.lag is None else a.lag, a.detail]
            for a in sorted(answers, key=lambda a: (stack.SERVICES.index(a.service)
                                                    if a.service in stack.SERVICES else 99, a.instance))]
    rows += [[name, "DOWN", "-", "-", "-", ""] for name in stack.SERVICES if all(a.service != name for a in answers)]
    return table(["service", "instance", "version", "up for", "lag", "detail"], rows, footer=False)


def _for(span: timedelta) -> str:
    minutes = int(span.total_seconds() // 60)
    return f"{minutes // 60}h {minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m {int(span.seconds % 60):02d}s"


async def _ask(urls: list[str], subject: str, request: msgspec.Struct, reply: type[T], timeout: float) -> T:
    """One question to the running ledger."""
    bus = await Bus.connect(urls, "cli")
    try:
        return await bus.request(subject, request, reply, timeout=timeout)
    finally:
        await bus.close()


def cmd_tail(args: argparse.Namespace) -> int:
    config = load_config()
    running = stack.running_stack(config)
    urls = running.nats_urls if running else config.nats.urls
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_tail(urls, args.subject, args.json))
    return 0


async def _tail(urls: list[str], subject: str | None, raw: bool) -> None:
    """Print every message on `subject` (default: the events' subjects) until interrupted."""
    nc = await nats.connect(servers=urls, name="cli/tail", max_reconnect_attempts=-1)
    # Not '>' by default: that also matches the JetStream API's and the request inboxes' traffic (every pull).
    subjects = [subject] if subject else STREAM_SUBJECTS
    lines: asyncio.Queue[str] = asyncio.Queue()

    async def show(message: Msg) -> None:
        await lines.put(message.data.decode("utf-8", errors="replace") if raw
                        else describe(message.subject, message.data))

    for pattern in subjects:
        await nc.subscribe(pattern, cb=show)
    await nc.flush()  # subscribed on the server before saying so
    print(f"tailing {', '.join(subjects)} on {', '.join(urls)} (Ctrl-C stops)", file=sys.stderr, flush=True)
    while True:
        print(await lines.get(), flush=True)


def describe(subject_name: str, data: bytes, received: datetime | None = None) -> str:
    """One aligned line for a message: time, kind, the run or proposal, and what matters for its kind. A message
    that is no event is shown with its reason (malformed) or as it is (any other subject asked for)."""
    at = f"{(received or datetime.now(UTC)).astimezone():%H:%M:%S}"
    if subject_name.split(".")[0] not in EVENT_ROOTS:
        return f"{at}  {'message':<16} {subject_name}  {_cut(data.decode('utf-8', errors='replace'))}"
    try:
        event = decode(subject_name, data)
    except BadEvent as error:
        return f"{at}  {'MALFORMED':<16} {subject_name}  {_cut(str(error), 160)}"
    return f"{event.ts.astimezone():%H:%M:%S}  {_kind(event):<16} {_what(event)}"


def _kind(event: AnyEvent) -> str:
    return {ProposalCreated: "proposal", RunProgress: "progress", RunAborted: "ABORTED", RunFinished: "finished",
            PolicyUpdated: "policy"}[type(event)]


def _what(event: AnyEvent) -> str:
    if isinstance(event, ProposalCreated):
        rationale = event.parse_error or event.rationale or ""
        return f"{event.proposal_id}  {event.policy} {event.policy_version} {event.purpose}: {_cut(rationale)}"
    if isinstance(event, RunProgress):
        loss = "-" if event.train_loss is None else f"{event.train_loss:.4f}"
        return (f"{event.run_id}  {event.phase} step {event.step} loss {loss} "
                f"{event.budget_used:.0%} of budget")
    if isinstance(event, RunAborted):
        forecast = "-" if event.forecast is None else f"{event.forecast:.4f}"
        threshold = "-" if event.threshold is None else f"{event.threshold:.4f}"
        return (f"{event.run_id}  at {event.at_train_s:.0f} s: forecast {forecast} vs threshold {threshold}; "
                f"{_cut(event.commentary)}")
    if isinstance(event, RunFinished):
        result = event.result
        bpb = "-" if result.val_bpb is None else f"{result.val_bpb:.4f}"
        return (f"{event.run_id}  {result.status} val_bpb {bpb} after {result.training_s:.1f} s training"
                + (f": {_cut(result.error)}" if result.error else ""))
    stats = event.stats
    return (f"{event.policy_version}  mean reward {stats.mean_reward:.3f} entropy {stats.entropy:.3f} "
            f"approx KL {stats.approx_kl:.4f} clip {stats.clip_fraction:.2f}")


def _cut(text: str, width: int = 100) -> str:
    line = " ".join(text.split())
    return line if len(line) <= width else line[:width - 1] + "…"


def cmd_sql(args: argparse.Namespace) -> int:
    sql = sys.stdin.read() if args.query == "-" else args.query
    with _ledger_sql(load_config()) as query:
        result = query(sql)
    if args.json:
        for row in result.rows:
            print(json.dumps(dict(zip(result.columns, row, strict=True)), default=str))
    elif args.csv:
        writer = csv.writer(sys.stdout)
        writer.writerow(result.columns)
        writer.writerows(result.rows)
    else:
        print(table(result.columns, result.rows))
    if result.truncated:
        print(f"(only the first {len(result.rows)} rows)", file=sys.stderr)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from services.ledger import report  # matplotlib: only this command needs it

    since = report.parse_since(args.since) if args.since else None
    with _ledger_sql(load_config()) as query:
        path = report.write_report(query, Path(args.out), since)
    print(f"report: {path} (charts as PNG beside it)")
    return 0


@contextlib.contextmanager
def _ledger_sql(config: Config) -> Iterator[Callable[[str], QueryResult]]:
    """Read-only SQL on the ledger: through the API of a ledger running here (it holds the file), or on the file
    itself when none runs."""
    port = _live_ledger_port(config)
    if port is not None:
        yield lambda sql: sql_over_http(port, sql, config.ledger.http_token)
        return
    ledger = _offline_ledger(config)
    try:
        yield ledger.query
    finally:
        ledger.close()


def _live_ledger_port(config: Config) -> int | None:
    """The HTTP port of the ledger running on this machine: the stack's, or the configured one where a ledger
    answers there (started without `autoresearch up`, as on a fleet's ledger machine)."""
    running = stack.running_stack(config)
    if running:
        return running.http_port
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{config.ledger.http_port}/health", timeout=2) as response:
            return config.ledger.http_port if json.loads(response.read()).get("ok") else None
    except (OSError, ValueError, AttributeError):  # nothing listens there, or something that is no ledger
        return None


def sql_over_http(port: int, sql: str, token: str) -> QueryResult:
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {token}"} if token else {})
    request = urllib.request.Request(f"http://127.0.0.1:{port}/sql", data=json.dumps({"sql": sql}).encode(),
                                     headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return msgspec.json.decode(response.read(), type=QueryResult)
    except urllib.error.HTTPError as error:
        raise ValueError(json.loads(error.read()).get("detail", str(error))) from None


def table(columns: list[str], rows: list[list], width: int = 48, footer: bool = True) -> str:
    """psql's picture: aligned columns, numbers on the right, NULL said, long cells cut with an ellipsis."""
    cells = [[_cell(value, width) for value in row] for row in rows]
    widths = [max([len(name), *(len(row[i]) for row in cells)]) for i, name in enumerate(columns)]
    numeric = [bool(rows) and all(isinstance(row[i], int | float) or row[i] is None for row in rows)
               for i in range(len(columns))]
    lines = [" | ".join(name.center(w) for name, w in zip(columns, widths, strict=True)),
             "-+-".join("-" * w for w in widths)]
    for row in cells:
        lines.append(" | ".join(value.rjust(w) if right else value.ljust(w)
                                for value, w, right in zip(row, widths, numeric, strict=True)).rstrip())
    if footer:
        lines.append(f"({len(rows)} row{'' if len(rows) == 1 else 's'})")
    return "\n".join(lines)


def _cell(value: object, width: int) -> str:
    if value is None:
        return "NULL"
    text = f"{value:.6g}" if isinstance(value, float) else " ".join(str(value).split())
    return text if len(text) <= width else text[:width - 1] + "…"


def cmd_replay(args: argparse.Namespace) -> int:
    config = load_config()
    running = stack.running_stack(config)
    if running:
        reply = asyncio.run(_ask(running.nats_urls, queries.REPLAY, queries.ReplayRequest(), queries.ReplayReply, 600))
    else:
        ledger = _offline_ledger(config, read_only=False)
        reply = replay(ledger)
        ledger.close()
    print(f"projections rebuilt from the log in {reply.seconds:.2f} s: "
          + ", ".join(f"{table} {rows}" for table, rows in reply.rows.items()))
    return 0


def _offline_ledger(config: Config, read_only: bool = True) -> Ledger:
    if not config.ledger_path.is_file():
        raise FileNotFoundError(f"no ledger at {config.ledger_path}: run `autoresearch up` first")
    return Ledger(config.ledger_path, read_only=read_only)


RECORD_SERVICES = ("ledger", "executor", "proposer")
"""Recording complete curves: the loop without the evaluator, so no run is cut short."""
OK_RUNS = "SELECT count(*) FROM experiments WHERE status = 'ok'"


def cmd_evaluator_record(args: argparse.Namespace) -> int:
    recording = f"{Path(load_config().stack.target).name}_seed{load_config().proposer.seed}"
    os.environ["AUTORESEARCH_STACK_DATA_DIR"] = args.data_dir or f".data/record-{recording}"  # for the services too
    config = load_config()
    out = Path(args.out or f"bench/data/curves_{recording}.jsonl")

    def enough() -> bool:
        try:
            done = sql_over_http(config.ledger.http_port, OK_RUNS, config.ledger.http_token).rows[0][0]
        except (OSError, ValueError):  # the ledger is starting
            return False
        print(f"record: {done}/{args.runs} complete runs", file=sys.stderr)
        return done >= args.runs

    if not config.ledger_path.is_file() or _offline_ledger(config).query(OK_RUNS).rows[0][0] < args.runs:
        stack.up(config, RECORD_SERVICES, until=enough)
    curves = _offline_ledger(config).curves(CurvesRequest(limit=2**31 - 1, complete_only=False))
    write_curves(out, curves)
    print(f"{len(curves)} finished runs ({sum(c.complete for c in curves)} complete) -> {out}")
    return 0


def cmd_evaluator_replay(args: argparse.Namespace) -> int:
    from services.evaluator.replay import replay as replay_decisions  # scipy: only this command needs it

    result = replay_decisions([read_curves(Path(path)) for path in args.curves], load_config().evaluator)
    print(table(["rule", "aborted", "mu_abort", "G", "false aborts [95%]", "would-be best", "ms/look p50/p99"],
                [[name, f"{r['aborted']}/{r['runs']}", r["mu_abort"], r["G"],
                  f"{r['false_aborts']}/{r['good_runs']} = {r['false_abort_rate']:.1%} "
                  f"[{r['false_abort_rate_95'][0]:.1%}, {r['false_abort_rate_95'][1]:.1%}]",
                  r["aborted_would_be_best"], f"{r['decision_ms_median']}/{r['decision_ms_p99']}"]
                 for name, r in result["rules"].items()], width=60))
    print(f"\n{result['runs']} complete runs in {result['sequences']} recording(s), p_bad {result['p_bad']}; forecast: "
          + json.dumps(result["forecast"], ensure_ascii=False))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="autoresearch", description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    top.add_argument("--progress", action=argparse.BooleanOptionalAction,
                     help="progress bars on stderr for long operations (default: only when stderr is a terminal)")
    commands = top.add_subparsers(dest="command", required=True)
    commands.add_parser("up", help="start NATS and every service; Ctrl-C stops them").set_defaults(handler=cmd_up)
    commands.add_parser("down", help="stop a running stack").set_defaults(handler=cmd_down)
    commands.add_parser("status", help="where the loop stands").set_defaults(handler=cmd_status)
    tail = commands.add_parser("tail", help="print events as they are published")
    tail.add_argument("subject", nargs="?", help="subject pattern, e.g. 'run.>' (default: every event)")
    tail.add_argument("--json", action="store_true", help="each message as it is on the wire")
    tail.set_defaults(handler=cmd_tail)
    sql = commands.add_parser("sql", help="read-only SQL on the ledger (tables: experiments, champions, ...)")
    sql.add_argument("query", help="one SELECT statement, or - to read it from stdin")
    formats = sql.add_mutually_exclusive_group()
    formats.add_argument("--json", action="store_true", help="one JSON object per row")
    formats.add_argument("--csv", action="store_true", help="CSV with a header row")
    sql.set_defaults(handler=cmd_sql)
    commands.add_parser("replay", help="drop the ledger's projections and rebuild them from its event log"
                        ).set_defaults(handler=cmd_replay)
    written = commands.add_parser("report", help="the research run as one self-contained HTML file, with its "
                                                 "charts as PNG files beside it")
    written.add_argument("--since", help="only experiments proposed since: a duration before now (12h, 90m, 2d) "
                                         "or an ISO time (UTC unless it says otherwise)")
    written.add_argument("--out", default="report", help="the folder to write into (default ./report)")
    written.set_defaults(handler=cmd_report)
    evaluator = commands.add_parser("evaluator", help="record complete curves; replay abort decisions on them")
    evaluator_verbs = evaluator.add_subparsers(dest="verb", required=True)
    record = evaluator_verbs.add_parser("record", help="run the loop without aborts until N complete runs, "
                                                       "then write every finished run's curve to a file")
    record.add_argument("--runs", type=int, default=200, help="complete (ok) runs to record (default 200)")
    record.add_argument("--data-dir", help="the recording loop's own data dir, so it can be resumed "
                                           "(default .data/record-<target>_seed<proposer seed>)")
    record.add_argument("--out", help="default bench/data/curves_<target>_seed<proposer seed>.jsonl; "
                                      "another proposer seed (AUTORESEARCH_PROPOSER_SEED) is another recording")
    record.set_defaults(handler=cmd_evaluator_record)
    replayed = evaluator_verbs.add_parser("replay", help="the evaluator's and the baselines' decisions on "
                                                         "recorded curves, in the order the runs finished")
    replayed.add_argument("curves", nargs="+", help="curves files written by `evaluator record`, each one loop's "
                                                   "history, replayed from its start")
    replayed.add_argument("--json", help="also write the full results to this file")
    replayed.set_defaults(handler=cmd_evaluator_replay)

    target = commands.add_parser("target", help="research targets: prepare data, run one experiment")
    verbs = target.add_subparsers(dest="verb", required=True)

    run = verbs.add_parser("run", help="train and evaluate a target's train.py; print the result record")
    run.add_argument("target", help="target folder, e.g. targets/cpu_gpt")
    run.add_argument("--train-py", help="train this file instead of the target's train.py")
    budget = run.add_mutually_exclusive_group()
    budget.add_argument("--budget-seconds", type=float, help="training seconds (default: the target's T_max)")
    budget.add_argument("--budget-steps", type=int, help="deterministic budget: batches drawn from env.batches()")
    budget.add_argument("--budget-tokens", type=int, help="deterministic budget: training tokens")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--device", choices=["cpu", "cuda"], help="override the target's device")
    run.add_argument("--quiet", action="store_true", help="print only the result record")
    run.set_defaults(handler=cmd_run)

    prep = verbs.add_parser("prepare", help="build the target's tokenized train/val data")
    prep.add_argument("target")
    prep.set_defaults(handler=cmd_prepare)

    fetch = verbs.add_parser("download", help="download parquet shards of a public corpus")
    fetch.add_argument("dataset", choices=sorted(DOWNLOADABLE))
    fetch.add_argument("--shards", type=int, required=True)
    fetch.add_argument("--dest", help="folder (default: <data root>/datasets/<dataset>)")
    fetch.add_argument("--base-url", help="mirror to download from")
    fetch.set_defaults(handler=cmd_download)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.progress is not None:
        os.environ[progress.ENV] = "1" if args.progress else "0"
    try:
        return args.handler(args)
    except (TargetError, ConfigError, OSError, ValueError, RuntimeError, TimeoutError) as error:
        print(f"autoresearch: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
