"""Tokenizers: byte, BPE trained locally (cache, save/load), gpt2:DIR, bad specs."""

from __future__ import annotations

import os
import socket

import pytest

from tests.data.helpers import DOCS, TRICKY, corpus_text
from torchpeer.data import (
    ByteTokenizer,
    DataConfig,
    expected_vocab_size,
    load_saved_tokenizer,
    load_tokenizer,
)


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
    src.write_text("".join(corpus_text()) + TRICKY, encoding="utf-8")
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
    src.write_text("".join(corpus_text()[:100]), encoding="utf-8")
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
    src.write_text("".join(corpus_text()), encoding="utf-8")
    bpe = load_tokenizer(DataConfig(train=str(src), tokenizer="bpe", vocab_size=300, cache_dir=str(tmp_path)))
    gdir = tmp_path / "gpt2"
    gdir.mkdir()
    bpe.tok.model.save(str(gdir))  # writes vocab.json + merges.txt, like GPT-2's files
    tok = load_tokenizer(DataConfig(tokenizer=f"gpt2:{gdir}"))
    assert tok.eot_id == bpe.eot_id and tok.vocab_size == bpe.vocab_size
    # what planning, `torchpeer info` and the dry run take without training a BPE: the loaded sizes
    bpe_cfg = DataConfig(train=str(src), tokenizer="bpe", vocab_size=300, cache_dir=str(tmp_path))
    assert expected_vocab_size(bpe_cfg) == bpe.vocab_size == 300
    assert expected_vocab_size(DataConfig(tokenizer=f"gpt2:{gdir}")) == tok.vocab_size
    assert expected_vocab_size(DataConfig(tokenizer="byte")) == load_tokenizer(DataConfig(tokenizer="byte")).vocab_size
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
