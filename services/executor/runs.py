"""The executor's pure decisions: run ids, seeds, which progress to publish, when a loss has diverged."""

from __future__ import annotations

import math
import os
from pathlib import Path

from shared.events import ProposalCreated
from shared.target.records import Budget, Progress, RunResult, Status

CGROUP_MEMORY_LIMITS = (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))
"""cgroup v2, then v1: a container's memory limit, which the kernel enforces before the machine's runs out."""
EXPLODING_FACTOR = 2.0
"""A train loss above this multiple of the run's first loss is exploding: no recovery is worth the budget."""


def memory_available(cgroup_limits: tuple[Path, ...] = CGROUP_MEMORY_LIMITS) -> int:
    """Bytes this process may use: physical memory, or its container's cgroup limit where that is lower."""
    available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in cgroup_limits:
        try:
            limit = path.read_text().strip()
        except OSError:
            continue
        if limit.isdigit():  # v2 says "max" when there is none
            available = min(available, int(limit))
    return available


def run_id_for(proposal_id: str, attempt: int) -> str:
    """Each delivery of a proposal is its own run, so a redelivered proposal never reuses a dead run's id."""
    return f"{proposal_id[:48]}-{attempt}"


def seed_for(proposal: ProposalCreated, configured: int) -> int:
    """The proposal's own seed (a repeat measuring noise), else the configured one: searched edits all run
    under one seed, so that two of them differ by their code, not by their luck."""
    return configured if proposal.seed is None else proposal.seed


def unrun_result(status: Status, error: str, budget: Budget, seed: int, code_sha256: str = "") -> RunResult:
    """The record of a proposal that never reached training (bad diff, unknown parent)."""
    return RunResult(status=status, val_bpb=None, training_s=0.0, startup_s=0.0, total_s=0.0, steps=0, tokens=0,
                     peak_mem_mb=0.0, num_params=None, code_sha256=code_sha256, corpus_sha256="", tokenizer_id="",
                     eval_tokens=0, budget=str(budget), seed=seed, device="", sandbox="", error=error)


class DivergenceGuard:
    """Flags a run whose loss went non-finite or exploded (the executor aborts it; the evaluator
    handles the subtler case of a run that is merely losing)."""

    def __init__(self) -> None:
        self.first_loss: float | None = None

    def check(self, record: Progress) -> str | None:
        if record.nonfinite_loss:
            return f"train loss became non-finite at step {record.step}"
        if record.train_loss is None:
            return None
        if self.first_loss is None:
            self.first_loss = record.train_loss
        elif record.train_loss > EXPLODING_FACTOR * self.first_loss:
            return (f"train loss exploded to {record.train_loss:.3g} at step {record.step} "
                    f"(more than {EXPLODING_FACTOR:g}x its first value {self.first_loss:.3g})")
        return None


class ProgressThrottle:
    """At most one run.progress per interval, but never drop a phase change (started, evaluating)."""

    def __init__(self, interval_s: float, clock) -> None:
        self.interval_s = interval_s
        self.clock = clock
        self.last_sent = -math.inf
        self.last_phase: str | None = None

    def admit(self, record: Progress) -> bool:
        now = self.clock()
        if record.phase != self.last_phase or now - self.last_sent >= self.interval_s:
            self.last_sent, self.last_phase = now, record.phase
            return True
        return False
