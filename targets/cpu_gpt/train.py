"""A small GPT trained for a fixed budget on CPU. This is the file the agent edits.

Data, clock and evaluation come from the frozen `prepare.py`: `env.batches()` stops when the budget
is spent, `env.progress()` says how much of it is gone, `env.submit(model)` hands the model in.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from prepare import session

# Hyperparameters (edit these directly, no CLI flags needed)
N_LAYER = 4  # transformer blocks
N_HEAD = 4  # attention heads per block
N_EMBD = 128  # model width
MLP_RATIO = 4  # hidden width of the MLP, in multiples of N_EMBD
DROPOUT = 0.0  # dropout on attention and MLP outputs
BATCH_SIZE = 32  # sequences per optimizer step
LEARNING_RATE = 3e-3  # peak AdamW learning rate
WEIGHT_DECAY = 0.1  # AdamW weight decay on matrices (not on norms, biases or embeddings)
BETAS = (0.9, 0.95)  # AdamW betas
WARMUP_FRAC = 0.05  # fraction of the budget spent warming the learning rate up
WARMDOWN_FRAC = 0.4  # fraction of the budget spent decaying it linearly to zero
GRAD_CLIP = 1.0  # max gradient norm (0 disables clipping)
INIT_STD = 0.02  # std of the normal init of linear and embedding weights


class CausalSelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(N_EMBD, 3 * N_EMBD, bias=False)
        self.proj = nn.Linear(N_EMBD, N_EMBD, bias=False)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(N_EMBD, dim=2)
        q, k, v = (t.view(B, T, N_HEAD, C // N_HEAD).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=DROPOUT if self.training else 0.0)
        return F.dropout(self.proj(y.transpose(1, 2).reshape(B, T, C)), DROPOUT, self.training)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(N_EMBD, MLP_RATIO * N_EMBD, bias=False)
        self.proj = nn.Linear(MLP_RATIO * N_EMBD, N_EMBD, bias=False)

    def forward(self, x):
        return F.dropout(self.proj(F.gelu(self.fc(x))), DROPOUT, self.training)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1 = nn.LayerNorm(N_EMBD)
        self.attn = CausalSelfAttention()
        self.ln2 = nn.LayerNorm(N_EMBD)
        self.mlp = MLP()

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab_size, seq_len):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, N_EMBD)
        self.wpe = nn.Embedding(seq_len, N_EMBD)
        self.blocks = nn.ModuleList(Block() for _ in range(N_LAYER))
        self.ln_f = nn.LayerNorm(N_EMBD)
        self.lm_head = nn.Linear(N_EMBD, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):  # scale residual projections by depth (GPT-2)
                nn.init.normal_(p, std=INIT_STD / math.sqrt(2 * N_LAYER))

    def _init(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=INIT_STD)

    def forward(self, idx):
        T = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def lr_multiplier(progress):
    """Linear warmup, constant, then linear warmdown to zero; keyed on the budget spent."""
    if progress < WARMUP_FRAC:
        return progress / WARMUP_FRAC
    if progress > 1 - WARMDOWN_FRAC:
        return max(0.0, (1 - progress) / WARMDOWN_FRAC)
    return 1.0


env = session()
model = GPT(env.vocab_size, env.seq_len).to(env.device)
decay = [p for p in model.parameters() if p.dim() >= 2 and p is not model.wte.weight]
no_decay = [p for p in model.parameters() if p.dim() < 2 or p is model.wte.weight]
optimizer = torch.optim.AdamW(
    [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
    lr=LEARNING_RATE,
    betas=BETAS,
)

model.train()
for x, y in env.batches(BATCH_SIZE):
    for group in optimizer.param_groups:
        group["lr"] = LEARNING_RATE * lr_multiplier(env.progress())
    logits = model(x)
    loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if GRAD_CLIP > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
    optimizer.step()
    env.log(loss)

env.submit(model)
