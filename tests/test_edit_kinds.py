"""The kinds the report and the dashboard group edits by (shared/edit_kinds.py)."""

from __future__ import annotations

import re

from conftest import CPU_TARGET

from services.proposer.catalog import catalog
from shared.diffs import apply_ops, unified_diff
from shared.edit_kinds import CODE, NO_CHANGE, edit_kind


def test_a_diff_is_classified_as_the_catalogue_classifies_the_same_edit():
    code = (CPU_TARGET / "train.py").read_text()
    found = set()
    for action in catalog(code):
        kind = edit_kind(unified_diff(code, apply_ops(code, action.ops)))
        constant_move = len(action.ops) == 1 and re.match(r"[A-Z][A-Z0-9_]* =", action.ops[0].text)
        assert kind == (action.kind if constant_move else CODE), action.description
        found.add(kind)
    assert {"depth", "lr-scale", "weight-decay", "warmup", "warmdown", "hyperparameter", CODE} <= found


def test_an_action_names_its_kind_and_no_change_is_a_repeat():
    assert edit_kind("", "qk-norm: normalise q and k\ninsert before 40\n+q = ...") == "qk-norm"
    assert edit_kind("") == NO_CHANGE
    diff = "--- a/train.py\n+++ b/train.py\n@@ -3 +3 @@\n-BATCH_SIZE: int = 8\n+BATCH_SIZE: int = 16\n"
    assert edit_kind(diff) == "hyperparameter"
    assert edit_kind(diff + "@@ -9 +9 @@\n-x = F.gelu(x)\n+x = F.relu(x)\n") == CODE
