"""Tokenizers of the frozen environment: raw bytes, or byte-level BPE trained locally.

Both give every token id its UTF-8 byte length (`token_bytes`), which is what makes val-bpb
(paper eq. 1) tokenizer-agnostic: the byte lengths of a document's tokens add up to its byte count.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from functools import cache
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

DOC_SEPARATOR = "<|endoftext|>"
"""Special token placed before every document; it has no bytes, so eq. (1) never scores it."""


class Tokenizer:
    """Encode text to ids; know each id's byte length. `id` names the exact vocabulary."""

    def __init__(self, id: str, vocab_size: int, separator_id: int, token_bytes: np.ndarray):
        self.id = id
        self.vocab_size = vocab_size
        self.separator_id = separator_id
        self.token_bytes = token_bytes

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        raise NotImplementedError

    def save(self, folder: Path) -> None:
        np.save(folder / "token_bytes.npy", self.token_bytes)


class ByteTokenizer(Tokenizer):
    """Ids 0-255 are bytes; 256 separates documents."""

    def __init__(self) -> None:
        token_bytes = np.ones(257, dtype=np.int32)
        token_bytes[256] = 0
        super().__init__("byte257", 257, 256, token_bytes)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(text.encode("utf-8")) for text in texts]


class BPETokenizer(Tokenizer):
    """GPT-2 style byte-level BPE from the `tokenizers` library."""

    def __init__(self, hf: HFTokenizer):
        self.hf = hf
        vocab = hf.get_vocab()
        separator_id = vocab[DOC_SEPARATOR]
        unicode_to_byte = {ch: b for b, ch in _bytes_to_unicode().items()}
        token_bytes = np.zeros(len(vocab), dtype=np.int32)
        for token, index in vocab.items():
            if index != separator_id:
                token_bytes[index] = len(bytes(unicode_to_byte[ch] for ch in token))
        digest = hashlib.sha256(hf.to_str().encode()).hexdigest()[:12]
        super().__init__(f"bpe{len(vocab)}-{digest}", len(vocab), separator_id, token_bytes)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [encoding.ids for encoding in self.hf.encode_batch(texts, add_special_tokens=False)]

    def save(self, folder: Path) -> None:
        super().save(folder)
        self.hf.save(str(folder / "tokenizer.json"))

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> BPETokenizer:
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[DOC_SEPARATOR],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        hf.train_from_iterator(_batched(texts), trainer=trainer)
        return cls(hf)


def train_tokenizer(spec: str, train_texts: Iterable[str]) -> Tokenizer:
    """`byte` or `bpe:<vocab size>`; BPE learns only from the train split."""
    if spec == "byte":
        return ByteTokenizer()
    kind, _, size = spec.partition(":")
    if kind != "bpe" or not size.isdigit() or int(size) < 257:
        raise ValueError(f"unknown tokenizer {spec!r}: use 'byte' or 'bpe:<vocab size >= 257>'")
    return BPETokenizer.train(train_texts, int(size))


def load_tokenizer(folder: Path) -> Tokenizer:
    manifest = json.loads((folder / "manifest.json").read_text())
    if manifest["tokenizer_spec"] == "byte":
        return ByteTokenizer()
    return BPETokenizer(HFTokenizer.from_file(str(folder / "tokenizer.json")))


def _batched(texts: Iterable[str], size: int = 256) -> Iterator[list[str]]:
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@cache
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters, used by byte-level BPE tokens."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}
