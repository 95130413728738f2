"""What every service's main.py shares: config, logging, an instance id, a clean stop on SIGTERM, and an answer to
`autoresearch status` (its version, since when it runs, and how far behind it is)."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import msgspec
from nats.aio.msg import Msg

from shared import progress, queries
from shared.bus import Bus
from shared.config import Config, ConfigError, load_config

Serve = Callable[[Config, asyncio.Event], Awaitable[None]]
Lag = Callable[[], Awaitable[tuple[int | None, str]]]
"""A service's lag and a line of detail, asked when `autoresearch status` asks."""
STARTED_AT = datetime.now(UTC)


def instance_id(service: str, pid: int | None = None) -> str:
    """`executor/host-1234`: the producer of every event a process (this one by default) publishes."""
    return f"{service}/{socket.gethostname()}-{pid or os.getpid()}"


@functools.cache
def version() -> str:
    """The installed package's version, with the commit of the checkout it runs from when there is one."""
    found = metadata.version("autoresearch-rl")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                                capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{found}+{commit}" if commit else found


async def answer_status(bus: Bus, service: str, instance: str, lag: Lag | None = None) -> None:
    """Answer every `autoresearch status` (queries.STATUS) while this process runs."""
    built = version()  # now, not in the first answer: it may run git

    async def answer(message: Msg) -> None:
        try:
            behind, detail = await lag() if lag else (None, "")
        except Exception as error:  # noqa: BLE001 - a service that cannot measure its lag is still up: say so
            behind, detail = None, f"lag unknown: {error or type(error).__name__}"
        await message.respond(msgspec.json.encode(queries.ServiceStatus(
            service=service, instance=instance, version=built, started_at=STARTED_AT, lag=behind, detail=detail)))

    await bus.nc.subscribe(queries.STATUS, cb=answer)


def run_service(service: str, serve: Serve) -> None:
    """Run `serve(config, stop)` until SIGINT/SIGTERM sets `stop`; exit 2 with one line on a bad config."""
    logging.basicConfig(level=os.environ.get("AUTORESEARCH_LOG_LEVEL", "INFO"), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # A service's stderr is a log, not a terminal: no progress bar in it, even one `autoresearch --progress up` asked.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ[progress.ENV] = "0"
    try:
        config = load_config()
    except ConfigError as error:
        print(f"{service}: {error}", file=sys.stderr)
        sys.exit(2)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await serve(config, stop)

    asyncio.run(main())
