"""``torchpeer data``: tokenise a config's train/valid splits into the cache (torchpeer/data/command.py)."""

from __future__ import annotations


def add_parser(subparsers):
    from torchpeer.data.command import add_data_subcommand

    p = add_data_subcommand(subparsers)
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from torchpeer.data import run_data_subcommand

    return run_data_subcommand(args)
