"""The lm-score policy in the running loop: real nats-server, ledger, executor and proposer as processes
(bench/loop.py), the tiny CPU target in deterministic step budgets, the embedded default model built by the
proposer itself. What every proposal records, a parse_error proposal finished as invalid without a run, and an
adapter published mid-run: the running proposer hot-loads it, and a restarted one loads it again from the stream
before its first step. (The restart also makes the test deterministic: a step reads the policy once, so a live
adapter may or may not arrive in time for the step already under way.)"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import torch
from conftest import make_target
from test_loop import FINISHED, assert_every_event_once
from test_policy import publish_adapter

from bench.loop import Loop
from services.proposer import lm
from services.proposer.default_model import build_default_model
from shared.bus import Bus
from shared.diffs import code_sha256
from shared.events import ProposalCreated, new_id, now


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, small_corpus: Path) -> Path:
    return make_target(tmp_path_factory.mktemp("policy_target"), small_corpus, progress_interval_s=0.05)


def train_adapter(model: Path, folder: Path) -> Path:
    """One gradient step on log π of an action, as a PPO update takes, saved as an adapter. A short prompt
    keeps the step cheap; the adapter changes the scores of every prompt."""
    policy = lm.load_policy(str(model), "cpu")
    optimizer = torch.optim.Adam(policy.trainable_parameters(), lr=1e-2)
    scores = lm.score(policy, "# Research agenda\n", ["LEARNING_RATE = 6e-3\n", "N_LAYER = 3\n"], grad=True)
    (-scores.log_pi[0]).backward()
    optimizer.step()
    policy.save(folder)
    return folder


async def _publish(url: str, *events: ProposalCreated) -> None:
    bus = await Bus.connect([url], "test")
    for event in events:
        await bus.publish(event)
    await bus.close()


async def _publish_adapter(url: str, folder: Path, version: str) -> None:
    bus = await Bus.connect([url], "test")
    await publish_adapter(bus, folder, version, 1)
    await bus.close()


def test_lm_score_loop_records_the_policy_runs_invalid_answers_never_and_hot_loads_adapters(
        nats_server, tiny: Path, tmp_path: Path):
    loop = Loop(nats_server, tiny, tmp_path, PROPOSER_POLICY="lm-score", PROPOSER_NOISE_REPEATS=0,
                LEDGER_CONFIRM_SIGMAS=0, PROPOSER_MAX_EXPERIMENTS=2).start()  # no repeats: only the policy's runs
    baseline = (tiny / "train.py").read_text()
    try:
        loop.wait_for(lambda: "TERMINATE" in loop.log("proposer"), 180, "the baseline and one lm-score proposal")
        model = build_default_model(tmp_path / "models" / "default")  # the proposer's own build, reused
        adapter = train_adapter(model, tmp_path / "trained" / "v1")
        asyncio.run(_publish_adapter(nats_server.url, adapter, "v1"))
        loaded = "now proposing with adapter v1"
        loop.wait_for(lambda: loaded in loop.log("proposer"), 60, "the running proposer to load the adapter")
        loop.kill("proposer")
        loop.env["AUTORESEARCH_PROPOSER_MAX_EXPERIMENTS"] = "3"
        loop.start("proposer")
        loop.wait_for(lambda: "(lm-score v1)" in loop.log("proposer"), 180, "a proposal with the adapter")
        not_an_edit = ProposalCreated(
            event_id=new_id(), producer="test/1", ts=now(), proposal_id="not-an-edit",
            parent_code_sha256=code_sha256(baseline), ops=[], unified_diff="", policy="lm-generate",
            policy_version="base", rationale="I think we should", parse_error="no JSON object in the answer")
        asyncio.run(_publish(nats_server.url, not_an_edit))
        loop.wait_for(lambda: loop.count(FINISHED) >= 4, 300, "four finished experiments")
        assert all(loop.alive(name) for name in ("ledger", "executor", "proposer"))
    finally:
        loop.stop()

    assert_every_event_once(loop, nats_server.url)
    assert "UNTRAINED" in loop.log("proposer") and loop.log("proposer").count(loaded) == 2  # live, then restarted
    rows = loop.sql("SELECT p.proposal_id, p.policy_version, p.prompt, p.candidates, p.action_index, p.logprob, "
                    "p.value, e.status, e.val_bpb FROM proposals p JOIN experiments e USING (proposal_id) "
                    "WHERE p.policy = 'lm-score' ORDER BY p.seq")
    assert [row[1] for row in rows] == ["base", "v1"]  # after the baseline, two search steps
    for _, _, prompt, candidates, index, logprob, value, status, val_bpb in rows:
        assert "# Research agenda (program.md)" in prompt and len(json.loads(candidates)) > 10
        assert 0 <= index < len(json.loads(candidates)) and logprob < 0 and value is not None
        assert status == "ok" and val_bpb is not None

    invalid, = loop.sql("SELECT status, error FROM experiments WHERE proposal_id = 'not-an-edit'")
    assert invalid == ("invalid", "the policy's answer is not an edit: no JSON object in the answer")
    never_ran = "SELECT count(*) FROM events WHERE proposal_id = 'not-an-edit' AND kind = 'run.progress'"
    assert loop.sql(never_ran) == [(0,)]

    _, _, prompt, candidates, index, logprob, *_ = rows[1]  # sampled with the adapter (test_policy.py: and
    trained = lm.load_policy(str(model), "cpu", adapter=tmp_path / "policy" / "v1")  # its scores are not base's)
    assert logprob == pytest.approx(float(lm.score(trained, prompt, json.loads(candidates)).log_pi[index]), abs=1e-4)
