"""PPO for the proposing policy (paper §4.2, eqs. 2-4), in the manner of CleanRL's ppo.py.

The policy belongs to the caller: this module sees tensors and one callable, `evaluate(indices)`, the
caller's differentiable forward pass of the current policy on some experiments of the batch. The same
code trains a LoRA-adapted language model and the ten-logit toy policy of the tests.

The research loop is one never-ending episode whose steps are experiments: s_t = (c*, h), a_t the
proposed edit, r_t its reward (rewards.py). One update, in the order of the code below:

    1. make_batch: the rewards are scaled by their running RMS (RunningMoments, kept across updates and
       restarts), GAE runs over the experiments in proposal order (eq. 3), returns = advantages + values
    2. ppo_update: `epochs` passes over seeded, shuffled minibatches, each one optimizer step on the
       clipped surrogate (eq. 2), the value loss and the entropy bonus (eq. 4), gradient norm clipped
    3. statistics: losses, entropy, approx KL, clip fraction, mean reward (shared.events.PPOStats),
       and the KL to a reference policy when the batch carries its log-probs

Two kinds of action, one batch type:
- score mode: the policy scores candidate edits and picks one. log π(a_t|s_t) is one number per
  experiment: old_logprobs (N,), and evaluate returns new_logprobs (n,) and the entropy over the
  candidates (n,).
- generate mode: the policy writes the edit token by token. PPO takes one ratio per token, as RLHF
  implementations do (the ratio of a whole sequence of hundreds of tokens is too often far outside the
  clip range to learn from): old_logprobs (N, T), right-padded with finite values, `mask` (N, T) marking
  the action's tokens, and evaluate returns new_logprobs (n, T) and the entropy per token (n, T) or per
  experiment (n,). Every experiment's advantage is shared by its tokens.
Per-token quantities are averaged over each experiment's tokens, then over experiments: every experiment
weighs the same however long its diff, as each is one step of the MDP (score mode is the case T = 1).

Rewards, not advantages, are normalised, and only scaled (divided by the running root mean square over
every reward seen), never centred:
- the value head regresses on returns in reward units, which must stay near 1 whether the research is
  early (Δbpb ~0.1) or late (~0.001);
- a scale kept over the whole history is steady with batches of 16, where CleanRL's per-minibatch
  advantage normalisation is noisy at 4 experiments and undefined at 1;
- not centring keeps 0 meaning "as good as c*"; the value baseline in δ_t does the centring;
- the RMS rather than the standard deviation, so that a batch of equal rewards (16 invalid edits, all
  −p_syntax) is scaled by their size instead of divided by zero.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from shared.config import Learner
from shared.events import PPOStats

Evaluate = Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]
"""evaluate(indices) -> (new_logprobs, entropy, values) of the batch's experiments `indices` under the current
policy, with gradients: new_logprobs shaped like batch.old_logprobs[indices]; entropy (n,), or (n, T) per token;
values (n,)."""


# ---------------------------------------------------------------------------------------------
# Advantages (eq. 3)
# ---------------------------------------------------------------------------------------------


def gae(rewards: Tensor, values: Tensor, next_value: float | Tensor, dones: Tensor, gamma: float,
        lam: float) -> Tensor:
    """Â_t = Σ_l (γλ)^l δ_{t+l}, δ_t = r_t + γ V(s_{t+1}) − V(s_t) (eq. 3), over N consecutive experiments.

    values[t] = V(s_t), the value the proposer logged with experiment t; next_value = V(s_N), the state
    after the last one. dones[t] = 1 when the loop TERMINATEd after experiment t: s_{t+1} does not exist,
    so neither the bootstrap nor the sum runs past it. In a loop that runs forever, dones is all 0.
    """
    advantages = torch.zeros_like(rewards)
    last_advantage = 0.0
    for t in reversed(range(len(rewards))):
        next_v = next_value if t == len(rewards) - 1 else values[t + 1]
        nonterminal = 1.0 - float(dones[t])
        delta = rewards[t] + gamma * next_v * nonterminal - values[t]  # δ_t (eq. 3)
        last_advantage = delta + gamma * lam * nonterminal * last_advantage  # Â_t = δ_t + γλ Â_{t+1} (eq. 3)
        advantages[t] = last_advantage
    return advantages


# ---------------------------------------------------------------------------------------------
# Reward scale: Welford's running moments, persisted
# ---------------------------------------------------------------------------------------------


@dataclass
class RunningMoments:
    """Running mean and variance of every value seen, by Welford's update (exact and stable one value at a
    time, so batches of any size, even 1, add up to the moments of the whole stream). state_dict() is three
    numbers to persist with the adapter; RunningMoments(**state) continues where a stopped learner was."""

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0
    """Σ (x − mean)² over the values seen."""

    def update(self, values: Iterable[float]) -> None:
        for x in values:
            self.count += 1
            delta = x - self.mean
            self.mean += delta / self.count
            self.m2 += delta * (x - self.mean)

    @property
    def var(self) -> float:
        """The population variance (numpy's default, ddof=0)."""
        return self.m2 / self.count if self.count else 0.0

    @property
    def rms(self) -> float:
        """sqrt(mean of x²) = sqrt(var + mean²): the scale the rewards are divided by."""
        return math.sqrt(self.var + self.mean**2)

    def state_dict(self) -> dict[str, float]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# The batch
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Batch:
    """N experiments in proposal order, ready for ppo_update (see the module docstring for the two modes)."""

    old_logprobs: Tensor
    """log π_θold(a_t|s_t): (N,) in score mode, (N, T) per token in generate mode."""
    advantages: Tensor
    """Â_t (N,), in scaled reward units."""
    returns: Tensor
    """Value targets Â_t + V(s_t) (N,)."""
    rewards: Tensor
    """The raw rewards (N,), for the statistics only."""
    mask: Tensor | None = None
    """(N, T) bool, the action's tokens (generate mode); None: every entry of old_logprobs counts."""
    ref_logprobs: Tensor | None = None
    """log π_ref(a_t|s_t) shaped like old_logprobs, to report KL(π_θ ‖ π_ref); None: not reported."""

    def __post_init__(self) -> None:
        n = len(self.advantages)
        if not (len(self.old_logprobs) == len(self.returns) == len(self.rewards) == n > 0):
            raise ValueError("old_logprobs, advantages, returns and rewards need the same length N > 0")
        if self.mask is not None and (self.mask.shape != self.old_logprobs.shape or not self.mask.any(-1).all()):
            raise ValueError("mask must be shaped like old_logprobs and mark at least one token per experiment")
        if self.ref_logprobs is not None and self.ref_logprobs.shape != self.old_logprobs.shape:
            raise ValueError("ref_logprobs must be shaped like old_logprobs")


def make_batch(rewards: Tensor, values: Tensor, next_value: float | Tensor, dones: Tensor, old_logprobs: Tensor,
               moments: RunningMoments, settings: Learner, mask: Tensor | None = None,
               ref_logprobs: Tensor | None = None) -> Batch:
    """Step 1: `moments` takes in these rewards, then scales them; GAE (eq. 3) on the scaled rewards.
    values (N,) and next_value are the value head's estimates, in scaled units (see gae for dones)."""
    moments.update(rewards.tolist())
    scaled = rewards / (moments.rms or 1.0)
    advantages = gae(scaled, values, next_value, dones, settings.gamma, settings.gae_lambda)
    return Batch(old_logprobs, advantages, advantages + values, rewards, mask, ref_logprobs)


# ---------------------------------------------------------------------------------------------
# The losses (eqs. 2 and 4) and the statistics
# ---------------------------------------------------------------------------------------------


def clipped_surrogate(ratio: Tensor, advantages: Tensor, clip: float) -> Tensor:
    """min(ρ·Â, clip(ρ, 1 − ε, 1 + ε)·Â), elementwise (eq. 2): the objective, to be maximised. Once ρ has moved
    past 1 + ε for Â > 0 (or below 1 − ε for Â < 0) the clipped term is the smaller and its gradient is 0."""
    return torch.min(ratio * advantages, torch.clamp(ratio, 1 - clip, 1 + clip) * advantages)


def kl_estimate(logratio: Tensor) -> Tensor:
    """(ρ − 1) − log ρ with log ρ = `logratio`, elementwise: the unbiased, low-variance, never negative estimator
    of KL(p ‖ q) from samples of p, ρ = q/p (Schulman, "Approximating KL divergence", 2020)."""
    return torch.expm1(logratio) - logratio


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean over each experiment's action tokens, then over experiments. x: (n, T) or (n, 1); mask: (n, T)."""
    mask = mask.to(x.dtype)
    return ((x * mask).sum(-1) / mask.sum(-1)).mean()


def learning_rate(update_index: int, settings: Learner) -> float:
    """Linear warm-up over the first `warmup_updates` updates (paper §7.3): update k (from 0) uses (k + 1)/warmup
    of the learning rate, so the first update already moves and update warmup − 1 reaches the full rate."""
    return settings.learning_rate * min(1.0, (update_index + 1) / max(settings.warmup_updates, 1))


@dataclass(frozen=True)
class Update:
    """What one ppo_update did: the statistics every policy.updated event carries, and two more for the log."""

    stats: PPOStats
    learning_rate: float
    reference_kl: float | None
    """KL(π_θ ‖ π_ref) estimated on the batch's actions over the update; None without ref_logprobs."""


# ---------------------------------------------------------------------------------------------
# The update
# ---------------------------------------------------------------------------------------------


def ppo_update(evaluate: Evaluate, batch: Batch, optimizer: torch.optim.Optimizer, settings: Learner,
               update_index: int) -> Update:
    """Step 2: `settings.epochs` passes over shuffled minibatches of `batch`, one optimizer step each, on the
    parameters the optimizer holds, at the warm-up's learning rate for `update_index` (0 for the first update;
    it is written into the optimizer). Statistics are means over every minibatch step of the update."""
    lr = learning_rate(update_index, settings)
    for group in optimizer.param_groups:
        group["lr"] = lr
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    # Seeded by (seed, update): a restarted learner shuffles update k as the first one did.
    generator = torch.Generator().manual_seed(settings.seed * 1_000_000 + update_index)
    n = len(batch.advantages)
    logs: dict[str, list[float]] = defaultdict(list)

    for _epoch in range(settings.epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, settings.minibatch_size):
            mb = order[start:start + settings.minibatch_size]
            new_logprobs, entropy, new_values = evaluate(mb)
            old_logprobs = batch.old_logprobs[mb].reshape(len(mb), -1)  # (n, T); T = 1 in score mode
            mask = batch.mask[mb] if batch.mask is not None else torch.ones_like(old_logprobs, dtype=torch.bool)
            logratio = new_logprobs.reshape(len(mb), -1) - old_logprobs
            ratio = logratio.exp()  # ρ_t = π_θ(a_t|s_t) / π_θold(a_t|s_t) (eq. 2)
            advantages = batch.advantages[mb].unsqueeze(-1)  # one Â_t per experiment, shared by its tokens

            policy_loss = -masked_mean(clipped_surrogate(ratio, advantages, settings.clip), mask)  # −L^CLIP (eq. 2)
            value_loss = (new_values.reshape(-1) - batch.returns[mb]).pow(2).mean()  # L^VF = (V(s_t) − R_t)²
            entropy_mean = masked_mean(entropy.reshape(len(mb), -1), mask)  # H[π_θ(·|s_t)]
            # eq. (4) maximises L = L^CLIP − c1·L^VF + c2·H; the optimizer minimises −L:
            loss = policy_loss + settings.c1 * value_loss - settings.c2 * entropy_mean

            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, settings.max_grad_norm)
            optimizer.step()

            with torch.no_grad():
                logs["policy_loss"].append(policy_loss.item())
                logs["value_loss"].append(value_loss.item())
                logs["entropy"].append(entropy_mean.item())
                logs["approx_kl"].append(masked_mean(kl_estimate(logratio), mask).item())  # KL(π_old ‖ π_θ)
                logs["clip_fraction"].append(masked_mean(((ratio - 1).abs() > settings.clip).float(), mask).item())
                if batch.ref_logprobs is not None:
                    ref_logratio = batch.ref_logprobs[mb].reshape(len(mb), -1) - new_logprobs.reshape(len(mb), -1)
                    logs["reference_kl"].append(masked_mean(kl_estimate(ref_logratio), mask).item())

    mean = {name: sum(values) / len(values) for name, values in logs.items()}
    stats = PPOStats(policy_loss=mean["policy_loss"], value_loss=mean["value_loss"], entropy=mean["entropy"],
                     approx_kl=mean["approx_kl"], clip_fraction=mean["clip_fraction"],
                     mean_reward=batch.rewards.float().mean().item())
    return Update(stats, lr, mean.get("reference_kl"))
