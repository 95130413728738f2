"""Edits of train.py as data: apply a proposal's ops to its parent, and find the ops between two files.

The rules `apply_ops` enforces, in the terms of `EditOp`:

- Every op refers to line numbers of the ORIGINAL code, never to the code as earlier ops left it, so
  the order of `ops` does not matter. Lines are split on "\\n" only (a "\\r\\n" ending stays part of its
  line), the way editors and `ast` number them; a last line without a newline is still a line.
- `replace` and `delete` cover [start, end] inclusive with 1 <= start <= end <= n. A `delete` carries no
  text; a `replace` with empty text deletes too.
- `insert` puts non-empty text before line `start`, 1 <= start <= n + 1, and its `end` must be
  `start - 1`: the empty range just before `start` (so the baseline is `insert 1..0` into "").
- Ranges may touch but not overlap. An insert strictly inside a replaced or deleted range (start < p <= end)
  is refused because it has no place left to go; at the range's first line it lands before the new text,
  just after its last line it lands after it. Two inserts at one position are refused: their order
  would depend on the list order, which the rule above says does not matter; send them as one insert.
- New text ends with "\\n", except text that ends up last in the file (that is how a file without a
  trailing newline is written); text is never normalised, so the result is exactly what was sent.
- No NUL bytes and no lone surrogates (the code must encode to UTF-8 to be hashed), and the result is
  at most MAX_CODE_BYTES.

Everything is checked before the result is built, and a bad op raises InvalidDiff naming the op.
"""

from __future__ import annotations

import difflib
import hashlib
from collections.abc import Sequence

from shared.events import EditOp

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
"""The parent of the baseline experiment, whose single op inserts the whole train.py into the empty file."""

MAX_CODE_BYTES = 1 << 20
"""A train.py larger than this is refused: it would not fit in an event, and no real edit needs it."""

_KINDS = ("insert", "replace", "delete")


class InvalidDiff(ValueError):
    """Ops that do not apply to their parent; the message names the op (0-based index) and the problem."""


def code_sha256(code: str) -> str:
    return hashlib.sha256(code.encode("utf-8")).hexdigest()


def split_lines(code: str) -> list[str]:
    """Lines with their endings, split on "\\n" only (str.splitlines would also split on form feeds and
    U+2028, which Python source may contain inside a line)."""
    parts = code.split("\n")
    lines = [part + "\n" for part in parts[:-1]]
    return lines + [parts[-1]] if parts[-1] else lines


def apply_ops(code: str, ops: Sequence[EditOp]) -> str:
    """`code` with every op applied, or InvalidDiff if any op is bad (then nothing is applied)."""
    lines = split_lines(code)
    for index, op in enumerate(ops):
        _check_op(index, op, len(lines))
    ordered = sorted(range(len(ops)), key=lambda i: _position(ops[i]))
    _check_overlaps(ops, ordered)
    pieces = _pieces(lines, ops, ordered)
    _check_line_endings(pieces, len(lines))
    result = "".join(text for text, _ in pieces)
    size = len(result.encode("utf-8"))
    if size > MAX_CODE_BYTES:
        raise InvalidDiff(f"the edited file would be {size} bytes, over the {MAX_CODE_BYTES}-byte limit")
    return result


def _check_op(index: int, op: EditOp, n: int) -> None:
    """The checks one op needs on its own: kind, types, range, text."""

    def bad(problem: str) -> InvalidDiff:
        return InvalidDiff(f"op {index} ({op.op} {op.start}..{op.end}): {problem}")

    if op.op not in _KINDS:
        raise InvalidDiff(f"op {index}: unknown op {op.op!r}, expected one of {', '.join(_KINDS)}")
    # bool is an int subclass, and msgspec does not check types when a Struct is built in Python.
    if not all(type(value) is int for value in (op.start, op.end)):
        raise bad("start and end must be integers")
    if not isinstance(op.text, str):
        raise bad("text must be a string")
    if op.op == "insert":
        if not 1 <= op.start <= n + 1:
            raise bad(f"an insert goes before lines 1..{n + 1} of this {n}-line file")
        if op.end != op.start - 1:
            raise bad(f"an insert's end must be start - 1 = {op.start - 1} (the empty range before start)")
        if not op.text:
            raise bad("an insert with empty text does nothing")
    elif not 1 <= op.start <= op.end <= n:
        raise bad(f"the range must satisfy 1 <= start <= end <= {n} (lines in this file)")
    if op.op == "delete" and op.text:
        raise bad("a delete carries no text (use replace)")
    problem = _text_problem(op.text)
    if problem:
        raise bad(problem)


def _text_problem(text: str) -> str | None:
    nul = text.find("\0")
    if nul >= 0:
        return f"text contains a NUL byte at character {nul}"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        return f"text is not valid Unicode (lone surrogate at character {error.start})"
    return None


def _position(op: EditOp) -> tuple[int, int]:
    """Sort key: by start line, an insert before a range starting on the same line (it lands before it)."""
    return (op.start, 0 if op.op == "insert" else 1)


def _check_overlaps(ops: Sequence[EditOp], ordered: list[int]) -> None:
    """In start order each op needs checking only against the last range before it: the ranges that
    passed are disjoint and increasing, so that range ends furthest."""
    covered_to, owner = 0, -1  # last original line consumed so far, and the op that consumed it
    inserts_at: dict[int, int] = {}
    for index in ordered:
        op = ops[index]
        if op.op == "insert":
            if op.start in inserts_at:
                raise InvalidDiff(f"op {index} (insert {op.start}..{op.end}): op {inserts_at[op.start]} also inserts "
                                  f"before line {op.start} and their order would be ambiguous; merge them into one")
            if op.start <= covered_to:
                raise InvalidDiff(f"op {index} (insert {op.start}..{op.end}): inserts inside lines "
                                  f"{ops[owner].start}..{ops[owner].end} that op {owner} {ops[owner].op}s")
            inserts_at[op.start] = index
        else:
            if op.start <= covered_to:
                raise InvalidDiff(f"op {index} ({op.op} {op.start}..{op.end}): overlaps lines "
                                  f"{ops[owner].start}..{ops[owner].end} of op {owner} ({ops[owner].op})")
            covered_to, owner = op.end, index


def _pieces(lines: list[str], ops: Sequence[EditOp], ordered: list[int]) -> list[tuple[str, int | None]]:
    """The result as consecutive pieces, each tagged with the op that wrote it (None: original line).

    One forward pass over non-overlapping ops in start order: nothing shifts, so original line numbers
    hold throughout (the same result as applying the ops bottom-up)."""
    pieces: list[tuple[str, int | None]] = []
    cursor = 1  # the next original line not yet copied or consumed
    for index in ordered:
        op = ops[index]
        pieces += [(line, None) for line in lines[cursor - 1:op.start - 1]]
        if op.text:
            pieces.append((op.text, index))
        cursor = op.start if op.op == "insert" else op.end + 1
    return pieces + [(line, None) for line in lines[cursor - 1:]]


def _check_line_endings(pieces: list[tuple[str, int | None]], n: int) -> None:
    """Only the last piece may lack a newline; otherwise two lines would silently fuse into one."""
    for (text, source), (_, next_source) in zip(pieces, pieces[1:], strict=False):
        if text.endswith("\n"):
            continue
        if source is not None:
            raise InvalidDiff(f"op {source}: text must end with a newline unless it ends the file")
        raise InvalidDiff(f"op {next_source}: line {n} has no newline, so text inserted after it would join it; "
                          f"replace line {n} instead")


def unified_diff(old: str, new: str, context: int = 3) -> str:
    """A git-style diff of train.py for people (`a/train.py`, `b/train.py`); the ops stay the truth."""
    out = []
    for line in difflib.unified_diff(split_lines(old), split_lines(new), "a/train.py", "b/train.py", n=context):
        # A last line without a newline would glue the next diff line onto it; git marks it instead.
        out.append(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n")
    return "".join(out)


def ops_between(old: str, new: str) -> list[EditOp]:
    """Ops that turn `old` into `new`: apply_ops(old, ops_between(old, new)) == new."""
    a, b = split_lines(old), split_lines(new)
    ops = []
    # autojunk would treat frequent lines (blank ones) as junk and give worse, though still valid, ops.
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        text = "".join(b[j1:j2])
        if tag == "replace":
            ops.append(EditOp("replace", i1 + 1, i2, text))
        elif tag == "delete":
            ops.append(EditOp("delete", i1 + 1, i2))
        elif tag == "insert":
            ops.append(EditOp("insert", i1 + 1, i1, text))
    return ops
