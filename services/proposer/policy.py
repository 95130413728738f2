"""The search step's four policies (paper §4.1): which edit of c* to run next, once no scheduled run (the
baseline, its noise repeats, a confirmation: search.scheduled_proposal) is due. `[proposer] policy` picks one.

- random (search.grid_proposal): one constant of c* moved one step of the grid; no learning.
- lm-score: π_θ scores every action of the catalogue (catalog.py) by its log-likelihood after the state
  prompt s_t (prompt.py), and one action is drawn from π(a|s) = softmax over the candidates (lm.score).
- lm-generate: π_θ writes the edit as JSON (lm.generate), parsed strictly (lm.parse_action). An answer that
  does not parse, apply to c* or compile is published as a proposal with `parse_error` (the executor records
  it invalid, the learner gives it −p_syntax: Algorithm 1, line 7) and π_θ samples again, at most
  max_resamples times per step.
- openai-greedy: the paper's Greedy LLM baseline: any OpenAI-compatible chat endpoint at temperature 0, no
  learning; answers are checked as lm-generate's, and a bad one is sent back with the reason.

`propose(step)` yields the step's proposals in order: its bad answers, if any, then the edit. Each records the
policy and the version that made it ("base" before any adapter, then PolicyUpdated.policy_version; the model
name for openai-greedy); the LM policies also the prompt and what PPO needs (log π, V(s), the candidates and
the chosen index, or the tokens written). The draws are seeded by (seed, experiment count), as random
search's are, so a restarted proposer repeats them. The calls block (a model, an HTTP request): main.py runs
them in a worker thread.

The language model sits behind `Backend`, one adapter version each, made by a `LoadBackend` (`[proposer]
backend`): `Transformers` here (transformers + peft, CPU or GPU, lm.py), or vllm_backend.VLLMEngine.backend
(one vLLM engine on a GPU, each version a LoRA). lm.py (torch, transformers) is imported only where a model is
used, so that the proposer with random search starts without torch, like the ledger.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import httpx

from services.proposer.catalog import catalog
from services.proposer.grid import GridError
from services.proposer.prompt import ANSWER_SCHEMA, PromptTooLong, build_prompt, state_diagnostics
from services.proposer.search import edit_proposal, grid_proposal
from shared.config import Proposer as Settings
from shared.diffs import InvalidDiff, apply_ops
from shared.events import EditOp, ProposalCreated
from shared.queries import LedgerState

if TYPE_CHECKING:
    from shared.policy import lm

log = logging.getLogger("proposer")

BASE_VERSION = "base"
"""The policy version of a language model without a learned adapter."""
LM_SCORE = "lm-score"
LM_GENERATE = "lm-generate"
OPENAI_GREEDY = "openai-greedy"
BYTES_PER_TOKEN = 3
"""openai-greedy cannot count the remote model's tokens: a prompt is taken to have one per 3 UTF-8 bytes, more
than BPE tokenizers give for English and code (about 4), so the estimate errs on the short side."""
REQUEST_TIMEOUT = httpx.Timeout(600.0, connect=10.0)
"""A chat answer may take minutes on a busy server; a refused or silent connection is known in seconds."""
MAX_SHOWN_ANSWER = 500
"""Characters of a bad answer kept as its proposal's rationale, for a human reading the ledger."""


@dataclass(frozen=True)
class Step:
    """One search step's inputs: the ledger's state, the code to edit (c*), who proposes, and when."""

    state: LedgerState
    parent: str
    producer: str
    at: datetime


class SearchPolicy(Protocol):
    def propose(self, step: Step) -> Iterator[ProposalCreated]: ...


class CannotPropose(RuntimeError):
    """No proposal can be made for this c* (nothing to move, a prompt that cannot fit): waiting will not help."""


class PolicyUnavailable(RuntimeError):
    """The policy's server failed (down, an error, an answer that is no chat completion): try again later."""


class NotAnEdit(ValueError):
    """A policy's answer that is not one edit of c* that compiles; the message says why."""


# --- random search -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RandomSearch:
    settings: Settings

    def propose(self, step: Step) -> Iterator[ProposalCreated]:
        try:
            yield grid_proposal(step.state, step.parent, self.settings, step.producer)
        except GridError as error:
            raise CannotPropose(f"random search cannot mutate c*: {error}") from None


# --- the language model --------------------------------------------------------------------------------


class Backend(Protocol):
    """π_θ with one adapter version: what the LM policies ask of a model, wherever it runs."""

    version: str

    def count_tokens(self, text: str) -> int: ...

    def score(self, prompt: str, actions: list[str]) -> lm.Scores: ...

    def generate(self, prompt: str, max_new_tokens: int, temperature: float, seed: int) -> lm.Generated: ...

    def value(self, prompt: str) -> float | None: ...


@dataclass(frozen=True)
class Transformers:
    """π_θ in this process with transformers + peft (lm.py). Never changed: a new adapter is a new backend."""

    policy: lm.Policy
    version: str

    def count_tokens(self, text: str) -> int:
        return len(self.policy.tokenizer(text)["input_ids"])

    def score(self, prompt: str, actions: list[str]) -> lm.Scores:
        from shared.policy import lm

        return lm.score(self.policy, prompt, actions)

    def generate(self, prompt: str, max_new_tokens: int, temperature: float, seed: int) -> lm.Generated:
        from shared.policy import lm

        return lm.generate(self.policy, prompt, max_new_tokens, temperature, seed)

    def value(self, prompt: str) -> float:
        """V(s) as lm.score computes it beside π: the value head on the prompt's last hidden state (the
        generate mode logs it for PPO's advantages, eq. 3)."""
        import torch

        ids = torch.tensor([self.policy.tokenizer(prompt)["input_ids"]], device=self.policy.device)
        with torch.no_grad():
            out = self.policy.model(input_ids=ids, output_hidden_states=True, logits_to_keep=1)
            return float(self.policy.value_head(out.hidden_states[-1][0, -1].float()))


LoadBackend = Callable[[Path | None, str], Backend]
"""(adapter folder, version) -> π_θ with that adapter; (None, BASE_VERSION): the base model."""


def load_transformers(model: str, device: str, adapter: Path | None, version: str) -> Transformers:
    """The model with this adapter (None: a fresh one, whose B matrices are zero: the base model)."""
    from shared.policy import lm

    return Transformers(lm.load_policy(model, device, adapter), version)


class LanguageModelPolicy:
    """What lm-score and lm-generate share: the state prompt, and the backend, which a new adapter replaces
    while the proposer runs (hot-loading, main.py). A step reads the backend once, so every proposal is
    sampled and labelled with one adapter version."""

    def __init__(self, settings: Settings, program_md: str, load_backend: LoadBackend) -> None:
        self.settings = settings
        self.program_md = program_md
        self.load_backend = load_backend
        self.backend = load_backend(None, BASE_VERSION)

    @property
    def version(self) -> str:
        return self.backend.version

    def load(self, adapter: Path, version: str) -> None:
        """Propose with this adapter (a folder lm.Policy.save wrote) from the next step on."""
        self.backend = self.load_backend(adapter, version)

    def prompt(self, step: Step, backend: Backend) -> str:
        return state_prompt(step, self.program_md, backend.count_tokens, self.settings.token_limit)


class LMScore(LanguageModelPolicy):
    """a ~ π(·|s) over the catalogue's actions (§4.1 in score mode); logprob = log π(a|s), value = V(s).

    With more actions than [proposer] max_candidates, π_θ chooses among that many drawn uniformly (kept in
    catalogue order): the proposal records them, so PPO's ratio is over the same set."""

    def propose(self, step: Step) -> Iterator[ProposalCreated]:
        backend, settings = self.backend, self.settings
        try:
            actions = catalog(step.parent)
        except GridError as error:
            raise CannotPropose(f"no catalogue for c*: {error}") from None
        if not actions:
            raise CannotPropose("the catalogue has no action that applies to c*")
        rng = random.Random(f"{settings.seed}:{step.state.experiments}")
        if 0 < settings.max_candidates < len(actions):
            actions = [actions[i] for i in sorted(rng.sample(range(len(actions)), settings.max_candidates))]
        prompt = self.prompt(step, backend)
        texts = [action.text for action in actions]
        scores = backend.score(prompt, texts)
        index = sample_index(scores.pi.tolist(), rng)
        action = actions[index]
        value = None if scores.value is None else float(scores.value)
        yield edit_proposal(step.producer, step.parent, action.ops, action.description, LM_SCORE, backend.version,
                            logprob=float(scores.log_pi[index]), value=value, prompt=prompt, candidates=texts,
                            action_index=index)


class LMGenerate(LanguageModelPolicy):
    """The edit written token by token (§4.1 in generate mode); logprob = the sum of the tokens' log-probs,
    completion_token_ids the tokens, so the learner can take one PPO ratio per token."""

    def propose(self, step: Step) -> Iterator[ProposalCreated]:
        backend, settings = self.backend, self.settings
        prompt = self.prompt(step, backend)
        value = backend.value(prompt)
        for attempt in range(1 + settings.max_resamples):
            seed = draw_seed(settings.seed, step.state.experiments + attempt)
            sample = backend.generate(prompt, settings.max_new_tokens, settings.temperature, seed)
            fields = dict(logprob=float(sample.logprobs.sum()), value=value, prompt=prompt,
                          completion_token_ids=sample.token_ids)
            try:
                rationale, ops = parse_edit(sample.text, step.parent)
            except NotAnEdit as error:
                log.info("sample %d of %d is not an edit: %s", attempt + 1, 1 + settings.max_resamples, error)
                yield not_an_edit(step, sample.text, error, LM_GENERATE, backend.version, **fields)
                continue
            yield edit_proposal(step.producer, step.parent, ops, rationale, LM_GENERATE, backend.version, **fields)
            return
        log.warning("no edit in %d samples; the next step samples again", 1 + settings.max_resamples)


# --- the Greedy LLM baseline ---------------------------------------------------------------------------


RESPONSE_FORMAT = {"type": "json_schema",
                   "json_schema": {"name": "edit", "schema": json.loads(ANSWER_SCHEMA), "strict": False}}
"""Structured output, for servers that take it (OpenAI, vLLM, llama.cpp): the answer is then valid JSON of
prompt.Answer. A server that refuses the field (HTTP 400 or 422) is asked without it from then on."""


class OpenAIGreedy:
    """The Greedy LLM baseline: an instruction-tuned model behind an OpenAI-compatible API, at temperature 0."""

    def __init__(self, settings: Settings, program_md: str, client: httpx.Client) -> None:
        self.settings = settings
        self.program_md = program_md
        self.client = client
        self.structured = True
        """Whether to send RESPONSE_FORMAT: until the server refuses it."""

    def propose(self, step: Step) -> Iterator[ProposalCreated]:
        settings = self.settings
        prompt = state_prompt(step, self.program_md, estimate_tokens, settings.token_limit)
        messages = [{"role": "user", "content": prompt}]
        for attempt in range(1 + settings.max_resamples):
            answer = self.chat(messages)
            try:
                rationale, ops = parse_edit(answer, step.parent)
            except NotAnEdit as error:
                log.info("answer %d of %d is not an edit: %s", attempt + 1, 1 + settings.max_resamples, error)
                yield not_an_edit(step, answer, error, OPENAI_GREEDY, settings.api_model, prompt=prompt)
                messages += [{"role": "assistant", "content": answer},
                             {"role": "user", "content": f"That answer is not a valid edit: {error}\n"
                                                         "Answer again with one JSON object as described above."}]
                continue
            yield edit_proposal(step.producer, step.parent, ops, rationale, OPENAI_GREEDY, settings.api_model,
                                prompt=prompt)
            return
        log.warning("no edit in %d answers; the next step asks again", 1 + settings.max_resamples)

    def chat(self, messages: list[dict[str, str]]) -> str:
        """The endpoint's greedy answer (temperature 0); PolicyUnavailable when there is none to parse."""
        url = f"{self.settings.endpoint.rstrip('/')}/chat/completions"
        body: dict[str, Any] = {"model": self.settings.api_model, "messages": messages, "temperature": 0,
                                "max_tokens": self.settings.max_new_tokens}
        if self.structured:
            body["response_format"] = RESPONSE_FORMAT
        try:
            response = self.client.post(url, json=body)
            if self.structured and response.status_code in (400, 422):
                log.info("%s refused response_format (HTTP %d: %s); asking without it from now on", url,
                         response.status_code, response.text[:200])
                self.structured = False
                return self.chat(messages)
            response.raise_for_status()
            content = response.json()["choices"][0]["message"]["content"]
        except httpx.HTTPError as error:
            raise PolicyUnavailable(f"the chat endpoint {url} failed: {type(error).__name__}: {error}") from None
        except (ValueError, KeyError, IndexError, TypeError) as error:
            raise PolicyUnavailable(f"the chat endpoint {url} answered no chat completion: {error!r}") from None
        return content if isinstance(content, str) else ""


def chat_client(settings: Settings) -> httpx.Client:
    """An HTTP client with the API key from the environment variable settings.api_key_env, if it is set."""
    key = os.environ.get(settings.api_key_env, "") if settings.api_key_env else ""
    return httpx.Client(timeout=REQUEST_TIMEOUT, headers={"Authorization": f"Bearer {key}"} if key else {})


# --- shared by the policies ----------------------------------------------------------------------------


def state_prompt(step: Step, program_md: str, count_tokens: Callable[[str], int], token_limit: int) -> str:
    """s_t (§4.1): program.md, c*, the diagnostics and the history h (eq. 5), in at most token_limit tokens."""
    diagnostics = state_diagnostics(step.state, step.at)
    try:
        return build_prompt(program_md, step.parent, step.state.history, diagnostics, count_tokens, token_limit)
    except PromptTooLong as error:
        raise CannotPropose(f"[proposer] token_limit is too small for the state: {error}") from None


def estimate_tokens(text: str) -> int:
    return math.ceil(len(text.encode("utf-8")) / BYTES_PER_TOKEN)


def sample_index(pi: Sequence[float], rng: random.Random) -> int:
    """a ~ π(·|s): the candidate whose cumulative probability first passes a uniform draw of `rng`."""
    return rng.choices(range(len(pi)), weights=pi)[0]


def draw_seed(seed: int, count: int) -> int:
    """The generator seed of the sample that would be proposal number count + 1 (a restart draws it again)."""
    return random.Random(f"{seed}:{count}").getrandbits(63)


def parse_edit(answer: str, parent: str) -> tuple[str, list[EditOp]]:
    """The rationale and ops of an answer, checked as Algorithm 1 checks an action (lines 5-7): the JSON
    parses (lm.parse_action), the ops apply to c*, change it, and the result compiles; else NotAnEdit."""
    from shared.policy.lm import BadAction, parse_action

    try:
        rationale, ops = parse_action(answer)
    except BadAction as error:
        raise NotAnEdit(str(error)) from None
    try:
        child = apply_ops(parent, ops)
    except InvalidDiff as error:
        raise NotAnEdit(f"the ops do not apply to c*: {error}") from None
    if child == parent:
        raise NotAnEdit("the ops change nothing")
    try:
        compile(child, "train.py", "exec")
    except (SyntaxError, ValueError) as error:
        line = f" (line {error.lineno})" if isinstance(error, SyntaxError) else ""
        raise NotAnEdit(f"the edited train.py does not compile: {error}{line}") from None
    return rationale, ops


def not_an_edit(step: Step, answer: str, error: NotAnEdit, policy: str, version: str,
                **fields: Any) -> ProposalCreated:
    """A bad answer as a proposal: no ops, the reason as parse_error, the answer itself as the rationale."""
    shown = answer if len(answer) <= MAX_SHOWN_ANSWER else answer[:MAX_SHOWN_ANSWER] + " [...]"
    return edit_proposal(step.producer, step.parent, [], shown, policy, version, parse_error=str(error), **fields)


# --- the one config key --------------------------------------------------------------------------------


def make_policy(settings: Settings, program_md: str, data_dir: Path, lora_rank: int) -> SearchPolicy:
    """The policy `[proposer] policy` names; the LM ones start with the base model (no adapter) and serve
    adapters of `lora_rank` ([learner] lora_r: vLLM reserves room for it)."""
    if settings.policy == "random":
        return RandomSearch(settings)
    if settings.policy == OPENAI_GREEDY:
        if not settings.endpoint or not settings.api_model:
            raise CannotPropose("policy openai-greedy needs [proposer] endpoint and api_model")
        log.info("policy openai-greedy: %s at %s, temperature 0", settings.api_model, settings.endpoint)
        return OpenAIGreedy(settings, program_md, chat_client(settings))
    from shared.policy.default_model import resolve_model
    from shared.policy.lm import resolve_device

    model, device = resolve_model(settings.model, data_dir), resolve_device(settings.device)
    kind = LMScore if settings.policy == LM_SCORE else LMGenerate
    log.info("policy %s: %s on %s with %s", settings.policy, model, device, settings.backend)
    if settings.backend == "vllm":
        from services.proposer.vllm_backend import VLLMEngine

        return kind(settings, program_md, VLLMEngine(model, device, settings.gpu_memory, lora_rank).backend)
    return kind(settings, program_md, functools.partial(load_transformers, model, device))
