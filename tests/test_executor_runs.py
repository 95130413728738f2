"""The executor's pure decisions: divergence, progress throttling, run ids, seeds, unrun results."""

from __future__ import annotations

from pathlib import Path

import msgspec

from services.executor.runs import (
    DivergenceGuard,
    ProgressThrottle,
    memory_available,
    run_id_for,
    seed_for,
    unrun_result,
)
from shared.events import ProposalCreated, RunFinished, decode, encode, new_id, now
from shared.target.records import Budget, Progress


def training(step: int, loss: float | None, nonfinite: bool = False) -> Progress:
    return Progress(phase="training", step=step, train_loss=loss, nonfinite_loss=nonfinite)


def test_divergence_guard_flags_nan_and_explosions_only():
    guard = DivergenceGuard()
    assert guard.check(training(0, None)) is None  # no loss yet
    assert [guard.check(training(step, loss)) for step, loss in enumerate([7.6, 9.0, 5.0, 15.1], 1)] == [None] * 4
    assert "exploded to 15.3 at step 5" in guard.check(training(5, 15.3))
    assert "non-finite at step 6" in DivergenceGuard().check(training(6, None, nonfinite=True))


def test_throttle_admits_phase_changes_and_one_record_per_interval():
    clock = iter([0.0, 0.1, 0.2, 1.3, 1.4, 1.5]).__next__
    throttle = ProgressThrottle(1.0, clock)
    phases = ["started", "training", "training", "training", "training", "evaluating"]
    assert [throttle.admit(Progress(phase=phase)) for phase in phases] == [True, True, False, True, False, True]


def test_each_delivery_is_its_own_run_and_ids_are_subject_safe():
    assert run_id_for("a" * 64, 1) != run_id_for("a" * 64, 2)
    result = unrun_result("invalid", "op 0: line 9999 is past the end", Budget("steps", 10), seed=0)
    event = RunFinished(event_id=new_id(), producer="executor/t", ts=now(), run_id=run_id_for("a" * 64, 3),
                        proposal_id="a" * 64, executor_id="executor/t", result=result)
    assert decode(f"run.finished.{event.run_id}", encode(event)) == event


def test_a_proposal_with_a_seed_runs_under_it_and_any_other_under_the_configured_one():
    proposal = ProposalCreated(event_id=new_id(), producer="proposer/t", ts=now(), proposal_id="p", ops=[],
                               parent_code_sha256="a" * 64, unified_diff="", policy="t", policy_version="0")
    assert seed_for(proposal, configured=3) == 3
    assert seed_for(msgspec.structs.replace(proposal, seed=11, purpose="noise"), configured=3) == 11


def test_memory_available_is_the_lower_of_the_machine_and_its_container(tmp_path: Path):
    physical = memory_available(())
    v2, v1 = tmp_path / "memory.max", tmp_path / "memory.limit_in_bytes"
    v2.write_text("max\n")  # no limit
    v1.write_text(f"{2**63 - 4096}\n")  # v1's "no limit"
    assert memory_available((v2, v1, tmp_path / "absent")) == physical
    v2.write_text(f"{2**30}\n")  # a pod with 1 GiB
    assert memory_available((v2, v1)) == 2**30
