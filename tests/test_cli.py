"""The `autoresearch target` commands, as a user runs them."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
from conftest import make_target

from shared.cli import main
from shared.target.records import RunResult


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
