"""π_θ served by vLLM (written against vLLM 0.32.0): one engine for the base model, each adapter version a LoRA.

The transformers backend (policy.Transformers, lm.py) loads the base model again for every adapter; here one
`vllm.LLM` holds the base model on the GPU and every adapter version the learner publishes is served by name,
so a new version costs one small LoRA load. The four methods of policy.Backend keep lm.py's definitions:

- score: π(a|s) = softmax over the candidates of their mean per-token log-likelihood after the prompt, computed
  from vLLM's prompt log-probs of prompt + action with the same math as lm.score (scores_from_token_logprobs);
- generate: an answer sampled at the given temperature, constrained to prompt.ANSWER_SCHEMA, with each sampled
  token's log-probability under the distribution it was drawn from (see the caveat at VLLMBackend.generate);
- value: None. vLLM has no value head; the learner computes V(s) itself with the proposing adapter version.

vLLM is imported only inside the engine, so this module imports without it (`pip install -e '.[gpu]'`):

    engine = VLLMEngine("Qwen/Qwen2.5-0.5B", device="cuda:0", gpu_memory=0.4, lora_rank=32)
    base = engine.backend(None, "base")                              # the base model, no adapter
    backend = engine.backend(Path(".data/learner/v0007"), "v0007")  # LoRARequest("v0007", 7, ...)
    scores = backend.score(prompt, ["N_LAYER = 6\\n", "LEARNING_RATE = 1e-3\\n"])
    sample = backend.generate(prompt, max_new_tokens=256, temperature=1.0, seed=0)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from services.proposer.policy import BASE_VERSION
from services.proposer.prompt import ANSWER_SCHEMA
from shared.policy import lm

if TYPE_CHECKING:
    from vllm import LLM, RequestOutput
    from vllm.lora.request import LoRARequest

INSTALL = "pip install -e '.[gpu]'"
VERSION = re.compile(r"v(\d{4,})")
"""The learner's adapter versions: v0001, v0002, ... (services/learner/main.py, version_name)."""
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The values vLLM 0.32 accepts for max_lora_rank (vllm/config/lora.py, MaxLoRARanks)."""


class VLLMEngine:
    """One vLLM engine for the base model (hub id or local folder) on one CUDA GPU, LoRA adapters on top."""

    def __init__(self, model: str, device: str, gpu_memory: float, lora_rank: int) -> None:
        device_ids = cuda_device_ids(device)
        max_lora_rank = rank_limit(lora_rank)
        try:
            from vllm import LLM
        except ImportError as error:
            raise ImportError(f"[proposer] backend = \"vllm\" needs vLLM, which is not installed: {INSTALL} "
                              f"(on a machine with a CUDA GPU)") from error
        self.model = model
        self.llm: LLM = LLM(
            model=model,
            dtype="bfloat16",
            gpu_memory_utilization=gpu_memory,  # the learner trains on the same GPU: vLLM takes only this share
            enable_lora=True,
            # vLLM's default is 16 (vllm/config/lora.py, LoRAConfig) and refuses larger adapters; the paper's is 32.
            max_lora_rank=max_lora_rank,
            max_loras=1,  # a backend serves one adapter version, and the proposer asks one backend at a time
            enable_prefix_caching=True,  # generate: consecutive prompts share program.md and c*
            # A sampled token's logprob is taken after temperature (vllm/config/model.py, ModelConfig.logprobs_mode):
            # log softmax(logits / T), as lm.generate reports and lm.token_logprobs recomputes. Prompt logprobs are
            # the same in every mode (no temperature), which is what score needs.
            logprobs_mode="processed_logprobs",
            # vLLM 0.32 EngineArgs.device_ids (engine/arg_utils.py, _resolve_device_ids): indices into the GPUs
            # that CUDA_VISIBLE_DEVICES leaves visible, as torch's "cuda:N" is. None: vLLM's default, GPU 0.
            device_ids=device_ids,
        )
        self.tokenizer = self.llm.get_tokenizer()

    def backend(self, adapter: Path | None, version: str) -> VLLMBackend:
        """π_θ of one version: the base model (adapter None, version "base") or the adapter folder that
        lm.Policy.save wrote for version vNNNN, served as the LoRA named vNNNN with id NNNN.

        vLLM 0.32 reads such a folder as it is: adapter_config.json's target_modules may be a regex string
        (vllm/lora/peft_helper.py, PEFTHelper.target_modules: list[str] | str, stored but never matched); which
        modules get a LoRA comes from the keys of adapter_model.safetensors (vllm/lora/lora_model.py,
        LoRAModel.from_local_checkpoint), and no other file is read, so value_head.safetensors is ignored."""
        return VLLMBackend(self, lora_request(version, adapter), version)


def lora_request(version: str, adapter: Path | None) -> LoRARequest | None:
    """The LoRARequest serving `adapter` as `version` (vNNNN → name vNNNN, id NNNN); None for the base model.

    The id names the weights in vLLM's adapter cache: a version's folder never changes (lm.Policy.save), so its
    number is a safe id. vLLM refuses id 0 (vllm/lora/request.py, LoRARequest.__post_init__), and v0000 is no
    version the learner writes."""
    lora_id = lora_int_id(version)
    if lora_id is None and adapter is None:
        return None
    if lora_id is None or adapter is None:
        raise ValueError(f"version {version!r} with adapter {adapter}: the base model ({BASE_VERSION!r}) has no "
                         "adapter, and every other version has one")
    from vllm.lora.request import LoRARequest

    return LoRARequest(lora_name=version, lora_int_id=lora_id, lora_path=str(adapter))


def lora_int_id(version: str) -> int | None:
    """7 for "v0007"; None for "base"; ValueError for any other name."""
    if version == BASE_VERSION:
        return None
    match = VERSION.fullmatch(version)
    if match is None or int(match[1]) < 1:
        raise ValueError(f"{version!r} is no policy version: expected {BASE_VERSION!r} or v0001, v0002, ...")
    return int(match[1])


def rank_limit(lora_rank: int) -> int:
    """The smallest max_lora_rank vLLM accepts that serves adapters of the learner's rank ([learner] lora_r)."""
    for limit in VLLM_LORA_RANKS:
        if limit >= lora_rank:
            return limit
    raise ValueError(f"vLLM serves LoRA ranks up to {VLLM_LORA_RANKS[-1]}, not {lora_rank}")


def cuda_device_ids(device: str) -> list[int] | None:
    """vLLM's device_ids for a [proposer] device: None for "cuda" (vLLM's default GPU), [N] for "cuda:N"."""
    if device == "cuda":
        return None
    match = re.fullmatch(r"cuda:(\d+)", device)
    if match is None:
        raise ValueError(f"[proposer] backend = \"vllm\" runs on a CUDA GPU (device \"cuda\" or \"cuda:N\"), not "
                         f"{device!r}; use backend = \"transformers\" on this device")
    return [int(match[1])]


@dataclass(frozen=True)
class VLLMBackend:
    """policy.Backend for one adapter version (lora None: the base model). Never changed: a new version is a new
    backend on the same engine."""

    engine: VLLMEngine
    lora: LoRARequest | None
    version: str

    def count_tokens(self, text: str) -> int:
        return len(self.engine.tokenizer(text)["input_ids"])

    def score(self, prompt: str, actions: list[str]) -> lm.Scores:
        """lm.score's π(a|s) from vLLM's prompt log-probs: each candidate is one request, prompt + action as
        tokens (tokenized apart, as lm.score does), and the log-probs of the action's tokens are summed.

        The requests go in one call, but vLLM does not share the prompt's prefill between them: a request that
        asks for prompt logprobs skips reading the prefix cache (vllm/sampling_params.py, SamplingParams.
        __post_init__ sets skip_reading_prefix_cache), since cached positions would get no logprob."""
        if not actions:
            raise ValueError("score needs at least one candidate action")
        from vllm import SamplingParams, TokensPrompt

        prompt_ids = self._encode(prompt, special_tokens=True)
        if not prompt_ids:
            raise ValueError("score needs a prompt of at least one token: the first token has no log-probability")
        action_ids = [self._encode(text, special_tokens=False) for text in actions]
        for index, ids in enumerate(action_ids):
            if not ids:
                raise ValueError(f"candidate {index} is empty: an action needs at least one token")
        # prompt_logprobs=0: the log-probability of each actual prompt token and nothing more (no top-k).
        # max_tokens=1 because every request must sample; that token is not used.
        params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0, detokenize=False,
                                flat_logprobs=True)
        outputs = self.engine.llm.generate([TokensPrompt(prompt_token_ids=prompt_ids + ids) for ids in action_ids],
                                           params, use_tqdm=False, lora_request=self.lora)
        return scores_from_token_logprobs([_action_logprobs(output, len(prompt_ids), ids)
                                           for output, ids in zip(outputs, action_ids, strict=True)])

    def generate(self, prompt: str, max_new_tokens: int, temperature: float, seed: int) -> lm.Generated:
        """An answer sampled from softmax(logits / temperature), constrained to JSON of prompt.ANSWER_SCHEMA.

        Caveat for PPO: the constraint masks the logits before sampling, and vLLM computes the returned log-probs
        after that mask, in every logprobs_mode (vllm/v1/worker/gpu_model_runner.py, GPUModelRunner.sample_tokens,
        and vllm/v1/worker/gpu/model_runner.py apply the grammar bitmask in place before the sampler). So each
        Generated.logprobs entry is log π renormalised over the tokens the grammar allows. The learner recomputes
        π_θold unmasked (lm.token_logprobs), which is lower or equal, equal only where the mask removed no
        probability: its drift (learner/update.py, Learned.drift) shows the gap, and PPO's ratio and gradient
        treat the tokens as drawn from the unmasked π_θ, which they were not."""
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, not {temperature}")
        from vllm import SamplingParams, TokensPrompt
        from vllm.sampling_params import StructuredOutputsParams

        params = SamplingParams(temperature=temperature, max_tokens=max_new_tokens, seed=seed, logprobs=0,
                                structured_outputs=StructuredOutputsParams(json=ANSWER_SCHEMA),
                                # The text is decoded below as lm.generate decodes it; vLLM's incremental
                                # detokenizer may space special tokens differently.
                                detokenize=False, flat_logprobs=True)
        prompt_ids = self._encode(prompt, special_tokens=True)
        output = self.engine.llm.generate([TokensPrompt(prompt_token_ids=prompt_ids)], params, use_tqdm=False,
                                          lora_request=self.lora)[0].outputs[0]
        # token_ids end with the end-of-sequence token if the model stopped by itself (vllm/v1/core/sched/utils.py,
        # check_stop, appends it before stopping), as lm.generate's do; logprobs has one entry per token.
        tokens = list(output.token_ids)
        logprobs = [output.logprobs[position][token].logprob for position, token in enumerate(tokens)]
        text = self.engine.tokenizer.decode(tokens, skip_special_tokens=True)
        return lm.Generated(text, tokens, torch.tensor(logprobs, dtype=torch.float32))

    def value(self, prompt: str) -> float | None:
        """No V(s) here: vLLM serves the adapter, not the value head beside it. The learner computes V(s)."""
        return None

    def _encode(self, text: str, *, special_tokens: bool) -> list[int]:
        return list(self.engine.tokenizer(text, add_special_tokens=special_tokens)["input_ids"])


def _action_logprobs(output: RequestOutput, start: int, action_ids: list[int]) -> list[float]:
    """The prompt log-probs of the action's tokens, which follow `start` prompt tokens in the request.
    RequestOutput.prompt_logprobs has one {token id: Logprob} per prompt position (None for the first), in 0.32
    a list or a FlatLogprobs, both indexable by position (vllm/logprobs.py)."""
    assert output.prompt_logprobs is not None
    return [output.prompt_logprobs[start + offset][token].logprob for offset, token in enumerate(action_ids)]


def scores_from_token_logprobs(per_action: list[list[float]]) -> lm.Scores:
    """lm.Scores from each candidate's per-token log-probabilities after the prompt, by lm.score's own math
    (lm.candidate_scores). No value: V(s) is None."""
    logprob = torch.tensor([sum(tokens) for tokens in per_action], dtype=torch.float32)
    return lm.candidate_scores(logprob, torch.tensor([len(tokens) for tokens in per_action]), None)
