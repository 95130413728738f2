"""shared.policy.lm and default_model: the policy on the real embedded model, no mocks, no downloads.

Log-likelihoods are checked against the plainest computation there is, one full forward pass per action;
learning is checked by a few gradient steps that must raise the chosen action's probability.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

from shared.config import Learner
from shared.events import EditOp
from shared.policy import lm
from shared.policy.default_model import NOTE, build_default_model
from shared.policy.lm import BadAction, Policy, generate, load_policy, parse_action, score, token_logprobs

CPU_TRAIN_PY = Path(__file__).resolve().parent.parent / "targets" / "cpu_gpt" / "train.py"
PROMPT = CPU_TRAIN_PY.read_text(encoding="utf-8")[:1500]
ACTIONS = ["N_LAYER = 6  # deeper\n", "=", "LEARNING_RATE = 1e-3\n", "x", "BATCH_SIZE = 64  # more per step\n"]
CHOSEN = 2
STEPS = 5


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_default_model(tmp_path_factory.mktemp("default") / "model")


@pytest.fixture(scope="module")
def policy(model_dir: Path) -> Policy:
    return load_policy(str(model_dir), "cpu")


@pytest.fixture(scope="module")
def trained(model_dir: Path) -> tuple[Policy, list[lm.Scores]]:
    """A fresh policy after STEPS steps of ascent on log π(CHOSEN|s) and of V(s) towards 1, with its scores
    before every step and after the last."""
    policy = load_policy(str(model_dir), "cpu")
    optimizer = torch.optim.Adam(policy.trainable_parameters(), lr=3e-3)
    history = []
    for _ in range(STEPS):
        scores = score(policy, PROMPT, ACTIONS, grad=True)
        loss = -scores.log_pi[CHOSEN] + 0.5 * (scores.value - 1.0) ** 2
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(scores)
    return policy, history + [score(policy, PROMPT, ACTIONS)]


def unbatched_logprobs(model: torch.nn.Module, tokenizer, prompt: str, actions: list[str]) -> torch.Tensor:
    """Σ log p(action tokens | prompt), one full forward pass of prompt + action per action."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    sums = []
    with torch.no_grad():
        for action in actions:
            action_ids = tokenizer(action, add_special_tokens=False)["input_ids"]
            logits = model(input_ids=torch.tensor([prompt_ids + action_ids])).logits[0].log_softmax(-1)
            positions = range(len(prompt_ids) - 1, len(prompt_ids) + len(action_ids) - 1)
            sums.append(sum(logits[p, t] for p, t in zip(positions, action_ids, strict=True)))
    return torch.stack(sums)


def files(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


# The default model


def test_build_is_deterministic_and_notes_what_it_is(model_dir: Path, tmp_path: Path) -> None:
    again = build_default_model(tmp_path / "again")
    note = json.loads((model_dir / NOTE).read_text())
    if json.loads((again / NOTE).read_text())["corpus_sha256"] != note["corpus_sha256"]:
        pytest.skip("a project file changed between the two builds")
    assert files(again) == files(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert note["trained"] is False
    assert note["parameters"] == model.num_parameters() > 1_000_000
    assert note["vocab_size"] == len(AutoTokenizer.from_pretrained(model_dir)) == model.config.vocab_size


def test_build_reuses_a_complete_build_and_redoes_a_half_written_one(model_dir: Path, tmp_path: Path) -> None:
    weights = model_dir / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert build_default_model(model_dir) == model_dir
    assert weights.stat().st_mtime_ns == stamp

    crashed = tmp_path / "crashed"
    crashed.mkdir()
    (crashed / "config.json").write_text('{"model_type": "lla')
    build_default_model(crashed)
    assert (crashed / NOTE).is_file()
    assert files(crashed).keys() == files(model_dir).keys()
    assert [path.name for path in tmp_path.iterdir()] == ["crashed"]  # no staging folder left behind


# Loading: LoRA on the attention projections, the value head beside it


@pytest.mark.parametrize("rank", [Learner().lora_r, 8])
def test_only_the_adapter_and_value_head_train(policy: Policy, rank: int) -> None:
    if rank != policy.model.peft_config["default"].r:
        policy = load_policy(policy.base, "cpu", rank=rank, alpha=2 * rank)
    config = policy.model.config
    head_dim = config.hidden_size // config.num_attention_heads
    hidden, kv = config.hidden_size, config.num_key_value_heads * head_dim
    per_layer = rank * ((hidden + hidden) * 2 + (hidden + kv) * 2)  # q, o: h→h; k, v: h→kv
    expected = config.num_hidden_layers * per_layer + hidden + 1
    assert sum(p.numel() for p in policy.trainable_parameters()) == expected
    trainable = [name for name, p in policy.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert {name.split(".")[-4] for name in trainable} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert not any("value" in name for name, _ in policy.model.named_parameters())


def test_gpt2_gets_the_adapter_on_attention_not_on_the_mlp(model_dir: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=4096, n_embd=32, n_layer=2, n_head=2)).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(tmp_path)
    gpt2 = load_policy(str(tmp_path), "cpu")
    adapted = {name.rsplit(".lora_", 1)[0].split("transformer.", 1)[1]
               for name, p in gpt2.model.named_parameters() if p.requires_grad}
    assert adapted == {f"h.{i}.attn.{layer}" for i in range(2) for layer in ("c_attn", "c_proj")}
    expected = unbatched_logprobs(gpt2.model, gpt2.tokenizer, PROMPT[:300], ACTIONS)
    torch.testing.assert_close(score(gpt2, PROMPT[:300], ACTIONS).logprob, expected, atol=1e-4, rtol=1e-5)


# Score mode


def test_batched_scores_equal_one_forward_pass_per_action(policy: Policy, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = unbatched_logprobs(policy.model, policy.tokenizer, PROMPT, ACTIONS)
    scores = score(policy, PROMPT, ACTIONS)
    torch.testing.assert_close(scores.logprob, expected, atol=1e-4, rtol=1e-5)
    assert scores.tokens.tolist() == [len(policy.tokenizer(a)["input_ids"]) for a in ACTIONS]
    assert scores.tokens.min() == 1 and scores.tokens.max() > 5  # padding is exercised

    prompt_tokens = len(policy.tokenizer(PROMPT)["input_ids"])
    monkeypatch.setattr(lm, "MAX_CACHED_TOKENS", 2 * prompt_tokens)  # two candidates per batch
    torch.testing.assert_close(score(policy, PROMPT, ACTIONS).logprob, scores.logprob)


def test_pi_is_a_softmax_of_mean_log_likelihoods_with_its_entropy(policy: Policy) -> None:
    scores = score(policy, PROMPT, ACTIONS)
    mean = scores.logprob / scores.tokens
    expected = torch.exp(mean - mean.max()) / torch.exp(mean - mean.max()).sum()
    torch.testing.assert_close(scores.pi, expected)
    assert scores.pi.sum().item() == pytest.approx(1.0, abs=1e-6)
    entropy = -sum(p * torch.log(p) for p in expected)
    assert scores.entropy.item() == pytest.approx(entropy.item(), abs=1e-5)
    assert 0 < scores.entropy.item() <= torch.log(torch.tensor(len(ACTIONS))).item()
    assert scores.value.item() == 0.0  # a fresh value head
    assert not scores.log_pi.requires_grad  # proposing records no graph
    with pytest.raises(ValueError, match="candidate 1 is empty"):
        score(policy, PROMPT, ["x", ""])


def test_gradient_steps_on_the_adapter_raise_the_chosen_action(trained: tuple[Policy, list[lm.Scores]],
                                                               policy: Policy) -> None:
    tuned, history = trained
    assert history[0].log_pi.requires_grad
    chosen = [scores.pi[CHOSEN].item() for scores in history]
    assert chosen[-1] > chosen[0] + 0.1, chosen
    assert history[-1].value.item() > 0.5
    for (name, base), (_, before) in zip(tuned.model.named_parameters(), policy.model.named_parameters(),
                                         strict=True):
        assert torch.equal(base, before) == ("lora_" not in name), name  # the adapter moved, nothing else


def test_with_the_adapter_disabled_scores_are_the_base_models(trained: tuple[Policy, list[lm.Scores]],
                                                              model_dir: Path) -> None:
    tuned, history = trained
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    expected = unbatched_logprobs(base, tuned.tokenizer, PROMPT, ACTIONS)
    with tuned.reference():
        reference = score(tuned, PROMPT, ACTIONS)
    torch.testing.assert_close(reference.logprob, expected, atol=1e-4, rtol=1e-5)
    assert not torch.allclose(history[-1].logprob, expected, atol=1e-2)
    torch.testing.assert_close(score(tuned, PROMPT, ACTIONS).logprob, history[-1].logprob)  # the adapter is back


def test_save_and_load_restore_the_policy_exactly(trained: tuple[Policy, list[lm.Scores]], model_dir: Path,
                                                  policy: Policy, tmp_path: Path) -> None:
    tuned, history = trained
    sha256 = tuned.save(tmp_path / "v1")
    assert len(sha256) == 64 and (tmp_path / "v1" / lm.VALUE_HEAD_FILE).is_file()
    assert tuned.save(tmp_path / "v1") == sha256  # the same weights again: nothing changes
    with pytest.raises(FileExistsError, match="different policy version"):
        policy.save(tmp_path / "v1")

    loaded = load_policy(str(model_dir), "cpu", adapter=tmp_path / "v1")
    restored = score(loaded, PROMPT, ACTIONS)
    for field in ("logprob", "log_pi", "entropy", "value"):
        assert torch.equal(getattr(restored, field), getattr(history[-1], field)), field
    assert loaded.save(tmp_path / "v1-again") == sha256
    assert policy.save(tmp_path / "v0") != sha256
    assert sorted(path.name for path in tmp_path.iterdir()) == ["v0", "v1", "v1-again"]


# Generate mode


def test_generate_is_seeded_and_token_logprobs_recomputes_it(policy: Policy) -> None:
    first = generate(policy, PROMPT, max_new_tokens=16, temperature=0.8, seed=7)
    again = generate(policy, PROMPT, max_new_tokens=16, temperature=0.8, seed=7)
    assert (again.text, again.token_ids) == (first.text, first.token_ids)
    assert torch.equal(again.logprobs, first.logprobs)
    assert generate(policy, PROMPT, max_new_tokens=16, temperature=0.8, seed=8).token_ids != first.token_ids
    assert len(first.token_ids) == len(first.logprobs) == 16
    assert first.text == policy.tokenizer.decode(first.token_ids)
    recomputed = token_logprobs(policy, PROMPT, first.token_ids, temperature=0.8)
    torch.testing.assert_close(recomputed, first.logprobs, atol=1e-4, rtol=1e-5)
    assert recomputed.requires_grad and not first.logprobs.requires_grad


# Parsing the model's answer


def test_parse_action_finds_the_json_among_prose() -> None:
    answer = ('Use {braces} sparingly. Here is my edit:\n```json\n'
              '{"rationale": "a deeper model", "ops": [{"op": "replace", "start": 15, "end": 15, '
              '"text": "N_LAYER = 6  # transformer blocks\\n"}, {"op": "delete", "start": 20, "end": 21}]}\n```\n'
              'Good luck {"not": "this one"}')
    rationale, ops = parse_action(answer)
    assert rationale == "a deeper model"
    assert ops == [EditOp("replace", 15, 15, "N_LAYER = 6  # transformer blocks\n"), EditOp("delete", 20, 21)]
    assert all(type(op) is EditOp for op in ops)


@pytest.mark.parametrize(("answer", "reason"), [
    ("I would make the model deeper.", "no JSON object"),
    ('{"rationale": "x"}', "missing required field `ops`"),
    ('{"rationale": "x", "ops": []}', "length >= 1 - at `$.ops`"),
    ('{"rationale": "x", "ops": [{"op": "replace", "start": "1", "end": 1}]}', "got `str` - at `$.ops[0].start`"),
    ('{"rationale": "x", "ops": [{"op": "replace", "start": true, "end": 1}]}', "got `bool` - at `$.ops[0].start`"),
    ('{"rationale": "x", "ops": [{"op": "modify", "start": 1, "end": 1}]}', "'modify' - at `$.ops[0].op`"),
    ('{"rationale": "x", "ops": [{"op": "delete", "start": 1, "end": 1, "lines": 2}]}', "unknown field `lines`"),
    ('{"rationale": "x", "diff": "", "ops": [{"op": "delete", "start": 1, "end": 1}]}', "unknown field `diff`"),
    ('{"rationale": 3, "ops": [{"op": "delete", "start": 1, "end": 1}]}', "got `int` - at `$.rationale`"),
])
def test_parse_action_refuses_anything_else_and_says_why(answer: str, reason: str) -> None:
    with pytest.raises(BadAction) as refused:
        parse_action(answer)
    assert reason in str(refused.value)
