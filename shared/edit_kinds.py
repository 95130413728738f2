"""What kind of edit a proposal made: the groups in which the paper reports what its agent discovered (§8.4).

One vocabulary for every policy. A catalogue action (score mode, services/proposer/catalog.py) names its kind in
its text ("qk-norm: ..."); any other edit is classified from its diff: an edit that only changes top-level
constants takes the kind of the first constant's name (KIND_BY_NAME); one that changes code is "code".
"""

from __future__ import annotations

import re

KIND_BY_NAME = (
    (r"^(N_LAYERS?|NUM_LAYERS|DEPTH)$", "depth"),
    (r"(^|_)LR$|LEARNING_RATE", "lr-scale"),
    (r"WEIGHT_DECAY", "weight-decay"),
    (r"GRAD_CLIP", "grad-clip"),
    (r"WARMUP", "warmup"),
    (r"WARMDOWN|COOLDOWN", "warmdown"),
    (r"INIT", "init"),
)
"""The kind of a constant's moves: the first pattern (re.search) that matches its name; else "hyperparameter"."""
NO_CHANGE = "no change"
"""An empty diff: a noise or confirmation repeat of a code, or a policy's answer that was not an edit."""
BASELINE = "baseline"
"""The first experiment: the human's train.py, whose diff from nothing is the whole file."""
CODE = "code"
_CONSTANT = re.compile(r"^[+-]([A-Z][A-Z0-9_]*)\s*(?::[^=]*)?=")


def constant_kind(name: str) -> str:
    return next((kind for pattern, kind in KIND_BY_NAME if re.search(pattern, name)), "hyperparameter")


def changed_lines(unified_diff: str) -> list[str]:
    """The + and − lines of a unified diff's hunks, signs kept (adding a line is not removing it). File
    headers, hunk headers (whose line numbers shift as c* changes), context and "\\ No newline" are dropped."""
    lines, in_hunk = [], False
    for line in unified_diff.split("\n"):
        if line.startswith("@@"):
            in_hunk = True
        elif in_hunk and line.startswith(("+", "-")):
            lines.append(line)
    return lines


def edit_kind(unified_diff: str, action_text: str | None = None) -> str:
    """The kind of an edit, from the catalogue action it was (when it was one) or else from its diff."""
    if action_text:
        return action_text.split(":", 1)[0].strip()
    changed = [line for line in changed_lines(unified_diff) if line[1:].strip()]
    if not changed:
        return NO_CHANGE
    names = [match[1] if (match := _CONSTANT.match(line)) else None for line in changed]
    if None in names:
        return CODE
    return constant_kind(names[0])
