"""Tokenised splits on disk: ``<hash>.bin`` (flat token ids) + ``<hash>.json`` (header).

Layout of a token file: every document is preceded by the end-of-text id,

    eot d1[0] d1[1] ... eot d2[0] ... eot dn[0] ... dn[-1]

so a next-token model predicts every text token of every document (the first one given eot)
and, between documents, the end of the previous one. ``n_bytes`` (UTF-8 bytes of the
document texts, separators excluded) turns the summed loss into bits per byte.

``prepare_split`` tokenises once and reuses the file while the inputs (source files' size and
content hash, see ``sources.fingerprint``), the tokenizer and the dtype are unchanged.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time

import numpy as np
from tqdm.auto import tqdm

from .atomic import atomic_open, write_json_atomic
from .config import DataConfig
from .sources import fingerprint, iter_documents, resolve_source
from .tokenizer import Tokenizer, load_tokenizer

FORMAT_VERSION = 1
BATCH_CHARS = 4_000_000  # encode_batch this much text at once (parallel inside `tokenizers`)


def token_dtype(vocab_size: int, requested: str = "auto") -> np.dtype:
    """Token-file dtype: "auto" is uint16 for vocab_size <= 65535, else uint32; a forced one is checked."""
    if requested == "auto":
        return np.dtype(np.uint16 if vocab_size <= 65535 else np.uint32)
    dt = np.dtype(requested)
    if vocab_size - 1 > np.iinfo(dt).max:
        raise ValueError(
            f"a vocabulary of {vocab_size} tokens does not fit in {requested} token files (ids up to "
            f"{np.iinfo(dt).max}); set token_dtype = 'uint32' (or 'auto'), or use a smaller vocab_size"
        )
    return dt


class TokenFile:
    """A tokenised split: ``tokens`` is a read-only 1-D np.memmap of token ids.

    header: the JSON header (tokenizer, vocab_size, dtype, sources, n_tokens, n_documents,
    n_bytes, format_version, ...); n_bytes: UTF-8 bytes of the text; len(): number of tokens.
    """

    def __init__(self, bin_path: str, header: dict):
        self.path = bin_path
        self.header = header
        self.tokens = np.memmap(bin_path, dtype=np.dtype(header["dtype"]), mode="r", shape=(header["n_tokens"],))

    @classmethod
    def open(cls, path: str) -> TokenFile:
        """Open ``X.bin`` / ``X.json`` / ``X`` (the header sits next to the .bin). A damaged pair (a
        header that is not one, a size that disagrees with it, a token id outside the vocabulary)
        is one ValueError that names the file and says to prepare the split again."""
        base = os.path.splitext(path)[0] if path.endswith((".bin", ".json")) else path
        bin_path, json_path = base + ".bin", base + ".json"
        if not (os.path.exists(bin_path) and os.path.exists(json_path)):
            raise FileNotFoundError(
                f"token file {base}.bin/.json not found; create it with prepare_split or `torchpeer data`"
            )
        again = "delete it and prepare the split again"
        try:
            with open(json_path, encoding="utf-8") as fh:
                header = json.load(fh)
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{json_path}: not a token-file header ({e}); {again}") from None
        _check_header(json_path, header, again)
        expected = header["n_tokens"] * np.dtype(header["dtype"]).itemsize
        if os.path.getsize(bin_path) != expected:
            raise ValueError(
                f"{bin_path} has {os.path.getsize(bin_path)} bytes, its header says {expected}; "
                "delete it and prepare the split again"
            )
        tf = cls(bin_path, header)
        bad = _first_id_outside(tf.tokens, header["vocab_size"])
        if bad is not None:
            raise ValueError(
                f"{bin_path}: token id {int(tf.tokens[bad])} at position {bad:,} is outside the vocabulary "
                f"({header['vocab_size']} ids): the file is damaged; {again}"
            )
        return tf

    @property
    def n_bytes(self) -> int:
        return self.header["n_bytes"]

    @property
    def n_documents(self) -> int:
        return self.header["n_documents"]

    @property
    def vocab_size(self) -> int:
        return self.header["vocab_size"]

    def __len__(self) -> int:
        return self.header["n_tokens"]

    def __repr__(self) -> str:
        h = self.header
        return (
            f"TokenFile({self.path!r}, n_tokens={h['n_tokens']}, "
            f"n_documents={h['n_documents']}, tokenizer={h['tokenizer']!r})"
        )


_HEADER_INTS = ("n_tokens", "n_documents", "n_bytes", "vocab_size")


def _check_header(json_path: str, header, again: str) -> None:
    """ValueError unless ``header`` is a token-file header of this format: the fields the reader
    uses, with the types and ranges it relies on."""
    if not isinstance(header, dict):
        raise ValueError(f"{json_path}: not a token-file header (a JSON object); {again}")
    if header.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{json_path}: token-file format {header.get('format_version')!r}, expected {FORMAT_VERSION}; {again}"
        )
    for key in _HEADER_INTS:
        value = header.get(key)
        if type(value) is not int or value < 0:
            raise ValueError(f"{json_path}: header field {key!r} is {value!r}, not a count; {again}")
    if header.get("dtype") not in ("uint16", "uint32"):
        raise ValueError(f"{json_path}: header field 'dtype' is {header.get('dtype')!r}, not uint16/uint32; {again}")
    if not isinstance(header.get("tokenizer"), str):
        raise ValueError(f"{json_path}: header field 'tokenizer' is {header.get('tokenizer')!r}; {again}")


def _first_id_outside(tokens: np.ndarray, vocab_size: int, chunk: int = 1 << 24) -> int | None:
    """Position of the first token id >= vocab_size (None if all fit): one sequential pass over the
    file at memory speed, so that a damaged file is reported here and not as an index error deep
    inside the embedding (a device-side assert on CUDA)."""
    for start in range(0, len(tokens), chunk):
        part = np.asarray(tokens[start : start + chunk])
        if part.size and int(part.max()) >= vocab_size:
            return start + int(np.argmax(part >= vocab_size))
    return None


def _cache_key(source: str, tok: Tokenizer, dtype: np.dtype) -> str:
    """The token file's name: the source spec as written (not the resolved absolute paths, so a corpus
    copied under the same relative spec keeps its token files), the tokenizer and the dtype. Whether
    the file is fresh is the header's "sources" fingerprint (content), so an edited source replaces
    its file in place."""
    ident = [FORMAT_VERSION, source, tok.fingerprint, dtype.name]
    return hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:20]


def _fresh(base: str, header: dict) -> bool:
    """Does an existing token file at ``base`` match ``header``'s inputs?"""
    try:
        tf = TokenFile.open(base)
    except (FileNotFoundError, ValueError):  # missing or damaged: tokenise again
        return False
    keys = ("sources", "tokenizer_fingerprint", "dtype", "format_version")
    return all(tf.header.get(k) == header[k] for k in keys)


def prepare_split(
    cfg: DataConfig,
    source: str,
    split_name: str,
    tokenizer: Tokenizer | None = None,
    progress: bool = True,
    force: bool = False,
) -> TokenFile:
    """Tokenise ``source`` (a source spec) into ``cfg.cache_dir`` once; return the TokenFile.

    tokenizer: an already loaded tokenizer (default: ``load_tokenizer(cfg)``).
    progress: show a tqdm bar (on a terminal) while tokenising.
    force: re-tokenise even when the cached file is fresh.
    Raises FileNotFoundError for a missing source, ValueError for an empty corpus or a vocab
    that does not fit ``cfg.token_dtype``.
    """
    tok = tokenizer if tokenizer is not None else load_tokenizer(cfg, progress=progress)
    dtype = token_dtype(tok.vocab_size, cfg.token_dtype)
    files = resolve_source(source)
    sources = fingerprint(files)
    base = os.path.join(cfg.cache_dir, _cache_key(source, tok, dtype))
    header = {
        "format_version": FORMAT_VERSION,
        "split": split_name,
        "source": source,
        "sources": sources,
        "tokenizer": tok.name,
        "tokenizer_fingerprint": tok.fingerprint,
        "vocab_size": tok.vocab_size,
        "eot_id": tok.eot_id,
        "dtype": dtype.name,
    }
    if not force and _fresh(base, header):
        return TokenFile.open(base)

    t0 = time.time()
    n_tokens = n_docs = n_bytes = 0
    total = sum(f.disk_size for f in files)
    eot = np.array([tok.eot_id], dtype=dtype)
    with contextlib.suppress(FileNotFoundError):
        os.remove(base + ".json")  # a stale header must never describe the new .bin
    bar = tqdm(
        total=total, unit="B", unit_scale=True, desc=f"tokenising {split_name}", disable=None if progress else True
    )
    if progress and bar.disable:  # not a terminal: no bar, so one line says what is happening
        print(f"tokenising {split_name} ({source}, {total / 1e6:,.1f} MB) ...", flush=True)
    with bar, atomic_open(base + ".bin", "wb") as out:

        def flush(batch: list[str]) -> None:
            nonlocal n_tokens, n_docs, n_bytes
            for ids in tok.encode_batch(batch):
                eot.tofile(out)
                ids.astype(dtype, copy=False).tofile(out)
                n_tokens += 1 + len(ids)
            n_docs += len(batch)
            n_bytes += sum(len(d.encode("utf-8")) for d in batch)

        batch, chars = [], 0
        for doc in iter_documents(files, on_progress=bar.update):  # bar counts on-disk bytes
            batch.append(doc)
            chars += len(doc)
            if chars >= BATCH_CHARS:
                flush(batch)
                batch, chars = [], 0
        if batch:
            flush(batch)
        if n_docs == 0:
            raise ValueError(f"the {split_name} source {source!r} contains no text (no non-empty document)")
    header.update(n_tokens=n_tokens, n_documents=n_docs, n_bytes=n_bytes, tokenize_seconds=round(time.time() - t0, 3))
    write_json_atomic(base + ".json", header)
    return TokenFile.open(base)


def prepare_splits(
    cfg: DataConfig, tokenizer: Tokenizer, progress: bool = True
) -> tuple[TokenFile, dict[str, TokenFile]]:
    """The train split and every valid split of ``cfg`` (``prepare_split`` each): (train, {name: valid})."""
    train = prepare_split(cfg, cfg.train, "train", tokenizer=tokenizer, progress=progress)
    valid = {
        name: prepare_split(cfg, spec, f"valid/{name}", tokenizer=tokenizer, progress=progress)
        for name, spec in cfg.valid.items()
    }
    return train, valid
