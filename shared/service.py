"""What every service's main.py shares: config, logging, an instance id, and a clean stop on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable

from shared.config import Config, ConfigError, load_config

Serve = Callable[[Config, asyncio.Event], Awaitable[None]]


def instance_id(service: str, pid: int | None = None) -> str:
    """`executor/host-1234`: the producer of every event a process (this one by default) publishes."""
    return f"{service}/{socket.gethostname()}-{pid or os.getpid()}"


def run_service(service: str, serve: Serve) -> None:
    """Run `serve(config, stop)` until SIGINT/SIGTERM sets `stop`; exit 2 with one line on a bad config."""
    logging.basicConfig(level=os.environ.get("AUTORESEARCH_LOG_LEVEL", "INFO"), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # a service's stderr is a log, not a terminal
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
