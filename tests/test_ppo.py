"""PPO (services/learner/ppo.py) with real torch: GAE, the clip, the reward scale, the warm-up, and a toy
policy that learns only through ppo_update (and does not when the advantages' sign is flipped)."""

from __future__ import annotations

import dataclasses
import json
import math

import msgspec
import numpy as np
import pytest
import torch

from services.learner.ppo import (
    Batch,
    RunningMoments,
    clipped_surrogate,
    gae,
    kl_estimate,
    learning_rate,
    make_batch,
    ppo_update,
)
from shared.config import Learner

# ---------------------------------------------------------------------------------------------
# GAE (eq. 3)
# ---------------------------------------------------------------------------------------------


def test_gae_matches_a_hand_computed_example():
    rewards, values = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.5, 1.0, 0.2])
    # δ = (1 + .9·1 − .5, 0 + .9·.2 − 1, 2 + .9·.4 − .2) = (1.4, −0.82, 2.16); γλ = 0.72
    advantages = gae(rewards, values, 0.4, torch.zeros(3), gamma=0.9, lam=0.8)
    assert advantages.tolist() == pytest.approx([1.4 + 0.72 * (-0.82 + 0.72 * 2.16), -0.82 + 0.72 * 2.16, 2.16])
    # TERMINATE after experiment 1: no bootstrap from V(s_2), and the sum stops there.
    advantages = gae(rewards, values, 0.4, torch.tensor([0.0, 1.0, 0.0]), gamma=0.9, lam=0.8)
    assert advantages.tolist() == pytest.approx([1.4 + 0.72 * -1.0, -1.0, 2.16])


def _brute_force_gae(rewards, values, next_value, dones, gamma, lam):
    """Σ_l (γλ)^l δ_{t+l}, term by term, stopping after a terminal experiment."""
    n = len(rewards)
    following = [*values[1:], next_value]
    delta = [rewards[t] + gamma * following[t] * (1 - dones[t]) - values[t] for t in range(n)]
    advantages = []
    for t in range(n):
        total = 0.0
        for k in range(n - t):
            total += (gamma * lam) ** k * delta[t + k]
            if dones[t + k]:
                break
        advantages.append(total)
    return advantages


@pytest.mark.parametrize("with_dones", [False, True])
def test_gae_is_the_discounted_sum_of_td_errors(with_dones: bool):
    rng = np.random.default_rng(1)
    rewards, values = rng.normal(size=40), rng.normal(size=40)
    dones = (rng.random(40) < 0.15).astype(float) if with_dones else np.zeros(40)
    advantages = gae(torch.tensor(rewards), torch.tensor(values), 0.3, torch.tensor(dones), gamma=0.97, lam=0.95)
    assert advantages.tolist() == pytest.approx(_brute_force_gae(rewards, values, 0.3, dones, 0.97, 0.95), abs=1e-9)


# ---------------------------------------------------------------------------------------------
# The clipped surrogate (eq. 2) and the KL estimator
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("advantage, gradients", [
    # Â > 0: once ρ > 1 + ε there is nothing more to gain (gradient 0); below 1 − ε it still pushes ρ up.
    (1.0, [0.5, 0.9, 1.1, 0.0]),
    # Â < 0: once ρ < 1 − ε there is nothing more to gain; above 1 + ε it still pushes ρ down.
    (-1.0, [0.0, -0.9, -1.1, -1.5]),
])
def test_the_clip_zeroes_the_gradient_only_past_the_trust_region(advantage: float, gradients: list[float]):
    ratios = torch.tensor([0.5, 0.9, 1.1, 1.5])
    new_logprobs = ratios.log().requires_grad_()  # old log-probs 0: ρ = exp(new)
    clipped_surrogate(new_logprobs.exp(), torch.tensor(advantage), clip=0.2).sum().backward()
    # d(ρÂ)/d log π = ρÂ where the unclipped term is the minimum, 0 where the clipped one is.
    assert new_logprobs.grad.tolist() == pytest.approx(gradients)


def test_kl_estimate_is_never_negative_and_matches_the_exact_kl_in_expectation():
    p, q = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.5, 0.3])
    exact = (p * (p / q).log()).sum()
    expected = (p * kl_estimate((q / p).log())).sum()  # E_{a~p}[(ρ − 1) − log ρ], ρ = q/p
    assert expected.item() == pytest.approx(exact.item())
    assert (kl_estimate(torch.linspace(-5, 5, 101)) >= 0).all()


# ---------------------------------------------------------------------------------------------
# Reward scale (Welford) and the warm-up
# ---------------------------------------------------------------------------------------------


def test_running_moments_match_numpy_over_a_stream_and_survive_a_restart():
    stream = np.random.default_rng(2).normal(0.01, 0.05, size=200)
    sizes = [1, 1, 3, 16, 7, 16, 1, 30, 60, 65]
    moments, seen = RunningMoments(), 0
    for size in sizes[:5]:
        moments.update(stream[seen:seen + size].tolist())
        seen += size
        part = stream[:seen]
        assert (moments.count, moments.mean, moments.var) == (seen, pytest.approx(part.mean()),
                                                              pytest.approx(part.var()))
        assert moments.rms == pytest.approx(np.sqrt(np.mean(part**2)))
    restored = RunningMoments(**json.loads(json.dumps(moments.state_dict())))  # as a restarted learner reads it
    for size in sizes[5:]:
        restored.update(stream[seen:seen + size].tolist())
        seen += size
    assert seen == len(stream)
    assert (restored.mean, restored.var) == (pytest.approx(stream.mean()), pytest.approx(stream.var()))


def test_equal_rewards_are_scaled_by_their_size():
    batch = make_batch(torch.full((4,), -0.1), torch.zeros(4), 0.0, torch.ones(4), torch.zeros(4), RunningMoments(),
                       Learner())
    assert batch.advantages.tolist() == pytest.approx([-1.0] * 4)  # dones: each one is its own δ = r/rms


def test_the_learning_rate_warms_up_linearly_over_50_updates():
    settings = Learner(learning_rate=1e-4)
    assert settings.warmup_updates == 50
    rates = [learning_rate(k, settings) for k in (0, 24, 48, 49, 50, 1000)]
    assert rates == pytest.approx([1e-4 / 50, 1e-4 / 2, 1e-4 * 49 / 50, 1e-4, 1e-4, 1e-4])


# ---------------------------------------------------------------------------------------------
# ppo_update on a toy policy: a softmax over ten fixed candidate edits, one of them best
# ---------------------------------------------------------------------------------------------

MEANS = torch.tensor([-0.05, 0.0, -0.02, 0.01, -0.04, 0.0, -0.01, 0.03, -0.03, 0.005])
BEST = 7
NOISE = 0.02
"""The best candidate is better than the runner-up by one noise σ: a single reward rarely tells them apart."""
SETTINGS = Learner(learning_rate=0.05, warmup_updates=5, batch_size=16, epochs=4)
"""The paper's PPO constants, CleanRL's 4 epochs, a toy's batch and learning rate, a short warm-up."""


class Toy:
    """Score mode: logits over the candidates (the policy) and one value: the state never changes."""

    def __init__(self) -> None:
        self.logits = torch.nn.Parameter(torch.zeros(len(MEANS)))
        self.value = torch.nn.Parameter(torch.zeros(()))
        self.optimizer = torch.optim.Adam([self.logits, self.value])

    def evaluate_for(self, actions: torch.Tensor):
        def evaluate(indices: torch.Tensor):
            logprobs = torch.log_softmax(self.logits, -1)
            entropy = -(logprobs.exp() * logprobs).sum()
            return logprobs[actions[indices]], entropy.expand(len(indices)), self.value.expand(len(indices))
        return evaluate

    def p_best(self) -> float:
        return torch.softmax(self.logits, -1)[BEST].item()


def _train(updates: int, seed: int = 0, flip: bool = False, ref: bool = False) -> tuple[Toy, list]:
    """Collect a batch from the current policy, then one ppo_update, `updates` times; as the learner does:
    a never-ending episode, rewards scaled by a running RMS."""
    generator = torch.Generator().manual_seed(seed)
    toy, moments, results = Toy(), RunningMoments(), []
    reference = torch.log_softmax(toy.logits, -1).detach()
    for k in range(updates):
        with torch.no_grad():
            logprobs = torch.log_softmax(toy.logits, -1)
            actions = torch.multinomial(logprobs.exp(), SETTINGS.batch_size, replacement=True, generator=generator)
            rewards = MEANS[actions] + NOISE * torch.randn(SETTINGS.batch_size, generator=generator)
            values = toy.value.detach().expand(SETTINGS.batch_size)
        batch = make_batch(rewards, values, toy.value.item(), torch.zeros(SETTINGS.batch_size), logprobs[actions],
                           moments, SETTINGS, ref_logprobs=reference[actions] if ref else None)
        if flip:
            batch = dataclasses.replace(batch, advantages=-batch.advantages)
        results.append(ppo_update(toy.evaluate_for(actions), batch, toy.optimizer, SETTINGS, k))
    return toy, results


def test_a_toy_policy_learns_the_best_candidate_through_ppo_update_alone():
    toy, results = _train(30)
    assert toy.p_best() > 0.8
    stats = results[-1].stats
    assert msgspec.json.decode(msgspec.json.encode(stats), type=type(stats)) == stats  # fits policy.updated
    assert all(0 <= r.stats.clip_fraction <= 1 and r.stats.approx_kl >= 0 for r in results)
    assert results[0].learning_rate == pytest.approx(0.01) and results[-1].learning_rate == pytest.approx(0.05)
    assert all(r.reference_kl is None for r in results)


def test_with_the_advantages_sign_flipped_it_learns_the_opposite():
    toy, _ = _train(30, flip=True)
    assert toy.p_best() < 0.02  # it avoids the best candidate: the test above can fail


def test_the_kl_to_a_reference_policy_is_reported_and_grows_as_the_policy_moves():
    _, results = _train(20, ref=True)
    kls = [r.reference_kl for r in results]
    assert kls[0] >= 0 and kls[-1] > 10 * max(kls[0], 1e-4)


# ---------------------------------------------------------------------------------------------
# Generate mode: per-token log-probs with a mask
# ---------------------------------------------------------------------------------------------


def _one_update(batch: Batch, token_logits: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, object]:
    """One ppo_update of per-token logits (T positions over a vocabulary of 5) on fixed token sequences."""
    logits = torch.nn.Parameter(token_logits.clone())
    optimizer = torch.optim.SGD([logits], lr=1.0)

    def evaluate(indices: torch.Tensor):
        logprobs = torch.log_softmax(logits, -1)  # (T, V): the same context for every experiment
        chosen = logprobs[torch.arange(len(logits)), tokens[indices].clamp(min=0)]  # (n, T)
        entropy = -(logprobs.exp() * logprobs).sum(-1).expand(len(indices), -1)  # per token
        return chosen.reshape(batch.old_logprobs[indices].shape), entropy, torch.zeros(len(indices))

    return logits, ppo_update(evaluate, batch, optimizer, Learner(warmup_updates=0, learning_rate=1.0), 0)


def test_padding_tokens_do_not_count():
    token_logits = torch.randn(3, 5, generator=torch.Generator().manual_seed(3))
    tokens = torch.tensor([[1, 2, 0], [3, -1, -1], [4, 4, -1], [0, 1, 2]])  # −1: padding
    mask = tokens >= 0
    old = torch.log_softmax(token_logits, -1)[torch.arange(3), tokens.clamp(min=0)].detach()
    common = dict(advantages=torch.tensor([1.0, -0.5, 0.3, 0.8]), returns=torch.zeros(4), rewards=torch.zeros(4))
    first = _one_update(Batch(old_logprobs=old, mask=mask, **common), token_logits, tokens)
    garbage = torch.where(mask, old, torch.tensor(7.0))
    second = _one_update(Batch(old_logprobs=garbage, mask=mask, **common), token_logits, tokens)
    assert torch.equal(first[0], second[0]) and first[1] == second[1]
    assert not math.isclose(first[1].stats.policy_loss, 0.0)


def test_generate_mode_with_one_token_is_score_mode():
    token_logits = torch.randn(1, 5, generator=torch.Generator().manual_seed(4))
    tokens = torch.tensor([[1], [3], [3], [0]])
    old = torch.log_softmax(token_logits, -1)[0, tokens[:, 0]].detach()
    common = dict(advantages=torch.tensor([1.0, -0.5, 0.3, 0.8]), returns=torch.zeros(4), rewards=torch.zeros(4))
    per_token = _one_update(Batch(old_logprobs=old[:, None], mask=torch.ones(4, 1, dtype=torch.bool), **common),
                            token_logits, tokens)
    scalar = _one_update(Batch(old_logprobs=old, **common), token_logits, tokens)
    assert torch.allclose(per_token[0], scalar[0]) and per_token[1] == scalar[1]


def test_a_batch_refuses_a_mask_that_leaves_an_experiment_empty():
    with pytest.raises(ValueError, match="at least one token"):
        Batch(old_logprobs=torch.zeros(2, 3), advantages=torch.zeros(2), returns=torch.zeros(2),
              rewards=torch.zeros(2), mask=torch.tensor([[True, False, False], [False, False, False]]))
