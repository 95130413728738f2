"""The `autoresearch` commands, as a user runs them (the loop's own in tests/test_loop.py)."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import msgspec
import nats
import pytest
from conftest import make_target
from test_loop import FINISHED, cli_in

from bench.loop import Loop
from services.executor.runs import unrun_result
from shared import progress
from shared.cli import describe, main, table
from shared.diffs import EMPTY_SHA256
from shared.events import (
    PolicyUpdated,
    PPOStats,
    ProposalCreated,
    RunAborted,
    RunFinished,
    RunProgress,
    encode,
    new_id,
    now,
    subject,
)
from shared.nats_server import EmbeddedServer
from shared.stack import SERVICES
from shared.target.records import Budget, RunResult


def test_target_run_prints_the_result_record(small_corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    target = make_target(tmp_path / "t", small_corpus)
    assert main(["target", "run", str(target), "--budget-steps", "3", "--seed", "1"]) == 0
    captured = capsys.readouterr()
    result = msgspec.json.decode(captured.out, type=RunResult)
    assert result.status == "ok" and result.steps == 3 and result.seed == 1 and result.budget == "3 steps"
    assert "training" in captured.err and "evaluating" in captured.err


def test_errors_are_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture):
    assert main(["target", "run", str(tmp_path)]) == 2
    assert "is not a research target: prepare.py is missing" in capsys.readouterr().err
    assert main(["target", "run", "targets/cpu_gpt", "--budget-steps", "0"]) == 2
    assert "a budget must be positive" in capsys.readouterr().err


def test_tail_prints_one_readable_line_per_event_and_names_a_malformed_one():
    made = {"event_id": new_id(), "producer": "test/1", "ts": now()}
    finished = RunFinished(**made, run_id="p1-1", proposal_id="p1", executor_id="e/1",
                           result=unrun_result("crashed", "train.py raised\nKeyError: 'x'", Budget("steps", 12), 0))
    events = [
        ProposalCreated(**made, proposal_id="p1", parent_code_sha256=EMPTY_SHA256, ops=[], unified_diff="",
                        policy="lm-score", policy_version="v0003", rationale="halve the learning rate"),
        RunProgress(**made, run_id="p1-1", proposal_id="p1", executor_id="e/1", phase="training",
                    elapsed_train_s=3.0, budget_used=0.25, step=30, train_loss=2.5, tokens=100, peak_mem_mb=1.0),
        RunAborted(**made, run_id="p1-1", at_train_s=3.0, forecast=1.61, forecast_low=1.5, forecast_high=1.7,
                   threshold=1.42, statistic=5.0, boundary=2.9, commentary="cannot beat c*"),
        finished,
        PolicyUpdated(**made, policy_version="v0004", adapter_name="a", adapter_sha256="0" * 64,
                      stats=PPOStats(policy_loss=0.1, value_loss=0.2, entropy=1.5, approx_kl=0.01,
                                     clip_fraction=0.1, mean_reward=-0.25)),
    ]
    lines = [describe(subject(event), encode(event)) for event in events]
    assert [line.split()[1] for line in lines] == ["proposal", "progress", "ABORTED", "finished", "policy"]
    assert "p1  lm-score v0003 search: halve the learning rate" in lines[0]
    assert "p1-1  training step 30 loss 2.5000 25% of budget" in lines[1]
    assert "forecast 1.6100 vs threshold 1.4200; cannot beat c*" in lines[2]
    assert "crashed val_bpb - after 0.0 s training: train.py raised KeyError: 'x'" in lines[3]  # one line
    assert "v0004  mean reward -0.250 entropy 1.500" in lines[4]
    malformed = describe("run.finished.p1-1", b"{truncated")
    assert "malformed" in malformed and "run.finished.p1-1" in malformed


def test_sql_tables_align_numbers_right_and_say_null():
    lines = table(["name", "val_bpb"], [["baseline", 1.5], ["a much longer name" * 4, None]], width=20).splitlines()
    assert lines[0] == "        name         | val_bpb"
    assert lines[2] == "baseline             |     1.5"
    assert lines[3] == "a much longer namea… |    NULL" and lines[-1] == "(2 rows)"


# The commands against a live loop: every service as a process on a real nats-server, one experiment (the baseline),
# shared by the tests below (a loop takes seconds to start), with a `tail` watching it from before its first event.

@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, small_corpus: Path) -> Iterator[Live]:
    folder = tmp_path_factory.mktemp("cli_loop")
    server = EmbeddedServer(folder / "nats").start()
    loop = Loop(server, make_target(folder / "target", small_corpus), folder, PROPOSER_MAX_EXPERIMENTS=1)
    tails = {name: _start_tail(loop, folder / f"{name}.out", *argv)
             for name, argv in (("lines", ()), ("json", ("run.>", "--json")))}
    try:
        loop.start(*SERVICES)
        loop.wait_for(lambda: loop.count(FINISHED) >= 1, 120, "the baseline to finish")
        yield Live(loop, server, folder)
    finally:
        for process in tails.values():
            process.terminate()
            process.wait(timeout=10)
        loop.stop()
        server.stop()


class Live(NamedTuple):
    loop: Loop
    server: EmbeddedServer
    folder: Path


def _start_tail(loop: Loop, out: Path, *argv: str) -> subprocess.Popen:
    """`autoresearch tail`, writing to `out`; returns once it is subscribed."""
    process = subprocess.Popen([sys.executable, "-m", "shared.cli", "tail", *argv], env=loop.env,
                               stdout=out.open("w"), stderr=subprocess.PIPE, text=True)
    assert process.stderr is not None and process.stderr.readline().startswith("tailing")
    return process


def _tailed(out: Path, needle: str, timeout: float = 10) -> list[str]:
    """The lines a tail has printed, once one contains `needle`."""
    deadline = time.monotonic() + timeout
    while needle not in (text := out.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert needle in text, text
    return text.splitlines()


async def _publish(url: str, messages: list[tuple[str, bytes]]) -> None:
    """As any publisher would: plain NATS publishes, which the stream stores as it does the services' events."""
    nc = await nats.connect(url)
    for name, data in messages:
        await nc.publish(name, data)
    await nc.close()


def test_tail_shows_the_loops_events_one_line_each_and_a_malformed_message_as_such(live: Live):
    made = {"event_id": new_id(), "producer": "test/1", "ts": now()}
    aborted = RunAborted(**made, run_id="gone-1", at_train_s=3.0, forecast=1.61, forecast_low=1.5, forecast_high=1.7,
                         threshold=1.42, statistic=5.0, boundary=2.9, commentary="cannot beat c*")
    updated = PolicyUpdated(**made, policy_version="v0009", adapter_name="a", adapter_sha256="0" * 64,
                            stats=PPOStats(policy_loss=0.1, value_loss=0.2, entropy=1.5, approx_kl=0.01,
                                           clip_fraction=0.1, mean_reward=-0.25))
    asyncio.run(_publish(live.server.url, [(subject(aborted), encode(aborted)), (subject(updated), encode(updated)),
                                           ("run.finished.gone-1", b"{truncated")]))
    lines = _tailed(live.folder / "lines.out", "run.finished.gone-1")
    by_kind: dict[str, list[str]] = {}
    for line in lines:
        by_kind.setdefault(line.split()[1], []).append(line)
    assert sorted(by_kind) == ["ABORTED", "MALFORMED", "finished", "policy", "progress", "proposal"]  # no API chatter
    (baseline,), = live.loop.live_sql("SELECT proposal_id FROM experiments")
    assert re.fullmatch(rf"\d\d:\d\d:\d\d  proposal {{9}}{baseline}  random-search \S+ search: the unmodified "
                        r"train\.py.*", by_kind["proposal"][0])
    assert all(re.fullmatch(rf"\d\d:\d\d:\d\d  progress {{9}}{baseline}-1  (started|training|evaluating) "
                            r"step \d+ loss (-|\d+\.\d{4}) \d+% of budget", line) for line in by_kind["progress"])
    assert re.fullmatch(rf"\d\d:\d\d:\d\d  finished {{9}}{baseline}-1  ok val_bpb \d\.\d{{4}} after \d+\.\d s "
                        "training", by_kind["finished"][0])
    assert by_kind["ABORTED"][0].endswith("gone-1  at 3 s: forecast 1.6100 vs threshold 1.4200; cannot beat c*")
    assert "v0009  mean reward -0.250 entropy 1.500 approx KL 0.0100" in by_kind["policy"][0]
    assert "MALFORMED        run.finished.gone-1  malformed RunFinished on run.finished.gone-1" in \
        by_kind["MALFORMED"][0]
    raw = _tailed(live.folder / "json.out", "{truncated")  # --json: as on the wire, the malformed one too
    assert raw[-1] == "{truncated"
    assert {json.loads(line)["run_id"] for line in raw[:-1]} == {f"{baseline}-1", "gone-1"}


def test_status_lists_every_service_with_its_version_and_lag_and_a_killed_one_down(live: Live):
    screen = cli_in(live.loop, "status")
    table_rows = [[cell.strip() for cell in line.split("|", 5)] for line in screen.splitlines()]
    rows = {cells[0]: cells for cells in table_rows if len(cells) == 6}
    assert sorted(rows) == sorted([*SERVICES, "service"]), screen
    for name in SERVICES:
        _, instance, version, up_for, lag, _ = rows[name]
        assert instance.startswith(f"{name}/") and re.fullmatch(r"\d+\.\d+\.\d+(\+[0-9a-f]+)?", version), rows[name]
        assert re.fullmatch(r"\d+m \d\ds", up_for) and lag == ("-" if name in ("proposer", "evaluator") else "0")
    assert "committed up to stream seq" in rows["ledger"][5] and "0/1 slots busy" in rows["executor"][5]
    assert "experiments: 1 proposed, 1 finished, 0 outstanding" in screen
    live.loop.kill("evaluator")
    down = cli_in(live.loop, "status")
    assert [line.split()[:3] for line in down.splitlines() if line.startswith("evaluator")] == \
        [["evaluator", "|", "DOWN"]]
    assert sum(" | DOWN " in line for line in down.splitlines()) == 1
    assert not any("\r" in live.loop.log(name) or "it/s]" in live.loop.log(name) for name in SERVICES)  # no bar


def test_sql_as_a_table_as_csv_and_as_json_lines_on_the_live_ledger(live: Live):
    query = ("SELECT proposal_id, status, val_bpb, NULL AS nothing, 'a, \"b\"' || chr(10) || 'c' AS awkward "
             "FROM experiments")
    (proposal, status, val_bpb), = live.loop.live_sql("SELECT proposal_id, status, val_bpb FROM experiments")
    lines = cli_in(live.loop, "sql", query).splitlines()
    assert [name.strip() for name in lines[0].split("|")] == ["proposal_id", "status", "val_bpb", "nothing", "awkward"]
    assert [cell.strip() for cell in lines[2].split("|")] == [proposal, status, f"{val_bpb:.6g}", "NULL", 'a, "b" c']
    assert lines[3] == "(1 row)"
    parsed = list(csv.reader(io.StringIO(cli_in(live.loop, "sql", query, "--csv"))))
    assert parsed == [["proposal_id", "status", "val_bpb", "nothing", "awkward"],
                      [proposal, status, repr(val_bpb), "", 'a, "b"\nc']]
    assert [json.loads(line) for line in cli_in(live.loop, "sql", query, "--json").splitlines()] == \
        [{"proposal_id": proposal, "status": status, "val_bpb": val_bpb, "nothing": None, "awkward": 'a, "b"\nc'}]


def test_progress_bars_only_when_asked_or_on_a_terminal(small_corpus: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture):
    target = make_target(tmp_path / "t", small_corpus)
    monkeypatch.setenv("AUTORESEARCH_DATA", str(tmp_path / "quiet"))  # a fresh data root: prepared from scratch
    monkeypatch.delenv(progress.ENV, raising=False)
    assert main(["target", "prepare", str(target)]) == 0
    assert "preparing" not in capsys.readouterr().err  # stderr is no terminal here, as in CI
    monkeypatch.setenv("AUTORESEARCH_DATA", str(tmp_path / "asked"))
    assert main(["--progress", "target", "prepare", str(target)]) == 0
    assert re.search(r"preparing .*100%\|.*\| \d+/\d+ \[", capsys.readouterr().err)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    monkeypatch.delenv(progress.ENV)
    assert progress.wanted()  # a terminal watches
    monkeypatch.setenv(progress.ENV, "0")
    assert not progress.wanted()  # as every service sets it: its stderr is a log
