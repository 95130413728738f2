"""Corpora, the train/val split, tokenizers and the downloader, on data the tests make."""

from __future__ import annotations

import functools
import http.server
import threading
from pathlib import Path

import duckdb
import numpy as np
import pytest

from shared.target.data import download, is_val, open_corpus, prepare
from shared.target.tokenizer import load_tokenizer


@pytest.mark.parametrize("tokenizer", ["byte", "bpe:400"])
def test_token_byte_lengths_add_up_to_the_text_bytes(small_corpus: Path, data_root: Path, tokenizer: str):
    data = prepare(str(small_corpus), tokenizer, data_root, quiet=True)
    token_bytes = np.load(data.token_bytes_npy)
    for split in ("train", "val"):
        tokens = data.tokens(split)
        assert int(token_bytes[tokens].sum()) == data.manifest[f"{split}_bytes"]
        assert int((tokens == data.manifest["separator_id"]).sum()) == data.manifest[f"{split}_docs"]
    assert data.manifest["val_docs"] > 0 and data.manifest["train_docs"] > 5 * data.manifest["val_docs"]


def test_bpe_is_trained_on_train_only_and_reloads_identically(small_corpus: Path, data_root: Path):
    data = prepare(str(small_corpus), "bpe:400", data_root, quiet=True)
    tokenizer = load_tokenizer(data.folder)
    assert tokenizer.id == data.manifest["tokenizer_id"] and tokenizer.vocab_size == 400
    text = "naïve café 🎉 def f(x):\n    return x\n"
    ids = tokenizer.encode_batch([text])[0]
    assert int(tokenizer.token_bytes[ids].sum()) == len(text.encode("utf-8"))


def test_preparation_is_deterministic_and_cached(small_corpus: Path, tmp_path: Path):
    first = prepare(str(small_corpus), "bpe:300", tmp_path / "a", quiet=True)
    second = prepare(str(small_corpus), "bpe:300", tmp_path / "b", quiet=True)
    again = prepare(str(small_corpus), "bpe:300", tmp_path / "a", quiet=True)
    assert again.folder == first.folder
    assert first.manifest["corpus_sha256"] == second.manifest["corpus_sha256"]
    assert first.manifest["tokenizer_id"] == second.manifest["tokenizer_id"]
    assert first.train_bin.read_bytes() == second.train_bin.read_bytes()
    assert first.val_bin.read_bytes() == second.val_bin.read_bytes()


def test_the_split_depends_only_on_document_names():
    names = [f"doc{i}" for i in range(4000)]
    val = [n for n in names if is_val(n)]
    assert 0.03 < len(val) / len(names) < 0.07
    assert val == [n for n in reversed(names) if is_val(n)][::-1]


def _write_parquet(path: Path, texts: list[str]) -> None:
    con = duckdb.connect()
    con.execute("CREATE TABLE docs (id INTEGER, text VARCHAR)")
    con.executemany("INSERT INTO docs VALUES (?, ?)", list(enumerate(texts)))
    con.execute(f"COPY docs TO '{path}' (FORMAT parquet)")


def test_parquet_shards_with_a_text_column(tmp_path: Path):
    shards = tmp_path / "shards"
    shards.mkdir()
    for index in range(2):
        _write_parquet(shards / f"shard_{index:05d}.parquet", [f"document {index}-{i} " * 20 for i in range(300)])
    corpus = open_corpus(str(shards))
    documents = list(corpus.documents)
    assert corpus.count == 600 and len(documents) == 600
    assert documents[0].name == "shard_00000.parquet:0" and documents[0].text.startswith("document 0-0")
    data = prepare(str(shards), "byte", tmp_path / "root", quiet=True)
    assert data.manifest["train_docs"] + data.manifest["val_docs"] == 600


def test_empty_or_missing_corpora_are_clear_errors(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="neither 'stdlib' nor a folder"):
        open_corpus(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no files"):
        open_corpus(str(tmp_path / "empty"))
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "a.txt").write_text("only one document")
    with pytest.raises(ValueError, match="too small"):
        prepare(str(tmp_path / "one"), "byte", tmp_path / "root", quiet=True)
    assert not list((tmp_path / "root" / "prepared").iterdir()), "a failed preparation leaves nothing behind"


@pytest.fixture
def shard_server(tmp_path: Path):
    """A loopback HTTP server holding two parquet shards in the upstream naming."""
    served = tmp_path / "served"
    served.mkdir()
    for index in range(2):
        _write_parquet(served / f"shard_{index:05d}.parquet", [f"served text {index} {i}" for i in range(50)])
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None  # type: ignore[method-assign]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_download_fetches_shards_and_skips_those_it_has(shard_server, tmp_path: Path):
    served, url = shard_server
    dest = download("climbmix", 2, tmp_path / "climbmix", base_url=url)
    for index in range(2):
        name = f"shard_{index:05d}.parquet"
        assert (dest / name).read_bytes() == (served / name).read_bytes()
    (served / "shard_00000.parquet").unlink()
    download("climbmix", 2, dest, base_url=url)  # nothing to fetch again
    assert open_corpus(str(dest)).count == 100


def test_download_fails_clearly_on_a_missing_shard(shard_server, tmp_path: Path):
    _, url = shard_server
    with pytest.raises(RuntimeError, match="could not download .*shard_00002.parquet"):
        download("climbmix", 3, tmp_path / "dest", base_url=url)
    assert not list((tmp_path / "dest").glob("*.part"))
    with pytest.raises(ValueError, match="unknown dataset"):
        download("nope", 1)
