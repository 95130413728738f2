"""The policy π_θ (paper §4.1): a causal language model with a LoRA adapter and a value head.

It acts in one of two ways:

- score mode (the main one on CPU): the prompt is the state s, the candidate edits are the actions, and
  π(a|s) is a softmax over their length-normalised log-likelihoods (`score`);
- generate mode: the model writes its answer token by token, and every token is an action (`generate`,
  `token_logprobs`); `parse_action` turns the answer into edit ops.

PPO (eq. 2–4) trains only the adapter (on the attention projections; `[learner] lora_r, lora_alpha`, the
paper's r = 32, α = 64 by default, §7.3) and the value head V(s), which sits beside the adapter, not inside
the peft model. The base weights never change, so the same model with the adapter disabled is the reference
policy the learner measures its KL against. The model stays in eval mode throughout (no dropout), so π_θold
and π_θ are computed the same way and the first PPO ratio is exactly 1.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import msgspec
import torch
import torch.nn as nn
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, PreTrainedTokenizerBase
from transformers.pytorch_utils import Conv1D

from shared.config import Learner
from shared.events import EditOp

LORA_SEED = 0
"""A fresh adapter's A matrices are drawn from this seed (B starts at zero), so every fresh policy is alike."""
VALUE_HEAD_FILE = "value_head.safetensors"
MAX_CACHED_TOKENS = 1 << 17
"""Score mode copies the prompt's key/value cache once per candidate: at most this many tokens at a time."""


class ValueHead(nn.Module):
    """V(s) from the final hidden state at the prompt's last token. Zero-initialised, so every state starts
    at V = 0 and the first advantages are the raw returns rather than noise from random weights."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden).squeeze(-1)


@dataclass
class Policy:
    model: PeftModel
    tokenizer: PreTrainedTokenizerBase
    value_head: ValueHead
    base: str
    """The base model's hub id or path."""

    @property
    def device(self) -> torch.device:
        return self.value_head.linear.weight.device

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What PPO optimises: the LoRA matrices and the value head; the base model is frozen."""
        return [p for p in self.model.parameters() if p.requires_grad] + list(self.value_head.parameters())

    @contextmanager
    def reference(self) -> Iterator[None]:
        """Within this block the policy is the base model (adapter off): the reference for the learner's KL."""
        with self.model.disable_adapter():
            yield

    def save(self, directory: Path) -> str:
        """Write the adapter and value head to `directory` (one folder per policy version) and return their
        sha256. A version never changes: saving the same weights again is a no-op, different ones raise."""
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.saving-", dir=directory.parent))
        try:
            self.model.save_pretrained(staging)
            save_file(self.value_head.state_dict(), staging / VALUE_HEAD_FILE)
            sha256 = folder_sha256(staging)
            if not directory.exists():
                staging.rename(directory)
            elif folder_sha256(directory) != sha256:
                raise FileExistsError(f"{directory} already holds a different policy version")
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return sha256


def folder_sha256(folder: Path) -> str:
    """sha256 over the files' names and contents, in name order: identifies a saved version on disk (the object
    store and PolicyUpdated.adapter_sha256 name the packed tar's bytes, shared/policy/adapters.py)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(json.dumps(str(path.relative_to(folder))).encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def resolve_device(device: str) -> str:
    """[proposer] device as it is; "": cuda if available, else cpu."""
    if device:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_policy(model: str, device: str, adapter: Path | None = None, rank: int = Learner().lora_r,
                alpha: int = Learner().lora_alpha) -> Policy:
    """The base model (hub id or local path) with a fresh adapter of this rank and α, or the one saved in
    `adapter` (which has its own).

    float32 on CPU; bfloat16 on CUDA, where the adapter and value head stay float32 (peft's default)."""
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    tokenizer = AutoTokenizer.from_pretrained(model)
    base = AutoModelForCausalLM.from_pretrained(model, dtype=dtype)
    value_head = ValueHead(base.config.get_text_config().hidden_size)
    if adapter is None:
        transposed = any(isinstance(module, Conv1D) for module in base.modules())  # GPT-2 stores W as (in, out)
        config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, fan_in_fan_out=transposed,
                            target_modules=attention_projections(base))
        with torch.random.fork_rng(devices=[]):  # built on the CPU, so the CPU generator is the one drawn from
            torch.manual_seed(LORA_SEED)
            peft_model = get_peft_model(base, config)
    else:
        peft_model = PeftModel.from_pretrained(base, adapter, is_trainable=True)
        value_head.load_state_dict(load_file(Path(adapter) / VALUE_HEAD_FILE))
    peft_model.to(device).eval()
    return Policy(peft_model, tokenizer, value_head.to(device).eval(), model)


def attention_projections(model: nn.Module) -> str:
    """A regex (peft full-matches it) for the linear layers directly inside each attention module: q/k/v/o_proj
    in Llama-like models, c_attn and c_proj in GPT-2 (whose MLP also has a c_proj, hence full names).
    Layer numbers become \\d+: one short pattern per kind of projection, and a stable adapter_config.json
    (a list is saved as a set, in an order that changes from run to run)."""
    names = {re.sub(r"\\\.\d+\\\.", r"\\.\\d+\\.", re.escape(f"{name}.{child}"))
             for name, module in model.named_modules() if "Attention" in type(module).__name__
             for child, layer in module.named_children() if isinstance(layer, nn.Linear | Conv1D)}
    if not names:
        raise ValueError(f"found no attention projections in {type(model).__name__} to put the adapter on")
    return "|".join(sorted(names))


@dataclass(frozen=True)
class Scores:
    """The policy over a set of candidate actions for one state. Tensors; differentiable if scored with grad."""

    logprob: torch.Tensor
    """[N] log p(a|s): the sum of the action's token log-probabilities given the prompt."""
    tokens: torch.Tensor
    """[N] tokens per action."""
    log_pi: torch.Tensor
    """[N] log π(a|s) = log_softmax(logprob / tokens) over the candidates."""
    entropy: torch.Tensor
    """[] H[π(·|s)], the entropy bonus of eq. 4."""
    value: torch.Tensor | None
    """[] V(s); None from a backend without the value head (vLLM: the learner computes it)."""

    @property
    def pi(self) -> torch.Tensor:
        return self.log_pi.exp()


def score(policy: Policy, prompt: str, action_texts: list[str], *, grad: bool = False) -> Scores:
    """π(a|s) over candidate actions: each one's log-likelihood as a continuation of the prompt, and V(s).

    π is a softmax over the candidates' mean per-token log-likelihoods, not their sums: a sum adds one
    negative term per token, so it would favour the shortest edit whatever it says; the mean compares how
    plausible each edit is token by token, independent of its length.

    The prompt runs once; its key/value cache is shared by all candidates, which run as one right-padded
    batch (causal attention keeps the padding out of every real token's view). grad=False (proposing)
    records no graph; grad=True (the learner's PPO epochs) makes every field differentiable.
    """
    if not action_texts:
        raise ValueError("score needs at least one candidate action")
    with torch.enable_grad() if grad else torch.no_grad():
        prompt_ids = _encode(policy, prompt, special_tokens=True)
        actions = [_encode(policy, text, special_tokens=False) for text in action_texts]
        for index, ids in enumerate(actions):
            if len(ids) == 0:
                raise ValueError(f"candidate {index} is empty: an action needs at least one token")
        # A cache without the config keeps every layer whole (no sliding window): it must hold the whole prompt.
        out = policy.model(input_ids=prompt_ids[None], past_key_values=DynamicCache(), use_cache=True,
                           output_hidden_states=True, logits_to_keep=1)
        value = policy.value_head(out.hidden_states[-1][0, -1].float())
        first = out.logits[0, -1].float().log_softmax(-1)
        prompt_cache = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        per_chunk = max(1, MAX_CACHED_TOKENS // len(prompt_ids))
        logprob = torch.cat([_continuation_logprobs(policy, prompt_cache, first, actions[i:i + per_chunk])
                             for i in range(0, len(actions), per_chunk)])
        return candidate_scores(logprob, torch.tensor([len(ids) for ids in actions], device=policy.device), value)


def candidate_scores(logprob: torch.Tensor, tokens: torch.Tensor, value: torch.Tensor | None) -> Scores:
    """π over the candidates from their summed log-likelihoods and lengths in tokens (see score)."""
    log_pi = (logprob / tokens).log_softmax(0)
    return Scores(logprob, tokens, log_pi, -(log_pi.exp() * log_pi).sum(), value)


def _continuation_logprobs(policy: Policy, prompt_cache: list[tuple[torch.Tensor, torch.Tensor]],
                           first: torch.Tensor, actions: list[torch.Tensor]) -> torch.Tensor:
    """Summed log-probabilities of each action after the prompt: the first token from the prompt's last
    logits, the rest from one batched pass of the actions (all but their last token) over the cache."""
    n, width = len(actions), max(len(ids) for ids in actions)
    ids = torch.zeros(n, width, dtype=torch.long, device=policy.device)
    real = torch.zeros(n, width, dtype=torch.bool, device=policy.device)
    for row, action in enumerate(actions):
        ids[row, :len(action)], real[row, :len(action)] = action, True
    logprob = first[ids[:, 0]]
    if width == 1:
        return logprob
    cache = DynamicCache([(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)) for k, v in prompt_cache])
    prompt_length = prompt_cache[0][0].shape[-2]
    attention_mask = torch.cat([real.new_ones(n, prompt_length), real[:, :-1]], dim=1).long()
    logits = policy.model(input_ids=ids[:, :-1], attention_mask=attention_mask, past_key_values=cache,
                          use_cache=True).logits.float()
    targets = logits.gather(-1, ids[:, 1:, None]).squeeze(-1) - logits.logsumexp(-1)
    return logprob + torch.where(real[:, 1:], targets, 0.0).sum(1)


@dataclass(frozen=True)
class Generated:
    text: str
    """The answer, special tokens removed."""
    token_ids: list[int]
    """The sampled tokens, the end-of-sequence token included if the model stopped by itself."""
    logprobs: torch.Tensor
    """[T] log-probability of each sampled token under the distribution it was drawn from (PPO's per-token
    π_θold), recomputable with token_logprobs."""


def generate(policy: Policy, prompt: str, max_new_tokens: int, temperature: float, seed: int) -> Generated:
    """Sample an answer token by token from softmax(logits / temperature); the same seed gives the same answer."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, not {temperature}")
    generator = torch.Generator(policy.device).manual_seed(seed)
    tokens: list[int] = []
    logprobs: list[torch.Tensor] = []
    with torch.no_grad():
        cache, inputs = DynamicCache(), _encode(policy, prompt, special_tokens=True)[None]
        for _ in range(max_new_tokens):
            logits = policy.model(input_ids=inputs, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
            log_p = (logits[0, -1].float() / temperature).log_softmax(-1)
            token = torch.multinomial(log_p.exp(), 1, generator=generator)
            tokens.append(int(token))
            logprobs.append(log_p[token])
            if tokens[-1] == policy.tokenizer.eos_token_id:
                break
            inputs = token[None]
    text = policy.tokenizer.decode(tokens, skip_special_tokens=True)
    return Generated(text, tokens, torch.cat(logprobs) if logprobs else torch.zeros(0, device=policy.device))


def token_logprobs(policy: Policy, prompt: str, completion_token_ids: list[int],
                   temperature: float = 1.0) -> torch.Tensor:
    """[T] log-probabilities of a completion's tokens after the prompt, in one pass; differentiable under grad.
    With the temperature it was generated at, this recomputes Generated.logprobs."""
    prompt_ids = _encode(policy, prompt, special_tokens=True)
    completion = torch.tensor(completion_token_ids, dtype=torch.long, device=policy.device)
    ids = torch.cat([prompt_ids, completion])[None]
    logits = policy.model(input_ids=ids, logits_to_keep=len(completion) + 1).logits[0, :-1].float() / temperature
    return logits.gather(-1, completion[:, None]).squeeze(-1) - logits.logsumexp(-1)


def _encode(policy: Policy, text: str, *, special_tokens: bool) -> torch.Tensor:
    """Token ids on the policy's device. Only the prompt gets the tokenizer's special tokens (a BOS, if any):
    an action is scored as a continuation, tokenized on its own."""
    ids = policy.tokenizer(text, add_special_tokens=special_tokens)["input_ids"]
    return torch.tensor(ids, dtype=torch.long, device=policy.device)


class BadAction(ValueError):
    """The model's answer is not one valid action; the message says why."""


class _StrictEditOp(EditOp, frozen=True, forbid_unknown_fields=True):
    """EditOp as the schema, refusing field names it does not have."""


class _Answer(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    rationale: str
    ops: Annotated[list[_StrictEditOp], msgspec.Meta(min_length=1)]


def parse_action(text: str) -> tuple[str, list[EditOp]]:
    """The rationale and ops of the first JSON object in the answer, {"rationale": str, "ops": [EditOp, ...]},
    ignoring text around it (prose, code fences). Field names and types are checked strictly (no "1" for 1);
    whether the ops apply to train.py is for shared.diffs.apply_ops to say."""
    span = _first_json_object(text)
    if span is None:
        raise BadAction(f"no JSON object in the answer: {text[:200]!r}")
    try:
        answer = msgspec.json.decode(text[span[0]:span[1]], type=_Answer)
    except msgspec.DecodeError as error:  # also a ValidationError: the JSON parses, the action does not
        raise BadAction(f"the answer's JSON is not an action: {error}") from None
    return answer.rationale, [EditOp(op.op, op.start, op.end, op.text) for op in answer.ops]


def _first_json_object(text: str) -> tuple[int, int] | None:
    """Where the first complete JSON object starts and ends: a '{' that is not one is skipped."""
    decoder = json.JSONDecoder()
    start = text.find("{")
    while start >= 0:
        try:
            _, end = decoder.raw_decode(text, start)
            return start, end
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
    return None
