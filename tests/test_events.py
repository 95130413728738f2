"""Event schemas: one definition per subject, round trips, and bad input rejected with a reason."""

from __future__ import annotations

import contextlib
import random

import msgspec
import pytest

from shared.events import (
    MAX_EVENT_BYTES,
    SCHEMA_VERSION,
    BadEvent,
    EditOp,
    PolicyUpdated,
    PPOStats,
    ProposalCreated,
    RunAborted,
    RunFinished,
    RunProgress,
    decode,
    encode,
    new_id,
    now,
    subject,
)
from shared.target.records import RunResult

COMMON = dict(producer="test/1", ts=now())
RESULT = RunResult(
    status="ok", val_bpb=2.4, training_s=30.0, startup_s=2.0, total_s=41.0, steps=99, tokens=405504,
    peak_mem_mb=600.0, num_params=10, code_sha256="c" * 64, corpus_sha256="d" * 64, tokenizer_id="bpe2048-x",
    eval_tokens=65511, budget="30 seconds", seed=0, device="cpu", sandbox="landlock-abi7",
)
EVENTS = [
    ProposalCreated(event_id=new_id(), proposal_id="p1", parent_code_sha256="a" * 64,
                    ops=[EditOp("replace", 3, 3, "N_LAYER = 6\n")], unified_diff="-N_LAYER = 4\n+N_LAYER = 6\n",
                    policy="random", policy_version="0", **COMMON),
    RunProgress(event_id=new_id(), run_id="r1", proposal_id="p1", executor_id="e1", phase="training",
                elapsed_train_s=1.5, step=3, train_loss=None, tokens=100, peak_mem_mb=1.0, **COMMON),
    RunAborted(event_id=new_id(), run_id="r1", at_train_s=10.0, forecast=2.9, forecast_low=2.8, forecast_high=3.0,
               threshold=2.5, statistic=3.1, boundary=2.9, commentary="forecast 2.9 > tau 2.5", **COMMON),
    RunFinished(event_id=new_id(), run_id="r1", proposal_id="p1", executor_id="e1", result=RESULT, **COMMON),
    PolicyUpdated(event_id=new_id(), policy_version="1", adapter_name="lora-1", adapter_sha256="b" * 64,
                  stats=PPOStats(policy_loss=0.1, value_loss=0.2, entropy=1.0, approx_kl=0.01, clip_fraction=0.1,
                                 mean_reward=0.0), **COMMON),
]


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: type(e).__name__)
def test_every_event_round_trips_on_its_subject(event):
    assert decode(subject(event), encode(event)) == event


def test_run_subjects_carry_the_run_id_so_run_wildcards_tail_them():
    assert [subject(e) for e in EVENTS] == [
        "proposal.created", "run.progress.r1", "run.aborted.r1", "run.finished.r1", "policy.updated",
    ]


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: type(e).__name__)
def test_bad_payloads_are_bad_events_with_reasons(event):
    name, data = subject(event), encode(event)
    for cut in range(0, len(data), max(1, len(data) // 40)):
        with pytest.raises(BadEvent, match="malformed"):
            decode(name, data[:cut])
    rng = random.Random(0)
    for _ in range(200):
        noisy = bytearray(data)
        for _ in range(rng.randint(1, 5)):
            noisy[rng.randrange(len(noisy))] = rng.randrange(256)
        with contextlib.suppress(BadEvent):
            assert type(decode(name, bytes(noisy))) is type(event)
    old = msgspec.json.decode(data)
    old["schema_version"] = 99
    with pytest.raises(BadEvent, match="schema_version 99"):
        decode(name, msgspec.json.encode(old))
    with pytest.raises(BadEvent, match="over the"):
        decode(name, b" " * (MAX_EVENT_BYTES + 1))


def test_unknown_subjects_and_mismatched_run_ids_are_refused():
    progress = EVENTS[1]
    with pytest.raises(BadEvent, match="does not match run_id"):
        decode("run.progress.other", encode(progress))
    for name in ("run.progress", "run.nope.r1", "proposal.deleted", "policy.updated.x"):
        with pytest.raises(BadEvent, match="no event is defined"):
            decode(name, encode(progress))


def test_repeats_round_trip_and_proposals_logged_before_them_still_decode():
    repeat = ProposalCreated(event_id=new_id(), proposal_id="p2", parent_code_sha256="a" * 64, ops=[],
                             unified_diff="", policy="random", policy_version="0", seed=7, repeat_of="p1",
                             purpose="confirm", **COMMON)
    assert decode(subject(repeat), encode(repeat)) == repeat
    old = msgspec.json.decode(encode(EVENTS[0]))
    for field in ("seed", "repeat_of", "purpose"):
        del old[field]
    decoded = decode("proposal.created", msgspec.json.encode(old))
    assert decoded == EVENTS[0] and (decoded.seed, decoded.repeat_of, decoded.purpose) == (None, None, "search")
    with pytest.raises(BadEvent, match="purpose"):
        decode("proposal.created", msgspec.json.encode(old | {"purpose": "explore"}))


def test_this_build_reads_older_events_and_refuses_newer_ones():
    finished = EVENTS[3]
    old = msgspec.json.decode(encode(finished)) | {"schema_version": 1}
    for field in ("slot", "waited_s", "prepared_s"):  # what schema 2 added, with defaults
        del old[field]
    for field in ("setup_s", "eval_s"):
        del old["result"][field]
    decoded = decode(subject(finished), msgspec.json.encode(old))  # the stream's version-1 events still replay
    assert isinstance(decoded, RunFinished) and decoded.schema_version == 1
    assert (decoded.slot, decoded.waited_s, decoded.result.setup_s) == (None, None, 0.0)
    for version in (0, SCHEMA_VERSION + 1):
        data = old | {"schema_version": version}
        with pytest.raises(BadEvent, match=f"schema_version {version}, this build reads 1 to {SCHEMA_VERSION}"):
            decode(subject(finished), msgspec.json.encode(data))
