"""services.proposer.prompt: s_t as a prompt in section order, history left out oldest first (then the worst
of the best) to fit the token limit, program.md and the code never; the answer schema is EditOp's."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import timedelta

import msgspec
import pytest
from conftest import CPU_TARGET, REPO
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from services.proposer.catalog import catalog
from services.proposer.prompt import (
    ANSWER_SCHEMA,
    Answer,
    PromptTooLong,
    build_prompt,
    state_diagnostics,
)
from shared.diffs import apply_ops, unified_diff
from shared.events import EditOp, now
from shared.queries import HistoryEntry, LedgerState

CODE = (CPU_TARGET / "train.py").read_text(encoding="utf-8")
PROGRAM = (CPU_TARGET / "program.md").read_text(encoding="utf-8")
DIAGNOSTICS = {"experiments proposed": 35, "best val-bpb so far (bpb*)": 2.2871, "noise floor (σ_noise)": None}


def _history() -> list[HistoryEntry]:
    """35 experiments as the ledger's history view gives them, oldest first, with real diffs of c* (catalogue
    actions): the last 32 are recent; the 5 best are the first three and two recent ones."""
    best = {0: 2.34, 1: 2.31, 2: 2.33, 7: 2.30, 20: 2.32}
    entries = []
    for index, action in enumerate(catalog(CODE)[:35]):
        aborted = index % 4 == 0 and index not in best
        recent, top = index >= 3, index in best
        entries.append(HistoryEntry(
            proposal_id=f"{index:02d}" + "e" * 30, status="aborted" if aborted else "ok",
            val_bpb=None if aborted else best.get(index, 2.40 + index / 1000),
            unified_diff=unified_diff(CODE, apply_ops(CODE, action.ops)),
            abort_commentary="forecast 2.47 [2.44, 2.50] above τ 2.41" if aborted else None,
            why="both" if recent and top else "top" if top else "recent"))
    return entries


HISTORY = _history()
ALL = [f"{i:02d}" for i in range(len(HISTORY))]
DROP_ORDER = [f"{i:02d}" for i in range(3, 35) if i not in (7, 20)] + ["00", "02", "20", "01", "07"]
"""Recent-only entries oldest first, then the best-ever ones from the worst val-bpb: the best (07) is last."""


def words(text: str) -> int:
    return len(text.split())


def _shown(prompt: str) -> list[str]:
    """The two-digit index of every experiment in the prompt, in order."""
    return re.findall(r"^## (?:★ )?(\d\d)e{6}", prompt, flags=re.MULTILINE)


def _prompt(limit: int, count: Callable[[str], int] = words) -> str:
    return build_prompt(PROGRAM, CODE, HISTORY, DIAGNOSTICS, count, limit)


def test_sections_in_order_with_the_code_numbered_and_every_experiment_oldest_first():
    prompt = _prompt(10**6)
    heads = [line for line in prompt.splitlines() if line.startswith("# ")]
    assert heads == ["# Research agenda (program.md)", "# Research agenda: a small GPT on two CPU cores",
                     "# The best train.py so far (c*), with line numbers", "# Diagnostics",
                     "# Experiments, oldest first (★: one of the 5 best ever)", "# Your answer"]
    assert PROGRAM.strip() in prompt
    assert "  1| \"\"\"A small GPT trained for a fixed budget on CPU." in prompt
    assert " 21| LEARNING_RATE = 3e-3  # peak AdamW learning rate\n" in prompt
    assert f"{len(CODE.splitlines())}| env.submit(model)\n" in prompt
    assert "- best val-bpb so far (bpb*): 2.2871\n- noise floor (σ_noise): unknown\n" in prompt
    assert _shown(prompt) == ALL
    assert "## ★ 07eeeeee: ok, val-bpb 2.3000\n```diff\n@@ " in prompt
    assert "## 08eeeeee: aborted\n```diff\n" in prompt and "self-evaluator: forecast 2.47" in prompt
    assert "left out" not in prompt
    assert prompt.endswith("start = 126 appends.\n- text is whole lines of Python, each ending with a newline, "
                           "without the listing's line numbers.\n")


def test_a_repeat_shows_that_it_has_no_edit():
    repeat = HistoryEntry(proposal_id="r" * 32, status="ok", val_bpb=2.35, unified_diff="", abort_commentary=None,
                          why="recent")
    prompt = build_prompt(PROGRAM, CODE, [repeat], {}, words, 10**6)
    assert "## rrrrrrrr: ok, val-bpb 2.3500\n(no edit: a repeat of its parent's code with another seed)\n" in prompt


def _check_truncation(count: Callable[[str], int]) -> None:
    """From the limit that fits everything down, one token below each prompt's own size at a time: each step
    leaves out exactly the next entry of DROP_ORDER, the prompt fits and keeps program.md and all the code;
    one token below the prompt without any experiment, PromptTooLong says so."""
    limit = count(_prompt(10**6, count))
    for dropped in range(len(ALL) + 1):
        prompt = _prompt(limit, count)
        assert _shown(prompt) == [i for i in ALL if i not in DROP_ORDER[:dropped]]
        assert count(prompt) <= limit
        assert PROGRAM.strip() in prompt and " 98|         return max(0.0, (1 - progress) / WARMDOWN_FRAC)\n" in prompt
        assert "125| env.submit(model)\n" in prompt
        assert (f"({dropped} left out to fit the context" in prompt) == (dropped > 0)
        limit = count(prompt) - 1
    with pytest.raises(PromptTooLong, match=f"takes {limit + 1} tokens, 1 over the limit of {limit}$"):
        _prompt(limit, count)
    with pytest.raises(PromptTooLong, match=f"takes {limit + 1} tokens, 101 over the limit of {limit - 100}$"):
        _prompt(limit - 100, count)


def test_truncation_with_whitespace_words():
    _check_truncation(words)


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    """A byte-level BPE trained here on the repository's own sources: a real subword tokenizer, offline."""
    files = [p for pattern in ("*.py", "*.md") for p in sorted(REPO.rglob(pattern))
             if ".venv" not in p.parts and ".data" not in p.parts]
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in files]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=4096, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def test_truncation_with_a_real_bpe_tokenizer(bpe: Tokenizer):
    prompt = _prompt(10**6)
    assert bpe.decode(bpe.encode(prompt).ids) == prompt  # lossless, non-ASCII (★, σ, ²) included
    assert len(bpe.encode(prompt).ids) < words(prompt) * 3
    _check_truncation(lambda text: len(bpe.encode(text).ids))


def test_the_answer_schema_is_editops_and_decodes_a_real_answer():
    schema = msgspec.json.decode(ANSWER_SCHEMA)
    assert set(schema["$defs"]["EditOp"]["properties"]) == set(EditOp.__struct_fields__)
    assert set(schema["$defs"]["Answer"]["required"]) == {"rationale", "ops"}
    assert ANSWER_SCHEMA in _prompt(10**6)
    text = ('{"rationale": "QK-norm bounds the attention logits", "ops": [{"op": "insert", "start": 40, "end": 39, '
            '"text": "        q, k = F.rms_norm(q, (q.size(-1),)), F.rms_norm(k, (k.size(-1),))\\n"}]}')
    answer = msgspec.json.decode(text, type=Answer)
    assert "F.rms_norm(q" in apply_ops(CODE, answer.ops)
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode('{"rationale": "x", "ops": [{"op": "move", "start": 1, "end": 1}]}', type=Answer)


def test_diagnostics_of_a_ledger_state():
    at = now()
    state = LedgerState(cursor=9, experiments=12, finished=11, outstanding=1, c_star_sha256=None, c_star_code=None,
                        bpb_star=2.3456789, sigma_h=0.01, since_best=3, first_proposed_at=at - timedelta(hours=1.5),
                        history=[], sigma_noise=None)
    assert state_diagnostics(state, at) == {
        "hours since the first experiment": 1.5, "experiments proposed": 12, "experiments finished": 11,
        "best val-bpb so far (bpb*, the score of c*)": 2.3456789,
        "noise floor (σ_noise: std of val-bpb between seeds of one code)": None,
        "spread of recent val-bpb (σ_h)": 0.01, "finished experiments since the last new best": 3}
    prompt = build_prompt(PROGRAM, CODE, [], state_diagnostics(state, at), words, 10**6)
    assert "- best val-bpb so far (bpb*, the score of c*): 2.34568\n" in prompt
    assert "No experiment has finished yet." in prompt
