"""The embedded default policy model: a small, untrained Llama with a byte-level BPE tokenizer trained on
this project's own text, so that the loop runs offline on a CPU with nothing to download.

It is untrained on purpose: it knows nothing about code beyond its tokenizer, and everything it learns
comes from PPO on the loop's own rewards. Its size is chosen for 2 CPU cores: a forward and backward
pass over a 2,000-token prompt takes about half a second on one core.

    build_default_model(Path(".data/models/default"))   # the folder, ready for load_policy

The build is seeded, so two builds from the same sources are identical, and atomic: it is written to a
temporary folder beside the destination and renamed into place, so a crash leaves no half-built model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from shared import progress

log = logging.getLogger("policy")
ROOT = Path(__file__).resolve().parents[2]
"""The project folder (shared/policy/default_model.py is two levels below it)."""
CORPUS = ("*.md", "targets/**/*.py", "targets/**/*.md", "shared/**/*.py", "services/**/*.py")
"""The tokenizer's training text, relative to ROOT: the targets' train.py and program.md, and our own code."""
NOTE = "default_model.json"
"""Written last, so a folder holding it is a complete build."""
SEED = 0
VOCAB_SIZE = 4096
EOS = "<|endoftext|>"
CONTEXT = 16384
"""Tokens the model is configured for (rotary positions, so longer prompts still run)."""
SHAPE = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2)
"""Four layers of width 128; two key/value heads keep the score mode's shared prompt cache small."""


def build_default_model(directory: Path) -> Path:
    """The default model in `directory`: an existing complete build is reused, anything else is rebuilt."""
    directory = Path(directory)
    if (directory / NOTE).is_file():
        return directory
    if directory.exists():  # a build that stopped halfway (or an older, non-atomic one)
        shutil.rmtree(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.building-", dir=directory.parent))
    try:
        _build(staging)
        staging.rename(directory)
    except OSError:
        if not (directory / NOTE).is_file():  # not just another process finishing the same build first
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def resolve_model(model: str, data_dir: Path) -> str:
    """[proposer] model: a hub id or folder as it is; "" builds the embedded default on first use (offline,
    seconds) under data_dir/models/default."""
    if model:
        return model
    folder = build_default_model(data_dir / "models" / "default")
    log.warning("the policy model is the embedded default at %s: a small UNTRAINED model built from this "
                "project's own text; it proposes at random until PPO trains it (set [proposer] model for a "
                "pretrained one)", folder)
    return str(folder)


def corpus_files() -> list[Path]:
    files = {path for pattern in CORPUS for path in ROOT.glob(pattern) if path.is_file()}
    if not files:
        raise FileNotFoundError(f"no tokenizer training text under {ROOT} ({', '.join(CORPUS)})")
    return sorted(files)


def _build(folder: Path) -> None:
    files = corpus_files()
    texts = [path.read_text(encoding="utf-8") for path in files]
    tokenizer = _train_tokenizer(texts)
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=CONTEXT, tie_word_embeddings=True,
                         bos_token_id=eos_id, eos_token_id=eos_id, **SHAPE)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    corpus = hashlib.sha256(b"".join(hashlib.sha256(text.encode()).digest() for text in texts)).hexdigest()
    note = {
        "what": "the embedded default policy model: a small Llama, randomly initialised (untrained), "
                "with a byte-level BPE tokenizer trained on this project's own text",
        "trained": False,
        "parameters": model.num_parameters(),
        "vocab_size": len(tokenizer),
        "shape": SHAPE,
        "seed": SEED,
        "corpus_files": [str(path.relative_to(ROOT)) for path in files],
        "corpus_sha256": corpus,
    }
    (folder / NOTE).write_text(json.dumps(note, indent=2) + "\n")


def _train_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """Byte-level BPE, as GPT-2's: every string encodes (no unknown token), and decoding gives it back."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=[EOS],
                                  show_progress=progress.wanted(),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=EOS, eos_token=EOS,
                                   model_max_length=CONTEXT)
