"""Random search over the constants at the top of train.py: one constant moved one step of the grid.

The search space, GRID:

- a float is multiplied by one of 0.25, 0.5, 0.8, 1.25, 2, 4;
- an int is halved or doubled, and moved by ±1 when it is at most 8; a positive int (a count, a size)
  never drops below 1, a zero one never goes negative;
- a bool flips;
- a few floats known by name follow their own rule (RULES): probabilities and dropout stay in [0, 1)
  and may be switched off; betas and momenta move by multiplying 1 - x, so 0.95 becomes 0.9 or 0.975;
  fractions of the budget stay in [0, 1]; weight decay and gradient clipping may be switched off (0) or
  back on; seeds and hardware constants (PEAK_FLOPS) never move, since they cannot improve training.

A constant is an UPPER_CASE module-level `NAME = <literal>` (or `NAME: type = <literal>`) before the first
def or class, whose value is an int, float or bool, all on one line, maybe written as literal arithmetic
(`-3e-4`, `2**13`, `64 * 8`), and whose name the module binds nowhere else (a later assignment would
make the top one dead or conditional, and moving it a wasted run). They are found with `ast`, so
strings, tuples, calls and anything inside a function are never touched.
"""

from __future__ import annotations

import ast
import math
import operator
import random
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from shared.diffs import split_lines
from shared.events import EditOp

Number = int | float  # bool is an int subclass; a bool constant flips


class GridError(ValueError):
    """train.py cannot be mutated: it does not parse, or it has no constant with a move left."""


@dataclass(frozen=True)
class Constant:
    """A mutable constant; offsets are 0-based characters (not ast's UTF-8 bytes) within line `lineno`,
    spanning the value expression only, so the rest of the line (a comment) stays as it is."""

    name: str
    value: Number
    lineno: int
    col_offset: int
    end_col_offset: int


@dataclass(frozen=True)
class Mutation:
    ops: list[EditOp]
    description: str
    """e.g. "LEARNING_RATE 3e-3 -> 6e-3": the value as written before, and as written now."""


def _anything(_: float) -> bool:
    return True


@dataclass(frozen=True)
class Rule:
    """How a float whose name matches `pattern` (re.search) moves besides the factors; the first match wins.
    A frozen rule holds a constant of any type still."""

    pattern: str
    extra: tuple[float, ...] = ()
    """Values tried besides the factor moves (switching a term off or back on)."""
    one_minus: bool = False
    """Apply the factors to 1 - x: for values near 1, such as betas and momenta."""
    keep: Callable[[float], bool] = _anything
    """Candidates outside this range are dropped."""
    frozen: bool = False
    """Never moved."""


RULES = (
    Rule(r"(^|_)SEED$|PEAK_FLOPS", frozen=True),
    Rule(r"DROPOUT|PROB", extra=(0.0, 0.05, 0.1, 0.2), keep=lambda x: 0 <= x < 1),
    Rule(r"BETA|MOMENTUM$", one_minus=True, keep=lambda x: 0 <= x < 1),
    Rule(r"_FRAC$", extra=(0.0, 0.05, 0.1, 0.2), keep=lambda x: 0 <= x <= 1),
    Rule(r"WEIGHT_DECAY", extra=(0.0, 0.01, 0.1), keep=lambda x: x >= 0),
    Rule(r"GRAD_CLIP", extra=(0.0, 0.5, 1.0), keep=lambda x: x >= 0),
)


@dataclass(frozen=True)
class Grid:
    """The search space (the module docstring says it in words)."""

    float_factors: tuple[float, ...] = (0.25, 0.5, 0.8, 1.25, 2.0, 4.0)
    small_int: int = 8
    """Ints up to this size also move by ±1 (halving or doubling 4 heads is a big step)."""
    rules: tuple[Rule, ...] = RULES


GRID = Grid()

_NAME = re.compile(r"^[A-Z][A-Z0-9_]*$")
_ARITHMETIC: dict[type[ast.operator], Callable[[Number, Number], Number]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.Pow: operator.pow,
}


# --- finding the constants ---------------------------------------------------------------------------


def constants(code: str) -> list[Constant]:
    """The constants at the top of `code`, in source order; GridError if it does not parse."""
    try:
        tree = ast.parse(code)
    except SyntaxError as error:
        raise GridError(f"train.py does not parse: line {error.lineno}: {error.msg}") from None
    except (ValueError, RecursionError) as error:  # NUL bytes; nesting too deep for the parser
        raise GridError(f"train.py does not parse: {error}") from None
    if re.search("\r(?!\n)", code):
        # Python ends a line at a lone "\r" too, the ops only at "\n": line numbers would disagree.
        raise GridError("train.py has a lone carriage return (\\r) line ending; use \\n or \\r\\n")
    bound = _bindings(tree)
    lines = split_lines(code)
    found = []
    for statement in _preamble(tree):
        target, value = _simple_assignment(statement)
        if target is None or value is None or not _NAME.match(target) or bound[target] != 1:
            continue
        number = _value(value)
        if number is None or statement.lineno != statement.end_lineno:
            continue
        found.append(_locate(target, number, value, lines))
    return found


def _preamble(tree: ast.Module) -> list[ast.stmt]:
    """Module-level statements before the first function or class: the constants block."""
    definitions = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    for index, statement in enumerate(tree.body):
        if isinstance(statement, definitions):
            return tree.body[:index]
    return tree.body


def _bindings(tree: ast.Module) -> Counter[str]:
    """How many times each name is assigned anywhere (or declared global): conservative on purpose."""
    names: Counter[str] = Counter()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names[node.id] += 1
        elif isinstance(node, ast.Global):
            names.update(node.names)
    return names


def _simple_assignment(statement: ast.stmt) -> tuple[str | None, ast.expr | None]:
    if isinstance(statement, ast.Assign) and len(statement.targets) == 1:
        target = statement.targets[0]
        return (target.id, statement.value) if isinstance(target, ast.Name) else (None, None)
    if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
        return statement.target.id, statement.value
    return None, None


def _value(node: ast.expr) -> Number | None:
    try:
        return _literal(node)
    except RecursionError:  # `1 + 1 + ... + 1` thousands of terms deep is not a knob
        return None


def _literal(node: ast.expr) -> Number | None:
    """The value of a number/bool literal or of literal arithmetic, or None; never runs code."""
    if isinstance(node, ast.Constant):
        value = node.value
        return value if type(value) in (int, bool) or (type(value) is float and math.isfinite(value)) else None
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        operand = _literal(node.operand)
        if operand is None or isinstance(operand, bool):
            return None
        return -operand if isinstance(node.op, ast.USub) else operand
    if isinstance(node, ast.BinOp) and type(node.op) in _ARITHMETIC:
        return _arithmetic(node)
    return None


def _arithmetic(node: ast.BinOp) -> Number | None:
    left, right = _literal(node.left), _literal(node.right)
    if left is None or right is None or isinstance(left, bool) or isinstance(right, bool):
        return None
    if isinstance(node.op, ast.Pow) and not _small_power(left, right):
        return None
    try:
        result = _ARITHMETIC[type(node.op)](left, right)
    except (ZeroDivisionError, OverflowError):
        return None
    return result if isinstance(result, int) or math.isfinite(result) else None


def _small_power(base: Number, exponent: Number) -> bool:
    """Integer exponents only (no complex results), and small enough that 9**9**9 cannot hang us."""
    if not isinstance(exponent, int) or abs(exponent) > 64:
        return False
    return isinstance(base, float) or abs(base).bit_length() * abs(exponent) <= 1024


def _locate(name: str, value: Number, node: ast.expr, lines: list[str]) -> Constant:
    """ast gives UTF-8 byte columns; the edit works on characters."""
    assert node.end_col_offset is not None  # always set on a parsed expression
    raw = lines[node.lineno - 1].encode("utf-8")
    start = len(raw[:node.col_offset].decode("utf-8"))
    end = len(raw[:node.end_col_offset].decode("utf-8"))
    return Constant(name, value, node.lineno, start, end)


# --- the grid ----------------------------------------------------------------------------------------


def candidates(constant: Constant, grid: Grid = GRID) -> list[Number]:
    """The values a constant may move to, sorted, its current value excluded."""
    value = constant.value
    if any(rule.frozen and re.search(rule.pattern, constant.name) for rule in grid.rules):
        return []
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return _int_moves(value, grid)
    return _float_moves(constant.name, value, grid)


def _int_moves(value: int, grid: Grid) -> list[Number]:
    halved = value // 2 if value >= 0 else -(-value // 2)
    moves = {halved, value * 2}
    if abs(value) <= grid.small_int:
        moves |= {value - 1, value + 1}
    floor = 1 if value >= 1 else 0 if value == 0 else None
    return sorted(m for m in moves if m != value and (floor is None or m >= floor))


def _float_moves(name: str, value: float, grid: Grid) -> list[Number]:
    rule = next((r for r in grid.rules if re.search(r.pattern, name)), Rule(".*"))
    if rule.one_minus:
        moves = [1 - (1 - value) * factor for factor in grid.float_factors]
    else:
        moves = [value * factor for factor in grid.float_factors]
    tidy = {_tidy(m) for m in [*moves, *rule.extra]}
    return sorted(m for m in tidy if m != value and math.isfinite(m) and rule.keep(m))


def _tidy(value: float) -> float:
    """0.0006 rather than 0.0006000000000000001: twelve significant digits are plenty for a knob."""
    return float(f"{value:.12g}")


def render(value: Number, like: str) -> str:
    """Python source for `value`; a float keeps the style of the literal it replaces (`like`)."""
    if isinstance(value, bool | int):
        return repr(value)
    if value == 0:
        return "0.0"
    if "e" in like.lower() or "e" in repr(value):
        return _scientific(value)
    return repr(value)


def _scientific(value: float) -> str:
    """The shortest exact mantissa, without the "+" and padding of Python's exponent: 1.5e-3, 9.89e14."""
    digits = next(p for p in range(17) if float(f"{value:.{p}e}") == value)
    mantissa, exponent = f"{value:.{digits}e}".split("e")
    return f"{mantissa}e{int(exponent)}"


# --- one mutation ------------------------------------------------------------------------------------


def mutate(code: str, rng: random.Random, grid: Grid = GRID) -> Mutation:
    """Move one constant, chosen uniformly among those with a move, to a uniformly chosen grid value.

    The op replaces that one line, with only the value's characters changed. Deterministic for a given
    rng state, since constants come in source order and candidates sorted."""
    movable = [(c, moves) for c in constants(code) if (moves := candidates(c, grid))]
    if not movable:
        raise GridError("train.py has no constant at its top that the grid can move")
    constant, moves = rng.choice(movable)
    return move(split_lines(code), constant, rng.choice(moves))


def move(lines: list[str], constant: Constant, value: Number) -> Mutation:
    """The op that replaces the constant's line, with only its value's characters changed."""
    line = lines[constant.lineno - 1]
    before = line[constant.col_offset:constant.end_col_offset]
    after = render(value, before)
    new_line = line[:constant.col_offset] + after + line[constant.end_col_offset:]
    op = EditOp("replace", constant.lineno, constant.lineno, new_line)
    return Mutation([op], f"{constant.name} {before} -> {after}")
