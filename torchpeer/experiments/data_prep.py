"""The data of a sweep, prepared once before its runs: the tokenizer and every split's token file.

Runs of one sweep share their data config, so tokenising in the sweep's own process first means
parallel workers (``--parallel``) never tokenise the same split at once, and every run knows how
many tokens one pass over the train split is (the ``epochs`` column of the plan and the report).
"""

from __future__ import annotations

import json
import os


def prepare_data(data_cfg, progress: bool = False) -> int:
    """Tokenise (if not cached) the train split and every valid split; returns the train split's tokens."""
    from torchpeer.data import load_tokenizer, prepare_splits

    train, _ = prepare_splits(data_cfg, load_tokenizer(data_cfg, progress=progress), progress=progress)
    return int(train.header["n_tokens"])


def cached_train_tokens(data_cfg) -> int | None:
    """Tokens of the train split when a fresh token file of it is already in the cache, else None.

    Reads only the cache's JSON headers (no tokenizer training, no tokenising), so ``--dry-run``
    stays instant: a header matches when its source spec, tokenizer name and source files'
    fingerprint (sizes and content hashes: torchpeer.data.sources.fingerprint) are this config's.
    """
    from torchpeer.data.sources import fingerprint, resolve_source

    folder = data_cfg.cache_dir
    if not os.path.isdir(folder):
        return None
    want_tok = "byte" if data_cfg.tokenizer == "byte" else None
    if data_cfg.tokenizer == "bpe":
        want_tok = f"bpe-{data_cfg.vocab_size}"
    try:
        sources = fingerprint(resolve_source(data_cfg.train))
    except (FileNotFoundError, ValueError):
        return None
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".json"):
            continue
        try:
            with open(os.path.join(folder, name), encoding="utf-8") as fh:
                header = json.load(fh)
        except (OSError, ValueError):
            continue
        if (
            isinstance(header, dict)
            and header.get("split") == "train"
            and header.get("source") == data_cfg.train
            and (want_tok is None or header.get("tokenizer") == want_tok)
            and header.get("sources") == sources
            and os.path.exists(os.path.join(folder, name[: -len(".json")] + ".bin"))
        ):
            return int(header["n_tokens"])
    return None
