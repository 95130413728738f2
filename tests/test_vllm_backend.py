"""services.proposer.vllm_backend without vLLM (CPU only, no mocks): the module imports, the engine says how to
install vLLM, π from per-token log-probs equals lm.score's, and adapter versions map to vLLM's LoRA names and ids.
What needs vLLM and a GPU (the engine's requests) is not run here."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from services.proposer.vllm_backend import (
    VLLMEngine,
    cuda_device_ids,
    lora_int_id,
    lora_request,
    rank_limit,
    scores_from_token_logprobs,
)
from shared.config import Learner
from shared.policy import lm
from shared.policy.default_model import build_default_model

PROMPT = "LEARNING_RATE = 3e-4\nN_LAYER = 4\n# propose one edit\n"
ACTIONS = ["N_LAYER = 6  # deeper\n", "=", "LEARNING_RATE = 1e-3\n", "BATCH_SIZE = 64\n"]
VLLM_INSTALLED = importlib.util.find_spec("vllm") is not None


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> lm.Policy:
    return lm.load_policy(str(build_default_model(tmp_path_factory.mktemp("default") / "m")), "cpu")


@pytest.mark.skipif(VLLM_INSTALLED, reason="vLLM is installed here")
def test_engine_without_vllm_names_the_install_command() -> None:
    assert "vllm" not in sys.modules  # importing the backend module did not need it
    with pytest.raises(ImportError, match=r"pip install -e '\.\[gpu\]'"):
        VLLMEngine("any-model", "cuda", 0.4, Learner().lora_r)


def test_max_lora_rank_is_the_smallest_vllm_accepts() -> None:
    assert rank_limit(Learner().lora_r) == 32
    assert rank_limit(4) == 8
    assert rank_limit(64) == 64
    with pytest.raises(ValueError, match="up to 512"):
        rank_limit(1024)


def test_device_picks_the_gpu_or_is_refused() -> None:
    assert cuda_device_ids("cuda") is None
    assert cuda_device_ids("cuda:1") == [1]
    for device in ("cpu", "cuda:", "mps", "1"):
        with pytest.raises(ValueError, match="CUDA GPU"):
            cuda_device_ids(device)


def test_scores_from_token_logprobs_equal_lm_score(policy: lm.Policy) -> None:
    """What vLLM's prompt_logprobs returns for prompt + action (one forward pass, the log-prob of each action
    token), fed to the pure function, gives lm.score's π and entropy."""
    prompt_ids = policy.tokenizer(PROMPT, add_special_tokens=True)["input_ids"]
    per_action = []
    with torch.no_grad():
        for action in ACTIONS:
            ids = policy.tokenizer(action, add_special_tokens=False)["input_ids"]
            logits = policy.model(input_ids=torch.tensor([prompt_ids + ids])).logits[0].float()
            log_p = logits[len(prompt_ids) - 1:-1].log_softmax(-1)  # position i predicts token i + 1
            per_action.append(log_p.gather(-1, torch.tensor(ids)[:, None]).squeeze(-1).tolist())
    ours = scores_from_token_logprobs(per_action)
    theirs = lm.score(policy, PROMPT, ACTIONS)
    torch.testing.assert_close(ours.logprob, theirs.logprob, atol=1e-5, rtol=0)
    assert ours.tokens.tolist() == theirs.tokens.tolist()
    torch.testing.assert_close(ours.log_pi, theirs.log_pi, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.entropy, theirs.entropy, atol=1e-5, rtol=0)
    assert ours.value is None


def test_versions_are_lora_names_and_ids(tmp_path: Path) -> None:
    assert lora_int_id("v0007") == 7
    assert lora_int_id("v0001") == 1
    assert lora_int_id("v12345") == 12345
    assert lora_int_id("base") is None
    for bad in ("v0000", "v07", "7", "adapter-v0007", "v0007 ", "Base"):
        with pytest.raises(ValueError, match="no policy version"):
            lora_int_id(bad)
    assert lora_request("base", None) is None
    with pytest.raises(ValueError, match="has no adapter"):
        lora_request("v0007", None)
    with pytest.raises(ValueError, match="has no adapter"):
        lora_request("base", tmp_path)


def test_saved_adapter_is_what_vllm_loads_as_is(policy: lm.Policy, tmp_path: Path) -> None:
    """No rewrite of the folder: vLLM 0.32 takes the modules from adapter_model.safetensors's keys, which must be
    base_model.model.<module>.lora_A/B.weight on attention projections, and stores target_modules (here a regex)
    unread; the rank is the learner's, which sets the engine's max_lora_rank."""
    folder = tmp_path / "v0001"
    policy.save(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["r"] == Learner().lora_r
    assert isinstance(config["target_modules"], str)
    assert not config["modules_to_save"] and not config["use_dora"] and config["bias"] == "none"
    with safe_open(folder / "adapter_model.safetensors", framework="pt") as tensors:
        keys = list(tensors.keys())
    assert keys
    for key in keys:
        prefix, *module, matrix, weight = key.split(".")
        assert (prefix, module[0], matrix, weight) == ("base_model", "model", matrix, "weight"), key
        assert matrix in ("lora_A", "lora_B") and module[-1] in ("q_proj", "k_proj", "v_proj", "o_proj"), key
