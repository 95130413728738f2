"""Shared fixtures: a private data root, small corpora, and throwaway target folders."""

from __future__ import annotations

import os
import re
import sysconfig
from pathlib import Path

import pytest

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
    folder = tmp_path_factory.mktemp("small_corpus")
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
    """A target folder with a small frozen config; train.py defaults to the CPU target's, shrunk."""
    folder.mkdir(parents=True, exist_ok=True)
    settings = dict(
        time_budget_s=20, seq_len=32, corpus=str(corpus), tokenizer="byte", device="cpu", eval_tokens=4096,
        eval_batch=8, startup_allowance_s=30, eval_allowance_s=60, progress_interval_s=0.1,
    ) | config
    args = ", ".join(f"{key}={value!r}" for key, value in settings.items())
    prepare = f"from shared.target import TargetConfig, session\nCONFIG = TargetConfig({args})\n"
    (folder / "prepare.py").write_text(prepare)
    (folder / "program.md").write_text("# test target\n")
    source = train_py if train_py is not None else shrink((CPU_TARGET / "train.py").read_text(), **TINY_MODEL)
    (folder / "train.py").write_text(source)
    return folder


@pytest.fixture
def nats_server(tmp_path: Path):
    """A real nats-server with JetStream on a free loopback port, file storage in tmp_path."""
    from shared.nats_server import EmbeddedServer

    server = EmbeddedServer(tmp_path / "nats").start()
    yield server
    server.stop()
