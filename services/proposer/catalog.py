"""The catalogue: every edit the literature suggests that applies to c* right now (the policy's score mode).

In score mode the policy does not write a diff (§4.1): it scores each action of this finite set by the
log-likelihood of its `text` given the prompt s_t, so every action must be a valid edit of exactly this
code. Two families, in this order:

- hyperparameter actions: every grid move (grid.py) of every constant at the top of train.py, plus depth
  ±1 where the grid only halves or doubles it. The kind comes from the constant's name (shared/edit_kinds.py):
  N_LAYER is "depth", LEARNING_RATE "lr-scale", ..., everything else "hyperparameter".
- structural actions (STRUCTURAL): exact code transformations. Each is anchored on code fragments and
  is offered only when its anchors are there: an anchor is a fragment that must occur on exactly one
  line, or, for a swap among interchangeable forms (Family: activation, norm, warmdown shape), every
  occurrence of a known form. c* changes over time, so an edit whose anchor has gone is simply not
  offered; an insertion whose first line is already in the code counts as applied and is not offered
  again.

An action whose result is unchanged, does not compile, or repeats an earlier action's result is dropped,
so every action is a distinct, compiling train.py. The order is deterministic: constants in source order
with their values sorted, then STRUCTURAL's order.
"""

from __future__ import annotations

import math
import re
import textwrap
from collections.abc import Callable
from dataclasses import dataclass

from services.proposer.grid import Constant, Number, candidates, constants, move
from shared.diffs import apply_ops, split_lines
from shared.edit_kinds import constant_kind
from shared.events import EditOp


@dataclass(frozen=True)
class Action:
    """One candidate edit of c*: `ops` is a structured diff against the code it was catalogued from."""

    kind: str
    """A short slug: "hyperparameter", "depth", "qk-norm", "activation", ..."""
    description: str
    """One human line, e.g. "LEARNING_RATE 3e-3 -> 6e-3: double; peak AdamW learning rate"."""
    ops: list[EditOp]

    @property
    def text(self) -> str:
        """The canonical text the policy's log-likelihood is scored on:

            <kind>: <description>
            replace 21..21
            +LEARNING_RATE = 6e-3  # peak AdamW learning rate
            insert before 40
            +        q, k = F.rms_norm(q, (q.size(-1),)), F.rms_norm(k, (k.size(-1),))  # QK-norm
            delete 73..73

        The first line says what and why; then every op in line order: its range in c*'s line numbers (the
        prompt lists c* numbered) and its new lines, each prefixed "+". The old lines are not repeated:
        the prompt already shows them, and they would only lengthen what is scored."""
        out = [f"{self.kind}: {self.description}"]
        for op in sorted(self.ops, key=lambda o: (o.start, o.op != "insert")):
            out.append(f"insert before {op.start}" if op.op == "insert" else f"{op.op} {op.start}..{op.end}")
            out += [f"+{line}" for line in op.text.splitlines()]
        return "\n".join(out)


def catalog(code: str) -> list[Action]:
    """Every action that applies to `code` now, each a distinct compiling edit; grid.GridError if `code`
    does not parse (c* always does: it ran)."""
    lines = split_lines(code)
    moves = _hyperparameter_actions(lines, constants(code))
    edits = [action for transform in STRUCTURAL for action in transform(lines)]
    return _distinct(code, moves, edits)


def _distinct(code: str, moves: list[Action], edits: list[Action]) -> list[Action]:
    """Drop no-ops, structural edits that do not compile, and repeats of an earlier action's result. A move
    swaps one literal for another, so it cannot break the syntax and need not pay for a compile."""
    seen = {code}
    kept = []
    for index, action in enumerate([*moves, *edits]):
        result = apply_ops(code, action.ops)
        if result in seen or (index >= len(moves) and not _compiles(result)):
            continue
        seen.add(result)
        kept.append(action)
    return kept


def _compiles(code: str) -> bool:
    try:
        compile(code, "train.py", "exec")
    except (SyntaxError, ValueError):
        return False
    return True


# --- hyperparameter actions --------------------------------------------------------------------------

_FACTOR_WORDS = {2.0: "double", 0.5: "halve", 4.0: "quadruple", 0.25: "quarter"}


def _hyperparameter_actions(lines: list[str], found: list[Constant]) -> list[Action]:
    actions = []
    for constant in found:
        kind = constant_kind(constant.name)
        for value in _values(constant, kind):
            actions.append(_move(lines, constant, value, kind))
    return actions


def _values(constant: Constant, kind: str) -> list[Number]:
    """The grid's values, and depth ±1 (the paper's agent went from 12 to 14 layers, §8.4), which the grid
    offers only up to 8 layers."""
    moves = set(candidates(constant))
    value = constant.value
    if kind == "depth" and type(value) is int and moves:  # a frozen depth stays frozen
        moves |= {v for v in (value - 1, value + 1) if v >= 1}
    return sorted(moves)


def _move(lines: list[str], constant: Constant, value: Number, kind: str) -> Action:
    """grid.move, described: the change in words and the constant's own comment."""
    mutation = move(lines, constant, value)
    comment = lines[constant.lineno - 1][constant.end_col_offset:].partition("#")[2].strip()
    meaning = f"; {comment}" if comment else ""
    return Action(kind, f"{mutation.description}: {_change(constant.value, value)}{meaning}", mutation.ops)


def _change(old: Number, new: Number) -> str:
    """The move in words: "double", "one fewer", "switch off", "x1.25"."""
    if isinstance(old, bool):
        return "flip"
    if new == 0:
        return "switch off"
    if old == 0:
        return "switch on"
    if isinstance(old, int) and abs(new - old) == 1:
        return "one more" if new > old else "one fewer"
    ratio = new / old
    word = next((w for factor, w in _FACTOR_WORDS.items() if math.isclose(ratio, factor)), None)
    return word or f"x{ratio:.3g}"


# --- anchors -----------------------------------------------------------------------------------------


def _line_of(lines: list[str], fragment: str) -> int | None:
    """The 1-based number of the one line containing `fragment`; None when no line or several do."""
    hits = [number for number, line in enumerate(lines, 1) if fragment in line]
    return hits[0] if len(hits) == 1 else None


def _substitute(lines: list[str], fragment: str, new: str) -> EditOp | None:
    """Replace `fragment` by `new` in the one line that contains it."""
    number = _line_of(lines, fragment)
    if number is None:
        return None
    return EditOp("replace", number, number, lines[number - 1].replace(fragment, new))


def _delete(lines: list[str], fragment: str) -> EditOp | None:
    number = _line_of(lines, fragment)
    return None if number is None else EditOp("delete", number, number)


def _insert_before(lines: list[str], fragment: str, body: str) -> EditOp | None:
    """`body` indented like the one line containing `fragment`, inserted before it; None also when the
    body's first line is already a line of the code (the edit was made before)."""
    number = _line_of(lines, fragment)
    first = body.splitlines()[0].strip()
    if number is None or any(line.strip() == first for line in lines):
        return None
    anchor = lines[number - 1]
    indent = anchor[:len(anchor) - len(anchor.lstrip())]
    return EditOp("insert", number, number - 1, textwrap.indent(body, indent))


def _anchored(kind: str, description: str, *ops: EditOp | None) -> list[Action]:
    """The action when every anchor was found, else nothing."""
    if any(op is None for op in ops):
        return []
    return [Action(kind, description, [op for op in ops if op is not None])]


# --- swaps among interchangeable forms ---------------------------------------------------------------


@dataclass(frozen=True)
class Form:
    """One of a family's interchangeable fragments: `template` with "{}" where the operand the swap keeps
    goes (the MLP's input, the norm's width)."""

    name: str
    template: str
    why: str
    requires: str = ""
    """A regex (multiline) the code must match for this form to be offered, e.g. its import."""


@dataclass(frozen=True)
class Family:
    kind: str
    what: str
    operand: str
    """Regex of the operand."""
    forms: tuple[Form, ...]


ACTIVATION = Family("activation", "MLP activation", r"self\.\w+\(x\)", (
        Form("GELU", "F.gelu({})", "the GPT-2 default"),
        Form("ReLU²", "F.relu({}).square()", "squared ReLU, sparse and cheap (Primer, So et al. 2021; modded-nanogpt)"),
        Form("SiLU", "F.silu({})", "Swish (Ramachandran et al. 2017)"),
))
NORM = Family("norm", "normalisation", r"\w+", (
        Form("LayerNorm", "nn.LayerNorm({})", "mean and variance, with a bias (GPT-2)"),
        Form("LayerNorm without bias", "nn.LayerNorm({}, bias=False)", "no bias parameters (nanoGPT)"),
        Form("RMSNorm", "nn.RMSNorm({})", "no mean subtraction, no bias; cheaper (Zhang & Sennrich 2019)"),
))
WARMDOWN = Family("warmdown", "learning-rate warmdown", r"\(1 - progress\) / \w+", (
        Form("linear to zero", "return max(0.0, {})", "the trapezoidal schedule's linear decay"),
        Form("cosine to zero", "return 0.5 * (1 + math.cos(math.pi * (1 - max(0.0, {}))))",
             "a half cosine over the warmdown (Loshchilov & Hutter 2017)", requires=r"^import math$"),
        Form("1-sqrt to zero", "return 1 - (1 - max(0.0, {})) ** 0.5",
             "decays later and faster than linear (Hägele et al. 2024)"),
        Form("linear to 10%", "return 0.1 + 0.9 * max(0.0, {})", "ends at a tenth of the peak rather than zero"),
))


def _swaps(family: Family) -> Callable[[list[str]], list[Action]]:
    return lambda lines: _swap_actions(lines, family)


def _swap_actions(lines: list[str], family: Family) -> list[Action]:
    """For each form, one action that rewrites every occurrence of the family's other forms into it."""
    code = "".join(lines)
    actions = []
    for target in family.forms:
        if target.requires and not re.search(target.requires, code, re.MULTILINE):
            continue
        others = [form for form in family.forms if form is not target]
        pattern = re.compile("|".join(f"(?P<f{i}>{_regex(form.template, family.operand)})"
                                      for i, form in enumerate(others)))
        ops, replaced = [], []
        for number, line in enumerate(lines, 1):
            matches = list(pattern.finditer(line))
            if matches:
                ops.append(EditOp("replace", number, number, pattern.sub(_into(target), line)))
                replaced += [others[int(m.lastgroup[1:])].name for m in matches]
        if ops:
            old = " and ".join(dict.fromkeys(replaced))
            where = f" (all {len(replaced)})" if len(replaced) > 1 else ""
            actions.append(Action(family.kind, f"{family.what} {old} -> {target.name}{where}: {target.why}", ops))
    return actions


def _into(target: Form) -> Callable[[re.Match[str]], str]:
    """The replacement of a match of another form: the target form around the same operand."""
    return lambda match: target.template.format(match.group(match.lastindex + 1))


def _regex(template: str, operand: str) -> str:
    """The template as a regex whose only unnamed group is the operand (it follows the form's named group,
    so a match's operand is group lastindex + 1)."""
    return re.escape(template).replace(re.escape("{}"), f"({operand})")


# --- structural edits anchored on the nanoGPT-style code ---------------------------------------------

_ATTENTION = "F.scaled_dot_product_attention(q, k, v"


def _qk_norm(lines: list[str]) -> list[Action]:
    body = "q, k = F.rms_norm(q, (q.size(-1),)), F.rms_norm(k, (k.size(-1),))  # QK-norm\n"
    return _anchored("qk-norm", "RMS-normalise each head's queries and keys before attention, which "
                     "bounds the attention logits (Dehghani et al. 2023; the paper's agent, §8.4)",
                     _insert_before(lines, _ATTENTION, body))


_ROTARY = '''\
def rotary(x):
    """Rotary position embedding (RoPE, Su et al. 2021) of queries or keys shaped [B, H, T, D]."""
    T, D = x.shape[-2], x.shape[-1]
    freqs = 10000.0 ** (-torch.arange(0, D, 2, device=x.device, dtype=torch.float32) / D)
    angles = torch.arange(T, device=x.device, dtype=torch.float32)[:, None] * freqs
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., : D // 2], x[..., D // 2 :]
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


'''


def _rope(lines: list[str]) -> list[Action]:
    """Learned absolute positions -> rotary embeddings of queries and keys."""
    return _anchored(
        "position", "RoPE: rotate queries and keys by their position instead of adding a learned position "
        "embedding (rotary embeddings, Su et al. 2021; LLaMA, nanochat)",
        _insert_before(lines, "class CausalSelfAttention(", _ROTARY),
        _insert_before(lines, _ATTENTION, "q, k = rotary(q), rotary(k)  # RoPE\n"),
        _delete(lines, "self.wpe = nn.Embedding("),
        _delete(lines, "T = idx.shape[1]"),
        _substitute(lines, "self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))", "self.wte(idx)"),
    )


def _swiglu(lines: list[str]) -> list[Action]:
    """The MLP as a SwiGLU, its hidden width cut to 2/3 so that parameters and FLOPs stay the same."""
    hidden = "2 * MLP_RATIO * N_EMBD // 3"
    forward = _line_of(lines, "self.fc(x)")
    if forward is None:
        return []
    line = lines[forward - 1]
    current = [form for form in ACTIVATION.forms if re.search(_regex(form.template, r"self\.fc\(x\)"), line)]
    if len(current) != 1:
        return []
    indent = line[:len(line) - len(line.lstrip())]
    gated = re.sub(_regex(current[0].template, r"self\.fc\(x\)"), "F.silu(gate) * up", line)
    return _anchored(
        "activation", f"MLP {current[0].name} -> SwiGLU, silu(gate) * up at 2/3 of the hidden width so that "
        "parameters and FLOPs stay the same (Shazeer 2020; LLaMA)",
        _substitute(lines, "nn.Linear(N_EMBD, MLP_RATIO * N_EMBD, bias=False)",
                    f"nn.Linear(N_EMBD, 2 * ({hidden}), bias=False)"),
        _substitute(lines, "nn.Linear(MLP_RATIO * N_EMBD, N_EMBD, bias=False)",
                    f"nn.Linear({hidden}, N_EMBD, bias=False)"),
        EditOp("replace", forward, forward, f"{indent}gate, up = self.fc(x).chunk(2, dim=-1)\n{gated}"),
    )


def _zero_init(lines: list[str]) -> list[Action]:
    depth_scaled = "nn.init.normal_(p, std=INIT_STD / math.sqrt(2 * N_LAYER))"
    return _anchored("init", "zero-init the residual projections, so every block starts as the identity "
                     "(modded-nanogpt, nanochat)",
                     _substitute(lines, depth_scaled, "nn.init.zeros_(p)  # zero-init: blocks start as the identity"))


def _untie(lines: list[str]) -> list[Action]:
    return _anchored("weight-tying", "untie the output head from the token embedding: more parameters, "
                     "each matrix free to do its own job (nanochat, LLaMA)",
                     _delete(lines, "self.lm_head.weight = self.wte.weight"))


def _softcap(lines: list[str]) -> list[Action]:
    """logits = 15 tanh(logits / 15), nanochat's cap; the anchor is a `return self.lm_head(...)` line."""
    hits = [n for n, line in enumerate(lines, 1) if re.fullmatch(r"\s*return self\.lm_head\(.+\)\s*", line)]
    if len(hits) != 1:
        return []
    line = lines[hits[0] - 1]
    indent = line[:len(line) - len(line.lstrip())]
    capped = (f"{indent}logits = {line.strip().removeprefix('return ')}\n"
              f"{indent}return 15.0 * torch.tanh(logits / 15.0)  # logit soft-capping\n")
    return [Action("logit-softcap", "soft-cap the logits at 15 with tanh, which keeps them from growing "
                   "overconfident (Gemma 2, nanochat)", [EditOp("replace", hits[0], hits[0], capped)])]


def _decay_embedding(lines: list[str]) -> list[Action]:
    return _anchored("weight-decay", "apply weight decay to the token embedding too, not only to the "
                     "blocks' matrices",
                     _substitute(lines, "p.dim() >= 2 and p is not model.wte.weight", "p.dim() >= 2"),
                     _substitute(lines, "p.dim() < 2 or p is model.wte.weight", "p.dim() < 2"))


def _clip_warmup(lines: list[str]) -> list[Action]:
    if not any("env.progress()" in line for line in lines):
        return []
    return _anchored("grad-clip", "relax the clip norm linearly from 0.5 GRAD_CLIP to GRAD_CLIP over the "
                     "first 10% of the budget (the paper's agent, §8.4)",
                     _substitute(lines, "clip_grad_norm_(model.parameters(), GRAD_CLIP)",
                                 "clip_grad_norm_(model.parameters(), GRAD_CLIP * min(1.0, 0.5 + 5 * env.progress()))"))


STRUCTURAL: tuple[Callable[[list[str]], list[Action]], ...] = (
    _qk_norm, _rope, _swaps(ACTIVATION), _swiglu, _swaps(NORM), _zero_init, _untie, _softcap,
    _decay_embedding, _clip_warmup, _swaps(WARMDOWN),
)
"""Every structural transformation, in catalogue order; each returns its actions for the code's lines."""
