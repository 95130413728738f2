"""Shared fixtures: a private data root, small corpora, and throwaway target folders (bench/loop.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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


@pytest.fixture
def nats_server(tmp_path: Path):
    """A real nats-server with JetStream on a free loopback port, file storage in tmp_path."""
    from shared.nats_server import EmbeddedServer

    server = EmbeddedServer(tmp_path / "nats").start()
    yield server
    server.stop()
