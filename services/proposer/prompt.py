"""The policy's state s_t as one prompt (§4.1), and the answer it must give in generate mode.

The sections, in order: the research agenda (program.md), c* with line numbers (edits refer to lines),
the diagnostics d_t (§3.1), the history h_t of eq. (5) (the last K = 32 experiments and the 5 best ever,
§4.3 and §7.3, as the ledger's history view gives them, oldest first), and the answer instructions with
ANSWER_SCHEMA. The prompt must fit `token_limit` tokens of the policy's own tokenizer (`count_tokens`):
history entries are left out, the oldest recent ones first, then the best-ever ones from the worst;
program.md, the code, the diagnostics and the instructions never are, and PromptTooLong says by how much
they alone are over.
"""

from __future__ import annotations

import bisect
import functools
import json
import math
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Annotated

import msgspec

from shared.diffs import split_lines
from shared.events import EditOp
from shared.queries import HistoryEntry, LedgerState

Diagnostics = Mapping[str, float | int | str | None]
"""d_t: a few named numbers, rendered one per line ("best val-bpb so far (bpb*)": 2.31)."""


class Answer(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The policy's answer in generate mode: one edit of c*, as the ops of a ProposalCreated."""

    rationale: Annotated[str, msgspec.Meta(description="what the edit changes and why it should lower val-bpb")]
    ops: list[EditOp]


ANSWER_SCHEMA = json.dumps(msgspec.json.schema(Answer), indent=1, ensure_ascii=False)
"""The JSON schema of Answer, derived from it so that it names EditOp's fields exactly: shown to the policy
here, and for the parser and for constrained decoding (msgspec.json.decode(text, type=Answer) checks it)."""

INSTRUCTIONS = """# Your answer

Propose one edit of train.py (the listing above) that you expect to lower val-bpb. Answer with one JSON
object and nothing else, valid under this JSON schema:

{schema}

- Line numbers are those of the listing. Every op refers to them, not to the code as other ops leave it,
  so the order of the ops does not matter; their ranges must not overlap.
- "replace" and "delete" cover lines start..end inclusive; a "delete" has no text.
- "insert" puts its text before line start, with end = start - 1; start = {append} appends.
- text is whole lines of Python, each ending with a newline, without the listing's line numbers.
"""


class PromptTooLong(ValueError):
    """program.md, the code, the diagnostics and the instructions alone exceed the token limit."""


def build_prompt(program_md: str, code: str, history: Sequence[HistoryEntry], diagnostics: Diagnostics,
                 count_tokens: Callable[[str], int], token_limit: int) -> str:
    """s_t as text of at most `token_limit` tokens (as `count_tokens` counts them), keeping as much of
    `history` (oldest first) as fits; PromptTooLong when even none of it does.

    How many entries to leave out is a binary search (the prompt grows as entries come back), so a long
    prompt is tokenized about log2(len(history)) times rather than once per entry."""
    order = _drop_order(history)

    @functools.cache
    def prompt(dropped: int) -> str:
        gone = {id(entry) for entry in order[:dropped]}
        kept = [entry for entry in history if id(entry) not in gone]
        return _render(program_md, code, kept, dropped, diagnostics)

    @functools.cache
    def tokens(dropped: int) -> int:
        return count_tokens(prompt(dropped))

    fewest = bisect.bisect_left(range(len(order) + 1), True, key=lambda dropped: tokens(dropped) <= token_limit)
    if fewest > len(order):
        bare = tokens(len(order))
        raise PromptTooLong(f"without any experiment the prompt (program.md, train.py, the diagnostics, the "
                            f"instructions) takes {bare} tokens, {bare - token_limit} over the limit of {token_limit}")
    return prompt(fewest)


def _drop_order(history: Sequence[HistoryEntry]) -> list[HistoryEntry]:
    """Which entries go first when the prompt is too long: recent-only ones oldest first, then the best-ever
    ones (top or both) from the worst val-bpb, so the last to go is the best."""
    recent = [entry for entry in history if entry.why == "recent"]
    top = [entry for entry in history if entry.why != "recent"]
    return recent + sorted(top, key=lambda e: -e.val_bpb if e.val_bpb is not None else -math.inf)


def state_diagnostics(state: LedgerState, at: datetime) -> dict[str, float | int | None]:
    """d_t from the ledger's state (None: not known yet)."""
    started = state.first_proposed_at
    return {
        "hours since the first experiment": round((at - started).total_seconds() / 3600, 2) if started else None,
        "experiments proposed": state.experiments,
        "experiments finished": state.finished,
        "best val-bpb so far (bpb*, the score of c*)": state.bpb_star,
        "noise floor (σ_noise: std of val-bpb between seeds of one code)": state.sigma_noise,
        "spread of recent val-bpb (σ_h)": state.sigma_h,
        "finished experiments since the last new best": state.since_best,
    }


# --- rendering ---------------------------------------------------------------------------------------


def _render(program_md: str, code: str, history: Sequence[HistoryEntry], dropped: int,
            diagnostics: Diagnostics) -> str:
    append = len(split_lines(code)) + 1
    sections = [
        f"# Research agenda (program.md)\n\n{program_md.strip()}\n",
        f"# The best train.py so far (c*), with line numbers\n\n{_numbered(code)}",
        "# Diagnostics\n\n" + "".join(f"- {name}: {_value(value)}\n" for name, value in diagnostics.items()),
        _history(history, dropped),
        INSTRUCTIONS.format(schema=ANSWER_SCHEMA, append=append),
    ]
    return "\n".join(sections)


def _numbered(code: str) -> str:
    lines = split_lines(code)
    width = len(str(len(lines)))
    return "".join(f"{number:>{width}}| {line.rstrip(chr(10))}\n" for number, line in enumerate(lines, 1))


def _value(value: float | int | str | None) -> str:
    if value is None:
        return "unknown"
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _history(history: Sequence[HistoryEntry], dropped: int) -> str:
    header = "# Experiments, oldest first (★: one of the 5 best ever)\n\n"
    if dropped:
        header += f"({dropped} left out to fit the context: the oldest first, then the worst of the best.)\n\n"
    elif not history:
        header += "No experiment has finished yet.\n"
    return header + "\n".join(_entry(entry) for entry in history)


def _entry(entry: HistoryEntry) -> str:
    star = "★ " if entry.why != "recent" else ""
    outcome = entry.status if entry.val_bpb is None else f"{entry.status}, val-bpb {entry.val_bpb:.4f}"
    diff = entry.unified_diff.removeprefix("--- a/train.py\n+++ b/train.py\n")
    change = f"```diff\n{diff}```\n" if diff else "(no edit: a repeat of its parent's code with another seed)\n"
    commentary = f"self-evaluator: {entry.abort_commentary}\n" if entry.abort_commentary else ""
    return f"## {star}{entry.proposal_id[:8]}: {outcome}\n{change}{commentary}"
