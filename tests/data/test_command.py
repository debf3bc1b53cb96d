"""`torchpeer data` / `python -m torchpeer.data`: the subcommand on its own parser."""

from __future__ import annotations

import argparse

import pytest

from tests.data.helpers import DOCS, write_jsonl
from torchpeer.data import (
    add_data_subcommand,
    run_data_subcommand,
)


def test_data_subcommand(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="torchpeer")
    add_data_subcommand(parser.add_subparsers(dest="command"))
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["data", "--help"])
    assert e.value.code == 0 and "Source specs" in capsys.readouterr().out
    write_jsonl(tmp_path / "t.jsonl", DOCS)
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
