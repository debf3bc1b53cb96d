"""Data pipeline: corpora -> tokenizer -> memory-mapped token files -> (x, y) windows.

Public API::

    from torchpeer.data import (DataConfig, load_tokenizer, prepare_split, TokenFile,
                                RandomWindows, sequential_windows)

    cfg = DataConfig(train="ptb:train", valid={"ptb": "ptb:valid"}, tokenizer="byte")
    tok = load_tokenizer(cfg)                        # .encode/.decode/.vocab_size/.eot_id/.name/.save
    train = prepare_split(cfg, cfg.train, "train")   # TokenFile: .tokens (np.memmap), .header, .n_bytes
    for x, y in RandomWindows(train, batch_size=32, seq_len=256, seed=0):  # (32, 256) int64 each
        ...
    for x, y in sequential_windows(valid, 32, 256): ...   # one ordered pass, every target once

``DataConfig`` (config.py): train / valid source specs, tokenizer spec, vocab_size, cache_dir,
token_dtype ("auto" | "uint16" | "uint32"); ``to_dict()`` / ``from_dict()`` (TOML [data] table).

Source specs (sources.py): ``ptb:train|valid|test``, a ``.txt`` file (one document), a
``.jsonl`` / ``.jsonl.xz`` / ``.jsonl.gz`` file (one document per line, field "text"), a
directory (every such file under it, sorted), a glob pattern, or several joined with ",".
``resolve_source(spec) -> list[SourceFile]``, ``iter_documents(files)``, ``load_ptb(split)``.

Tokenizers (tokenizer.py): ``load_tokenizer(cfg, progress=True)``; ``ByteTokenizer`` (vocab
257, eot 256), ``HFTokenizer`` ("bpe" trained on cfg.train with ``tokenizers`` and cached
under cache_dir/tokenizers/, "gpt2:DIR", "hf:NAME"); ``tok.encode_batch(texts) ->
list[np.ndarray]``; ``tok.save(dir)`` / ``load_saved_tokenizer(dir)``; ``tok.fingerprint``.

Token files (token_file.py): ``prepare_split(cfg, source, split_name, tokenizer=None,
progress=True, force=False) -> TokenFile`` writes cache_dir/<hash>.bin + <hash>.json once
and reuses them while the inputs are unchanged. Each document is *preceded* by eot, so
tokens[1:] are every text token plus the boundaries. ``header["n_bytes"]`` (UTF-8 bytes of
the text) gives bits per byte = sum of losses (nats) over tokens[1:] / (n_bytes * ln 2).
``TokenFile.open(path)``, ``token_dtype(vocab_size, requested)``.

Windows (windows.py): ``RandomWindows(tokens, batch_size, seq_len, seed=0, rank=0,
world_size=1)`` with ``state_dict()`` / ``load_state_dict()``; ``sequential_windows(tokens,
batch_size, seq_len, max_batches=None, pad=False)``, ``num_sequential_batches(...)``,
``IGNORE_INDEX`` (-100, padded targets when pad=True).

The ``torchpeer data`` subcommand is torchpeer/cli/data.py (it reads run configs, which import
this package); ``python -m torchpeer.data`` runs it too.
"""

from .config import DataConfig
from .sources import SourceFile, iter_documents, load_ptb, resolve_source
from .token_file import TokenFile, prepare_split, prepare_splits, token_dtype
from .tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    Tokenizer,
    expected_vocab_size,
    load_saved_tokenizer,
    load_tokenizer,
    train_bpe,
)
from .windows import IGNORE_INDEX, RandomWindows, num_sequential_batches, sequential_windows

__all__ = [
    "IGNORE_INDEX",
    "ByteTokenizer",
    "DataConfig",
    "HFTokenizer",
    "RandomWindows",
    "SourceFile",
    "TokenFile",
    "Tokenizer",
    "expected_vocab_size",
    "iter_documents",
    "load_ptb",
    "load_saved_tokenizer",
    "load_tokenizer",
    "num_sequential_batches",
    "prepare_split",
    "prepare_splits",
    "resolve_source",
    "sequential_windows",
    "token_dtype",
    "train_bpe",
]
