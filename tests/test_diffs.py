"""shared.diffs: every way an edit is refused and why, and ops_between as the inverse of apply_ops."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import pytest

from shared.diffs import (
    EMPTY_SHA256,
    MAX_CODE_BYTES,
    InvalidDiff,
    apply_ops,
    code_sha256,
    ops_between,
    split_lines,
    unified_diff,
)
from shared.events import EditOp

TARGETS = Path(__file__).resolve().parent.parent / "targets"
CODE = "a\nb\nc\nd\n"


def test_hashes() -> None:
    assert EMPTY_SHA256 == code_sha256("") == hashlib.sha256(b"").hexdigest()
    assert code_sha256("é\n") == hashlib.sha256("é\n".encode()).hexdigest()


def test_baseline_inserts_the_whole_file_into_the_empty_one() -> None:
    code = (TARGETS / "cpu_gpt" / "train.py").read_text(encoding="utf-8")
    assert apply_ops("", [EditOp("insert", 1, 0, code)]) == code


def test_ops_refer_to_original_line_numbers_in_any_order() -> None:
    ops = [EditOp("delete", 1, 1), EditOp("replace", 3, 3, "C\n"), EditOp("insert", 5, 4, "e\n"),
           EditOp("insert", 2, 1, "a2\n")]
    expected = "a2\nb\nC\nd\ne\n"
    assert apply_ops(CODE, ops) == expected
    for seed in range(5):
        shuffled = ops[:]
        random.Random(seed).shuffle(shuffled)
        assert apply_ops(CODE, shuffled) == expected


def test_inserts_at_the_edges_of_a_replaced_range_land_outside_it() -> None:
    ops = [EditOp("replace", 2, 3, "X\n"), EditOp("insert", 2, 1, "before\n"), EditOp("insert", 4, 3, "after\n")]
    assert apply_ops(CODE, ops) == "a\nbefore\nX\nafter\nd\n"


def test_replace_with_empty_text_deletes_and_no_ops_change_nothing() -> None:
    assert apply_ops(CODE, [EditOp("replace", 2, 3, "")]) == "a\nd\n"
    assert apply_ops(CODE, []) == CODE


def test_a_file_without_a_trailing_newline_survives() -> None:
    code = "a\nb\nc"
    assert split_lines(code) == ["a\n", "b\n", "c"]
    assert apply_ops(code, [EditOp("replace", 2, 2, "B\n")]) == "a\nB\nc"
    assert apply_ops(code, [EditOp("replace", 3, 3, "C")]) == "a\nb\nC"
    assert apply_ops(code, [EditOp("delete", 3, 3)]) == "a\nb\n"
    assert apply_ops(code, [EditOp("insert", 1, 0, "z\n")]) == "z\na\nb\nc"
    assert apply_ops(CODE, [EditOp("insert", 5, 4, "tail")]) == CODE + "tail"


def test_lines_split_on_newline_only() -> None:
    """Form feeds and U+2028 are inside a line for Python and editors, so they are for the ops too."""
    code = "x = 1  # \x0c page\ns = 'a\u2028b'\r\ny = 2\n"
    assert split_lines(code) == ["x = 1  # \x0c page\n", "s = 'a\u2028b'\r\n", "y = 2\n"]
    assert apply_ops(code, [EditOp("replace", 3, 3, "y = 3\n")]) == code.replace("y = 2", "y = 3")


@pytest.mark.parametrize(
    ("op", "reason"),
    [
        (EditOp("move", 1, 1, "x\n"), r"op 0: unknown op 'move'"),  # type: ignore[arg-type]
        (EditOp("replace", 1.0, 1, "x\n"), r"start and end must be integers"),  # type: ignore[arg-type]
        (EditOp("delete", True, 1), r"start and end must be integers"),
        (EditOp("replace", 1, 1, None), r"text must be a string"),  # type: ignore[arg-type]
        (EditOp("replace", 0, 1, "x\n"), r"1 <= start <= end <= 4"),
        (EditOp("replace", 3, 2, "x\n"), r"1 <= start <= end <= 4"),
        (EditOp("delete", 4, 5), r"1 <= start <= end <= 4"),
        (EditOp("replace", 9999, 9999, "x\n"), r"1 <= start <= end <= 4"),
        (EditOp("insert", 0, -1, "x\n"), r"before lines 1\.\.5 of this 4-line file"),
        (EditOp("insert", 6, 5, "x\n"), r"before lines 1\.\.5"),
        (EditOp("insert", 2, 2, "x\n"), r"end must be start - 1 = 1"),
        (EditOp("insert", 2, 1, ""), r"empty text does nothing"),
        (EditOp("delete", 2, 2, "x\n"), r"a delete carries no text"),
        (EditOp("replace", 2, 2, "x"), r"op 0: text must end with a newline unless it ends the file"),
        (EditOp("insert", 1, 0, "x"), r"must end with a newline"),
        (EditOp("replace", 2, 2, "x\0y\n"), r"NUL byte at character 1"),
        (EditOp("replace", 2, 2, "x\udc80\n"), r"lone surrogate at character 1"),
    ],
)
def test_a_bad_op_is_refused_with_its_reason(op: EditOp, reason: str) -> None:
    with pytest.raises(InvalidDiff, match=reason):
        apply_ops(CODE, [op])


@pytest.mark.parametrize(
    ("ops", "reason"),
    [
        ([EditOp("replace", 1, 2, "x\n"), EditOp("delete", 2, 3)],
         r"op 1 \(delete 2\.\.3\): overlaps lines 1\.\.2 of op 0"),
        ([EditOp("delete", 2, 4), EditOp("replace", 1, 2, "x\n")],
         r"op 0 \(delete 2\.\.4\): overlaps lines 1\.\.2 of op 1"),
        ([EditOp("replace", 2, 2, "x\n"), EditOp("replace", 2, 2, "y\n")], r"overlaps lines 2\.\.2"),
        ([EditOp("delete", 1, 3), EditOp("insert", 3, 2, "x\n")],
         r"op 1 \(insert 3\.\.2\): inserts inside lines 1\.\.3"),
        ([EditOp("insert", 2, 1, "x\n"), EditOp("insert", 2, 1, "y\n")], r"op 1 .*op 0 also inserts before line 2"),
    ],
)
def test_overlapping_ops_are_refused(ops: list[EditOp], reason: str) -> None:
    with pytest.raises(InvalidDiff, match=reason):
        apply_ops(CODE, ops)


def test_text_inserted_after_a_last_line_without_newline_is_refused() -> None:
    with pytest.raises(InvalidDiff, match=r"op 0: line 3 has no newline.*replace line 3 instead"):
        apply_ops("a\nb\nc", [EditOp("insert", 4, 3, "d\n")])


def test_text_without_newline_followed_by_another_op_is_refused() -> None:
    with pytest.raises(InvalidDiff, match=r"op 0: text must end with a newline"):
        apply_ops(CODE, [EditOp("replace", 4, 4, "D"), EditOp("insert", 5, 4, "e\n")])


def test_the_result_size_is_capped() -> None:
    big = "x" * (MAX_CODE_BYTES // 2) + "\n"
    with pytest.raises(InvalidDiff, match=r"over the 1048576-byte limit"):
        apply_ops(CODE, [EditOp("insert", 1, 0, big), EditOp("insert", 5, 4, big)])


def test_nothing_is_applied_when_one_op_is_bad() -> None:
    """Valid ops before and after the bad one: the whole list is refused, naming the bad op."""
    ops = [EditOp("replace", 1, 1, "A\n"), EditOp("delete", 9, 9), EditOp("insert", 5, 4, "e\n")]
    with pytest.raises(InvalidDiff, match=r"^op 1 \(delete 9\.\.9\)"):
        apply_ops(CODE, ops)
    # Found only once the result is laid out: still nothing comes back.
    with pytest.raises(InvalidDiff, match=r"^op 1:"):
        apply_ops(CODE, [EditOp("replace", 1, 1, "A\n"), EditOp("replace", 2, 2, "B")])


def test_unified_diff() -> None:
    diff = unified_diff(CODE, "a\nB\nc\nd\n")
    assert diff.startswith("--- a/train.py\n+++ b/train.py\n@@ -1,4 +1,4 @@\n")
    assert "-b\n+B\n" in diff
    assert unified_diff(CODE, CODE) == ""
    assert unified_diff("a\nb", "a\nc").endswith("-b\n\\ No newline at end of file\n+c\n\\ No newline at end of file\n")


@pytest.mark.parametrize(("old", "new"), [("", ""), ("", CODE), (CODE, ""), (CODE, CODE), ("a", "a\n"),
                                          ("a\n", "a"), ("a\nb", "a\nb\nc"), ("\n\n\n", "\n")])
def test_ops_between_edge_cases(old: str, new: str) -> None:
    assert apply_ops(old, ops_between(old, new)) == new
    assert (ops_between(old, new) == []) == (old == new)


def _random_edit(lines: list[str], rng: random.Random) -> list[str]:
    """One edit an agent might make: delete, insert, replace, duplicate or move a run of lines."""
    lines = lines[:]
    i = rng.randrange(len(lines) + 1)
    j = min(len(lines), i + rng.randrange(1, 6))
    kind = rng.choice(["delete", "insert", "replace", "duplicate", "move", "blank"])
    if kind == "delete":
        del lines[i:j]
    elif kind == "insert":
        lines[i:i] = [f"x_{rng.randrange(1000)} = {rng.random()!r}\n" for _ in range(rng.randrange(1, 4))]
    elif kind == "replace":
        lines[i:j] = [line.replace("e", "E", 1) for line in lines[i:j]]
    elif kind == "duplicate":
        lines[i:i] = lines[i:j]
    elif kind == "move":
        chunk = lines[i:j]
        del lines[i:j]
        at = rng.randrange(len(lines) + 1)
        lines[at:at] = chunk
    else:
        lines[i:i] = ["\n"] * rng.randrange(1, 3)
    return lines


@pytest.mark.parametrize("target", ["cpu_gpt", "gpu_nanochat"])
def test_ops_between_inverts_random_edits_of_a_real_train_py(target: str) -> None:
    code = (TARGETS / target / "train.py").read_text(encoding="utf-8")
    for seed in range(150):
        rng = random.Random(seed)
        lines = split_lines(code)
        for _ in range(rng.randrange(1, 6)):
            lines = _random_edit(lines, rng)
        new = "".join(lines)
        if rng.random() < 0.2:  # sometimes the edit also drops the trailing newline
            new = new.rstrip("\n")
        ops = ops_between(code, new)
        assert apply_ops(code, ops) == new, f"seed {seed}"
        assert apply_ops(new, ops_between(new, code)) == code, f"seed {seed}"
        rng.shuffle(ops)
        assert apply_ops(code, ops) == new, f"seed {seed} (ops shuffled)"
