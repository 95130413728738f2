"""Shared fixtures: a private data root, small corpora, and throwaway target folders (bench/loop.py)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, sync_playwright

from bench.loop import TINY_MODEL, make_target, shrink, write_small_corpus  # noqa: F401 - for the tests

REPO = Path(__file__).resolve().parent.parent
CPU_TARGET = REPO / "targets" / "cpu_gpt"


@pytest.fixture(scope="session", autouse=True)
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every test prepares data and runs experiments under one temporary data root."""
    root = tmp_path_factory.mktemp("data")
    os.environ["AUTORESEARCH_DATA"] = str(root)
    return root


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 400 KB of real text: standard-library sources plus a file of non-ASCII prose."""
    return write_small_corpus(tmp_path_factory.mktemp("small_corpus"))


def alive_processes(uid: int) -> list[int]:
    """Processes of `uid` that are not zombies (a zombie holds no memory and runs nothing)."""
    pids = []
    for entry in os.scandir("/proc"):
        try:
            status = Path(entry.path, "status").read_text() if entry.name.isdigit() else ""
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if fields and int(fields["Uid"].split()[0]) == uid and fields["State"].split()[0] not in ("Z", "X"):
            pids.append(int(entry.name))
    return pids


@pytest.fixture
def nats_server(tmp_path: Path):
    """A real nats-server with JetStream on a free loopback port, file storage in tmp_path."""
    from shared.nats_server import EmbeddedServer

    server = EmbeddedServer(tmp_path / "nats").start()
    yield server
    server.stop()


ARTIFACTS = REPO / "test-artifacts"
"""Screenshots and reports the browser tests leave for a human to look at (not committed)."""
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
"""As root, no sandbox; without the background-networking flags Chromium keeps calling out of this offline box."""


@contextlib.contextmanager
def chromium() -> Iterator[Browser]:
    """Debian's chromium (make test installs it), headless, driven by Playwright (which downloads nothing). Not a
    fixture: Playwright's sync API holds an event loop while it runs, so tests open it only where they need it."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()
