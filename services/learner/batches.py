"""From the ledger's transitions to a PPO batch: which transitions, their rewards, the tensors (paper §3.1, eq. 3).

    batch = select(pending, settings.batch_size)      # once at least batch_size are pending
    ppo_batch = to_batch(batch, old, reference, moments, settings)

The ledger (services/ledger/transitions.py) answers the pending transitions in the order they finished, each
with the context its reward is measured against. A batch is the first batch_size of them: the same set
whenever it is asked for, so a restarted learner redoes an interrupted update on exactly the same steps.
Within the batch the steps are put back in the order the policy took them, the order GAE runs over.

Score-mode and generate-mode transitions share one layout: (N, T) log-probabilities with a mask, a score-mode
action being one "token" (T = 1 when every action is one).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from services.learner.ppo import Batch, RunningMoments, make_batch
from services.learner.rewards import reward_of
from shared.config import Learner
from shared.queries import Transition


def select(pending: Sequence[Transition], size: int) -> list[Transition]:
    """The next batch: the first `size` pending transitions in the order they finished, sorted into proposal order."""
    return sorted(pending[:size], key=lambda transition: transition.proposal_seq)


def padded(rows: Sequence[Tensor], width: int) -> Tensor:
    """(N, width): each row right-padded with zeros (finite, as ppo.Batch requires); differentiable."""
    return torch.stack([F.pad(row, (0, width - len(row))) for row in rows])


def lengths(batch: Sequence[Transition]) -> list[int]:
    """Each action's length in tokens; a score-mode action counts as one."""
    return [1 if t.candidates is not None else len(t.completion_token_ids or ()) for t in batch]


def to_batch(batch: Sequence[Transition], old: Sequence[Tensor], values: Tensor, reference: Sequence[Tensor],
             moments: RunningMoments, settings: Learner) -> Batch:
    """ppo.Batch of the steps in `batch` (proposal order), given log π_θold and log π_ref of each action's tokens
    (1-d tensors, one per step) and the critic's V(s_t) before the update (N,), in scaled reward units.

    GAE (eq. 3) bootstraps after the last step with that step's own V(s_{N-1}): s_N differs from it by one
    experiment of h, and the next prompt is not part of the batch, so a redone update bootstraps alike. The loop
    never terminates, so no step is done."""
    sizes = lengths(batch)
    t = max(sizes)
    rewards = torch.tensor([reward_of(transition, settings).total for transition in batch])
    mask = torch.arange(t)[None, :] < torch.tensor(sizes)[:, None]
    return make_batch(rewards, values, float(values[-1]), torch.zeros(len(batch)), padded(old, t), moments, settings,
                      mask=mask, ref_logprobs=padded(reference, t))
