"""The learner: batches from the ledger's transitions, the ledger's `ledger.transitions` query on a real ledger,
PPO updates of the real default model, and the service on a real bus with the real ledger: updates published
with their adapters in the object store, and a learner killed (kill -9) in the middle of an update that, once
restarted, neither redoes the update before nor skips or doubles a transition."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgspec
import pytest
import torch

from bench.loop import REPO, Loop
from services.learner.batches import select, to_batch
from services.learner.main import version_name
from services.learner.ppo import RunningMoments, gae
from services.learner.rewards import reward_of
from services.learner.update import Trainer, adapter_of, load_moments, save_version
from services.ledger import transitions as ledger_transitions
from services.ledger.store import Ledger
from shared.bus import Bus, Delivered
from shared.config import Learner
from shared.diffs import EMPTY_SHA256, code_sha256, ops_between, unified_diff
from shared.events import (
    PolicyUpdated,
    PPOStats,
    ProposalCreated,
    Purpose,
    RunFinished,
    encode,
    new_id,
    now,
    subject,
)
from shared.policy.adapters import unpack_adapter
from shared.policy.default_model import build_default_model
from shared.policy.lm import Policy, folder_sha256, load_policy, score, token_logprobs
from shared.queries import Transition, TransitionsRequest
from shared.target.records import RunResult, Status

BASELINE = "".join(f"X{i} = {i}  # a constant\n" for i in range(20))
PROMPT = "# The best train.py so far\n" + BASELINE + "# Your answer\n"
CANDIDATES = ["hyperparameter: X3 3 -> 6\nreplace 4..4\n+X3 = 6", "depth: X1 1 -> 2\nreplace 2..2\n+X1 = 2",
              "hyperparameter: X7 7 -> 3\nreplace 8..8\n+X7 = 3"]


# ---------------------------------------------------------------------------------------------
# batches.py on hand-built transitions
# ---------------------------------------------------------------------------------------------

DIFF = "--- a/train.py\n+++ b/train.py\n@@ -4 +4 @@\n-X3 = 3\n+X3 = 6\n"


def transition(n: int, status: Status = "ok", val_bpb: float | None = 1.4, **fields: object) -> Transition:
    """Step n: proposed at stream sequence 10n, finished at 10n + 5, against bpb* 1.5 and c* at 200 tokens/s."""
    defaults = dict(proposal_id=f"p{n}", proposal_seq=10 * n, finished_seq=10 * n + 5, policy="lm-score",
                    policy_version="base", prompt=PROMPT, candidates=CANDIDATES, action_index=0,
                    completion_token_ids=None, parse_error=None, logprob=-1.1,
                    unified_diff=DIFF, status=status, val_bpb=val_bpb if status == "ok" else None, tokens=6000,
                    training_s=30.0, bpb_star=1.5, throughput=200.0, history=[], file_lines=20)
    return Transition(**defaults | fields)


@pytest.mark.parametrize(("status", "penalty"), [("invalid", -0.1), ("rejected", -0.1), ("aborted", -0.05),
                                                  ("crashed", -0.1), ("timeout", -0.1)])
def test_a_failed_step_earns_its_penalty(status: Status, penalty: float):
    assert reward_of(transition(1, status), Learner()).total == pytest.approx(penalty)


def test_an_ok_step_earns_its_improvement_novelty_and_efficiency():
    settings = Learner()
    paid = reward_of(transition(1, val_bpb=1.4, tokens=6600, history=[DIFF.replace("6", "5")]), settings)
    d = 1 / 20  # the closest tried diff (X3 = 5) differs in one changed line; the file has 20 lines
    assert (paid.improvement, paid.novelty) == (pytest.approx(0.1), pytest.approx(settings.xi * d / (1 + d)))
    assert paid.efficiency == pytest.approx(settings.lambda_eff * math.log(6600 / 30 / 200))
    repeat = reward_of(transition(2, val_bpb=1.6, bpb_star=1.5, history=[DIFF]), settings)
    assert (repeat.improvement, repeat.novelty) == (pytest.approx(-0.05), 0.0)  # floored at −p_waste; tried before


def test_a_batch_is_the_first_to_finish_in_the_order_they_were_proposed():
    pending = [transition(3, finished_seq=100), transition(1, finished_seq=101), transition(2, finished_seq=102),
               transition(0, finished_seq=103)]
    assert [t.proposal_id for t in select(pending, 3)] == ["p1", "p2", "p3"]


def test_gae_runs_over_the_steps_and_bootstraps_from_the_last_steps_value():
    steps = [transition(1), transition(2, "invalid", candidates=None, action_index=None,
                                       completion_token_ids=[5, 6, 7], parse_error="no JSON object"),
             transition(3, "aborted")]
    old = [torch.tensor([-1.0]), torch.tensor([-2.0, -0.5, -0.25]), torch.tensor([-0.75])]
    values = torch.tensor([0.2, -0.1, 0.05])
    moments, settings = RunningMoments(), Learner()
    batch = to_batch(steps, old, values, [lp - 0.01 for lp in old], moments, settings)

    assert batch.old_logprobs.tolist() == [[-1.0, 0.0, 0.0], [-2.0, -0.5, -0.25], [-0.75, 0.0, 0.0]]
    assert batch.mask.tolist() == [[True, False, False], [True, True, True], [True, False, False]]
    rewards = torch.tensor([0.1 + reward_of(steps[0], settings).novelty, -0.1, -0.05])
    assert batch.rewards.tolist() == pytest.approx(rewards.tolist())
    assert moments.count == 3
    expected = gae(rewards / moments.rms, values, 0.05, torch.zeros(3), settings.gamma, settings.gae_lambda)
    assert batch.advantages.tolist() == pytest.approx(expected.tolist())
    assert (batch.returns - batch.advantages).tolist() == pytest.approx(values.tolist())


# ---------------------------------------------------------------------------------------------
# The ledger's answer, on a real ledger file fed real events
# ---------------------------------------------------------------------------------------------


class Log:
    """Events delivered to a Ledger in stream order, as its service would deliver them."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger, self.seq = ledger, 0

    def add(self, *events) -> int:
        batch = []
        for event in events:
            self.seq += 1
            batch.append(Delivered(self.seq, subject(event), encode(event)))
        self.ledger.append(batch)
        return self.seq


def proposal(parent: str, child: str, policy: str = "lm-score", purpose: Purpose = "search",
             repeat_of: str | None = None, **fields: object) -> ProposalCreated:
    return ProposalCreated(event_id=new_id(), producer="proposer/test", ts=now(), proposal_id=new_id(),
                           parent_code_sha256=code_sha256(parent) if parent else EMPTY_SHA256,
                           ops=ops_between(parent, child), unified_diff=unified_diff(parent, child) if parent else "",
                           policy=policy, policy_version="base", purpose=purpose, repeat_of=repeat_of, **fields)


def lm_fields(index: int = 0, logprob: float = -1.1) -> dict[str, object]:
    """A score-mode action as vLLM logs it: no V(s), which the learner computes itself."""
    return dict(prompt=PROMPT, candidates=CANDIDATES, action_index=index, logprob=logprob)


def finished(p: ProposalCreated, code: str, status: Status = "ok", val_bpb: float | None = None,
             tokens: int = 6000) -> RunFinished:
    result = RunResult(status=status, val_bpb=val_bpb if status == "ok" else None, training_s=30.0, startup_s=1.0,
                       total_s=32.0, steps=100, tokens=tokens, peak_mem_mb=100.0, num_params=1000,
                       code_sha256=code_sha256(code), corpus_sha256="c" * 64, tokenizer_id="byte", eval_tokens=4096,
                       budget="30 seconds", seed=0, device="cpu", sandbox="none",
                       error=None if status == "ok" else status)
    return RunFinished(event_id=new_id(), producer="executor/test", ts=now(), run_id=f"{p.proposal_id[:12]}-1",
                       proposal_id=p.proposal_id, executor_id="executor/test", result=result)


def policy_updated(version: str, proposals: list[str], index: int = 0) -> PolicyUpdated:
    stats = PPOStats(policy_loss=0.0, value_loss=0.0, entropy=1.0, approx_kl=0.0, clip_fraction=0.0, mean_reward=0.0)
    return PolicyUpdated(event_id=new_id(), producer="learner/test", ts=now(), policy_version=version,
                         adapter_name=f"adapter-{version}", adapter_sha256="a" * 64, stats=stats, update_index=index,
                         proposals=proposals)


def edit(n: int) -> str:
    return BASELINE.replace(f"X{n} = {n}  #", f"X{n} = {n + 1}  #")


def test_the_ledger_answers_the_pending_lm_steps_with_their_context(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch):
    ledger = Ledger(tmp_path / "ledger.duckdb")
    log = Log(ledger)
    baseline = proposal("", BASELINE, policy="random-search")
    log.add(baseline, finished(baseline, BASELINE, val_bpb=1.50, tokens=6000))  # c* at 200 tokens/s
    noise = proposal(BASELINE, BASELINE, purpose="noise", repeat_of=baseline.proposal_id, **lm_fields())
    log.add(noise, finished(noise, BASELINE, val_bpb=1.51))  # a repeat is no step, whatever it carries
    a = proposal(BASELINE, edit(1), **lm_fields(1))
    b = proposal(BASELINE, BASELINE, policy="lm-generate", prompt=PROMPT, logprob=-9.0,
                 completion_token_ids=[5, 6, 7], parse_error="no JSON object in the answer")
    log.add(a, b)
    a_done = log.add(finished(a, edit(1), val_bpb=1.40, tokens=9000))  # a clear win: c* at 300 tokens/s
    log.add(finished(b, BASELINE, "invalid"))
    greedy = proposal(BASELINE, edit(2), policy="openai-greedy", prompt=PROMPT)  # no log π: nothing to learn
    c = proposal(BASELINE, edit(3), **lm_fields(2))
    log.add(greedy, finished(greedy, edit(2), val_bpb=1.45), c, finished(c, edit(3), "aborted"))

    def ask(**request: object):
        return ledger.transitions(TransitionsRequest(**{"limit": 10} | request))

    reply = ask()
    assert [t.proposal_id for t in reply.transitions] == [a.proposal_id, b.proposal_id, c.proposal_id]
    assert (reply.pending, reply.lm_proposals, reply.policies) == (3, 3, [])
    first, second, third = reply.transitions
    assert (first.finished_seq, first.status, first.val_bpb, first.bpb_star) == (a_done, "ok", 1.40, 1.50)
    assert (first.candidates, first.action_index, first.logprob) == (CANDIDATES, 1, -1.1)
    assert (first.throughput, first.file_lines, first.unified_diff) == (200.0, 20, a.unified_diff)
    assert first.history == [baseline.unified_diff, noise.unified_diff]
    assert (second.status, second.bpb_star, second.throughput) == ("invalid", 1.40, 300.0)
    assert (second.completion_token_ids, second.parse_error, second.candidates) == ([5, 6, 7], b.parse_error, None)
    assert second.history == [baseline.unified_diff, noise.unified_diff, a.unified_diff]
    assert third.history[-2:] == [b.unified_diff, greedy.unified_diff]

    assert [t.proposal_id for t in ask(limit=1).transitions] == [a.proposal_id]
    assert [t.proposal_id for t in ask(after_finished_seq=a_done).transitions] == [b.proposal_id, c.proposal_id]
    monkeypatch.setattr(ledger_transitions, "MAX_REPLY_BYTES", 1)  # each page holds one, however small
    assert [t.proposal_id for t in ask().transitions] == [a.proposal_id]

    log.add(policy_updated("v0001", [a.proposal_id, b.proposal_id]), proposal(BASELINE, edit(4), **lm_fields()))
    reply = ask()
    assert [t.proposal_id for t in reply.transitions] == [c.proposal_id]
    assert (reply.pending, reply.lm_proposals) == (1, 4)
    assert [(p.policy_version, p.adapter_name, p.update_index) for p in reply.policies] == [("v0001", "adapter-v0001",
                                                                                             0)]
    assert msgspec.json.decode(msgspec.json.encode(reply), type=type(reply)) == reply
    ledger.close()


# ---------------------------------------------------------------------------------------------
# update.py on the real default model
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_default_model(tmp_path_factory.mktemp("learner") / "models" / "default")


def trainer(model_dir: Path, adapter: Path | None = None, temperature: float = 1.0) -> Trainer:
    return Trainer(load_policy(str(model_dir), "cpu", adapter), temperature, threading.Event())


def lm_steps(policy: Policy, n: int, version: str = "base", start: int = 0) -> list[Transition]:
    """n score-mode steps as the proposer would log them with `policy`, different outcomes each."""
    statuses: list[tuple[Status, float | None]] = [("ok", 1.45), ("invalid", None), ("ok", 1.55), ("aborted", None)]
    steps = []
    for k in range(start, start + n):
        prompt = PROMPT.replace("# Your answer", f"# Experiment {k}")
        scores = score(policy, prompt, CANDIDATES)
        status, val_bpb = statuses[k % len(statuses)]
        steps.append(transition(k, status, val_bpb, prompt=prompt, action_index=k % 3, policy_version=version,
                                logprob=float(scores.log_pi[k % 3])))
    return steps


def test_generate_mode_recomputes_the_token_logprobs_with_their_entropy(model_dir: Path):
    learner = trainer(model_dir, temperature=0.7)
    tokens = learner.policy.tokenizer("LEARNING_RATE = 0.01\n")["input_ids"]
    action = learner.generated(PROMPT, tokens, grad=False)
    expected = token_logprobs(learner.policy, PROMPT, tokens, temperature=0.7)
    assert action.logprobs.tolist() == pytest.approx(expected.tolist(), abs=1e-5)
    assert action.entropy.shape == (len(tokens),) and bool((action.entropy > 0).all())
    assert float(action.value) == pytest.approx(float(score(learner.policy, PROMPT, ["x"]).value), abs=1e-6)


def test_old_logprobs_come_from_the_version_that_proposed_and_values_from_the_current_critic(model_dir: Path,
                                                                                               tmp_path: Path):
    proposer = load_policy(str(model_dir), "cpu")
    with torch.no_grad():  # another version: any adapter whose B is not zero
        for name, parameter in proposer.model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    proposer.save(tmp_path / "v0001")
    steps = lm_steps(proposer, 2, "v0001") + lm_steps(load_policy(str(model_dir), "cpu"), 2, "base", start=2)

    learner = trainer(model_dir)
    with torch.no_grad():  # a critic that has learned something: V differs with the hidden states it reads
        learner.policy.value_head.linear.weight.normal_(0, 1, generator=torch.Generator().manual_seed(0))
    own = learner.act(steps[0], grad=False).logprobs
    old, values = learner.old_actions(steps, {"v0001": tmp_path / "v0001", "base": None}, current="v0002")
    assert [float(lp) for lp in old] == pytest.approx([t.logprob for t in steps], abs=1e-5)
    assert values.tolist() == pytest.approx([float(learner.act(t, grad=False).value) for t in steps], abs=1e-6)
    with adapter_of(learner.policy, tmp_path / "v0001"):  # not the values read from the proposer's adapter
        assert float(learner.act(steps[0], grad=False).value) != pytest.approx(float(values[0]), abs=1e-4)
    assert float(own) != pytest.approx(steps[0].logprob, abs=1e-3)  # the learner's own policy differs
    assert torch.equal(learner.act(steps[0], grad=False).logprobs, own)  # and is itself again afterwards
    assert len(learner.policy.trainable_parameters()) == len(proposer.trainable_parameters())


def test_an_update_redone_from_the_same_state_gives_the_same_adapter(model_dir: Path, tmp_path: Path):
    settings = Learner(batch_size=4, minibatch_size=2, epochs=2, learning_rate=1e-3, warmup_updates=1)
    steps = lm_steps(load_policy(str(model_dir), "cpu"), 4)
    folders = []
    for attempt in ("first", "again"):  # a learner killed after the first, restarted from the same ledger
        learner, moments = trainer(model_dir), RunningMoments()
        learned = learner.learn(steps, {"base": None}, None, moments, settings, 0)
        save_version(learner.policy, moments, tmp_path / attempt)
        folders.append(tmp_path / attempt)
        update = learned.update
        assert all(math.isfinite(x) for x in [*msgspec.structs.astuple(update.stats)[:6], update.reference_kl])
        assert update.learning_rate == 1e-3 and learned.drift < 1e-5
    assert folder_sha256(folders[0]) == folder_sha256(folders[1])
    assert load_moments(folders[1]).count == 4
    moved = score(load_policy(str(model_dir), "cpu", folders[0]), PROMPT, CANDIDATES)
    assert not torch.allclose(moved.log_pi, score(load_policy(str(model_dir), "cpu"), PROMPT, CANDIDATES).log_pi)


def test_ppo_on_a_bandit_of_candidate_diffs_raises_the_rewarded_ones_probability(model_dir: Path):
    """The learner's whole update (recomputed π_θold, GAE, the clipped surrogate through lm.score) on the real model,
    online: each update's batch is sampled from the policy as it stands. One diff lowers val-bpb by 0.1; every
    other raises it by 0.1 (a regression, floored at −p_waste)."""
    # A bandit: no step's reward depends on another step's action, so γ = 0 (with the default 0.9, GAE would
    # credit each action with its successors' rewards, which here are noise).
    settings = Learner(batch_size=8, minibatch_size=4, epochs=4, learning_rate=3e-3, warmup_updates=1, gamma=0.0)
    learner, moments, rng = trainer(model_dir), RunningMoments(), random.Random(0)
    rewarded = 1

    def pi() -> list[float]:
        return score(learner.policy, PROMPT, CANDIDATES).pi.tolist()

    before = pi()
    for update in range(6):
        version = version_name(update - 1) if update else "base"
        steps = []
        for k in range(settings.batch_size):
            probabilities = pi()
            index = rng.choices(range(len(CANDIDATES)), probabilities)[0]
            steps.append(transition(update * settings.batch_size + k, val_bpb=1.4 if index == rewarded else 1.6,
                                    action_index=index, policy_version=version,
                                    logprob=math.log(probabilities[index])))
        learner.learn(steps, {}, version, moments, settings, update)
    after = pi()
    # Measured: 0.33 -> 0.70 (after 4 updates, 0.48; before a code change, 0.56). The default model's tokenizer is
    # trained on this repository's code, so these figures move with every change to it: hence 6 updates, a margin.
    assert after[rewarded] > before[rewarded] + 0.15, (before, after)
    assert all(after[i] < before[i] for i in range(len(CANDIDATES)) if i != rewarded)


def yielded(check: str, own_session: bool = False) -> list[str]:
    """What `check` prints in a fresh process after the learner's yield_the_cpu()."""
    code = f"import os; from services.learner.main import yield_the_cpu; yield_the_cpu(); {check}"
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                          start_new_session=own_session).stdout.split()


def test_the_learner_trains_at_idle_priority_on_one_thread():
    shown = yielded("import torch; print(os.nice(0), torch.get_num_threads(), os.sched_getscheduler(0))")
    assert shown == ["19", "1", str(os.SCHED_IDLE)]


def autogroup_nice() -> str:
    """This process's autogroup nice value, or '' where autogroups do not rank it: a kernel without them, or a
    container whose cgroup scheduling takes their place (the file is then empty)."""
    with contextlib.suppress(OSError):
        return (Path("/proc/self/autogroup").read_text().split() or [""])[-1]
    return ""


@pytest.mark.skipif(not autogroup_nice(), reason="autogroups do not rank this process")
@pytest.mark.parametrize("own_session", [True, False])
def test_the_learner_yields_the_cpu_to_runs_in_other_sessions(own_session: bool):
    shown = yielded("print(open('/proc/self/autogroup').read().split()[-1])", own_session)
    assert shown == ["19" if own_session else autogroup_nice()]  # as `autoresearch up` starts it; by hand


# ---------------------------------------------------------------------------------------------
# The service on a real bus, with the real ledger
# ---------------------------------------------------------------------------------------------

BATCH = 3


async def publish(url: str, *events) -> None:
    bus = await Bus.connect([url], "test")
    await bus.ensure_stream()
    for event in events:
        await bus.publish(event)
    await bus.close()


def lm_experiments(policy: Policy, first: int, n: int) -> list:
    """n lm-score proposals made with `policy` on the baseline and their runs' ends."""
    events = []
    for k in range(first, first + n):
        prompt = PROMPT.replace("# Your answer", f"# Experiment {k}")
        scores = score(policy, prompt, CANDIDATES)
        index = k % len(CANDIDATES)
        p = proposal(BASELINE, edit(index + 1), prompt=prompt, candidates=CANDIDATES, action_index=index,
                     logprob=float(scores.log_pi[index]), value=float(scores.value))
        status: Status = ("ok", "invalid", "aborted")[k % 3]
        events += [p, finished(p, edit(index + 1), status, 1.5 - 0.01 * k)]
    return events


async def adapter(url: str, event: tuple, into: Path) -> Path:
    """The adapter a policy.updated row names, from the object store (checked against its sha256)."""
    _version, name, sha256 = event
    bus = await Bus.connect([url], "test")
    data = await bus.get_object(name, sha256)
    await bus.close()
    return unpack_adapter(data, into)


def test_the_learner_publishes_updates_and_a_restart_neither_redoes_nor_skips_one(nats_server, model_dir: Path,
                                                                                  tmp_path: Path):
    loop = Loop(nats_server, tmp_path, tmp_path, PROPOSER_MODEL=model_dir, LEARNER_BATCH_SIZE=BATCH,
                LEARNER_MINIBATCH_SIZE=BATCH, LEARNER_EPOCHS=2, LEARNER_LEARNING_RATE=1e-3,
                LEARNER_WARMUP_UPDATES=1)
    base = load_policy(str(model_dir), "cpu")
    baseline = proposal("", BASELINE, policy="random-search")
    updates = "SELECT policy_version, adapter_name, adapter_sha256 FROM policy_updates ORDER BY seq"
    try:
        loop.start("ledger", "learner")
        asyncio.run(publish(nats_server.url, baseline, finished(baseline, BASELINE, val_bpb=1.5)))
        loop.wait_for(lambda: "nothing to learn from" in loop.log("learner"), 60, "the learner to idle")
        first = lm_experiments(base, 0, BATCH + 1)  # one more than a batch: it waits for the next
        asyncio.run(publish(nats_server.url, *first))
        loop.wait_for(lambda: len(loop.live_sql(updates)) == 1, 60, "the first policy.updated")
        v1_here = folder_sha256(tmp_path / "learner" / "v0001")
        second = lm_experiments(base, BATCH + 1, BATCH - 1)
        asyncio.run(publish(nats_server.url, *second))
        loop.wait_for(lambda: "update 1 on" in loop.log("learner"), 60, "the second update to start")
        loop.kill("learner")  # kill -9 in the middle of the second update (or just after it): the restarted
        shutil.rmtree(tmp_path / "learner" / "v0001")  # learner, on a machine without v0001 (it has to fetch
        loop.start("learner")  # it), redoes that update alone, on the same transitions
        loop.wait_for(lambda: len(loop.live_sql(updates)) == 2, 60, "the second policy.updated")
        time.sleep(2)  # time enough for a wrongly repeated update to show
        published = loop.live_sql(updates)
        consumed = loop.live_sql("SELECT update_index, proposals, policy_loss, value_loss, entropy, approx_kl, "
                                 "clip_fraction, mean_reward, reference_kl, learning_rate FROM policy_updates "
                                 "ORDER BY seq")
        v1 = asyncio.run(adapter(nats_server.url, published[0], tmp_path / "fetched" / "v0001"))
    finally:
        loop.stop()

    assert [row[0] for row in published] == [version_name(0), version_name(1)]
    lm_ids = [event.proposal_id for event in first + second if isinstance(event, ProposalCreated)]
    assert [(index, json.loads(proposals)) for index, proposals, *_ in consumed] == [
        (0, lm_ids[:BATCH]), (1, lm_ids[BATCH:2 * BATCH])]  # every step learned from once, in order
    assert all(math.isfinite(x) for row in consumed for x in row[2:])
    assert folder_sha256(v1) == folder_sha256(tmp_path / "learner" / "v0001") == v1_here
    assert "fetched v0001 from the object store" in loop.log("learner")
    moved = score(load_policy(str(model_dir), "cpu", v1), PROMPT, CANDIDATES).log_pi
    assert not torch.allclose(moved, score(base, PROMPT, CANDIDATES).log_pi)
    assert load_moments(v1).count == BATCH
