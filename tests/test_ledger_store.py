"""The ledger file: exactly-once appends, projections equal to their replay, c* and h, fenced SQL, HTTP API."""

from __future__ import annotations

import asyncio
import math
import random
import statistics
from pathlib import Path

import duckdb
import numpy as np
import pytest
from fastapi.testclient import TestClient

from services.ledger.api import create_app
from services.ledger.projections import PROJECTION_TABLES
from services.ledger.sql import QueryRefused
from services.ledger.store import Ledger
from shared.bus import Delivered
from shared.config import Config, ConfigError, load_config
from shared.diffs import EMPTY_SHA256, code_sha256
from shared.events import (
    EditOp,
    PolicyUpdated,
    PPOStats,
    ProposalCreated,
    Purpose,
    RunAborted,
    RunFinished,
    RunProgress,
    encode,
    new_id,
    now,
    subject,
)
from shared.target.records import RunResult, Status

BASELINE = "lr = 0.1\nsteps = 10\n"


def variant(n: int) -> str:
    return f"lr = 0.{n}\nsteps = 10\n"


class Log:
    """Events of shared/events.py delivered in stream order (seq 1, 2, ...), as the ledger receives them."""

    def __init__(self) -> None:
        self.seq = 0

    def deliver(self, *events) -> list[Delivered]:
        out = []
        for event in events:
            self.seq += 1
            out.append(Delivered(self.seq, subject(event), encode(event)))
        return out

    @staticmethod
    def propose(parent: str, child: str, ops: list[EditOp] | None = None, parent_sha: str | None = None,
                proposal_id: str | None = None) -> ProposalCreated:
        if ops is None:  # the whole file: inserted into the empty file, or replacing every parent line
            ops = [EditOp("insert", 1, 0, child)] if not parent else [EditOp("replace", 1, parent.count("\n"), child)]
        sha = parent_sha if parent_sha is not None else (code_sha256(parent) if parent else EMPTY_SHA256)
        return ProposalCreated(event_id=new_id(), producer="proposer/test", ts=now(),
                               proposal_id=proposal_id or new_id(), parent_code_sha256=sha, ops=ops,
                               unified_diff=f"-{parent!r}\n+{child!r}", policy="test", policy_version="v0",
                               logprob=-1.5, value=0.25, rationale="because")

    @staticmethod
    def progress(proposal: ProposalCreated, run_id: str, step: int = 0) -> RunProgress:
        return RunProgress(event_id=new_id(), producer="executor/test", ts=now(), run_id=run_id,
                           proposal_id=proposal.proposal_id, executor_id="executor/test", phase="training",
                           elapsed_train_s=step * 0.5, step=step, train_loss=3.0 - step * 0.01, tokens=step * 64,
                           peak_mem_mb=100.0)

    @staticmethod
    def finish(proposal: ProposalCreated, run_id: str, code: str, status: Status = "ok",
               val_bpb: float | None = 1.5) -> RunFinished:
        result = RunResult(status=status, val_bpb=val_bpb if status == "ok" else None, training_s=30.0, startup_s=2.0,
                           total_s=35.0, steps=100, tokens=6400, peak_mem_mb=120.0, num_params=1000,
                           code_sha256=code_sha256(code), corpus_sha256="c" * 64, tokenizer_id="byte", eval_tokens=4096,
                           budget="30 seconds", seed=proposal.seed or 0, device="cpu", sandbox="none",
                           error=None if status == "ok" else f"{status}!", error_tail=None)
        return RunFinished(event_id=new_id(), producer="executor/test", ts=now(), run_id=run_id,
                           proposal_id=proposal.proposal_id, executor_id="executor/test", result=result)

    @staticmethod
    def abort(run_id: str, commentary: str = "forecast 1.61 ± 0.02 cannot beat τ 1.52") -> RunAborted:
        return RunAborted(event_id=new_id(), producer="evaluator/test", ts=now(), run_id=run_id, at_train_s=10.0,
                          forecast=1.61, forecast_low=1.59, forecast_high=1.63, threshold=1.52, statistic=3.1,
                          boundary=2.5, commentary=commentary)

    @staticmethod
    def repeat(code: str, of: ProposalCreated, purpose: Purpose, seed: int) -> ProposalCreated:
        """A run of `code` again with another seed: no ops, the code itself as the parent."""
        return ProposalCreated(event_id=new_id(), producer="proposer/test", ts=now(), proposal_id=new_id(),
                               parent_code_sha256=code_sha256(code), ops=[], unified_diff="", policy="test",
                               policy_version="v0", seed=seed, repeat_of=of.proposal_id, purpose=purpose)

    def experiment(self, parent: str, child: str, status: Status = "ok", val_bpb: float | None = 1.5,
                   progress: int = 3) -> tuple[ProposalCreated, list[Delivered]]:
        """A whole experiment: proposal, some progress, the end (and the abort before an aborted end)."""
        proposal = self.propose(parent, child)
        return proposal, self.deliver(proposal) + self.run(proposal, child, status, val_bpb, progress)

    def run(self, proposal: ProposalCreated, code: str, status: Status = "ok", val_bpb: float | None = 1.5,
            progress: int = 3) -> list[Delivered]:
        """The run of a proposal already delivered: some progress, the end (an abort before an aborted end)."""
        run_id = f"{proposal.proposal_id[:8]}-1"
        events = [*(self.progress(proposal, run_id, step) for step in range(progress))]
        if status == "aborted":
            events.append(self.abort(run_id))
        events.append(self.finish(proposal, run_id, code, status, val_bpb))
        return self.deliver(*events)


@pytest.fixture
def ledger(tmp_path: Path):
    ledger = Ledger(tmp_path / "ledger.duckdb")
    yield ledger
    ledger.close()


def tables(ledger: Ledger) -> dict[str, list[tuple]]:
    """Every projection table, sorted, for row-for-row comparison."""
    con = ledger._con.cursor()
    try:
        return {name: sorted(con.execute(f"SELECT * FROM {name}").fetchall(), key=repr) for name in PROJECTION_TABLES}
    finally:
        con.close()


# -- exactly once --------------------------------------------------------------------------------


def test_append_is_exactly_once(ledger: Ledger):
    log = Log()
    _, batch = log.experiment("", BASELINE)
    first = ledger.append(batch)
    assert (first.appended, first.duplicates, first.bad, first.cursor) == (len(batch), 0, 0, log.seq)

    again = ledger.append(batch)  # a redelivered batch: every seq is <= cursor
    assert (again.appended, again.duplicates, again.cursor) == (0, 0, log.seq)

    proposal = Log.propose("", "x = 1\n")
    retried = log.deliver(proposal, proposal)  # a publish retried after the duplicate window: two seqs, one id
    report = ledger.append(retried)
    assert (report.appended, report.duplicates, report.cursor) == (1, 1, log.seq)
    later = ledger.append(log.deliver(proposal))  # ... or the retry lands in a later batch (the slow path)
    assert (later.appended, later.duplicates, later.cursor) == (0, 1, log.seq)

    stale = Delivered(1, subject(proposal), encode(Log.propose("", "y = 2\n")))  # below the cursor: skipped
    assert ledger.append([stale]).appended == 0
    count = ledger.query("SELECT count(*), count(DISTINCT event_id) FROM events").rows[0]
    assert count == [len(batch) + 1, len(batch) + 1]
    assert ledger.state().experiments == 2


def test_cursor_survives_reopen_and_reads_only(tmp_path: Path):
    path = tmp_path / "ledger.duckdb"
    log = Log()
    writer = Ledger(path)
    writer.append(log.experiment("", BASELINE, val_bpb=1.7)[1])
    expected = writer.state()
    writer.close()

    reader = Ledger(path, read_only=True)
    try:
        assert reader.cursor == log.seq
        assert reader.state() == expected
        assert reader.code(expected.c_star_sha256) == BASELINE
        with pytest.raises(duckdb.Error):
            reader.append(log.experiment(BASELINE, variant(2))[1])
        assert reader.query("SELECT count(*) FROM experiments").rows == [[1]]
    finally:
        reader.close()


def test_bad_payloads_are_recorded_not_raised(ledger: Ledger):
    log = Log()
    proposal = Log.propose("", BASELINE)
    progress = Log.progress(proposal, "run-1")
    batch = [
        Delivered(1, "proposal.created", b"{not json"),
        Delivered(2, "run.progress.other-run", encode(progress)),  # subject and run_id disagree
        Delivered(3, "nonsense.subject", b"{}"),
        Delivered(4, "proposal.created", b"\xff\xfe"),
    ]
    log.seq = 4
    batch += log.deliver(proposal)
    report = ledger.append(batch)
    assert (report.appended, report.bad, report.cursor) == (1, 4, 5)
    bad = ledger.query("SELECT seq, subject, reason FROM bad_events ORDER BY seq").rows
    assert [row[0] for row in bad] == [1, 2, 3, 4]
    assert "malformed ProposalCreated" in bad[0][2]
    assert "does not match run_id" in bad[1][2]
    assert "no event is defined" in bad[2][2]
    assert all(row[2] for row in bad)


# -- c* and the keep gate ------------------------------------------------------------------------


def test_gate_off_keeps_every_strict_improvement(tmp_path: Path):
    ledger = Ledger(tmp_path / "ledger.duckdb", confirm_sigmas=0)
    log = Log()
    assert ledger.state().c_star_sha256 is None
    ledger.append(log.experiment("", BASELINE, val_bpb=1.50)[1])
    state = ledger.state()
    assert (state.bpb_star, state.c_star_code, state.since_best, state.confirm_sigmas) == (1.50, BASELINE, 0, 0)

    steps = [(variant(2), "ok", 1.60, 1.50, BASELINE),       # worse: revert
             (variant(3), "ok", 1.40, 1.40, variant(3)),      # better: keep
             (variant(4), "crashed", None, 1.40, variant(3)),  # crashed: revert
             (variant(5), "aborted", None, 1.40, variant(3)),  # aborted by the evaluator: revert
             (variant(6), "ok", 1.40, 1.40, variant(3))]      # equal: not strictly better, revert
    for child, status, bpb, bpb_star, c_star in steps:
        parent = ledger.state().c_star_code
        ledger.append(log.experiment(parent, child, status, bpb)[1])
        state = ledger.state()
        assert (state.bpb_star, state.c_star_code) == (bpb_star, c_star), child
        assert state.c_star_sha256 == code_sha256(c_star)
    assert state.since_best == 3 and state.finished == 6 and state.outstanding == 0 and state.candidates == []
    champions = ledger.query("SELECT val_bpb, improvement FROM champions ORDER BY finished_seq").rows
    assert champions[0] == [1.50, None] and champions[1][0] == 1.40
    assert champions[1][1] == pytest.approx(0.10)
    statuses = ledger.query("SELECT status, abort_commentary IS NOT NULL, keep FROM experiments "
                            "ORDER BY proposal_seq").rows
    assert [s for s, _, _ in statuses] == ["ok", "ok", "ok", "crashed", "aborted", "ok"]
    assert [a for _, a, _ in statuses] == [False, False, False, False, True, False]
    assert [k for _, _, k in statuses] == ["new best", None, "new best", None, None, None]
    ledger.close()


def noisy_baseline(ledger: Ledger, log: Log, bpbs: tuple[float, ...] = (1.50, 1.51, 1.49)) -> ProposalCreated:
    """The baseline, then its noise repeats with fresh seeds: σ_noise = 0.01 with the default values."""
    baseline, batch = log.experiment("", BASELINE, val_bpb=bpbs[0])
    ledger.append(batch)
    for seed, bpb in enumerate(bpbs[1:], 1):
        repeat = Log.repeat(BASELINE, baseline, "noise", seed)
        ledger.append(log.deliver(repeat) + log.run(repeat, BASELINE, val_bpb=bpb))
    return baseline


def confirm(ledger: Ledger, log: Log, candidate: ProposalCreated, code: str, status: Status = "ok",
            val_bpb: float | None = 1.5, seed: int = 7) -> ProposalCreated:
    """Propose a confirmation of `candidate` and run it."""
    repeat = Log.repeat(code, candidate, "confirm", seed)
    ledger.append(log.deliver(repeat) + log.run(repeat, code, status, val_bpb))
    return repeat


def column(ledger: Ledger, proposal: ProposalCreated, name: str):
    (value,), = ledger.query(f"SELECT {name} FROM experiments WHERE proposal_id = '{proposal.proposal_id}'").rows
    return value


def pooled_sd(groups: list[list[float]]) -> float:
    return math.sqrt(sum(((np.array(g) - np.mean(g)) ** 2).sum() for g in groups) / sum(len(g) - 1 for g in groups))


def test_sigma_noise_is_the_pooled_within_code_standard_deviation(ledger: Ledger):
    log = Log()
    state = ledger.state()
    assert (state.sigma_noise, state.noise_dof, state.noise_runs, state.baseline_proposal_id) == (None, 0, 0, None)
    baseline = noisy_baseline(ledger, log, (1.5013, 1.5102, 1.4931))
    state = ledger.state()
    assert (state.noise_dof, state.noise_runs, state.baseline_proposal_id) == (2, 2, baseline.proposal_id)
    assert state.sigma_noise == pytest.approx(pooled_sd([[1.5013, 1.5102, 1.4931]]), rel=1e-12)

    win, batch = log.experiment(BASELINE, variant(2), val_bpb=1.4472)  # a clear win: no candidate
    ledger.append(batch)
    for seed, status, bpb in [(3, "ok", 1.4618), (4, "crashed", None), (5, "ok", 1.4807)]:
        repeat = Log.repeat(variant(2), win, "noise", seed)  # any repeat counts, crashed ones do not
        ledger.append(log.deliver(repeat) + log.run(repeat, variant(2), status, bpb))
    ledger.append(log.experiment(variant(2), variant(3), val_bpb=1.6)[1])  # one run of a code: no spread
    state = ledger.state()
    groups = [[1.5013, 1.5102, 1.4931], [1.4472, 1.4618, 1.4807]]
    assert state.noise_dof == 4 and state.noise_runs == 5
    assert state.sigma_noise == pytest.approx(pooled_sd(groups), rel=1e-12)
    seeds = ledger.query("SELECT seed FROM experiments WHERE purpose = 'noise' ORDER BY proposal_seq").rows
    assert seeds == [[1], [2], [3], [4], [5]]


def test_a_clear_win_becomes_c_star_at_once(ledger: Ledger):
    log = Log()
    baseline = noisy_baseline(ledger, log)
    state = ledger.state()
    assert (state.bpb_star, state.c_star_code, state.confirm_sigmas) == (1.50, BASELINE, 2.0)
    assert state.sigma_noise == pytest.approx(0.01)
    win, batch = log.experiment(BASELINE, variant(2), val_bpb=1.47)  # beats bpb* by 0.03 > 2σ_noise = 0.02
    ledger.append(batch)
    state = ledger.state()
    assert (state.bpb_star, state.c_star_code, state.since_best, state.candidates) == (1.47, variant(2), 0, [])
    keeps = ledger.query("SELECT purpose, keep, is_new_best FROM experiments ORDER BY finished_seq").rows
    assert keeps == [["search", "new best", True], ["noise", None, False], ["noise", None, False],
                     ["search", "new best", True]]
    assert column(ledger, win, "beat_by") == pytest.approx(0.03)
    assert column(ledger, win, "sigma_noise") == pytest.approx(0.01)
    champions = ledger.query("SELECT proposal_id, val_bpb, keep FROM champions ORDER BY finished_seq").rows
    assert champions == [[baseline.proposal_id, 1.50, "new best"], [win.proposal_id, 1.47, "new best"]]


def test_a_small_win_is_kept_only_once_a_repeat_confirms_it(ledger: Ledger):
    log = Log()
    noisy_baseline(ledger, log)
    small, batch = log.experiment(BASELINE, variant(3), val_bpb=1.49)  # beats bpb* by 0.01 < 2σ_noise
    ledger.append(batch)
    state = ledger.state()
    assert (state.bpb_star, state.c_star_code, state.since_best) == (1.50, BASELINE, 3)  # noise runs count
    (candidate,) = state.candidates
    assert (candidate.proposal_id, candidate.code_sha256, candidate.val_bpb) == (small.proposal_id,
                                                                                 code_sha256(variant(3)), 1.49)
    assert (candidate.confirmations, candidate.failed) == (0, 0)
    assert candidate.beat_by == pytest.approx(0.01) and candidate.sigma_noise == pytest.approx(0.01)
    assert ledger.query("SELECT count(*) FROM champions").rows == [[1]]
    assert ledger.query("SELECT proposal_id, keep FROM candidates").rows == [[small.proposal_id, "unconfirmed"]]

    repeat = Log.repeat(variant(3), small, "confirm", seed=7)
    ledger.append(log.deliver(repeat))
    assert ledger.state().candidates[0].confirmations == 1  # proposed, not finished: nothing decided yet
    ledger.append(log.run(repeat, variant(3), val_bpb=1.485))
    state = ledger.state()
    assert (state.c_star_code, state.since_best, state.candidates) == (variant(3), 0, [])
    assert state.bpb_star == pytest.approx(1.4875)  # the mean of its code's two runs
    assert column(ledger, small, "keep") == "confirmed" and column(ledger, small, "is_new_best")
    assert column(ledger, repeat, "keep") is None and not column(ledger, repeat, "is_new_best")
    assert [column(ledger, repeat, name) for name in ("purpose", "repeat_of", "seed", "code_sha256")] == [
        "confirm", small.proposal_id, 7, code_sha256(variant(3))]  # no ops: the code it repeats
    last = ledger.query("SELECT proposal_id, val_bpb, keep, finished_seq, improvement FROM champions "
                        "ORDER BY finished_seq DESC LIMIT 1").rows[0]
    assert last[:3] == [small.proposal_id, pytest.approx(1.4875), "confirmed"]
    assert last[3] == column(ledger, repeat, "finished_seq") and last[4] == pytest.approx(0.0125)
    assert state.sigma_noise == pytest.approx(pooled_sd([[1.50, 1.51, 1.49], [1.49, 1.485]]))


def test_a_small_win_that_a_repeat_does_not_confirm_is_refuted(ledger: Ledger):
    log = Log()
    noisy_baseline(ledger, log)
    small, batch = log.experiment(BASELINE, variant(4), val_bpb=1.495)
    ledger.append(batch)
    confirm(ledger, log, small, variant(4), val_bpb=1.52)  # mean 1.5075: no better than bpb* 1.50
    state = ledger.state()
    assert (state.bpb_star, state.c_star_code, state.candidates, state.since_best) == (1.50, BASELINE, [], 4)
    refuted = ledger.query("SELECT proposal_id, keep, keep_bpb FROM candidates").rows
    assert refuted == [[small.proposal_id, "refuted", pytest.approx(1.5075)]]
    assert ledger.query("SELECT count(*) FROM champions").rows == [[1]]


def test_a_crashed_confirmation_is_tried_again_once(ledger: Ledger):
    log = Log()
    noisy_baseline(ledger, log)
    lucky, batch = log.experiment(BASELINE, variant(5), val_bpb=1.49)
    ledger.append(batch)
    confirm(ledger, log, lucky, variant(5), "crashed", None)
    (candidate,) = ledger.state().candidates
    assert (candidate.confirmations, candidate.failed) == (1, 1) and column(ledger, lucky, "keep") == "unconfirmed"
    confirm(ledger, log, lucky, variant(5), "ok", 1.48)  # the retry decides: mean 1.485 < 1.50
    assert ledger.state().c_star_code == variant(5) and column(ledger, lucky, "keep") == "confirmed"

    flaky, batch = log.experiment(variant(5), variant(6), val_bpb=1.48)
    ledger.append(batch)
    confirm(ledger, log, flaky, variant(6), "timeout", None)
    confirm(ledger, log, flaky, variant(6), "crashed", None)  # two failures: refuted
    state = ledger.state()
    assert state.candidates == [] and state.c_star_code == variant(5)
    assert column(ledger, flaky, "keep") == "refuted" and column(ledger, flaky, "keep_bpb") == 1.48


def test_every_win_waits_for_its_confirmation_while_sigma_noise_is_unknown(ledger: Ledger):
    log = Log()
    ledger.append(log.experiment("", BASELINE, val_bpb=1.5)[1])  # no noise repeats: σ_noise unknown
    big, batch = log.experiment(BASELINE, variant(2), val_bpb=1.2)
    ledger.append(batch)
    state = ledger.state()
    assert state.sigma_noise is None and state.bpb_star == 1.5 and state.candidates[0].proposal_id == big.proposal_id
    confirm(ledger, log, big, variant(2), val_bpb=1.22)
    state = ledger.state()
    assert state.c_star_code == variant(2) and state.bpb_star == pytest.approx(1.21)
    assert state.sigma_noise == pytest.approx(pooled_sd([[1.2, 1.22]])) and state.noise_dof == 1


def test_another_gate_replays_on_open_and_none_keeps_the_files(tmp_path: Path):
    path, log = tmp_path / "ledger.duckdb", Log()
    ledger = Ledger(path)
    noisy_baseline(ledger, log)
    small, batch = log.experiment(BASELINE, variant(3), val_bpb=1.49)
    ledger.append(batch)
    ledger.close()
    for confirm_sigmas, keep, bpb_star in [(None, "unconfirmed", 1.50), (0, "new best", 1.49),
                                           (None, "new best", 1.49), (2.0, "unconfirmed", 1.50)]:
        ledger = Ledger(path, confirm_sigmas=confirm_sigmas)
        state = ledger.state()
        assert (column(ledger, small, "keep"), state.bpb_star) == (keep, bpb_star), confirm_sigmas
        assert state.confirm_sigmas == (2.0 if keep == "unconfirmed" else 0)
        ledger.close()


# -- history, sigma_h -----------------------------------------------------------------------------


def test_status_queued_running_and_first_finish_wins(ledger: Ledger):
    log = Log()
    proposal = Log.propose("", BASELINE)
    ledger.append(log.deliver(proposal))
    assert _status(ledger, proposal) == ("queued", None)
    assert ledger.state().outstanding == 1 and not ledger.finished(proposal.proposal_id)

    ledger.append(log.deliver(Log.progress(proposal, "run-1")))
    assert _status(ledger, proposal) == ("running", "run-1")
    ledger.append(log.deliver(Log.progress(proposal, "run-2")))  # redelivered to another executor
    assert _status(ledger, proposal) == ("running", "run-2")

    ledger.append(log.deliver(Log.finish(proposal, "run-2", BASELINE, "crashed"),
                              Log.finish(proposal, "run-1", BASELINE, "ok", 1.2)))
    assert _status(ledger, proposal) == ("crashed", "run-2")
    assert ledger.finished(proposal.proposal_id) and ledger.state().c_star_sha256 is None


def _status(ledger: Ledger, proposal: ProposalCreated) -> tuple:
    rows = ledger.query(f"SELECT status, run_id FROM experiments WHERE proposal_id = '{proposal.proposal_id}'").rows
    return tuple(rows[0])


def test_history_buffer_top5_and_sigma_h(ledger: Ledger):
    log = Log()
    ledger.append(log.experiment("", BASELINE, val_bpb=2.0)[1])
    assert ledger.state().sigma_h is None  # one ok run: no spread yet
    bpbs = [2.0]
    for n in range(1, 41):  # val_bpb goes 1.0 (best, early) ... up; every 7th run crashes
        status: Status = "crashed" if n % 7 == 0 else "ok"
        bpb = 1.0 + n * 0.01 if n < 6 else 1.5 + (n % 5) * 0.01
        ledger.append(log.experiment(BASELINE, variant(n), status, bpb)[1])
        bpbs.append(bpb if status == "ok" else None)
    state = ledger.state()
    assert state.finished == 41
    recent = bpbs[-32:]
    assert state.sigma_h == pytest.approx(statistics.stdev([b for b in recent if b is not None]))

    whys = [entry.why for entry in state.history]
    assert whys.count("recent") + whys.count("both") == 32
    top = sorted((entry for entry in state.history if entry.why in ("top", "both")), key=lambda e: e.val_bpb)
    assert [entry.val_bpb for entry in top] == pytest.approx([1.01, 1.02, 1.03, 1.04, 1.05])
    assert len(state.history) == 37  # the five best finished before the last 32
    assert all(entry.unified_diff for entry in state.history)
    assert [entry.status for entry in state.history].count("crashed") == sum(b is None for b in recent)

    small = ledger.state(recent=4, top=2)
    assert len(small.history) == 6 and [e.why for e in small.history][:2] == ["top", "top"]
    assert ledger.query("SELECT count(*) FROM history").rows == [[37]]


def test_no_code_blob_for_unknown_parent_or_invalid_diff(ledger: Ledger):
    log = Log()
    baseline, batch = log.experiment("", BASELINE)
    unknown = Log.propose("x = 1\n", "x = 2\n")  # nobody ever produced the parent
    invalid = Log.propose(BASELINE, variant(9), ops=[EditOp("replace", 40, 50, "nope\n")])
    good = Log.propose(BASELINE, variant(8))
    ledger.append(batch + log.deliver(unknown, invalid, good))
    rows = dict((r[0], r[1:]) for r in ledger.query("SELECT proposal_id, code_sha256, code_error FROM proposals").rows)
    assert rows[unknown.proposal_id][0] is None and "unknown parent" in rows[unknown.proposal_id][1]
    assert rows[invalid.proposal_id][0] is None and "invalid diff" in rows[invalid.proposal_id][1]
    assert rows[good.proposal_id] == [code_sha256(variant(8)), None]
    assert ledger.code(code_sha256(variant(8))) == variant(8)
    assert ledger.code(code_sha256("x = 2\n")) is None
    assert ledger.code(EMPTY_SHA256) == ""
    assert ledger.query("SELECT count(*) FROM code_blobs").rows == [[2]]


# -- replay --------------------------------------------------------------------------------------


def busy_log() -> list[Delivered]:
    """Every kind of event and every awkward case: duplicates, redeliveries, bad messages, aborts, and every
    verdict of the keep gate (σ_noise = 0.0707 from the first two runs: variant(1) is the baseline's code)."""
    log = Log()
    baseline, out = log.experiment("", BASELINE, val_bpb=1.5)
    search = {}
    for n, (status, bpb) in enumerate([("ok", 1.6), ("ok", 1.4), ("aborted", None), ("crashed", None),
                                       ("ok", 1.4), ("ok", 1.3), ("invalid", None)], start=1):
        search[n], batch = log.experiment(BASELINE, variant(n), status, bpb, progress=n)
        out += batch  # 2 and 5: unconfirmed; 6: a new best (bpb* 1.3)
    again = Log.propose(BASELINE, variant(20))
    out += log.deliver(again, Log.progress(again, "a-1"), Log.progress(again, "a-2"),  # redelivered: two runs
                       Log.finish(again, "a-1", variant(20), "ok", 1.2),
                       Log.finish(again, "a-2", variant(20), "ok", 1.1))
    out += log.deliver(again)  # the same event id at a later sequence; 1.2: unconfirmed
    for candidate, code, status, bpb in [(search[2], variant(2), "ok", 1.35),  # refuted: mean 1.375
                                         (search[5], variant(5), "crashed", None),
                                         (search[5], variant(5), "ok", 1.25),  # the retry refutes: mean 1.325
                                         (again, variant(20), "ok", 1.21),  # confirmed: bpb* 1.205
                                         (again, variant(20), "ok", 1.3)]:  # decided already: only data
        repeat = Log.repeat(code, candidate, "confirm", seed=log.seq)
        out += log.deliver(repeat) + log.run(repeat, code, status, bpb)
    noise = Log.repeat(BASELINE, baseline, "noise", seed=log.seq)
    out += log.deliver(noise) + log.run(noise, BASELINE, val_bpb=1.55)
    pending, batch = log.experiment(variant(20), variant(23), val_bpb=1.19)  # unconfirmed, and its
    failed = Log.repeat(variant(23), pending, "confirm", seed=log.seq)  # confirmation crashes once: still waiting
    out += batch + log.deliver(failed) + log.run(failed, variant(23), "crashed", None)
    out += log.deliver(Log.propose(BASELINE, variant(21), proposal_id=again.proposal_id))  # same proposal id, new event
    out += log.deliver(Log.propose(BASELINE, variant(22)), Log.propose("z\n", "zz\n"))  # queued; unknown parent
    out += log.deliver(PolicyUpdated(event_id=new_id(), producer="learner/test", ts=now(), policy_version="v1",
                                     adapter_name="adapter-v1", adapter_sha256="a" * 64,
                                     stats=PPOStats(policy_loss=0.1, value_loss=0.2, entropy=1.0, approx_kl=0.01,
                                                    clip_fraction=0.1, mean_reward=0.05)))
    out += log.deliver(Log.abort(f"{baseline.proposal_id[:8]}-1", "late"))  # about the first run, long finished
    log.seq += 1
    out.append(Delivered(log.seq, "run.finished.x", b"{}"))
    return out


@pytest.mark.parametrize("batch_size", [1, 7, 1000])
def test_replay_rebuilds_identical_tables(tmp_path: Path, batch_size: int):
    deliveries = busy_log()
    ledger = Ledger(tmp_path / "ledger.duckdb")
    try:
        for start in range(0, len(deliveries), batch_size):
            ledger.append(deliveries[start:start + batch_size])
        incremental, state = tables(ledger), ledger.state()
        assert incremental["experiments"] and incremental["champions"] and incremental["policy_updates"]
        assert ledger.query("SELECT abort_commentary FROM experiments ORDER BY proposal_seq LIMIT 1").rows == [["late"]]
        rows = ledger.replay()
        assert tables(ledger) == incremental
        assert ledger.state() == state
        assert rows == {name: len(incremental[name]) for name in PROJECTION_TABLES}
        keeps = ledger.query("SELECT keep, count(*) FROM experiments GROUP BY keep").rows
    finally:
        ledger.close()
    assert state.bpb_star == pytest.approx(1.205) and state.c_star_code == variant(20) and state.outstanding == 2
    assert [(c.code_sha256, c.confirmations, c.failed) for c in state.candidates] == [(code_sha256(variant(23)), 1, 1)]
    assert dict(keeps) == {"new best": 2, "confirmed": 1, "refuted": 2, "unconfirmed": 1, None: 13}


def shuffled_log(rng: random.Random) -> list[Delivered]:
    """Search runs and repeats (confirmations mostly, some of other code), some failing, finishing out of order."""
    log, running = Log(), []
    baseline, out = log.experiment("", BASELINE, val_bpb=1.5)
    proposed = [(baseline, BASELINE)]
    for _ in range(40):
        if rng.random() < 0.45:
            of, code = rng.choice(proposed[-4:])
            code = variant(rng.randrange(12)) if rng.random() < 0.1 else code
            proposal = Log.repeat(code, of, rng.choice(["noise", "confirm", "confirm"]), seed=log.seq)
        else:
            code = variant(rng.randrange(12))
            proposal = Log.propose(BASELINE, code)
            proposed.append((proposal, code))
        out += log.deliver(proposal)
        running.append((proposal, code, rng.choice(["ok", "ok", "ok", "crashed"]), round(rng.gauss(1.45, 0.03), 4)))
        while running and rng.random() < 0.6:
            proposal, code, status, bpb = running.pop(rng.randrange(len(running)))
            out += log.run(proposal, code, status, bpb, progress=rng.randrange(2))
    for proposal, code, status, bpb in running:
        out += log.run(proposal, code, status, bpb, progress=0)
    return out + log.deliver(Log.abort(f"{baseline.proposal_id[:8]}-1", "late"))


@pytest.mark.parametrize("seed", [6, 12, 15, 29])  # logs with every verdict: confirmed, refuted, unconfirmed
def test_the_gate_resumed_batch_by_batch_judges_as_a_replay_does(tmp_path: Path, seed: int):
    rng = random.Random(seed)
    deliveries = shuffled_log(rng)
    ledger = Ledger(tmp_path / "ledger.duckdb", confirm_sigmas=1.0)
    try:
        start = 0
        while start < len(deliveries):
            size = rng.randint(1, 12)
            ledger.append(deliveries[start:start + size])
            start += size
        incremental, state = tables(ledger), ledger.state()
        ledger.replay()
        assert tables(ledger) == incremental and ledger.state() == state
    finally:
        ledger.close()


def test_changed_projection_code_replays_on_open(tmp_path: Path):
    path = tmp_path / "ledger.duckdb"
    ledger = Ledger(path)
    ledger.append(busy_log())
    expected = tables(ledger)
    ledger._con.execute("DELETE FROM experiments")
    ledger._con.execute("UPDATE meta SET value = 'built-by-older-code' WHERE key = 'projections'")
    ledger.close()
    reopened = Ledger(path)
    try:
        assert tables(reopened) == expected
    finally:
        reopened.close()


# -- user SQL ------------------------------------------------------------------------------------


@pytest.mark.parametrize("sql", [
    "INSERT INTO events VALUES (1, 'x', 'y', 'z', now()::timestamp, 'p', NULL, NULL, '{}')",
    "UPDATE cursor SET seq = 0",
    "DELETE FROM events",
    "CREATE TABLE t (a INT)",
    "DROP TABLE events",
    "ATTACH '/tmp/other.duckdb' AS other",
    "COPY events TO '/tmp/events.csv'",
    "EXPORT DATABASE '/tmp/dump'",
    "INSTALL httpfs",
    "LOAD httpfs",
    "SET enable_external_access = true",
    "RESET lock_configuration",
    "PRAGMA enable_profiling",
    "CALL pragma_version()",
    "CHECKPOINT",
    "EXPLAIN ANALYZE DELETE FROM events",
    "WITH d AS (DELETE FROM events RETURNING *) SELECT count(*) FROM d",
    "SELECT * FROM events WHERE seq IN (WITH d AS (DELETE FROM events RETURNING seq) SELECT seq FROM d)",
    "EXPLAIN ANALYZE WITH d AS (UPDATE cursor SET seq = 0 RETURNING *) SELECT * FROM d",
    "WITH d AS (INSERT INTO meta VALUES ('a', 'b') RETURNING *) SELECT * FROM d",
    "SELECT 1; DELETE FROM events",
    "SELECT 1; SELECT 2",
    "",
    "SELEC 1",
])
def test_sql_refusals(ledger: Ledger, sql: str):
    ledger.append(Log().experiment("", BASELINE)[1])
    with pytest.raises(QueryRefused):
        ledger.query(sql)
    assert ledger.query("SELECT count(*) FROM events").rows == [[5]]


@pytest.mark.parametrize("sql", [
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM read_text('/etc/passwd')",
    "SELECT * FROM glob('/etc/*')",
    "SELECT * FROM read_parquet('/tmp/x.parquet')",
    "SELECT * FROM '/etc/passwd'",
])
def test_sql_cannot_touch_files(ledger: Ledger, sql: str):
    with pytest.raises(duckdb.Error) as refusal:  # PermissionException; a bare path is not even looked up
        ledger.query(sql)
    assert isinstance(refusal.value, duckdb.PermissionException | duckdb.CatalogException)
    assert "root:" not in str(refusal.value)


def test_sql_cannot_turn_file_access_back_on(ledger: Ledger):
    with pytest.raises(duckdb.Error):
        ledger._con.execute("SET enable_external_access = true")  # locked even for the ledger's own connection
    settings = ledger.query("SELECT name, value FROM duckdb_settings() "
                            "WHERE name IN ('enable_external_access', 'lock_configuration') ORDER BY name").rows
    assert settings == [["enable_external_access", "false"], ["lock_configuration", "true"]]


def test_select_answers_json_ready_rows(ledger: Ledger):
    ledger.append(Log().experiment("", BASELINE, val_bpb=1.25)[1])
    result = ledger.query("SELECT proposal_id, status, val_bpb, proposed_at, 1.5::DECIMAL(4, 2) AS d, "
                          "now() AS zoned, 'nan'::DOUBLE AS n FROM experiments")
    assert result.columns == ["proposal_id", "status", "val_bpb", "proposed_at", "d", "zoned", "n"]
    (row,) = result.rows
    assert row[1:3] == ["ok", 1.25] and row[4] == 1.5 and row[6] is None
    assert isinstance(row[3], str) and row[3][:4].isdigit() and isinstance(row[5], str)
    assert not result.truncated
    many = ledger.query("SELECT * FROM range(50)", max_rows=10)
    assert many.truncated and len(many.rows) == 10
    assert ledger.query("EXPLAIN SELECT * FROM events").columns
    assert ledger.query("WITH x AS (SELECT 2 AS a) FROM x").rows == [[2]]


def test_sql_time_limit(ledger: Ledger):
    with pytest.raises(TimeoutError):
        ledger.query("SELECT count(*) FROM range(10000000000) a", timeout_s=0.2)
    assert ledger.query("SELECT 1").rows == [[1]]


# -- HTTP ----------------------------------------------------------------------------------------


def test_http_api(ledger: Ledger):
    ledger.append(Log().experiment("", BASELINE, val_bpb=1.25)[1])
    client = TestClient(create_app(ledger, Config(), asyncio.Event()))
    assert client.get("/health").json() == {"ok": True, "cursor": 5}
    state = client.get("/state").json()
    assert state["bpb_star"] == 1.25 and state["c_star_code"] == BASELINE and len(state["history"]) == 1
    (experiment,) = client.get("/experiments").json()
    assert experiment["status"] == "ok" and experiment["is_new_best"] is True
    answer = client.post("/sql", json={"sql": "SELECT kind, count(*) AS n FROM events GROUP BY kind ORDER BY kind"})
    assert answer.status_code == 200
    assert answer.json() == {"columns": ["kind", "n"], "truncated": False,
                             "rows": [["proposal.created", 1], ["run.finished", 1], ["run.progress", 3]]}
    refused = client.post("/sql", json={"sql": "DROP TABLE events"})
    assert refused.status_code == 400 and "only SELECT" in refused.json()["detail"]
    failing = client.post("/sql", json={"sql": "SELECT * FROM no_such_table"})
    assert failing.status_code == 400 and "no_such_table" in failing.json()["detail"]
    denied = client.post("/sql", json={"sql": "SELECT * FROM read_csv('/etc/passwd')"})
    assert denied.status_code == 400
    assert client.get("/experiments", params={"limit": 0}).status_code == 422


def test_a_token_guards_every_endpoint_but_health(ledger: Ledger):
    config = load_config(environ={"AUTORESEARCH_LEDGER_HTTP_TOKEN": "s3cret"})
    client = TestClient(create_app(ledger, config, asyncio.Event()))
    assert client.get("/health").status_code == 200
    for wrong in ({}, {"Authorization": "Bearer guess"}, {"Authorization": "s3cret"}):
        for path in ("/state", "/experiments", "/", "/live", "/api/overview", "/api/live/stream"):
            assert client.get(path, headers=wrong).status_code == 401, path
        assert client.post("/sql", json={"sql": "SELECT 1"}, headers=wrong).status_code == 401
    answer = client.post("/sql", json={"sql": "SELECT 1"}, headers={"Authorization": "Bearer s3cret"})
    assert answer.status_code == 200 and answer.json()["rows"] == [[1]]
    assert client.get("/?token=guess", follow_redirects=False).status_code == 401
    first = client.get("/policy?token=s3cret", follow_redirects=False)  # a browser's first visit
    assert first.status_code == 303 and first.headers["location"] == "/policy"
    cookie = first.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    assert client.get("/api/overview").status_code == 200  # the cookie, from now on


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "ledger.internal"])
def test_a_non_loopback_bind_needs_a_token(host: str):
    with pytest.raises(ConfigError, match="needs a token"):
        load_config(environ={"AUTORESEARCH_LEDGER_HTTP_HOST": host})
    settings = load_config(environ={"AUTORESEARCH_LEDGER_HTTP_HOST": host, "AUTORESEARCH_LEDGER_HTTP_TOKEN": "t"})
    assert settings.ledger.http_host == host
    for loopback in ("127.0.0.1", "::1", "localhost"):
        assert load_config(environ={"AUTORESEARCH_LEDGER_HTTP_HOST": loopback}).ledger.http_host == loopback


def test_sql_rolls_back_whatever_passes_the_guard(ledger: Ledger, monkeypatch: pytest.MonkeyPatch):
    """The third fence alone: with the guard switched off, a write still leaves no trace."""
    from services.ledger import sql

    ledger.append(Log().experiment("", BASELINE)[1])
    monkeypatch.setattr(sql, "guard", lambda con, text: text)
    deleted = ledger.query("WITH d AS (DELETE FROM events RETURNING *) SELECT count(*) FROM d")
    assert deleted.rows == [[5]]
    assert ledger.query("SELECT count(*) FROM events").rows == [[5]]


def test_readers_on_other_threads_never_see_half_a_batch(ledger: Ledger):
    import threading

    log, problems, done = Log(), [], threading.Event()

    def read() -> None:
        while not done.is_set():
            (row,) = ledger.query("SELECT (SELECT seq FROM cursor), (SELECT coalesce(max(seq), 0) FROM events), "
                                  "(SELECT count(*) FROM events), (SELECT coalesce(sum(steps), 0) FROM finishes)").rows
            if not (row[0] == row[1] == row[2] and row[3] * 5 == row[2] * 100):  # 5 events and 100 steps each
                problems.append(row)
            ledger.state()

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for n in range(40):
            ledger.append(log.experiment(BASELINE if n else "", variant(n + 1), val_bpb=2 - n / 100)[1])
    finally:
        done.set()
        reader.join()
    assert not problems
    assert ledger.state().finished == 40
