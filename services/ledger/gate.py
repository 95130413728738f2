"""The keep gate: which finished runs make c*, judged one at a time in finished order.

val-bpb is noisy from run to run (false wins of 1e-4 to 1e-2 are common), so a run that beats bpb* is
not kept on its own word unless it wins by more than the noise:

- σ_noise is the pooled within-code standard deviation of ok val_bpb over every code with at least two ok
  runs, sqrt(Σ_g Σ_i (x_gi − x̄_g)² / Σ_g (n_g − 1)): the baseline's noise repeats start it, every
  confirmation (and any code the search happens to run twice) keeps it current. Unknown until some code
  has two ok runs.
- The first ok run (the baseline) is c* outright: there is nothing to beat.
- An ok search run with val_bpb < bpb* − m·σ_noise is a clear win: a *new best*, c* at once.
- One with bpb* − m·σ_noise <= val_bpb < bpb*, or any improvement while σ_noise is unknown, is
  *unconfirmed*: c* stays, and the proposer runs the same code again with a fresh seed. When that
  confirmation finishes ok, the candidate is *confirmed* (c*, with bpb* = the mean of its code's ok runs)
  if that mean beats bpb* at that moment, else *refuted*.
- A confirmation that does not finish ok (crashed, timed out, aborted, ...) is tried again once; a second
  failure refutes the candidate: a code that fails half its runs is no base to build on.
- m = 0 turns the gate off: every strict improvement is a new best.
- Repeats (noise, confirm) are measurements, never candidates themselves. A confirmation is a proposal
  that says so (purpose confirm, repeat_of the candidate) and runs the candidate's code: one that runs
  other code (an unknown parent, say) is only data, as if it had never been proposed.

Each run is judged with what was known before it finished, and nothing else: the same log always gives
the same verdicts, whether judged batch by batch or replayed in one go. Every verdict records the gate's
scalars after its run (bpb*, the pooled sums), so the ledger resumes the gate just before the earliest run
a batch touches (Gate.resume) and judges from there: the cost follows the batch, not the log.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import msgspec
from msgspec.structs import replace

Keep = Literal["new best", "unconfirmed", "confirmed", "refuted"]
CLAIMS: tuple[Keep, ...] = ("unconfirmed", "confirmed", "refuted")
"""The verdicts of a candidate: waiting for its confirmation, then what the confirmation decided."""
CONFIRM_ATTEMPTS = 2
"""Confirmation runs of one candidate at most: the first, and one retry if it did not finish ok."""


class Finished(msgspec.Struct, frozen=True):
    """One finished experiment, as the gate reads it (the fields are columns of `experiments`)."""

    proposal_id: str
    finished_seq: int
    status: str
    val_bpb: float | None
    code_sha256: str | None
    purpose: str
    repeat_of: str | None

    @property
    def ok(self) -> bool:
        return self.status == "ok" and self.val_bpb is not None and self.code_sha256 is not None


class Verdict(msgspec.Struct, frozen=True, kw_only=True):
    """The gate's columns of one experiment row (the ledger generates them from these fields)."""

    keep: Keep | None = None
    keep_seq: int | None = None
    """Stream sequence of the finish that settled `keep` (this run's own, or its confirmation's)."""
    keep_bpb: float | None = None
    """What the verdict rests on: this run's val_bpb for a new best, the mean of its code's ok runs for a
    confirmed or refuted candidate (bpb* from keep_seq on, if it became c*)."""
    beat_by: float | None = None
    """bpb* − val_bpb when this search run finished (negative: worse)."""
    sigma_noise: float | None = None
    """σ_noise when this run finished, before its own val_bpb counted."""
    bpb_star: float | None = None
    """bpb* once this run was judged: the best-so-far curve, row by row."""
    noise_ss: float = 0.0
    """Σ_g Σ_i (x_gi − x̄_g)² over the ok runs finished up to this one."""
    noise_dof: int = 0
    """Σ_g (n_g − 1) over the same runs."""

    @property
    def is_new_best(self) -> bool:
        """Whether this run's code became c*."""
        return self.keep in ("new best", "confirmed")


@dataclass
class CodeRuns:
    """Welford's running mean of one code's ok val_bpb."""

    n: int = 0
    mean: float = 0.0

    def add(self, value: float) -> float:
        """Count one more run; returns how much the code's Σ (x_i − x̄)² grew (so does the pooled sum)."""
        self.n += 1
        delta = value - self.mean
        self.mean += delta / self.n
        return delta * (value - self.mean)


@dataclass
class Pending:
    """An unconfirmed candidate awaiting its confirmation."""

    code_sha256: str
    failures: int = 0
    """Its confirmation runs that finished without a val_bpb."""


def sigma(noise_ss: float, noise_dof: int) -> float | None:
    """The pooled σ_noise, or None while no code has two ok runs."""
    return math.sqrt(noise_ss / noise_dof) if noise_dof else None


@dataclass
class Gate:
    """What the gate knows after some finished runs; judge() the next one, in finished order."""

    confirm_sigmas: float
    bpb_star: float | None = None
    """The confirmed bpb* (c* is the code of the last run whose verdict made it: the champions view)."""
    noise_ss: float = 0.0
    noise_dof: int = 0
    codes: dict[str, CodeRuns] = field(default_factory=dict)
    """Ok runs per code: every code whose runs are still to be judged must be here."""
    pending: dict[str, Pending] = field(default_factory=dict)
    """Unconfirmed candidates awaiting their confirmation, by proposal id."""
    verdicts: dict[str, Verdict] = field(default_factory=dict)
    """Every verdict given or changed since this gate was built, by proposal id; a pending candidate's
    must be here too, since its confirmation changes it."""

    @classmethod
    def resume(cls, confirm_sigmas: float, before: Sequence[tuple[Finished, Verdict]],
               runs: Sequence[Finished]) -> Gate:
        """The gate as it stood just before `runs` (in finished order), as far as judging them needs.

        `before` are the earlier runs of the codes of `runs` (which include the candidates `runs` confirm
        and their earlier confirmations), then the last run before `runs`, whose verdict holds bpb* and
        the pooled sums; each with its verdict, in finished order. Each code's runs are counted again in
        the same order, so the means are bit for bit those of a judgement from the start; a candidate
        still pending then has its verdict undone."""
        gate = cls(confirm_sigmas)
        if before:
            last = before[-1][1]
            gate.bpb_star, gate.noise_ss, gate.noise_dof = last.bpb_star, last.noise_ss, last.noise_dof
        since = runs[0].finished_seq if runs else 0
        claimed = {run.repeat_of for run in runs if run.purpose == "confirm"}
        codes = {run.code_sha256 for run in runs}
        for run, verdict in before:
            undecided = verdict.keep in CLAIMS and (verdict.keep_seq is None or verdict.keep_seq >= since)
            if run.proposal_id in claimed and undecided:
                assert run.code_sha256 is not None  # a candidate is an ok run
                gate.pending[run.proposal_id] = Pending(run.code_sha256)
                gate.verdicts[run.proposal_id] = replace(verdict, keep="unconfirmed", keep_seq=None, keep_bpb=None)
            elif (pending := gate._confirmed_by(run)) is not None and not run.ok:
                pending.failures += 1
            if run.ok and run.code_sha256 in codes:
                assert run.val_bpb is not None
                gate.codes.setdefault(run.code_sha256, CodeRuns()).add(run.val_bpb)
        return gate

    def judge(self, run: Finished) -> None:
        """Judge the next finished run; its verdict, and its candidate's if it is a confirmation, go to
        `verdicts`."""
        before = sigma(self.noise_ss, self.noise_dof)
        if run.ok:
            self._count(run)
        verdict = Verdict(sigma_noise=before, noise_ss=self.noise_ss, noise_dof=self.noise_dof)
        if run.ok and self.bpb_star is None:
            verdict = self._crown(run.val_bpb, replace(verdict, keep="new best"), run.finished_seq)
        elif run.ok and run.purpose == "search":
            verdict = self._search(run, verdict, before)
        elif (pending := self._confirmed_by(run)) is not None:
            self._confirmation(run, pending)
        self.verdicts[run.proposal_id] = replace(verdict, bpb_star=self.bpb_star)

    def _confirmed_by(self, run: Finished) -> Pending | None:
        """The pending candidate `run` is a confirmation of, if any."""
        pending = self.pending.get(run.repeat_of or "") if run.purpose == "confirm" else None
        return pending if pending is not None and pending.code_sha256 == run.code_sha256 else None

    def _count(self, run: Finished) -> None:
        assert run.code_sha256 is not None and run.val_bpb is not None
        runs = self.codes.setdefault(run.code_sha256, CodeRuns())
        if runs.n:
            self.noise_dof += 1
        self.noise_ss += runs.add(run.val_bpb)

    def _search(self, run: Finished, verdict: Verdict, before: float | None) -> Verdict:
        assert run.val_bpb is not None and run.code_sha256 is not None and self.bpb_star is not None
        verdict = replace(verdict, beat_by=self.bpb_star - run.val_bpb)
        if not run.val_bpb < self.bpb_star:
            return verdict
        margin = None if before is None else self.confirm_sigmas * before
        if self.confirm_sigmas == 0 or margin is not None and run.val_bpb < self.bpb_star - margin:
            return self._crown(run.val_bpb, replace(verdict, keep="new best"), run.finished_seq)
        self.pending[run.proposal_id] = Pending(run.code_sha256)
        return replace(verdict, keep="unconfirmed")

    def _confirmation(self, run: Finished, pending: Pending) -> None:
        candidate = run.repeat_of
        assert candidate is not None and self.bpb_star is not None
        if not run.ok:
            pending.failures += 1
            if pending.failures < CONFIRM_ATTEMPTS:
                return
        del self.pending[candidate]
        claimed = self.verdicts[candidate]
        mean = self.codes[pending.code_sha256].mean
        if run.ok and mean < self.bpb_star:
            self.verdicts[candidate] = self._crown(mean, replace(claimed, keep="confirmed"), run.finished_seq)
        else:
            self.verdicts[candidate] = replace(claimed, keep="refuted", keep_seq=run.finished_seq, keep_bpb=mean)

    def _crown(self, bpb: float | None, verdict: Verdict, seq: int) -> Verdict:
        """The run of `verdict` makes c*, with bpb* = `bpb` from stream sequence `seq` on."""
        self.bpb_star = bpb
        return replace(verdict, keep_seq=seq, keep_bpb=bpb)
