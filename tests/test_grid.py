"""services.proposer.grid: which constants random search sees, where they may move, and the edit it makes."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from services.proposer.grid import GRID, Constant, GridError, candidates, constants, mutate, render
from shared.diffs import apply_ops, split_lines

TARGETS = Path(__file__).resolve().parent.parent / "targets"
CPU = (TARGETS / "cpu_gpt" / "train.py").read_text(encoding="utf-8")
GPU = (TARGETS / "gpu_nanochat" / "train.py").read_text(encoding="utf-8")


def _values(code: str) -> dict[str, object]:
    return {c.name: c.value for c in constants(code)}


def test_constants_of_the_cpu_target() -> None:
    assert _values(CPU) == {
        "N_LAYER": 4, "N_HEAD": 4, "N_EMBD": 128, "MLP_RATIO": 4, "DROPOUT": 0.0, "BATCH_SIZE": 32,
        "LEARNING_RATE": 3e-3, "WEIGHT_DECAY": 0.1, "WARMUP_FRAC": 0.05, "WARMDOWN_FRAC": 0.4, "GRAD_CLIP": 1.0,
        "INIT_STD": 0.02,
    }  # BETAS is a tuple: not a constant of the grid


def test_constants_of_the_gpu_target() -> None:
    names = list(_values(GPU))
    assert names[:3] == ["DEPTH", "ASPECT_RATIO", "HEAD_DIM"]
    assert {"MATRIX_LR", "MUON_MOMENTUM", "NS_STEPS", "LOGIT_SOFTCAP", "COMPILE", "PEAK_FLOPS"} <= set(names)
    assert "ADAM_BETAS" not in names
    assert _values(GPU)["COMPILE"] is True


def test_constant_offsets_span_the_value_only() -> None:
    lines = split_lines(CPU)
    for c in constants(CPU):
        line = lines[c.lineno - 1]
        assert line.startswith(f"{c.name} = ")
        assert eval(line[c.col_offset:c.end_col_offset]) == c.value  # noqa: S307 - our own target file


SAMPLE = '''"""doc"""
import os
A = 1  # a comment
B: float = -3e-4
C = 2**13
D = "text"
E = (1, 2)
F = os.cpu_count()
lower = 3
G = (
    4
)
H = 1 if os else 2
I = 9**9**9
J = 1.0
J = 2.0
K = True
S = "é"; L = 5
M = 1e999
N = 1 / 0
O = 4
P = 7
if os:
    Q = 1
for O in range(3):
    pass


def f():
    global P
    P = 3
    R = 1
    return R


T = 8
'''


def test_only_simple_literals_of_the_preamble_are_constants() -> None:
    started = time.perf_counter()
    found = constants(SAMPLE)
    assert time.perf_counter() - started < 1, "9**9**9 must be refused, not computed"
    assert {c.name: c.value for c in found} == {"A": 1, "B": -3e-4, "C": 8192, "K": True, "L": 5}
    # Strings, tuples, calls, lowercase, multi-line, conditional, rebound (J twice, O by a loop, P by a
    # global) and non-finite values are skipped; so is everything inside or after the first def.


def test_columns_are_characters_not_utf8_bytes() -> None:
    (c,) = [c for c in constants(SAMPLE) if c.name == "L"]
    line = split_lines(SAMPLE)[c.lineno - 1]
    assert line[c.col_offset:c.end_col_offset] == "5"


def test_code_that_does_not_parse_is_an_error() -> None:
    with pytest.raises(GridError, match=r"does not parse: line 2"):
        constants("A = 1\ndef (:\n")
    with pytest.raises(GridError, match=r"does not parse"):
        constants("A = 1\0\n")
    with pytest.raises(GridError, match=r"lone carriage return"):
        constants("A = 1\rB = 2\n")


def test_nothing_to_move_is_an_error() -> None:
    with pytest.raises(GridError, match="no constant"):
        mutate("PEAK_FLOPS = 1e15\nname = 'x'\n", random.Random(0))


def _candidates(name: str, value: object) -> list[object]:
    return candidates(Constant(name, value, 1, 0, 1))  # type: ignore[arg-type]


def test_int_moves() -> None:
    assert _candidates("N_HEAD", 4) == [2, 3, 5, 8]
    assert _candidates("N_EMBD", 128) == [64, 256]
    assert _candidates("N_LAYER", 1) == [2]  # a count never drops below 1
    assert _candidates("OFFSET", 0) == [1]
    assert _candidates("OFFSET", -3) == [-6, -4, -2, -1]  # halved toward zero


def test_bool_flips() -> None:
    assert _candidates("COMPILE", True) == [False]


def test_float_moves_are_factors_rendered_tidily() -> None:
    moves = _candidates("LEARNING_RATE", 3e-4)
    assert moves == [7.5e-5, 1.5e-4, 2.4e-4, 3.75e-4, 6e-4, 1.2e-3]
    assert render(6e-4, "0.0003") == "0.0006"
    assert render(6e-4, "3e-4") == "6e-4"
    assert render(3e-3 * 1.25, "3e-3") == "3.75e-3"
    assert render(1.978e15, "989e12") == "1.978e15"
    assert render(0.0, "3e-4") == "0.0"
    assert render(8192, "2**13") == "8192"


def test_named_rules() -> None:
    assert all(0 <= m < 1 for m in _candidates("MUON_MOMENTUM", 0.95))
    assert {0.9, 0.975} <= set(_candidates("MUON_MOMENTUM", 0.95))
    assert _candidates("DROPOUT", 0.0) == [0.05, 0.1, 0.2]
    assert all(0 <= m <= 1 for m in _candidates("WARMDOWN_FRAC", 0.4))
    assert 0.0 in _candidates("WARMUP_FRAC", 0.05)
    assert _candidates("WEIGHT_DECAY", 0.0) == [0.01, 0.1]
    assert _candidates("GRAD_CLIP", 0.0) == [0.5, 1.0]
    assert _candidates("PEAK_FLOPS", 989e12) == [] and _candidates("SEED", 42) == []
    assert _candidates("SOMETHING", 0.0) == []  # a zero float without a rule has no factor move


@pytest.mark.parametrize("code", [CPU, GPU], ids=["cpu_gpt", "gpu_nanochat"])
def test_mutations_change_exactly_one_constant_and_nothing_else(code: str) -> None:
    before = _values(code)
    for seed in range(60):
        mutation = mutate(code, random.Random(seed))
        (op,) = mutation.ops
        assert (op.op, op.start) == ("replace", op.end)
        new = apply_ops(code, mutation.ops)
        compile(new, "train.py", "exec")
        after = _values(new)
        changed = [name for name in before if (before[name], type(before[name])) != (after[name], type(after[name]))]
        assert len(changed) == 1 and after.keys() == before.keys(), mutation.description
        name = changed[0]
        assert mutation.description.startswith(f"{name} ") and " -> " in mutation.description
        assert after[name] in candidates(next(c for c in constants(code) if c.name == name), GRID)
        # Byte for byte outside the value: the comment survives.
        old_lines, new_lines = split_lines(code), split_lines(new)
        assert [i for i, (a, b) in enumerate(zip(old_lines, new_lines, strict=True)) if a != b] == [op.start - 1]
        old_line, new_line = old_lines[op.start - 1], new_lines[op.start - 1]
        assert old_line.partition("  #")[2] == new_line.partition("  #")[2] != ""


def test_mutation_is_deterministic_for_a_seed() -> None:
    assert mutate(GPU, random.Random(7)) == mutate(GPU, random.Random(7))
    assert len({mutate(GPU, random.Random(seed)).description for seed in range(40)}) > 20


def test_mutation_keeps_an_odd_line() -> None:
    """Non-ASCII before the value (ast counts UTF-8 bytes), a comment after it, no newline at the end."""
    first, last = 'S = "é"; LR = 3e-3  # ≈ peak\n', "X = 1"
    seen = set()
    for seed in range(20):
        mutation = mutate(first + last, random.Random(seed))
        new = apply_ops(first + last, mutation.ops)
        compile(new, "train.py", "exec")
        new_first, new_last = split_lines(new)
        if new_last != last:
            assert (new_first, new_last) == (first, "X = 2"), mutation.description
        else:
            assert new_first.startswith('S = "é"; LR = ') and new_first.endswith("  # ≈ peak\n")
        seen.add(mutation.description.split()[0])
    assert seen == {"LR", "X"}
