"""The loop as separate processes on a given nats-server, configured by environment: for the
end-to-end and crash tests and the executor benchmark."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from services.ledger.store import Ledger
from shared.nats_server import EmbeddedServer, free_port

REPO = Path(__file__).resolve().parent.parent
STEPS_PER_RUN = 12


class Loop:
    """Ledger, executor and proposer as `python -m services.<name>.main`, configured by environment; random search
    unless told otherwise (it starts quickest: no model to load)."""

    def __init__(self, server: EmbeddedServer, target: Path, data_dir: Path, **overrides: object):
        self.data_dir = data_dir
        self.http_port = free_port()
        settings = {
            "STACK_DATA_DIR": data_dir, "STACK_TARGET": target, "NATS_SERVERS": server.url,
            "LEDGER_HTTP_PORT": self.http_port, "EXECUTOR_BUDGET_UNIT": "steps",
            "EXECUTOR_BUDGET_AMOUNT": STEPS_PER_RUN, "EXECUTOR_ACK_WAIT_S": 3, "EXECUTOR_PROGRESS_INTERVAL_S": 0.2,
            "PROPOSER_MAX_EXPERIMENTS": 6, "PROPOSER_POLICY": "random",
        } | overrides
        self.env = os.environ | {"AUTORESEARCH_CONFIG": str(data_dir / "none.toml")} | {
            f"AUTORESEARCH_{key}": str(value) for key, value in settings.items()}
        self.processes: dict[str, subprocess.Popen] = {}

    def start(self, *names: str) -> Loop:
        for name in names or ("ledger", "executor", "proposer"):
            log = open(self.data_dir / f"{name}.log", "ab")  # noqa: SIM115 - the process owns it
            self.processes[name] = subprocess.Popen([sys.executable, "-m", f"services.{name}"], cwd=REPO,
                                                    env=self.env, stdout=log, stderr=log)
        return self

    def kill(self, name: str) -> None:
        """kill -9: no cleanup, no goodbye."""
        self.processes[name].send_signal(signal.SIGKILL)
        self.processes[name].wait()

    def stop(self) -> None:
        for process in reversed(self.processes.values()):
            if process.poll() is None:
                process.terminate()
        for process in self.processes.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()

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
