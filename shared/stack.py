"""`autoresearch up`: NATS and every service on this machine, their logs on the terminal.

Ctrl-C (or `autoresearch down`) stops the services newest first, then the embedded server. A service
that dies is restarted with backoff: the loop is meant to run overnight, and every service rebuilds
its state from the stream and the ledger.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import msgspec

from shared.config import Config
from shared.nats_server import EmbeddedServer

SERVICES = ("ledger", "learner", "executor", "evaluator", "proposer")
"""Start order; they stop in reverse, so nothing is proposed that no executor will take, and the learner, which
yields the CPU to runs (services/learner/main.py), stops once no run is left to starve its exit. The learner
idles (no model loaded) unless [proposer] policy is a language model."""
PREFIX = max(map(len, SERVICES)) + 1
"""Width of the service name that starts every log line."""
STOP_GRACE_S = 30.0
MAX_BACKOFF_S = 60.0
UNTIL_EVERY_S = 10.0
HEALTHY_AFTER_S = 120.0
"""A service that ran this long before dying is restarted at once, not after the backed-off delay."""


class StackFile(msgspec.Struct, frozen=True):
    """data_dir/stack.json while a stack runs: how `down`, `status`, `tail` and `sql` find it."""

    pid: int
    nats_urls: list[str]
    http_port: int


def stack_file(config: Config) -> Path:
    return config.data_dir / "stack.json"


def running_stack(config: Config) -> StackFile | None:
    path = stack_file(config)
    if not path.is_file():
        return None
    found = msgspec.json.decode(path.read_bytes(), type=StackFile)
    try:
        os.kill(found.pid, 0)
    except ProcessLookupError:
        return None  # left behind by a stack that was killed
    return found


class Service:
    def __init__(self, name: str, env: dict[str, str]):
        self.name = name
        self.env = env
        self.process: subprocess.Popen | None = None
        self.started = 0.0
        self.failures = 0
        self.restart_at = 0.0

    def start(self) -> None:
        # Own session, like nats-server: on Ctrl-C the supervisor stops the services in order, NATS last.
        self.process = subprocess.Popen([sys.executable, "-m", f"services.{self.name}"], env=self.env,
                                        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        self.started = time.monotonic()
        threading.Thread(target=_relay, args=(self.name, self.process.stdout), daemon=True).start()

    def check(self) -> None:
        """Restart a dead service, backing off while it keeps dying young."""
        assert self.process is not None
        if self.process.poll() is None:
            return
        now = time.monotonic()
        if self.restart_at == 0.0:
            self.failures = 0 if now - self.started > HEALTHY_AFTER_S else self.failures + 1
            delay = min(MAX_BACKOFF_S, 2.0 ** self.failures - 1)
            self.restart_at = now + delay
            _say(f"{self.name} exited with code {self.process.returncode}; restarting in {delay:.0f} s")
        if now >= self.restart_at:
            self.restart_at = 0.0
            self.start()

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            _say(f"{self.name} did not stop within {STOP_GRACE_S:.0f} s; killing it")
            self.process.kill()
            self.process.wait()


def up(config: Config, services: Sequence[str] = SERVICES, until: Callable[[], bool] | None = None) -> int:
    """Run the stack until Ctrl-C / `down`, or until `until()` (asked every few seconds) says it is done."""
    if (other := running_stack(config)) is not None:
        raise RuntimeError(f"a stack is already up (pid {other.pid}); stop it with `autoresearch down`")
    config.data_dir.mkdir(parents=True, exist_ok=True)
    server = None if config.nats.servers else EmbeddedServer(config.data_dir / "nats", port=config.nats.port).start()
    urls = config.nats.urls
    stack_file(config).write_bytes(msgspec.json.encode(StackFile(os.getpid(), urls, config.ledger.http_port)))
    env = os.environ | {"AUTORESEARCH_NATS_SERVERS": ",".join(urls), "PYTHONUNBUFFERED": "1"}
    running = [Service(name, env) for name in services]
    stopping = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopping.set())
    _say(f"NATS at {', '.join(urls)}{' (embedded)' if server else ''}; ledger SQL on "
         f"http://127.0.0.1:{config.ledger.http_port}; tail with `autoresearch tail 'run.>'`; Ctrl-C stops")
    try:
        for service in running:
            service.start()
        checked = time.monotonic()
        while not stopping.wait(0.5):
            if until is not None and time.monotonic() - checked > UNTIL_EVERY_S:
                checked = time.monotonic()
                if until():
                    break
            if server and server.process and server.process.poll() is not None:
                _say(f"nats-server exited with code {server.process.returncode}; restarting it (see {server.log_file})")
                server.start()
            for service in running:
                service.check()
    finally:
        _say("stopping")
        for service in reversed(running):
            service.stop()
        if server:
            server.stop()
        stack_file(config).unlink(missing_ok=True)
        _say("stopped")
    return 0


def down(config: Config, timeout: float = 2 * STOP_GRACE_S * len(SERVICES)) -> int:
    found = running_stack(config)
    if found is None:
        print("no stack is up", file=sys.stderr)
        return 0
    os.kill(found.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(found.pid, 0)
        except ProcessLookupError:
            print("stack stopped", file=sys.stderr)
            return 0
        time.sleep(0.2)
    raise RuntimeError(f"the stack (pid {found.pid}) did not stop within {timeout:.0f} s")


def _relay(name: str, stream) -> None:
    for line in iter(stream.readline, b""):
        sys.stdout.write(f"{name:<{PREFIX}}| {line.decode('utf-8', errors='replace')}")
        sys.stdout.flush()


def _say(message: str) -> None:
    print(f"{'stack':<{PREFIX}}| {message}", flush=True)
