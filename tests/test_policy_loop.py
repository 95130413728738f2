"""The RL default of `make up` in the running loop: real nats-server and all five services as processes
(bench/loop.py), lm-score on the embedded default model (built by the proposer itself), the tiny CPU target in
deterministic step budgets. Proposals record what PPO needs; the learner turns the finished runs into rewards and
a PPO update, publishes policy.updated with the adapter in the object store; the running proposer hot-loads it,
and a restarted one loads it again from the stream before its first step, and proposes with it. A parse_error
proposal is finished as invalid without a run. (The restart also makes the test deterministic: a step reads the
policy once, so a live adapter may or may not arrive in time for the step already under way.)"""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import pytest
from conftest import chromium, make_target
from pages import PHONE, dashboard_page, open_report
from test_loop import FINISHED, assert_every_event_once, cli_in

from bench.loop import Loop
from services.ledger.report import write_report
from services.ledger.store import Ledger
from shared.bus import Bus
from shared.cli import sql_over_http
from shared.config import Proposer
from shared.diffs import code_sha256
from shared.edit_kinds import edit_kind
from shared.events import ProposalCreated, new_id, now
from shared.policy import lm
from shared.stack import SERVICES

SEARCH_STEPS = 2
"""lm-score steps after the baseline: one PPO batch."""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, small_corpus: Path) -> Path:
    return make_target(tmp_path_factory.mktemp("policy_target"), small_corpus, progress_interval_s=0.05)


async def _publish(url: str, *events: ProposalCreated) -> None:
    bus = await Bus.connect([url], "test")
    for event in events:
        await bus.publish(event)
    await bus.close()


def test_the_rl_loop_proposes_learns_publishes_and_proposes_with_the_new_policy(nats_server, tiny: Path,
                                                                                 tmp_path: Path):
    loop = Loop(nats_server, tiny, tmp_path, PROPOSER_POLICY="lm-score", PROPOSER_NOISE_REPEATS=0,
                LEDGER_CONFIRM_SIGMAS=0, PROPOSER_MAX_EXPERIMENTS=1 + SEARCH_STEPS, LEARNER_BATCH_SIZE=SEARCH_STEPS,
                LEARNER_MINIBATCH_SIZE=SEARCH_STEPS, LEARNER_EPOCHS=2, LEARNER_WARMUP_UPDATES=1,
                LEARNER_LEARNING_RATE=1e-2)  # no repeats: only the policy's runs; a step big enough to show
    baseline = (tiny / "train.py").read_text()
    loaded = "now proposing with adapter v0001"
    try:
        loop.start("ledger", "executor", "evaluator", "learner", "proposer")
        loop.wait_for(lambda: loaded in loop.log("proposer"), 300, "the learner's first update, hot-loaded")
        loop.kill("proposer")
        loop.env["AUTORESEARCH_PROPOSER_MAX_EXPERIMENTS"] = str(2 + SEARCH_STEPS)
        loop.start("proposer")
        loop.wait_for(lambda: "(lm-score v0001)" in loop.log("proposer"), 180, "a proposal with the new policy")
        not_an_edit = ProposalCreated(
            event_id=new_id(), producer="test/1", ts=now(), proposal_id="not-an-edit",
            parent_code_sha256=code_sha256(baseline), ops=[], unified_diff="", policy="lm-generate",
            policy_version="base", rationale="I think we should", parse_error="no JSON object in the answer")
        asyncio.run(_publish(nats_server.url, not_an_edit))
        loop.wait_for(lambda: loop.count(FINISHED) >= 3 + SEARCH_STEPS, 300, "every experiment finished")
        assert all(loop.alive(name) for name in ("ledger", "executor", "evaluator", "learner", "proposer"))
        live_report = write_report(lambda sql: sql_over_http(loop.http_port, sql, ""), tmp_path / "live-report")
        dashboard = _dashboard(loop)
        screen = cli_in(loop, "status")
        loop.kill("learner")
        learner_down = cli_in(loop, "status")
    finally:
        loop.stop()

    assert_every_event_once(loop, nats_server.url)
    assert "UNTRAINED" in loop.log("proposer") and loop.log("proposer").count(loaded) == 2  # live, then restarted
    rows = loop.sql("SELECT p.proposal_id, p.policy_version, p.prompt, p.candidates, p.action_index, p.logprob, "
                    "e.status, e.val_bpb FROM proposals p JOIN experiments e USING (proposal_id) "
                    "WHERE p.policy = 'lm-score' ORDER BY p.seq")
    assert [row[1] for row in rows] == ["base"] * SEARCH_STEPS + ["v0001"]
    for _, _, prompt, candidates, index, logprob, status, val_bpb in rows:
        assert "# Research agenda (program.md)" in prompt and len(json.loads(candidates)) == Proposer().max_candidates
        assert 0 <= index < len(json.loads(candidates)) and logprob < 0
        assert status in ("ok", "aborted") and (val_bpb is not None) == (status == "ok")

    update, = loop.sql("SELECT policy_version, update_index, proposals, policy_loss, value_loss, entropy, approx_kl, "
                       "mean_reward, reference_kl, learning_rate FROM policy_updates")
    assert update[:2] == ("v0001", 0)
    assert json.loads(update[2]) == [row[0] for row in rows[:SEARCH_STEPS]]  # the base policy's steps, each once
    assert all(math.isfinite(x) for x in update[3:]) and update[-1] == 1e-2 and update[-2] > 0  # it moved

    invalid, = loop.sql("SELECT status, error FROM experiments WHERE proposal_id = 'not-an-edit'")
    assert invalid == ("invalid", "the policy's answer is not an edit: no JSON object in the answer")
    never_ran = "SELECT count(*) FROM events WHERE proposal_id = 'not-an-edit' AND kind = 'run.progress'"
    assert loop.sql(never_ran) == [(0,)]

    _, _, prompt, candidates, index, logprob, *_ = rows[-1]  # sampled with the learner's adapter, as hot-loaded
    model = tmp_path / "models" / "default"
    trained = lm.load_policy(str(model), "cpu", adapter=tmp_path / "policy" / "v0001")
    assert logprob == pytest.approx(float(lm.score(trained, prompt, json.loads(candidates)).log_pi[index]), abs=1e-4)
    base = lm.score(lm.load_policy(str(model), "cpu"), prompt, json.loads(candidates)).log_pi[index]
    assert logprob != pytest.approx(float(base), abs=1e-4)  # and not what the base model gives

    ledger = Ledger(tmp_path / "ledger.duckdb", read_only=True)  # the report of this research run, from the file
    try:
        report = write_report(ledger.query, tmp_path / "report")
        kept = ledger.query("SELECT count(*) FROM champions").rows[0][0]
        kinds = {edit_kind("", json.loads(candidates)[index]) for _, _, _, candidates, index, *_ in rows}
    finally:
        ledger.close()
    assert _section(report, "Kept edits") == _section(live_report, "Kept edits")  # through the ledger's /sql too
    with chromium() as browser:
        seen = open_report(browser, report, "rl-loop")
    assert seen["errors"] == [] and seen["outside"] == [] and not seen["overflow"]
    assert len(seen["charts"]) == 2 and min(seen["charts"]) > 10  # best so far, and the policy's learning curves
    assert seen["tables"][0] == kept >= 1 and seen["tables"][1] >= 1
    assert all(f"<td>{kind}</td>" in report.read_text() for kind in kinds)  # discoveries by the actions' kinds
    finished, updates = loop.sql(f"{FINISHED}")[0][0], loop.sql("SELECT count(*) FROM policy_updates")[0][0]
    assert all(seen["errors"] == [] and seen["outside"] == [] for seen in dashboard.values()), dashboard
    overview = dashboard["overview"]
    assert len(overview["charts"]) == 2 and min(overview["charts"]) > finished  # a mark per experiment, and c*
    assert overview["tables"] == [kept, finished]  # the lineage, the latest experiments
    assert not dashboard["overview-phone"]["overflow"]
    run = dashboard["run"]["text"]  # an lm-score step: its reward and the terms it is the sum of
    assert all(term in run for term in ("total", "improvement", "novelty", "penalty", "lm-score base"))
    policy = dashboard["policy"]
    assert len(policy["charts"]) == 5 and min(policy["charts"]) >= 2 * updates and policy["tables"][-1] == updates
    services = {line.split()[0]: line for line in screen.splitlines()[3:8]}  # `autoresearch status`: one screen
    assert sorted(services) == sorted(SERVICES) and all(" 0.1.0" in line for line in services.values())
    assert "committed up to stream seq" in services["ledger"] and "slots busy" in services["executor"]
    assert f"policy: v0001, {updates} update(s)" in screen and "aborted by the evaluator: " in screen
    assert [line.split()[:3] for line in learner_down.splitlines() if line.startswith("learner")] == \
        [["learner", "|", "DOWN"]]
    for chart in ("progress.png", "policy.png"):
        assert (report.parent / chart).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _dashboard(loop: Loop) -> dict[str, dict]:
    """The dashboard's pages as drawn in Chromium while the loop's ledger serves them."""
    base = f"http://127.0.0.1:{loop.http_port}"
    (step,), = loop.live_sql("SELECT proposal_id FROM experiments WHERE policy = 'lm-score' AND status = 'ok' "
                             "ORDER BY finished_seq LIMIT 1")
    with chromium() as browser:
        seen = {name: dashboard_page(browser, base + path, name)
                for name, path in (("overview", "/"), ("run", f"/runs/{step}"), ("policy", "/policy"))}
        seen["overview-phone"] = dashboard_page(browser, base + "/", "overview-phone", PHONE)
    return seen


def _section(report: Path, heading: str) -> str:
    return report.read_text().split(f"<h2>{heading}</h2>")[1].split("<h2>")[0]
