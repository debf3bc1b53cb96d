"""Shared inputs of the torchpeer.data tests."""

from __future__ import annotations

import json

import numpy as np

from torchpeer.data import ByteTokenizer

TRICKY = "naïve café — 日本語 🙂 tabs\tand\r\nCRLF  double  spaces\n\n<|endoftext|> literal\x00nul"

DOCS = [
    "The quick brown fox jumps over the lazy dog.\nA second line.",
    "Ünïcödé döcument with emoji 🙂 and CJK 文字.",
    "short",
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor. " * 5,
]


def corpus_text(n: int = 200) -> list[str]:
    rng = np.random.default_rng(0)
    words = "the of and to in is was for that with as on by at from his her they this be".split()
    return [" ".join(rng.choice(words, size=rng.integers(20, 80))) + ".\n" for _ in range(n)]


def write_jsonl(path, docs, opener=open):
    with opener(path, "wt", encoding="utf-8") as fh:
        for d in docs:
            fh.write(json.dumps({"text": d}) + "\n")


def split_docs(tokens, tok) -> list[str]:
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
