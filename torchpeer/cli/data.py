"""``torchpeer data``: tokenise a config's train/valid splits into the cache and print a summary.

A subcommand like the others (cli/registry.py): it reads run configs (lm.config_io), so it lives
here and not in torchpeer.data, which the config modules themselves import.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from torchpeer.cli.common import parse_valid_args

DESCRIPTION = """\
Prepare (tokenise) the train and valid splits of a data config into memory-mapped token files
in the cache folder, then print one row per split: documents, tokens, UTF-8 bytes and
bytes/token. Files are reused while their inputs are unchanged, so running this before
`torchpeer train` only moves the tokenising out of the training run.

Source specs: ptb:train | ptb:valid | ptb:test | FILE.txt | FILE.jsonl[.xz|.gz] (a "text" field
per line) | DIR (all such files under it) | a glob pattern; join several with ",".

Tokenizers: byte | bpe (trained on the train split, vocab --vocab-size) | gpt2:DIR (vocab.json +
merges.txt) | hf:NAME (the local Hugging Face cache, else the hub).
"""

EXAMPLES = """\
examples:
  torchpeer data                                    # what `torchpeer train` reads by default (ptb-tiny)
  torchpeer data --config configs/ptb-tiny.toml     # the [data] table of a run config (or its name)
  torchpeer data --train 'corpus/*/train.jsonl.xz' --valid 'all=corpus/*/valid.jsonl.xz' \\
                 --tokenizer bpe --vocab-size 16384
"""


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="CONFIG",
        help="run config (TOML path or shipped name) or a run, checkpoint or export-hf folder (the config it was "
        "saved with); its [data] table is the starting point (default: ptb-tiny, the config `torchpeer train` "
        "runs when it names none, so both use the same token files)",
    )
    parser.add_argument("--train", metavar="SPEC", help="train source spec (default: the config's)")
    parser.add_argument(
        "--valid",
        metavar="[NAME=]SPEC",
        action="append",
        help="a validation source; repeat for several (replaces the config's valid table); without NAME= it "
        "is named after its source (ptb:test -> ptb_test, dir/valid.txt -> valid)",
    )
    parser.add_argument("--tokenizer", metavar="SPEC", help="byte | bpe | gpt2:DIR | hf:NAME (default: the config's)")
    parser.add_argument(
        "--vocab-size", type=int, metavar="N", help="vocabulary size of a bpe tokenizer (default: the config's)"
    )
    parser.add_argument("--cache-dir", metavar="DIR", help="where token files live (default: data_cache)")
    parser.add_argument(
        "--token-dtype",
        choices=["auto", "uint16", "uint32"],
        help="integer type of the token files (default: auto, uint16 when the vocabulary fits, else uint32)",
    )
    parser.add_argument("--force", action="store_true", help="re-tokenise even if the cache is fresh")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``data`` on an argparse subparsers object; the handler is ``run``."""
    from torchpeer.cli.common import HelpFormatter

    p = subparsers.add_parser(
        "data",
        help="tokenise the train/valid splits into the cache and summarise them",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=HelpFormatter,
    )
    add_data_arguments(p)
    p.set_defaults(func=run)
    return p


def data_config_from_args(args: argparse.Namespace):
    """DataConfig from --config's [data] table (default: ptb-tiny's, as train's) overridden by the flags.

    --config is a run config's path or a shipped config's name (``ptb-tiny``, ``configs/ptb-tiny.toml``),
    or a run, checkpoint or export-hf folder (or its config.json): the config it was saved with; the
    flags are applied as the ``--data.FIELD VALUE`` overrides of ``torchpeer train`` would be.
    """
    from torchpeer.data import DataConfig
    from torchpeer.lm.config import RunConfig, from_dict
    from torchpeer.lm.config_io import DEFAULT_CONFIG, apply_overrides, read_toml, resolve_config_path

    # no --config: the one `torchpeer train` runs without a name, so that `data` prepares its token files
    # (before, the bare DataConfig: PTB with the byte tokenizer, which no shipped config trains on)
    config = getattr(args, "config", None) or DEFAULT_CONFIG
    if os.path.isdir(config) or config.endswith(".json"):  # a run's saved config, as train reads it
        from torchpeer.cli.common import config_with_overrides

        run = RunConfig(data=config_with_overrides(config, []).data)
    else:
        table = read_toml(resolve_config_path(config)).get("data", {})
        run = RunConfig(data=from_dict(DataConfig, table))
    flags = {
        "train": args.train,
        "tokenizer": args.tokenizer,
        "vocab_size": args.vocab_size,
        "cache_dir": args.cache_dir,
        "token_dtype": args.token_dtype,
    }
    apply_overrides(run, [(f"data.{k}", str(v)) for k, v in flags.items() if v is not None])
    if args.valid:
        run.data.valid = parse_valid_args(args.valid)
    run.data.validate()
    return run.data


def format_table(rows: list[dict]) -> str:
    """Rows of {split, documents, tokens, bytes} -> aligned text table."""
    head = ["split", "documents", "tokens", "bytes", "bytes/token"]
    body = [
        [
            r["split"],
            f"{r['documents']:,}",
            f"{r['tokens']:,}",
            f"{r['bytes']:,}",
            f"{r['bytes'] / r['tokens']:.3f}",
        ]
        for r in rows
    ]
    widths = [max(len(str(c)) for c in col) for col in zip(head, *body)]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        for row in [head, *body]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Prepare every split of the config and print the table; returns the exit status (0)."""
    from torchpeer.data import load_tokenizer, prepare_split
    from torchpeer.data.sources import check_sources

    cfg = data_config_from_args(args)
    progress = not args.no_progress
    splits = [("train", cfg.train)] + [(f"valid/{k}", v) for k, v in cfg.valid.items()]
    # fail on a bad spec now, not after a long BPE training, naming the option (or config field) it came from
    where = {"--train" if args.train else "data.train": cfg.train}
    where.update({(f"--valid {k}" if args.valid else f"data.valid.{k}"): v for k, v in cfg.valid.items()})
    check_sources(where)
    t0 = time.time()
    tok = load_tokenizer(cfg, progress=progress)
    dt = time.time() - t0
    print(f"tokenizer {tok.name}: vocab {tok.vocab_size}, end-of-text id {tok.eot_id} ({dt:.1f} s)")
    rows = []
    for name, spec in splits:
        t1 = time.time()
        tf = prepare_split(cfg, spec, name, tokenizer=tok, progress=progress, force=args.force)
        rows.append(
            {
                "split": name,
                "documents": tf.n_documents,
                "tokens": len(tf),
                "bytes": tf.n_bytes,
                "file": tf.path,
            }
        )
        print(f"{name}: {spec} -> {tf.path} ({time.time() - t1:.1f} s)", file=sys.stderr)
    print(format_table(rows))
    return 0
