"""A nanochat-style GPT for one GPU and a 5-minute budget. This is the file the agent edits.

Muon for the transformer's matrices, AdamW for embeddings and the head; RMSNorm, rotary
embeddings, ReLU², logit soft-capping, bf16 autocast and torch.compile on CUDA. The same file runs
on CPU at toy size (only the constants change). Data, clock and evaluation come from `prepare.py`.
"""

import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from prepare import session

# Hyperparameters (edit these directly, no CLI flags needed)
DEPTH = 12  # transformer blocks; width follows as DEPTH * ASPECT_RATIO
ASPECT_RATIO = 64  # model width per layer of depth
HEAD_DIM = 128  # width of one attention head
MLP_RATIO = 4  # hidden width of the MLP, in multiples of the model width
DEVICE_BATCH_SIZE = 64  # sequences per micro-batch
GRAD_ACCUM_STEPS = 8  # micro-batches per optimizer step
MATRIX_LR = 0.02  # Muon learning rate for the blocks' matrices
EMBEDDING_LR = 0.2  # AdamW learning rate for the token embedding
UNEMBEDDING_LR = 0.004  # AdamW learning rate for the lm_head
WEIGHT_DECAY = 0.0  # AdamW weight decay on embedding and lm_head
ADAM_BETAS = (0.8, 0.95)  # AdamW betas
MUON_MOMENTUM = 0.95  # Muon momentum after its warm-up
MUON_MOMENTUM_WARMUP_STEPS = 300  # optimizer steps to ramp Muon momentum from 0.85
NS_STEPS = 5  # Newton-Schulz iterations of the orthogonalisation
WARMUP_FRAC = 0.0  # fraction of the budget warming the learning rates up
WARMDOWN_FRAC = 0.4  # fraction of the budget decaying them linearly to zero
GRAD_CLIP = 0.0  # max gradient norm (0 disables clipping)
LOGIT_SOFTCAP = 15.0  # logits = cap * tanh(logits / cap)
ROPE_BASE = 10000.0  # rotary embedding base
COMPILE = True  # torch.compile the model on CUDA
PEAK_FLOPS = 989e12  # bf16 dense peak of an H100 SXM, for the MFU printout


def rms_norm(x):
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary(x, cos, sin):
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, dim, n_head):
        super().__init__()
        self.n_head = n_head
        self.c_q = nn.Linear(dim, dim, bias=False)
        self.c_k = nn.Linear(dim, dim, bias=False)
        self.c_v = nn.Linear(dim, dim, bias=False)
        self.c_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x, cos, sin):
        B, T, C = x.shape
        q, k, v = (proj(x).view(B, T, self.n_head, C // self.n_head) for proj in (self.c_q, self.c_k, self.c_v))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.c_fc = nn.Linear(dim, MLP_RATIO * dim, bias=False)
        self.c_proj = nn.Linear(MLP_RATIO * dim, dim, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, dim, n_head):
        super().__init__()
        self.attn = CausalSelfAttention(dim, n_head)
        self.mlp = MLP(dim)

    def forward(self, x, cos, sin):
        x = x + self.attn(rms_norm(x), cos, sin)
        return x + self.mlp(rms_norm(x))


class GPT(nn.Module):
    def __init__(self, vocab_size, seq_len):
        super().__init__()
        dim = DEPTH * ASPECT_RATIO
        self.wte = nn.Embedding(vocab_size, dim)
        self.blocks = nn.ModuleList(Block(dim, max(1, dim // HEAD_DIM)) for _ in range(DEPTH))
        self.lm_head = nn.Linear(dim, vocab_size, bias=False)
        head_dim = dim // max(1, dim // HEAD_DIM)
        inv_freq = 1.0 / ROPE_BASE ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
        self.register_buffer("cos", angles.cos()[None, :, None, :], persistent=False)
        self.register_buffer("sin", angles.sin()[None, :, None, :], persistent=False)
        self._init_weights(dim)

    @torch.no_grad()
    def _init_weights(self, dim):
        nn.init.normal_(self.wte.weight, std=1.0)
        nn.init.zeros_(self.lm_head.weight)
        bound = math.sqrt(3.0 / dim)
        for block in self.blocks:
            for linear in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                nn.init.uniform_(linear.weight, -bound, bound)
            nn.init.zeros_(block.attn.c_proj.weight)  # each block starts as the identity
            nn.init.zeros_(block.mlp.c_proj.weight)

    def forward(self, idx):
        T = idx.shape[1]
        cos, sin = self.cos[:, :T], self.sin[:, :T]
        x = rms_norm(self.wte(idx))
        for block in self.blocks:
            x = block(x, cos, sin)
        logits = self.lm_head(rms_norm(x)).float()
        return LOGIT_SOFTCAP * torch.tanh(logits / LOGIT_SOFTCAP)


def zeropower_via_newtonschulz(G, steps):
    """Approximately orthogonalise G (Muon's update direction) with a quintic Newton-Schulz iteration."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.bfloat16()
    transposed = X.size(-2) > X.size(-1)
    if transposed:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return X.mT if transposed else X


class Muon(torch.optim.Optimizer):
    """Momentum SGD whose update for each matrix is orthogonalised (Keller Jordan's Muon)."""

    def __init__(self, params, lr, momentum):
        super().__init__(params, dict(lr=lr, momentum=momentum))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p.grad))
                buf.lerp_(p.grad, 1 - group["momentum"])
                update = p.grad.lerp(buf, group["momentum"])  # Nesterov
                update = zeropower_via_newtonschulz(update, NS_STEPS)
                scale = max(1.0, p.size(-2) / p.size(-1)) ** 0.5
                p.add_(update.to(p.dtype), alpha=-group["lr"] * scale)


def lr_multiplier(progress):
    """Optional warmup, constant, then linear warmdown to zero; keyed on the budget spent."""
    if progress < WARMUP_FRAC:
        return progress / WARMUP_FRAC
    if progress > 1 - WARMDOWN_FRAC:
        return max(0.0, (1 - progress) / WARMDOWN_FRAC)
    return 1.0


def muon_momentum(step):
    frac = min(step / MUON_MOMENTUM_WARMUP_STEPS, 1.0)
    return (1 - frac) * 0.85 + frac * MUON_MOMENTUM


env = session()
cuda = env.device == "cuda"
torch.backends.cuda.matmul.allow_tf32 = True
model = GPT(env.vocab_size, env.seq_len).to(env.device)
dim = DEPTH * ASPECT_RATIO
dmodel_lr_scale = (dim / 768) ** -0.5  # AdamW learning rates scale with 1/sqrt(width), as in nanochat
adamw = torch.optim.AdamW(
    [
        {"params": [model.wte.weight], "lr": EMBEDDING_LR * dmodel_lr_scale},
        {"params": [model.lm_head.weight], "lr": UNEMBEDDING_LR * dmodel_lr_scale},
    ],
    betas=ADAM_BETAS,
    eps=1e-10,
    weight_decay=WEIGHT_DECAY,
)
muon = Muon([p for block in model.blocks for p in block.parameters()], lr=MATRIX_LR, momentum=MUON_MOMENTUM)
optimizers = [adamw, muon]
for opt in optimizers:
    for group in opt.param_groups:
        group["initial_lr"] = group["lr"]

num_params = sum(p.numel() for p in model.parameters())
non_embedding = num_params - model.wte.weight.numel()
n_head = max(1, dim // HEAD_DIM)
flops_per_token = 6 * non_embedding + 12 * DEPTH * n_head * (dim // n_head) * env.seq_len
print(f"params {num_params:,}  flops/token {flops_per_token:.3e}", flush=True)
train_model = torch.compile(model) if cuda and COMPILE else model
autocast = torch.autocast(device_type=env.device, dtype=torch.bfloat16, enabled=cuda)

model.train()
step = 0
micro = 0
tokens_timed = 0
time_timed = 0.0
last = time.perf_counter()
for x, y in env.batches(DEVICE_BATCH_SIZE):
    with autocast:
        logits = train_model(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1))
    (loss / GRAD_ACCUM_STEPS).backward()
    micro += 1
    if micro % GRAD_ACCUM_STEPS:
        continue
    multiplier = lr_multiplier(env.progress())
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * multiplier
    for group in muon.param_groups:
        group["momentum"] = muon_momentum(step)
    if GRAD_CLIP > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
    for opt in optimizers:
        opt.step()
    model.zero_grad(set_to_none=True)
    env.log(loss)
    step += 1
    if step % 50 == 0:
        if cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        if step > 50:  # the first window includes compilation
            tokens_timed += 50 * GRAD_ACCUM_STEPS * DEVICE_BATCH_SIZE * env.seq_len
            time_timed += now - last
            tok_s = tokens_timed / time_timed
            mfu = tok_s * flops_per_token / PEAK_FLOPS
            print(f"step {step:5d}  loss {loss.item():.4f}  tok/s {tok_s:,.0f}  mfu {100 * mfu:.1f}%", flush=True)
        last = now

if time_timed:
    tok_s = tokens_timed / time_timed
    print(f"summary: steps {step}  tok/s {tok_s:,.0f}  mfu {100 * tok_s * flops_per_token / PEAK_FLOPS:.1f}%")
env.submit(model)
