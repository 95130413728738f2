"""One PPO update of the language-model policy (paper §4.2, eqs. 2-4), with no bus in it.

    trainer = Trainer(policy, temperature, halt)
    learned = trainer.learn(batch, adapters, current, moments, settings, update_index)
    save_version(policy, moments, directory)

In the order of learn():

1. log π_θold of every action, recomputed with the adapter version that proposed it: the proposer's own number
   may come from another device, precision or engine (vLLM), and a ratio that does not start at exactly 1 is
   clipped for nothing. A version no policy.updated published ("base") is the initial policy: a fresh adapter,
   whose B matrices are zero, so the base model itself. V(s_t) is the critic's as it stands before the update,
   on the current adapter's hidden states (the ones it reads): the proposer's backend may have no value head.
2. log π_ref with the adapter disabled, the reference the KL is reported against.
3. ppo_update, with minibatches evaluated with gradients: score mode through lm.score (the ratio of the chosen
   candidate's π, the entropy over the candidates), generate mode through one forward pass over prompt +
   completion (a ratio and an entropy per written token); AdamW on the LoRA matrices and the value head.

The optimizer is made anew for each update: an update is then a function of the adapter version before it,
its batch, its index and the seed alone, all of which a restarted learner gets back from the ledger and the
object store. (Adam's bias correction keeps the first steps of each update to the intended size.)
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from services.learner.batches import padded, to_batch
from services.learner.ppo import Evaluate, RunningMoments, Update, ppo_update
from shared.config import Learner
from shared.policy.lm import Policy, score
from shared.queries import Transition

MOMENTS_FILE = "running_moments.json"
"""Beside the adapter in each version's folder: the reward scale as it stood after that version's update."""
PROPOSING = "proposing"
"""peft's name for an older version's adapter while its log-probs are recomputed."""


class Halted(Exception):
    """The service is stopping: the update is abandoned, and redone from the ledger at the next start."""


@dataclass(frozen=True)
class Action:
    """The policy on one transition's action: log π per token, the entropy per token, V(s)."""

    logprobs: Tensor
    """(T,): log π(a_t|s_t) in score mode (T = 1); each written token's log-probability in generate mode."""
    entropy: Tensor
    """(T,): over the candidates in score mode; over the vocabulary at each written token in generate mode."""
    value: Tensor
    """(): V(s_t)."""


@dataclass(frozen=True)
class Learned:
    update: Update
    drift: float
    """The largest |recomputed − logged| log π_θold(a_t|s_t) of the batch: about 0 when the proposer and the
    learner compute π alike (same model, tokenizer and temperature)."""


@dataclass(frozen=True)
class Trainer:
    policy: Policy
    temperature: float
    """The temperature generate mode sampled at ([proposer] temperature): π_θ = softmax(logits / temperature)."""
    halt: threading.Event
    """Set when the service stops: checked before every forward pass, so that it leaves within one."""

    def learn(self, batch: Sequence[Transition], adapters: Mapping[str, Path | None], current: str | None,
              moments: RunningMoments, settings: Learner, update_index: int) -> Learned:
        """One update of the policy, in place, on `batch` (proposal order); `moments` takes in its rewards."""
        old, values = self.old_actions(batch, adapters, current)
        with self.policy.reference():
            reference = [self.act(transition, grad=False).logprobs.cpu() for transition in batch]
        ppo_batch = to_batch(batch, old, values, reference, moments, settings)
        optimizer = torch.optim.AdamW(self.policy.trainable_parameters(), lr=settings.learning_rate)
        update = ppo_update(self.evaluate(batch, ppo_batch.old_logprobs.shape[1]), ppo_batch, optimizer, settings,
                            update_index)
        return Learned(update, max(abs(float(lp.sum()) - t.logprob) for t, lp in zip(batch, old, strict=True)))

    def old_actions(self, batch: Sequence[Transition], adapters: Mapping[str, Path | None],
                    current: str | None) -> tuple[list[Tensor], Tensor]:
        """log π_θold of each action, every version's transitions together, and V(s_t) of the current critic.
        `adapters` maps each policy_version of the batch other than `current` (the policy's own; None: the
        initial one) to its folder (None: initial)."""
        old: dict[int, Tensor] = {}
        values: dict[int, Tensor] = {}
        for version in sorted({transition.policy_version for transition in batch}):
            with nullcontext() if version == current else adapter_of(self.policy, adapters[version]):
                for i, transition in enumerate(batch):
                    if transition.policy_version == version:
                        action = self.act(transition, grad=False)
                        old[i] = action.logprobs.cpu()
                        if version == current:
                            values[i] = action.value.cpu()
        for i, transition in enumerate(batch):
            if i not in values:
                values[i] = self.act(transition, grad=False).value.cpu()
        return [old[i] for i in range(len(batch))], torch.stack([values[i] for i in range(len(batch))])

    def evaluate(self, batch: Sequence[Transition], width: int) -> Evaluate:
        """ppo.Evaluate on the policy as it trains: (n, T) log-probs and entropies and (n,) values, on the CPU with
        the batch."""

        def evaluate(indices: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            actions = [self.act(batch[i], grad=True) for i in indices.tolist()]
            return (padded([a.logprobs.cpu() for a in actions], width),
                    padded([a.entropy.cpu() for a in actions], width), torch.stack([a.value.cpu() for a in actions]))

        return evaluate

    def act(self, transition: Transition, *, grad: bool) -> Action:
        if self.halt.is_set():
            raise Halted
        if transition.candidates is not None:
            assert transition.action_index is not None
            scores = score(self.policy, transition.prompt, transition.candidates, grad=grad)
            return Action(scores.log_pi[transition.action_index].reshape(1), scores.entropy.reshape(1), scores.value)
        assert transition.completion_token_ids is not None
        return self.generated(transition.prompt, transition.completion_token_ids, grad=grad)

    def generated(self, prompt: str, token_ids: list[int], *, grad: bool) -> Action:
        """Generate mode in one forward pass over prompt + completion: what lm.token_logprobs computes, with the
        entropy at each written token and V(s) from the hidden state at the prompt's last token, as lm.score."""
        policy = self.policy
        with torch.enable_grad() if grad else torch.no_grad():
            prompt_ids = policy.tokenizer(prompt)["input_ids"]
            ids = torch.tensor([prompt_ids + token_ids], dtype=torch.long, device=policy.device)
            out = policy.model(input_ids=ids, output_hidden_states=True, logits_to_keep=len(token_ids) + 1)
            log_p = (out.logits[0, :-1].float() / self.temperature).log_softmax(-1)  # each written token's π
            chosen = log_p.gather(-1, ids[0, len(prompt_ids):, None]).squeeze(-1)
            entropy = -(log_p.exp() * log_p).sum(-1)
            value = policy.value_head(out.hidden_states[-1][0, len(prompt_ids) - 1].float())
        return Action(chosen, entropy, value)


@contextmanager
def adapter_of(policy: Policy, directory: Path | None) -> Iterator[None]:
    """Within this block the policy is the version saved in `directory` (None: the initial policy, which is the
    base model). Only the LoRA weights are swapped: log-probs need nothing else."""
    if directory is None:
        with policy.reference():
            yield
        return
    current = policy.model.active_adapter
    policy.model.load_adapter(str(directory), adapter_name=PROPOSING)
    policy.model.set_adapter(PROPOSING)
    try:
        yield
    finally:
        policy.model.set_adapter(current)  # which also makes `current` trainable again
        policy.model.delete_adapter(PROPOSING)


def save_version(policy: Policy, moments: RunningMoments, directory: Path) -> None:
    """The version's folder: the adapter and value head (Policy.save), and the reward scale after its update."""
    policy.save(directory)
    (directory / MOMENTS_FILE).write_text(json.dumps(moments.state_dict()))


def load_moments(directory: Path) -> RunningMoments:
    return RunningMoments(**json.loads((directory / MOMENTS_FILE).read_text()))
