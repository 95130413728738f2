"""services.proposer.catalog: every action applies to the code it was catalogued from, compiles and is new;
structural edits are offered only where their anchors are; structurally edited scripts still train."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from conftest import CPU_TARGET, TINY_MODEL, make_target, shrink

from services.proposer.catalog import Action, catalog
from services.proposer.grid import GridError, candidates, constants
from shared.diffs import apply_ops
from shared.events import EditOp
from shared.target.config import load_target
from shared.target.records import Budget
from shared.target.runner import run_target

CPU = (CPU_TARGET / "train.py").read_text(encoding="utf-8")
GPU = (CPU_TARGET.parent / "gpu_nanochat" / "train.py").read_text(encoding="utf-8")
STRUCTURAL_KINDS = {"qk-norm", "position", "activation", "norm", "init", "weight-tying", "logit-softcap",
                    "weight-decay", "grad-clip", "warmdown"}


def _check(code: str) -> list[Action]:
    """The catalogue of `code`, after checking that every action is a distinct, compiling change of it."""
    actions = catalog(code)
    results = [apply_ops(code, action.ops) for action in actions]
    for action, result in zip(actions, results, strict=True):
        assert result != code, action.description
        compile(result, "train.py", "exec")
    assert len(set(results)) == len(results)
    return actions


def _is_move(code: str, action: Action) -> bool:
    """A hyperparameter action: it rewrites one constant's line and nothing else."""
    lines = {c.lineno for c in constants(code)}
    return len(action.ops) == 1 and action.ops[0].op == "replace" and action.ops[0].start in lines


def _structural(code: str) -> list[Action]:
    return [action for action in catalog(code) if not _is_move(code, action)]


def _pick(code: str, kind: str, phrase: str = "") -> Action:
    """The structural action of `kind` whose description contains `phrase`."""
    found = [a for a in _structural(code) if a.kind == kind and phrase in a.description]
    assert len(found) == 1, (kind, phrase, [a.description for a in found])
    return found[0]


def _descriptions(code: str, kind: str) -> list[str]:
    """What each action of `kind` does: its description up to the first colon."""
    return [action.description.split(":")[0] for action in catalog(code) if action.kind == kind]


def test_every_action_of_both_targets_applies_compiles_and_changes_the_code():
    assert len(_check(CPU)) == 75
    assert len(_check(GPU)) > 50


def test_the_cpu_target_offers_every_kind():
    kinds = {action.kind for action in _check(CPU)}
    assert kinds == STRUCTURAL_KINDS | {"hyperparameter", "depth", "lr-scale", "warmup"}
    assert {"N_LAYER 4 -> 3", "N_LAYER 4 -> 5"} < set(_descriptions(CPU, "depth"))
    assert "LEARNING_RATE 3e-3 -> 6e-3: double; peak AdamW learning rate" in [a.description for a in catalog(CPU)]
    assert _descriptions(CPU, "activation") == [
        "MLP activation GELU -> ReLU²", "MLP activation GELU -> SiLU", "MLP GELU -> SwiGLU, silu(gate) * up at 2/3 of "
        "the hidden width so that parameters and FLOPs stay the same (Shazeer 2020; LLaMA)"]
    assert _descriptions(CPU, "norm") == [
        "normalisation LayerNorm -> LayerNorm without bias (all 3)", "normalisation LayerNorm -> RMSNorm (all 3)"]


def test_hyperparameter_actions_are_every_grid_move_and_depth_plus_minus_one():
    moves = [action for action in catalog(CPU) if _is_move(CPU, action)]
    assert len(moves) == sum(len(candidates(c)) for c in constants(CPU)) == 60  # N_LAYER 4: the grid has ±1
    assert all(len(a.ops) == 1 and a.ops[0].op == "replace" and a.ops[0].start == a.ops[0].end for a in moves)
    deep = CPU.replace("N_LAYER = 4 ", "N_LAYER = 12 ")
    assert _descriptions(deep, "depth") == [f"N_LAYER 12 -> {n}" for n in (6, 11, 13, 24)]


def test_text_is_the_description_and_the_new_lines_by_line_number():
    qk = _pick(CPU, "qk-norm")
    assert qk.text.splitlines() == [
        f"qk-norm: {qk.description}", "insert before 40",
        "+        q, k = F.rms_norm(q, (q.size(-1),)), F.rms_norm(k, (k.size(-1),))  # QK-norm"]
    untie = _pick(CPU, "weight-tying")
    assert untie.text.splitlines()[1:] == ["delete 75..75"]
    action = Action("x", "two ops", [EditOp("replace", 9, 10, "a\nb\n"), EditOp("insert", 3, 2, "c\n")])
    assert action.text == "x: two ops\ninsert before 3\n+c\nreplace 9..10\n+a\n+b"


def test_an_edit_whose_anchor_is_gone_or_ambiguous_is_not_offered():
    tied = "        self.lm_head.weight = self.wte.weight  # weight tying\n"
    assert "weight-tying" not in {a.kind for a in _check(CPU.replace(tied, ""))}
    twice = CPU.replace(tied, tied + tied.replace("  # weight tying", ""))
    assert "weight-tying" not in {a.kind for a in _check(twice)}  # two lines match: which one is meant?
    manual = CPU.replace("F.scaled_dot_product_attention(q, k, v, is_causal=True,", "attend(q, k, v, is_causal=True,")
    kinds = {a.kind for a in _check(manual)}
    assert "qk-norm" not in kinds and "position" not in kinds and "norm" in kinds
    no_math = CPU.replace("import math\n", "")  # the cosine warmdown needs math; the other shapes do not
    assert [a.description.split(":")[0] for a in _structural(no_math) if a.kind == "warmdown"] == [
        "learning-rate warmdown linear to zero -> 1-sqrt to zero",
        "learning-rate warmdown linear to zero -> linear to 10%"]


def test_applied_edits_are_not_offered_again_and_swaps_offer_the_way_back():
    qk = apply_ops(CPU, _pick(CPU, "qk-norm").ops)
    assert "qk-norm" not in {a.kind for a in _check(qk)}
    everything = _stack(CPU, *STACKS["modern"])  # once made, only the swaps among forms are left
    assert {a.kind for a in _structural(everything)} == {"activation", "norm", "warmdown"}
    rms = apply_ops(CPU, _pick(CPU, "norm", "RMSNorm").ops)
    assert _descriptions(rms, "norm") == [
        "normalisation RMSNorm -> LayerNorm (all 3)", "normalisation RMSNorm -> LayerNorm without bias (all 3)"]
    relu2 = apply_ops(CPU, _pick(CPU, "activation", "ReLU²").ops)
    assert [d[:28] for d in _descriptions(relu2, "activation")] == [
        "MLP activation ReLU² -> GELU", "MLP activation ReLU² -> SiLU", "MLP ReLU² -> SwiGLU, silu(ga"]
    swiglu = apply_ops(relu2, _pick(relu2, "activation", "SwiGLU").ops)
    assert _descriptions(swiglu, "activation") == []  # no known form of the activation is left to swap


def test_code_that_does_not_parse_has_no_catalogue():
    with pytest.raises(GridError):
        catalog("def broken(:\n")


def _stack(code: str, *picks: tuple[str, str]) -> str:
    """Apply one structural action after another, re-cataloguing (and checking the catalogue) each time."""
    for kind, phrase in picks:
        _check(code)
        code = apply_ops(code, _pick(code, kind, phrase).ops)
    _check(code)
    return code


STACKS = {
    "modern": [("qk-norm", ""), ("position", ""), ("norm", "RMSNorm"), ("activation", "ReLU²"), ("init", ""),
               ("weight-tying", ""), ("logit-softcap", ""), ("weight-decay", ""), ("grad-clip", ""),
               ("warmdown", "cosine")],
    "gated": [("activation", "SwiGLU"), ("norm", "without bias"), ("warmdown", "1-sqrt")],
}
"""Between them every structural kind, stacked so that two short runs train them all."""


def test_stacks_cover_every_structural_kind():
    assert {kind for stack in STACKS.values() for kind, _ in stack} == STRUCTURAL_KINDS


@pytest.mark.parametrize("name", list(STACKS))
def test_structurally_edited_scripts_still_train(name: str, tmp_path: Path, small_corpus: Path):
    """Each stack, on the tiny model of the test targets, trains 4 steps under the real harness (trainer and
    evaluator processes, the causality probe) and gets a finite val-bpb. About 15 s of CPU per run: two
    stacks rather than one run per action keep the file well under a minute on two cores."""
    source = shrink(_stack(CPU, *STACKS[name]), **TINY_MODEL)
    target = make_target(tmp_path / name, small_corpus, source)
    # A slot of its own: a supervisor already running on this machine (`make up`) holds slot 0's uid,
    # and sharing it would make the two take turns.
    result = run_target(load_target(target), budget=Budget("steps", 4), slot=9)
    assert result.status == "ok", result.error_tail or result.error
    assert result.val_bpb is not None and math.isfinite(result.val_bpb)
