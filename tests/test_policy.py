"""services.proposer.policy, adapters and the proposer's hot-loading: each policy's search step on a hand-built
ledger state, with the real embedded model, a real OpenAI-compatible HTTP server and a real nats-server; and the
proposer process riding out an endpoint that is down (ledger and proposer only: no executor, no training).

The untrained default model never writes a valid answer, so generate mode's valid path runs on a backend that
forces an answer through the real model (teacher forcing: the answer's real log-probabilities)."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
import torch
import uvicorn
from conftest import REPO, make_target
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from bench.loop import Loop
from services.proposer.catalog import catalog
from services.proposer.main import AdapterFollower
from services.proposer.policy import (
    LMGenerate,
    LMScore,
    LoadBackend,
    NotAnEdit,
    OpenAIGreedy,
    PolicyUnavailable,
    RandomSearch,
    Step,
    Transformers,
    chat_client,
    draw_seed,
    load_transformers,
    make_policy,
    parse_edit,
    sample_index,
)
from shared.bus import WORK_QUEUE, Bus
from shared.config import Proposer
from shared.diffs import apply_ops, code_sha256
from shared.events import PolicyUpdated, PPOStats, new_id, now
from shared.nats_server import free_port
from shared.policy import lm
from shared.policy.adapters import pack_adapter, unpack_adapter
from shared.policy.default_model import build_default_model
from shared.queries import HistoryEntry, LedgerState

CODE = '''"""A small train.py: a few constants on top, as the targets have them."""
import math

LEARNING_RATE = 3e-3  # peak learning rate
N_LAYER = 2  # transformer blocks
BATCH_SIZE = 8  # sequences per step
WEIGHT_DECAY = 0.1  # AdamW weight decay


def lr(progress):
    return LEARNING_RATE * 0.5 * (1 + math.cos(math.pi * progress))


print(lr(0.5), N_LAYER, BATCH_SIZE, WEIGHT_DECAY)
'''
PROGRAM = "# Agenda\n\nLower val-bpb within the fixed budget; change one thing at a time.\n"
HISTORY = [HistoryEntry(proposal_id="a1" * 16, status="ok", val_bpb=2.41, why="both", abort_commentary=None,
                        unified_diff="--- a/train.py\n+++ b/train.py\n@@ -5 +5 @@\n-N_LAYER = 3\n+N_LAYER = 2\n"),
           HistoryEntry(proposal_id="b2" * 16, status="aborted", val_bpb=None, why="recent",
                        abort_commentary="forecast 2.6 above τ 2.45", unified_diff="")]
AT = datetime(2026, 1, 1, 12, tzinfo=UTC)
VALID = {"rationale": "double the learning rate",
         "ops": [{"op": "replace", "start": 4, "end": 4, "text": "LEARNING_RATE = 6e-3  # peak learning rate\n"}]}


def state(experiments: int = 5) -> LedgerState:
    return LedgerState(cursor=0, experiments=experiments, finished=experiments - 1, outstanding=1,
                       c_star_sha256=code_sha256(CODE), c_star_code=CODE, bpb_star=2.41, sigma_h=0.02, since_best=1,
                       first_proposed_at=datetime(2026, 1, 1, 10, tzinfo=UTC), history=HISTORY)


def step(experiments: int = 5) -> Step:
    return Step(state(experiments), CODE, "proposer/test", AT)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_default_model(tmp_path_factory.mktemp("policy") / "model")


@pytest.fixture(scope="module")
def base(model_dir: Path) -> Transformers:
    return Transformers(lm.load_policy(str(model_dir), "cpu"), "base")


def loader(backend: Transformers) -> LoadBackend:
    """`backend` for the base model; a new adapter loaded as the proposer loads it."""
    return lambda adapter, version: backend if adapter is None else load_transformers(backend.policy.base, "cpu",
                                                                                      adapter, version)


def scorer(backend: Transformers, **settings: Any) -> LMScore:
    return LMScore(Proposer(policy="lm-score", **settings), PROGRAM, loader(backend))


# --- lm-score ------------------------------------------------------------------------------------------


def test_score_samples_one_catalogue_action_reproducibly_and_records_what_ppo_needs(base: Transformers):
    policy = scorer(base, seed=3, max_candidates=0)
    first, = policy.propose(step())
    again, = policy.propose(step())
    assert (again.action_index, again.ops, again.logprob) == (first.action_index, first.ops, first.logprob)
    assert again.proposal_id != first.proposal_id

    actions = catalog(CODE)
    action = actions[first.action_index]
    assert first.candidates == [a.text for a in actions] and len(actions) > 10
    assert (first.ops, first.rationale) == (action.ops, action.description)
    assert (first.policy, first.policy_version, first.parse_error) == ("lm-score", "base", None)
    assert first.parent_code_sha256 == code_sha256(CODE) and apply_ops(CODE, first.ops) != CODE
    assert PROGRAM.strip() in first.prompt and CODE.splitlines()[3] in first.prompt
    assert HISTORY[0].proposal_id[:8] in first.prompt and "forecast 2.6 above τ 2.45" in first.prompt

    scores = lm.score(base.policy, first.prompt, first.candidates)  # recomputed from what the proposal records
    assert first.logprob == pytest.approx(float(scores.log_pi[first.action_index]), abs=1e-5)
    assert first.value == pytest.approx(float(scores.value), abs=1e-6)
    assert first.action_index == sample_index(scores.pi.tolist(), random.Random("3:5"))  # seed 3, 5 experiments

    later = {next(policy.propose(step(k))).action_index for k in (6, 7)}
    assert len(later | {first.action_index}) > 1  # another count, another draw


def test_score_chooses_among_a_seeded_subset_of_the_catalogue(base: Transformers):
    policy = scorer(base, seed=3, max_candidates=5)
    first, = policy.propose(step())
    again, = policy.propose(step())
    texts = [action.text for action in catalog(CODE)]
    assert len(first.candidates) == 5 and first.candidates == again.candidates
    assert first.candidates == sorted(first.candidates, key=texts.index)  # catalogue order
    later, = policy.propose(step(6))
    assert later.candidates != first.candidates
    scores = lm.score(base.policy, first.prompt, first.candidates)  # π over the offered set, as recorded
    assert first.logprob == pytest.approx(float(scores.log_pi[first.action_index]), abs=1e-5)


# --- lm-generate -----------------------------------------------------------------------------------------


def test_generate_publishes_bad_answers_as_parse_errors_and_resamples_a_bounded_number_of_times(base: Transformers):
    settings = Proposer(policy="lm-generate", max_new_tokens=12, max_resamples=2, temperature=1.0, seed=1)
    policy = LMGenerate(settings, PROGRAM, loader(base))
    proposals = list(policy.propose(step()))
    assert len(proposals) == 3  # the first sample and two more: the untrained model writes no JSON
    again = lm.generate(base.policy, proposals[1].prompt, 12, 1.0, draw_seed(1, 6))  # sample 2 is proposal 7
    assert again.token_ids == proposals[1].completion_token_ids  # seeded by (seed, count): a restart repeats it
    value = float(lm.score(base.policy, proposals[0].prompt, ["x"]).value)
    for proposal in proposals:
        assert proposal.parse_error and "no JSON object" in proposal.parse_error
        assert (proposal.ops, proposal.unified_diff, proposal.policy, proposal.policy_version) == (
            [], "", "lm-generate", "base")
        assert 0 < len(proposal.completion_token_ids) <= 12 and proposal.logprob < 0
        assert proposal.value == pytest.approx(value, abs=1e-5)  # V(s) as score mode computes it
    assert len({tuple(p.completion_token_ids) for p in proposals}) == 3
    with torch.no_grad():
        recomputed = lm.token_logprobs(base.policy, proposals[2].prompt, proposals[2].completion_token_ids, 1.0)
    assert proposals[2].logprob == pytest.approx(float(recomputed.sum()), abs=1e-3)  # the sum of the tokens'


@dataclass(frozen=True)
class Forced(Transformers):
    """Writes `answer`, with its real log-probabilities under the model (teacher forcing)."""

    answer: str = ""

    def generate(self, prompt: str, max_new_tokens: int, temperature: float, seed: int) -> lm.Generated:
        text = self.answer
        ids = self.policy.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.policy.tokenizer.eos_token_id]
        with torch.no_grad():
            logprobs = lm.token_logprobs(self.policy, prompt, ids, temperature)
        return lm.Generated(text, ids, logprobs)


def test_generate_publishes_a_valid_answer_with_its_tokens_and_their_log_probability(base: Transformers):
    answer = "Here is my edit:\n```json\n" + json.dumps(VALID) + "\n```"
    backend = Forced(base.policy, "v7", answer)
    settings = Proposer(policy="lm-generate", temperature=0.7, max_resamples=3)
    proposal, = LMGenerate(settings, PROGRAM, loader(backend)).propose(step())
    assert (proposal.parse_error, proposal.policy, proposal.policy_version) == (None, "lm-generate", "v7")
    assert proposal.rationale == VALID["rationale"] and proposal.ops[0].text.startswith("LEARNING_RATE = 6e-3")
    assert proposal.unified_diff.count("\n+L") == 1
    assert proposal.completion_token_ids[-1] == base.policy.tokenizer.eos_token_id
    with torch.no_grad():
        recomputed = lm.token_logprobs(base.policy, proposal.prompt, proposal.completion_token_ids, 0.7).sum()
    assert proposal.logprob == pytest.approx(float(recomputed), abs=1e-3)


@pytest.mark.parametrize("answer, reason", [
    ("I would double the learning rate.", "no JSON object"),
    ('{"rationale": "x", "ops": [{"op": "replace", "start": "4", "end": 4, "text": "A = 1\\n"}]}', "not an action"),
    ('{"rationale": "x", "ops": [{"op": "replace", "start": 99, "end": 99, "text": "A = 1\\n"}]}', "do not apply"),
    ('{"rationale": "x", "ops": [{"op": "replace", "start": 5, "end": 5, "text": "N_LAYER = 2  # transformer '
     'blocks\\n"}]}', "change nothing"),
    ('{"rationale": "x", "ops": [{"op": "replace", "start": 10, "end": 10, "text": "def lr(progress:\\n"}]}',
     "does not compile"),
])
def test_an_answer_is_an_edit_only_if_it_parses_applies_changes_and_compiles(answer: str, reason: str):
    with pytest.raises(NotAnEdit, match=reason):
        parse_edit(answer, CODE)
    rationale, ops = parse_edit(json.dumps(VALID), CODE)
    assert rationale == VALID["rationale"] and "6e-3" in apply_ops(CODE, ops)


# --- openai-greedy over a real HTTP server ------------------------------------------------------------


class ChatServer:
    """A real OpenAI-compatible server (FastAPI + uvicorn on a loopback port): POST /v1/chat/completions answers
    `respond(body)` -> (HTTP status, message content), and every request body is kept."""

    def __init__(self, respond: Callable[[dict], tuple[int, str]], port: int | None = None) -> None:
        self.respond = respond
        self.port = port or free_port()
        self.requests: list[tuple[dict[str, str], dict]] = []
        app = FastAPI()
        app.post("/v1/chat/completions")(self._chat)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def _chat(self, request: Request) -> JSONResponse:
        body = await request.json()
        self.requests.append((dict(request.headers), body))
        status, content = self.respond(body)
        if status != 200:
            return JSONResponse({"error": {"message": content}}, status_code=status)
        return JSONResponse({"id": new_id(), "object": "chat.completion", "model": body["model"],
                             "choices": [{"index": 0, "finish_reason": "stop",
                                          "message": {"role": "assistant", "content": content}}]})

    def __enter__(self) -> ChatServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "the chat server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *_: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def greedy(endpoint: str, **settings: Any) -> OpenAIGreedy:
    configured = Proposer(policy="openai-greedy", endpoint=endpoint, api_model="tiny-chat", **settings)
    return OpenAIGreedy(configured, PROGRAM, chat_client(configured))


def test_openai_greedy_proposes_the_endpoints_answer(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TEST_CHAT_KEY", "sk-local")
    with ChatServer(lambda _: (200, "Sure.\n" + json.dumps(VALID) + "\nThat should help.")) as server:
        proposal, = greedy(server.endpoint, api_key_env="TEST_CHAT_KEY").propose(step())
    assert (proposal.policy, proposal.policy_version, proposal.parse_error) == ("openai-greedy", "tiny-chat", None)
    assert proposal.rationale == VALID["rationale"] and "6e-3" in apply_ops(CODE, proposal.ops)
    assert proposal.logprob is None and proposal.prompt and PROGRAM.strip() in proposal.prompt
    (headers, body), = server.requests
    assert headers["authorization"] == "Bearer sk-local"
    assert (body["model"], body["temperature"], body["messages"]) == (
        "tiny-chat", 0, [{"role": "user", "content": proposal.prompt}])
    assert body["response_format"]["json_schema"]["schema"]["$ref"].endswith("Answer")


def test_openai_garbage_is_published_as_parse_errors_and_asked_again_with_the_reason():
    with ChatServer(lambda _: (200, "lorem ipsum { not json")) as server:
        proposals = list(greedy(server.endpoint, max_resamples=2).propose(step()))
    assert len(proposals) == len(server.requests) == 3
    assert all(p.parse_error and "no JSON object" in p.parse_error and p.ops == [] for p in proposals)
    assert proposals[0].rationale == "lorem ipsum { not json"  # what the model said, for the reader of the ledger
    retry = server.requests[1][1]["messages"]
    assert [m["role"] for m in retry] == ["user", "assistant", "user"] and "not a valid edit" in retry[2]["content"]


def test_openai_server_without_structured_output_is_asked_without_it():
    def respond(body: dict) -> tuple[int, str]:
        return (400, "response_format is not supported") if "response_format" in body else (200, json.dumps(VALID))

    with ChatServer(respond) as server:
        policy = greedy(server.endpoint)
        assert next(policy.propose(step())).parse_error is None
        assert next(policy.propose(step())).parse_error is None
    assert ["response_format" in body for _, body in server.requests] == [True, False, False]


def test_openai_endpoint_down_or_failing_is_unavailable_not_a_bad_answer():
    down = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(PolicyUnavailable, match=f"{down}/chat/completions failed: ConnectError"):
        next(greedy(down).propose(step()))
    with ChatServer(lambda _: (500, "overloaded")) as server, pytest.raises(PolicyUnavailable, match="500"):
        next(greedy(server.endpoint).propose(step()))


async def _take(url: str, count: int) -> None:
    """Be the executor for a moment: take `count` proposals off the work queue and ack them."""
    bus = await Bus.connect([url], "test")
    await bus.ensure_stream()
    await bus.ensure_work_queue(ack_wait_s=3, max_deliver=3)  # as bench/loop.py configures the executors
    work = await bus.pull(WORK_QUEUE)
    taken = 0
    while taken < count:
        try:
            messages = await work.fetch(1, timeout=5)
        except TimeoutError:
            continue
        for message in messages:
            await message.ack_sync()
            taken += 1
    await bus.close()


def test_the_proposer_waits_out_an_endpoint_that_is_down_and_loses_nothing(nats_server, small_corpus: Path,
                                                                            tmp_path: Path):
    port = free_port()
    answers = iter(["I cannot answer in JSON today.", json.dumps(VALID)])
    loop = Loop(nats_server, make_target(tmp_path / "target", small_corpus), tmp_path, PROPOSER_NOISE_REPEATS=0,
                PROPOSER_POLICY="openai-greedy", PROPOSER_ENDPOINT=f"http://127.0.0.1:{port}/v1",
                PROPOSER_API_MODEL="tiny-chat", PROPOSER_MAX_EXPERIMENTS=3).start("ledger", "proposer")
    try:
        asyncio.run(asyncio.wait_for(_take(nats_server.url, 1), 120))  # the baseline
        loop.wait_for(lambda: "asking again in 4 s" in loop.log("proposer"), 60, "the proposer to back off twice")
        assert loop.count("SELECT count(*) FROM proposals") == 1
        with ChatServer(lambda _: (200, next(answers, json.dumps(VALID))), port=port):
            loop.wait_for(lambda: loop.count("SELECT count(*) FROM proposals") >= 3, 60, "the endpoint's proposals")
        assert loop.alive("proposer")
    finally:
        loop.stop()
    log = loop.log("proposer")
    assert f"the chat endpoint http://127.0.0.1:{port}/v1/chat/completions failed: ConnectError" in log
    assert "asking again in 1 s" in log and "asking again in 2 s" in log
    rows = loop.sql("SELECT policy, policy_version, parse_error, rationale, prompt IS NOT NULL FROM proposals "
                    "ORDER BY seq")
    assert [row[:2] for row in rows] == [("random-search", "grid-v1"), ("openai-greedy", "tiny-chat"),
                                         ("openai-greedy", "tiny-chat")]
    assert "no JSON object" in rows[1][2] and rows[1][3] == "I cannot answer in JSON today." and rows[1][4]
    assert rows[2][2] is None and rows[2][3] == VALID["rationale"] and rows[2][4]


# --- random search and the config key ------------------------------------------------------------------


def test_random_search_is_the_grid_step_and_starts_without_torch(tmp_path: Path):
    policy = make_policy(Proposer(policy="random"), PROGRAM, tmp_path, 32)
    proposal, = policy.propose(step())
    assert isinstance(policy, RandomSearch)
    assert (proposal.policy, proposal.policy_version, len(proposal.ops)) == ("random-search", "grid-v1", 1)
    check = "import sys, services.proposer.main; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", check], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


def test_the_embedded_default_is_built_on_first_use_and_said_to_be_untrained(tmp_path: Path,
                                                                              caplog: pytest.LogCaptureFixture):
    with caplog.at_level(logging.WARNING, logger="policy"):
        policy = make_policy(Proposer(policy="lm-generate"), PROGRAM, tmp_path, 32)
    assert isinstance(policy, LMGenerate) and policy.version == "base"
    assert isinstance(policy.backend, Transformers)
    assert policy.backend.policy.base == str(tmp_path / "models" / "default")
    assert "UNTRAINED" in caplog.text


# --- adapters and hot-loading ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapters(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two adapter versions saved from a fresh policy after one and after two gradient steps on log π."""
    policy = lm.load_policy(str(model_dir), "cpu")
    optimizer = torch.optim.Adam(policy.trainable_parameters(), lr=1e-2)
    prompt, texts = PROGRAM + CODE, [action.text for action in catalog(CODE)]
    saved = []
    for version in ("v1", "v2"):
        loss = -lm.score(policy, prompt, texts, grad=True).log_pi[0]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        folder = tmp_path_factory.mktemp("adapters") / version
        policy.save(folder)
        saved.append(folder)
    return saved


def test_an_adapter_packs_to_the_same_bytes_and_unpacks_whole_and_once(adapters: list[Path], tmp_path: Path):
    data = pack_adapter(adapters[0])
    assert pack_adapter(adapters[0]) == data
    folder = unpack_adapter(data, tmp_path / "v1")
    assert lm.folder_sha256(folder) == lm.folder_sha256(adapters[0])
    assert unpack_adapter(data, tmp_path / "v1") == folder  # again: the same contents are fine
    with pytest.raises(FileExistsError):
        unpack_adapter(pack_adapter(adapters[1]), tmp_path / "v1")  # a version never changes
    evil = BytesIO()
    with tarfile.open(fileobj=evil, mode="w") as tar:
        info = tarfile.TarInfo("link")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(ValueError, match="regular files only"):
        unpack_adapter(evil.getvalue(), tmp_path / "evil")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["v1"]  # nothing half-unpacked is left


async def publish_adapter(bus: Bus, folder: Path, version: str, index: int, sha256: str | None = None) -> None:
    name = f"adapter-{version}"
    stored = await bus.put_object(name, pack_adapter(folder))
    stats = PPOStats(policy_loss=0.1, value_loss=0.2, entropy=3.0, approx_kl=0.01, clip_fraction=0.0, mean_reward=-0.05)
    await bus.publish(PolicyUpdated(event_id=new_id(), producer="learner/test", ts=now(), policy_version=version,
                                    adapter_name=name, adapter_sha256=sha256 or stored, stats=stats,
                                    update_index=index))


async def test_the_proposer_loads_the_last_adapter_on_start_then_every_new_one(
        nats_server, base: Transformers, adapters: list[Path], tmp_path: Path, caplog: pytest.LogCaptureFixture):
    bus = await Bus.connect([nats_server.url], "test")
    await bus.ensure_stream()
    await publish_adapter(bus, adapters[0], "v1", 1)
    policy = scorer(base)
    follower = AdapterFollower(bus, policy, tmp_path / "policy")
    try:
        await follower.start()  # a restart: the stream's last update is loaded before the first step
        assert policy.version == "v1" and (tmp_path / "policy" / "v1").is_dir()
        await publish_adapter(bus, adapters[1], "broken", 2, sha256="0" * 64)
        await publish_adapter(bus, adapters[1], "v2", 3)
        for _ in range(200):
            if policy.version == "v2":
                break
            await asyncio.sleep(0.05)
    finally:
        await follower.stop()
        await bus.close()
    assert policy.version == "v2"
    assert "adapter broken (update 2) not loaded, still proposing with v1" in caplog.text

    proposal = await asyncio.to_thread(lambda: next(policy.propose(step())))
    assert proposal.policy_version == "v2"
    trained = lm.score(lm.load_policy(base.policy.base, "cpu", adapter=adapters[1]), proposal.prompt,
                       proposal.candidates)
    untrained = lm.score(base.policy, proposal.prompt, proposal.candidates)
    assert proposal.logprob == pytest.approx(float(trained.log_pi[proposal.action_index]), abs=1e-5)
    assert not torch.allclose(trained.log_pi, untrained.log_pi, atol=1e-4)  # the adapter changed the scores
