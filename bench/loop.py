"""The loop as separate processes on given nats-servers, configured by environment, and the small targets it
runs: for the end-to-end, crash and fault tests, the fault suite and the executor benchmark."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from services.ledger.store import Ledger
from shared.bus import Bus
from shared.nats_server import EmbeddedServer, free_port

REPO = Path(__file__).resolve().parent.parent
STEPS_PER_RUN = 12
CPU_TRAIN_PY = REPO / "targets" / "cpu_gpt" / "train.py"


def write_small_corpus(folder: Path) -> Path:
    """About 400 KB of real text: standard-library sources plus a file of non-ASCII prose."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.glob("*.py"))[:60]:
        (folder / path.name).write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    (folder / "unicode.txt").write_text("naïve café — 日本語のテキスト, emoji 🎉 and ß\n" * 200, encoding="utf-8")
    return folder


def shrink(source: str, **constants: object) -> str:
    """Rewrite `NAME = value` constant lines of a train.py, as an agent's edit would."""
    for name, value in constants.items():
        source, count = re.subn(rf"^{name} = .*$", f"{name} = {value!r}", source, count=1, flags=re.MULTILINE)
        assert count == 1, f"{name} is not a constant of this train.py"
    return source


TINY_MODEL = dict(N_LAYER=2, N_HEAD=2, N_EMBD=32, BATCH_SIZE=8)


def make_target(folder: Path, corpus: Path | str, train_py: str | None = None, **config: object) -> Path:
    """A target folder with a small frozen config; train.py defaults to the CPU target's, shrunk. One thread per run:
    a tiny model gains nothing from a second, and a loop runs several processes on two cores (measured: the random
    search loop of tests/test_loop.py, two slots, 55 s with two threads per run, 35 s with one)."""
    folder.mkdir(parents=True, exist_ok=True)
    settings = dict(
        time_budget_s=20, seq_len=32, corpus=str(corpus), tokenizer="byte", device="cpu", eval_tokens=4096,
        eval_batch=8, startup_allowance_s=30, eval_allowance_s=60, progress_interval_s=0.1, cpu_threads=1,
    ) | config
    args = ", ".join(f"{key}={value!r}" for key, value in settings.items())
    prepare = f"from shared.target import TargetConfig, session\nCONFIG = TargetConfig({args})\n"
    (folder / "prepare.py").write_text(prepare)
    (folder / "program.md").write_text("# test target\n")
    source = train_py if train_py is not None else shrink(CPU_TRAIN_PY.read_text(), **TINY_MODEL)
    (folder / "train.py").write_text(source)
    return folder


HELD = "SELECT max(seq) FROM (SELECT seq FROM events UNION ALL SELECT seq FROM bad_events)"
"""The last stream sequence the ledger file holds."""


def last_seq(urls: list[str]) -> int:
    """The stream's last sequence."""
    async def ask() -> int:
        bus = await Bus.connect(urls, "loop")
        try:
            return await bus.last_seq()
        finally:
            await bus.close()
    return asyncio.run(ask())


def _terminate(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


class Loop:
    """Ledger, executor and proposer as `python -m services.<name>.main`, configured by environment; random search
    unless told otherwise (it starts quickest: no model to load). A process name may add `#<instance>` to its
    service's (`executor#2`), with settings of its own (`start("executor#2", EXECUTOR_FIRST_SLOT=1)`)."""

    def __init__(self, servers: EmbeddedServer | list[EmbeddedServer], target: Path, data_dir: Path,
                 **overrides: object):
        urls = ",".join(server.url for server in (servers if isinstance(servers, list) else [servers]))
        self.data_dir = data_dir
        self.http_port = free_port()
        settings = {
            "STACK_DATA_DIR": data_dir, "STACK_TARGET": target, "NATS_SERVERS": urls,
            "LEDGER_HTTP_PORT": self.http_port, "EXECUTOR_BUDGET_UNIT": "steps",
            "EXECUTOR_BUDGET_AMOUNT": STEPS_PER_RUN, "EXECUTOR_ACK_WAIT_S": 3, "EXECUTOR_PROGRESS_INTERVAL_S": 0.2,
            "PROPOSER_MAX_EXPERIMENTS": 6, "PROPOSER_POLICY": "random",
        } | overrides
        self.env = os.environ | {"AUTORESEARCH_CONFIG": str(data_dir / "none.toml")} | {
            f"AUTORESEARCH_{key}": str(value) for key, value in settings.items()}
        self.processes: dict[str, subprocess.Popen] = {}
        self.instance_env: dict[str, dict[str, str]] = {}

    def start(self, *names: str, **overrides: object) -> Loop:
        """Start (or restart, with the settings of its first start) each named process."""
        for name in names or ("ledger", "executor", "proposer"):
            env = self.instance_env.setdefault(name, {f"AUTORESEARCH_{key}": str(value)
                                                      for key, value in overrides.items()})
            log = open(self.data_dir / f"{name}.log", "ab")  # noqa: SIM115 - the process owns it
            self.processes[name] = subprocess.Popen([sys.executable, "-m", f"services.{name.partition('#')[0]}"],
                                                    cwd=REPO, env=self.env | env, stdout=log, stderr=log)
        return self

    def kill(self, name: str) -> None:
        """kill -9: no cleanup, no goodbye. The process is out of the loop until started again."""
        process = self.processes.pop(name)
        process.send_signal(signal.SIGKILL)
        process.wait()

    def stop(self) -> None:
        """SIGTERM to every process; to the ledger last, once it holds all that the others published."""
        _terminate([process for name, process in self.processes.items() if name != "ledger"])
        if "ledger" in self.processes and self.alive("ledger"):
            last = last_seq(self.env["AUTORESEARCH_NATS_SERVERS"].split(","))
            deadline = time.monotonic() + 30
            while (self.count(HELD) or 0) < last and time.monotonic() < deadline:
                time.sleep(0.2)
            _terminate([self.processes["ledger"]])

    def alive(self, name: str) -> bool:
        return self.processes[name].poll() is None

    def log(self, name: str) -> str:
        return (self.data_dir / f"{name}.log").read_text(errors="replace")

    def live_sql(self, query: str) -> list[tuple]:
        """Ask the running ledger over its HTTP API; [] while it is not answering."""
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}/sql", method="POST",
                                         data=json.dumps({"sql": query}).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return [tuple(row) for row in json.loads(response.read())["rows"]]
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return []

    def count(self, query: str) -> int:
        rows = self.live_sql(query)
        return rows[0][0] if rows else -1

    def sql(self, query: str) -> list[tuple]:
        """Read the ledger file directly: only valid once the ledger process has stopped."""
        ledger = Ledger(self.data_dir / "ledger.duckdb", read_only=True)
        try:
            return [tuple(row) for row in ledger.query(query).rows]
        finally:
            ledger.close()

    def wait_for(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, process in self.processes.items():
                assert process.poll() is None, f"{name} died:\n{self.log(name)[-3000:]}"
            if condition():
                return
            time.sleep(0.5)
        raise AssertionError(f"timed out waiting for {what}:\n" + "\n".join(
            f"--- {name}\n{self.log(name)[-2000:]}" for name in self.processes))
