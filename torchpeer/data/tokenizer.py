"""Tokenizers: byte-level (vocab 257) and Hugging Face ``tokenizers`` BPE (trained, local or hub).

Every tokenizer has ``encode(str) -> list[int]``, ``decode(list[int]) -> str``,
``encode_batch(list[str]) -> list[np.ndarray]`` (fast path for corpora), ``vocab_size``,
``eot_id`` (end-of-text, the document separator), ``name``, ``fingerprint`` (changes when
the token mapping changes; keys the token cache) and ``save(dir)`` (reload with
``load_saved_tokenizer(dir)``). Text containing the literal string "<|endoftext|>" is encoded
as ordinary text: only the data pipeline inserts ``eot_id``.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import socket
import sys
import time
import urllib.parse

import numpy as np

from .atomic import write_json_atomic, write_text_atomic
from .config import DataConfig, check_tokenizer_spec

EOT_TEXT = "<|endoftext|>"
# Names under which hub tokenizers spell their end-of-text / end-of-sequence token.
EOT_CANDIDATES = (EOT_TEXT, "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[SEP]")
META_FILE = "torchpeer_tokenizer.json"


class ByteTokenizer:
    """UTF-8 bytes 0..255 plus end-of-text 256: vocab 257, exact round trip of any text."""

    name = "byte"
    vocab_size = 257
    eot_id = 256
    fingerprint = "byte-v1"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]

    def decode(self, ids) -> str:
        """Bytes -> text; eot decodes as "<|endoftext|>", invalid UTF-8 (sampled text) as U+FFFD."""
        out, run = [], bytearray()
        for i in ids:
            i = int(i)
            if i == self.eot_id:
                out.append(run.decode("utf-8", errors="replace") + EOT_TEXT)
                run = bytearray()
            elif 0 <= i < 256:
                run.append(i)
            else:
                raise ValueError(f"token id {i} is outside the byte tokenizer's vocabulary (0..256)")
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)

    def save(self, directory: str) -> None:
        write_json_atomic(os.path.join(directory, META_FILE), {"type": "byte", "name": self.name})

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=257, eot_id=256)"


class HFTokenizer:
    """A Hugging Face ``tokenizers.Tokenizer`` with a known end-of-text id."""

    def __init__(self, tok, name: str, eot_text: str | None = None):
        self.tok = tok
        self.name = name
        if hasattr(tok, "encode_special_tokens"):
            tok.encode_special_tokens = True  # "<|endoftext|>" inside a document stays text
        vocab = tok.get_vocab(with_added_tokens=True)
        if eot_text is None:
            eot_text = next((t for t in EOT_CANDIDATES if t in vocab), None)
        if eot_text is None or eot_text not in vocab:
            raise ValueError(
                f"tokenizer {name!r} has no end-of-text token (looked for {', '.join(EOT_CANDIDATES)}); "
                "documents must be separated by one: use a tokenizer that has '<|endoftext|>'"
            )
        self.eot_text = eot_text
        self.eot_id = vocab[eot_text]
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.fingerprint = hashlib.sha256(tok.to_str().encode("utf-8")).hexdigest()[:16]

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        # encode_batch_fast skips offset tracking; both run in parallel across texts
        fn = getattr(self.tok, "encode_batch_fast", self.tok.encode_batch)
        return [np.asarray(e.ids, dtype=np.uint32) for e in fn(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, directory: str) -> None:
        write_text_atomic(os.path.join(directory, "tokenizer.json"), self.tok.to_str())
        write_json_atomic(
            os.path.join(directory, META_FILE), {"type": "hf", "name": self.name, "eot_text": self.eot_text}
        )

    def __repr__(self) -> str:
        return f"HFTokenizer({self.name!r}, vocab_size={self.vocab_size}, eot_id={self.eot_id})"


Tokenizer = ByteTokenizer | HFTokenizer


def load_saved_tokenizer(directory: str) -> Tokenizer:
    """Reload a tokenizer written by ``tokenizer.save(directory)``."""
    meta_path = os.path.join(directory, META_FILE)
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"{meta_path} not found: {directory!r} holds no saved torchpeer tokenizer")
    with open(meta_path, encoding="utf-8") as fh:
        meta = json.load(fh)
    if meta["type"] == "byte":
        return ByteTokenizer()
    from tokenizers import Tokenizer as HFTok

    return HFTokenizer(HFTok.from_file(os.path.join(directory, "tokenizer.json")), meta["name"], meta["eot_text"])


# ---------------------------------------------------------------------------------------------
# BPE trained on the train split


def _byte_level_bpe(model):
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, pre_tokenizers

    tok = HFTok(model)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_bpe(documents, vocab_size: int, progress: bool = True):
    """Train a byte-level BPE (``tokenizers``) on an iterable of documents; returns the HF Tokenizer.

    The 256 byte symbols are always in the vocabulary (any text can be encoded), "<|endoftext|>"
    is a special token, merges need a pair frequency >= 2. progress: the trainer's own bars on a
    terminal (off a terminal they print blank lines, so the caller says what is happening instead).
    """
    from tokenizers import models, pre_tokenizers, trainers

    tok = _byte_level_bpe(models.BPE())
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOT_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress and sys.stderr.isatty(),
    )
    tok.train_from_iterator(documents, trainer)
    return tok


def _bpe_dir(cfg: DataConfig) -> str:
    key = hashlib.sha256(json.dumps([cfg.train, cfg.vocab_size, "bpe-v1"]).encode()).hexdigest()[:16]
    return os.path.join(cfg.cache_dir, "tokenizers", f"bpe-{cfg.vocab_size}-{key}")


def _load_or_train_bpe(cfg: DataConfig, progress: bool) -> HFTokenizer:
    from tokenizers import Tokenizer as HFTok

    from .sources import fingerprint, iter_documents, resolve_source

    files = resolve_source(cfg.train)
    fp = fingerprint(files)
    folder = _bpe_dir(cfg)
    name = f"bpe-{cfg.vocab_size}"
    meta_path, tok_path = os.path.join(folder, "train_meta.json"), os.path.join(folder, "tokenizer.json")
    if os.path.exists(meta_path) and os.path.exists(tok_path):
        with open(meta_path, encoding="utf-8") as fh:
            if json.load(fh).get("sources") == fp:
                return HFTokenizer(HFTok.from_file(tok_path), name, EOT_TEXT)
    t0 = time.time()
    n_docs = 0

    def docs():
        nonlocal n_docs
        for d in iter_documents(files):
            n_docs += 1
            yield d

    if progress:
        print(f"training a BPE tokenizer (vocab {cfg.vocab_size}) on {cfg.train} ...", flush=True)
    tok = train_bpe(docs(), cfg.vocab_size, progress=progress)
    if progress:
        docs_text = f"{n_docs:,} document{'' if n_docs == 1 else 's'}"
        print(f"trained {name} on {docs_text} in {time.time() - t0:.1f} s", flush=True)
    if n_docs == 0:
        raise ValueError(f"the train source {cfg.train!r} contains no text: cannot train a BPE tokenizer on it")
    write_text_atomic(tok_path, tok.to_str())
    write_json_atomic(
        meta_path,
        {"train": cfg.train, "vocab_size": cfg.vocab_size, "sources": fp, "train_seconds": time.time() - t0},
    )
    return HFTokenizer(tok, name, EOT_TEXT)


# ---------------------------------------------------------------------------------------------
# local GPT-2 files and the hub


def _load_local_dir(directory: str, name: str) -> HFTokenizer:
    from tokenizers import Tokenizer as HFTok
    from tokenizers import models

    if os.path.exists(os.path.join(directory, "tokenizer.json")):
        return HFTokenizer(HFTok.from_file(os.path.join(directory, "tokenizer.json")), name)
    vocab, merges = os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt")
    if not (os.path.exists(vocab) and os.path.exists(merges)):
        raise FileNotFoundError(
            f"tokenizer {name!r}: {directory!r} must hold vocab.json + merges.txt (GPT-2 style) or a tokenizer.json"
        )
    tok = _byte_level_bpe(models.BPE.from_file(vocab, merges))
    if tok.token_to_id(EOT_TEXT) is not None:
        tok.add_special_tokens([EOT_TEXT])  # already in the vocab: marks it special, keeps its id
    return HFTokenizer(tok, name)


def _hub_cache_file(repo: str) -> str | None:
    """tokenizer.json of ``repo`` in the local Hugging Face hub cache, if any."""
    hub = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface"), "hub"
    )
    pattern = os.path.join(hub, "models--" + repo.replace("/", "--"), "snapshots", "*", "tokenizer.json")
    found = sorted(glob.glob(pattern), key=os.path.getmtime)
    return found[-1] if found else None


def _load_hub(repo: str, name: str) -> HFTokenizer:
    from tokenizers import Tokenizer as HFTok

    if os.path.isdir(repo):
        return _load_local_dir(repo, name)
    cached = _hub_cache_file(repo)
    if cached:
        return HFTokenizer(HFTok.from_file(cached), name)
    hint = "use tokenizer = 'gpt2:DIR' with a local vocab.json + merges.txt, or 'bpe' / 'byte'"
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise ValueError(f"tokenizer {name!r}: not in the local Hugging Face cache and HF_HUB_OFFLINE is set; {hint}")
    # Probe the hub first: without a network the hub client retries for ~30 s, logging each try.
    url = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError as e:
        raise ValueError(f"tokenizer {name!r}: cannot reach the Hugging Face hub at {host} ({e}); {hint}") from None
    try:
        tok = HFTok.from_pretrained(repo)
    except Exception as e:  # the hub client raises many types (network, 404, auth)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"tokenizer {name!r}: could not fetch it from the Hugging Face hub ({msg}); offline? {hint}"
        ) from None
    return HFTokenizer(tok, name)


def expected_vocab_size(cfg: DataConfig, progress: bool = True) -> int:
    """The vocabulary ``load_tokenizer(cfg)`` gives, without training a BPE: 257 for bytes, the target
    size for "bpe"; a named tokenizer (gpt2:DIR, hf:REPO) is loaded to read it."""
    if cfg.tokenizer == "byte":
        return ByteTokenizer.vocab_size
    if cfg.tokenizer == "bpe":
        return cfg.vocab_size
    return load_tokenizer(cfg, progress).vocab_size


def load_tokenizer(cfg: DataConfig, progress: bool = True) -> Tokenizer:
    """The tokenizer of ``cfg.tokenizer``; a "bpe" one is trained on ``cfg.train`` once and cached."""
    spec = cfg.tokenizer
    check_tokenizer_spec(spec)
    if spec == "byte":
        return ByteTokenizer()
    if spec == "bpe":
        return _load_or_train_bpe(cfg, progress)
    kind, _, arg = spec.partition(":")
    if kind == "gpt2":
        path = os.path.expanduser(arg)
        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"tokenizer {spec!r}: {arg!r} is not a directory (it must hold vocab.json + merges.txt)"
            )
        return _load_local_dir(path, spec)
    return _load_hub(arg, spec)
