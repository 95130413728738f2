"""Data pipeline of the frozen environment: corpora, the fixed train/val split, tokenized shards.

A corpus is an ordered stream of documents. Each document goes to train or val by a hash of its
name, so the split never depends on order, machine or tokenizer. Preparation streams the corpus
twice at most (BPE training, then encoding) and writes, under the data root:

    prepared/<key>/manifest.json   corpus sha256, tokenizer id, sizes
    prepared/<key>/train.bin       uint16/uint32 token ids, a separator before each document
    prepared/<key>/val.bin         the same for the val split (never readable by training)
    prepared/<key>/token_bytes.npy UTF-8 byte length of every token id (eq. 1's denominator)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import duckdb
import numpy as np

from shared import progress
from shared.target.tokenizer import Tokenizer, train_tokenizer

VAL_BASIS_POINTS = 500
"""5% of documents (by name hash) form the validation split."""
MAX_VAL_BYTES = 32 << 20
"""Val documents past this many bytes are dropped, so huge corpora keep a bounded val split."""
TOKENIZER_TRAIN_BYTES = 512 << 20
"""BPE learns from at most this much train text."""
ENCODE_BATCH_DOCS = 512

DOWNLOADABLE = {
    # name: (base URL, shard file pattern, number of shards)
    "climbmix": (
        "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main",
        "shard_{:05d}.parquet",
        6543,
    ),
    "fineweb-edu": (
        "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main",
        "shard_{:05d}.parquet",
        1823,
    ),
}


def data_root() -> Path:
    """Where corpora, prepared shards and run workspaces live (`AUTORESEARCH_DATA`)."""
    return Path(os.environ.get("AUTORESEARCH_DATA", Path.home() / ".cache" / "autoresearch-rl")).resolve()


class Document(NamedTuple):
    name: str
    text: str


@dataclass(frozen=True)
class Corpus:
    """A named source of documents; `fingerprint` changes whenever its files do."""

    spec: str
    fingerprint: str
    documents: Iterable[Document]
    count: int | None


def is_val(name: str) -> bool:
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") % 10_000 < VAL_BASIS_POINTS


def open_corpus(spec: str) -> Corpus:
    """`stdlib`, or a folder holding parquet shards (a `text` column) or text files."""
    if spec == "stdlib":
        return _stdlib_corpus()
    folder = Path(spec).expanduser().resolve()
    if not folder.is_dir():
        raise FileNotFoundError(f"corpus {spec!r} is neither 'stdlib' nor a folder")
    shards = sorted(folder.rglob("*.parquet"))
    if shards:
        return _parquet_corpus(folder, shards)
    return _text_corpus(folder)


def _stdlib_corpus() -> Corpus:
    """The offline default: the Python standard library's own sources, present wherever Python is."""
    root = Path(sysconfig.get_paths()["stdlib"]).resolve()
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    files = sorted(p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts))
    fingerprint = _fingerprint([f"python {sys.version}"], root, files)

    def documents() -> Iterator[Document]:
        for path in files:
            text = _read_text(path)
            if text:
                yield Document(f"stdlib/{path.relative_to(root)}", text)

    return Corpus("stdlib", fingerprint, _Replayable(documents), len(files))


def _text_corpus(folder: Path) -> Corpus:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise FileNotFoundError(f"corpus folder {folder} holds no files")

    def documents() -> Iterator[Document]:
        for path in files:
            text = _read_text(path)
            if text:
                yield Document(str(path.relative_to(folder)), text)

    return Corpus(str(folder), _fingerprint([], folder, files), _Replayable(documents), len(files))


def _parquet_corpus(folder: Path, shards: list[Path]) -> Corpus:
    con = duckdb.connect()
    counts = [con.execute("SELECT count(*) FROM read_parquet(?)", [str(s)]).fetchone()[0] for s in shards]

    def documents() -> Iterator[Document]:
        for shard in shards:
            cursor = con.execute("SELECT text FROM read_parquet(?)", [str(shard)])
            row = 0
            while batch := cursor.fetchmany(4096):
                for (text,) in batch:
                    if text:
                        yield Document(f"{shard.relative_to(folder)}:{row}", text)
                    row += 1

    return Corpus(str(folder), _fingerprint([], folder, shards), _Replayable(documents), sum(counts))


class _Replayable:
    """An iterable that can be walked more than once (BPE training, then encoding)."""

    def __init__(self, make: Callable[[], Iterator[Document]]):
        self.make = make

    def __iter__(self) -> Iterator[Document]:
        return self.make()


def _read_text(path: Path) -> str | None:
    try:
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    return None if "\x00" in text else text


def _fingerprint(extra: list[str], root: Path, files: list[Path]) -> str:
    h = hashlib.sha256("\n".join(extra).encode())
    for path in files:
        stat = path.stat()
        h.update(f"{path.relative_to(root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return h.hexdigest()


@dataclass(frozen=True)
class PreparedData:
    """Tokenized train/val shards of one corpus under one tokenizer."""

    folder: Path
    manifest: dict

    @property
    def train_bin(self) -> Path:
        return self.folder / "train.bin"

    @property
    def val_bin(self) -> Path:
        return self.folder / "val.bin"

    @property
    def token_bytes_npy(self) -> Path:
        return self.folder / "token_bytes.npy"

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.manifest["dtype"])

    def tokens(self, split: str) -> np.ndarray:
        return np.memmap(self.folder / f"{split}.bin", dtype=self.dtype, mode="r")


def prepare(corpus_spec: str, tokenizer_spec: str, root: Path | None = None, quiet: bool = False) -> PreparedData:
    """Build (or find, if already built) the tokenized shards for a corpus and tokenizer."""
    corpus = open_corpus(corpus_spec)
    base = (root or data_root()) / "prepared"
    key = hashlib.sha256(f"{corpus.fingerprint}|{tokenizer_spec}".encode()).hexdigest()[:16]
    folder = base / key
    if (folder / "manifest.json").is_file():
        return PreparedData(folder, json.loads((folder / "manifest.json").read_text()))

    staging = base / f".{key}.{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    started = time.monotonic()
    try:
        train_texts = _capped(doc.text for doc in corpus.documents if not is_val(doc.name))
        tokenizer = train_tokenizer(tokenizer_spec, train_texts)
        tokenizer.save(staging)
        stats = _encode_corpus(corpus, tokenizer, staging, quiet)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    manifest = {
        "corpus": corpus.spec,
        "tokenizer_spec": tokenizer_spec,
        "tokenizer_id": tokenizer.id,
        "vocab_size": tokenizer.vocab_size,
        "separator_id": tokenizer.separator_id,
        "dtype": _dtype_for(tokenizer.vocab_size).name,
        "val_basis_points": VAL_BASIS_POINTS,
        "prepare_s": round(time.monotonic() - started, 2),
        **stats,
    }
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2))
    try:
        staging.rename(folder)
    except OSError:  # another process finished the same preparation first
        shutil.rmtree(staging, ignore_errors=True)
    return PreparedData(folder, json.loads((folder / "manifest.json").read_text()))


def _capped(texts: Iterable[str]) -> Iterator[str]:
    seen = 0
    for text in texts:
        if seen >= TOKENIZER_TRAIN_BYTES:
            return
        seen += len(text)
        yield text


def _dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def _encode_corpus(corpus: Corpus, tokenizer: Tokenizer, folder: Path, quiet: bool) -> dict:
    """Tokenize every document into train.bin / val.bin and hash the corpus content."""
    dtype = _dtype_for(tokenizer.vocab_size)
    corpus_hash = hashlib.sha256()
    counts = {"train_docs": 0, "val_docs": 0, "train_tokens": 0, "val_tokens": 0, "train_bytes": 0, "val_bytes": 0}
    batch: list[Document] = []
    with (
        open(folder / "train.bin", "wb") as train_file,
        open(folder / "val.bin", "wb") as val_file,
        progress.bar(total=corpus.count, unit="doc", desc=f"preparing {corpus.spec}", quiet=quiet) as bar,
    ):
        files = {"train": train_file, "val": val_file}

        def flush() -> None:
            for doc, ids in zip(batch, tokenizer.encode_batch([d.text for d in batch]), strict=True):
                split = "val" if is_val(doc.name) else "train"
                nbytes = len(doc.text.encode("utf-8"))
                if split == "val" and counts["val_bytes"] + nbytes > MAX_VAL_BYTES:
                    continue
                np.asarray([tokenizer.separator_id, *ids], dtype=dtype).tofile(files[split])
                counts[f"{split}_docs"] += 1
                counts[f"{split}_tokens"] += len(ids) + 1
                counts[f"{split}_bytes"] += nbytes
            bar.update(len(batch))
            batch.clear()

        for doc in corpus.documents:
            corpus_hash.update(f"{doc.name}\0{len(doc.text)}\0".encode())
            corpus_hash.update(doc.text.encode("utf-8"))
            batch.append(doc)
            if len(batch) == ENCODE_BATCH_DOCS:
                flush()
        flush()
    if counts["train_tokens"] == 0 or counts["val_tokens"] == 0:
        raise ValueError(f"corpus {corpus.spec} is too small: it needs documents in both train and val")
    return {"corpus_sha256": corpus_hash.hexdigest(), **counts}


def download(dataset: str, shards: int, dest: Path | None = None, base_url: str | None = None) -> Path:
    """Fetch the first `shards` parquet shards of a known dataset (needs internet), resumably."""
    if dataset not in DOWNLOADABLE:
        raise ValueError(f"unknown dataset {dataset!r}; known: {', '.join(DOWNLOADABLE)}")
    default_url, pattern, available = DOWNLOADABLE[dataset]
    if not 1 <= shards <= available:
        raise ValueError(f"{dataset} has {available} shards; asked for {shards}")
    folder = dest or data_root() / "datasets" / dataset
    folder.mkdir(parents=True, exist_ok=True)
    for index in progress.bar(range(shards), unit="shard", desc=f"downloading {dataset}"):
        name = pattern.format(index)
        _fetch(f"{base_url or default_url}/{name}", folder / name)
    return folder


def _fetch(url: str, path: Path, attempts: int = 5) -> None:
    if path.exists():
        return
    partial = path.with_suffix(path.suffix + ".part")
    for attempt in range(1, attempts + 1):
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as out:
                shutil.copyfileobj(response, out, 1 << 20)
            partial.rename(path)
            return
        except OSError as error:
            partial.unlink(missing_ok=True)
            permanent = isinstance(error, urllib.error.HTTPError) and 400 <= error.code < 500
            if permanent or attempt == attempts:
                raise RuntimeError(f"could not download {url}: {error}") from error
            time.sleep(min(2**attempt, 30))
