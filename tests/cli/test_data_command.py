"""`torchpeer data` / `python -m torchpeer.data`: the subcommand on its own parser."""

from __future__ import annotations

import argparse
import os

import pytest

from tests.data.helpers import DOCS, corpus_text, write_jsonl
from torchpeer.cli import data as data_command


def test_data_subcommand(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="torchpeer")
    data_command.add_parser(parser.add_subparsers(dest="command"))
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["data", "--help"])
    assert e.value.code == 0 and "Source specs" in capsys.readouterr().out
    write_jsonl(tmp_path / "t.jsonl", DOCS)
    (tmp_path / "v.txt").write_text(DOCS[1], encoding="utf-8")
    (tmp_path / "run.toml").write_text(f'[data]\ntrain = "{tmp_path / "t.jsonl"}"\ncache_dir = "{tmp_path / "c"}"\n')
    args = parser.parse_args(
        ["data", "--config", str(tmp_path / "run.toml"), "--valid", f"v={tmp_path / 'v.txt'}", "--no-progress"]
    )
    assert args.func(args) == 0 and data_command.run is args.func
    out = capsys.readouterr().out
    nbytes = sum(len(d.encode()) for d in DOCS)
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[3:]}
    assert rows["train"][:3] == ["4", f"{nbytes + 4:,}", f"{nbytes:,}"]
    assert rows["valid/v"][:3] == ["1", f"{len(DOCS[1].encode()) + 1:,}", f"{len(DOCS[1].encode()):,}"]


def test_piped_run_says_what_it_is_doing_without_blank_lines(tmp_path):
    """Off a terminal the tokenizer trainer's bars would print blank lines: one line says what happens."""
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    (tmp_path / "t.txt").write_text("\n".join(corpus_text(300)), encoding="utf-8")
    train = str(tmp_path / "t.txt")
    cmd = [sys.executable, "-m", "torchpeer.cli", "data", "--train", train, "--valid", f"v={train}"]
    cmd += ["--tokenizer", "bpe", "--vocab-size", "300", "--cache-dir", str(tmp_path / "c")]
    env = {**os.environ, "PYTHONPATH": repo, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    lines = (res.stderr + res.stdout).splitlines()
    assert "" not in [line.strip() for line in lines], lines
    assert any(line.startswith("training a BPE tokenizer (vocab 300) on ") for line in lines)
    assert any(line.startswith("tokenising train (") for line in lines)


def test_python_m_torchpeer_data_runs_the_same_subcommand():
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": repo, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "torchpeer.data", "--help"], capture_output=True, text=True, env=env)
    assert res.returncode == 0 and "Source specs" in res.stdout and "usage: torchpeer data" in res.stdout
    res = subprocess.run(
        [sys.executable, "-m", "torchpeer.data", "--train", "/nonexistent/x.txt"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2 and res.stderr.startswith("error: ") and "Traceback" not in res.stderr


def test_an_unnamed_valid_set_is_named_after_its_source():
    """`--valid ptb:test` was listed as "valid/valid": the name now says which set it is."""
    parse = data_command.parse_valid_args
    assert parse(["ptb:test", "ptb:valid"]) == {"ptb_test": "ptb:test", "ptb": "ptb:valid"}
    assert parse(["corpus/*/valid.jsonl.xz", "other/valid.txt", "mine=x.txt"]) == {
        "valid": "corpus/*/valid.jsonl.xz",
        "valid2": "other/valid.txt",
        "mine": "x.txt",
    }
    assert parse(["data/held out.txt"]) == {"held_out": "data/held out.txt"}
    with pytest.raises(ValueError, match="--valid name 'mine' is given twice"):
        parse(["mine=a.txt", "mine=b.txt"])


def test_a_valid_set_with_an_empty_name_or_source_says_the_form(capsys):
    """`--valid =ptb:test` was taken as the source '=ptb:test' ("does not exist"), and `--valid mine=`
    failed later as an empty spec: one error that names the empty side and the NAME=SOURCE form."""
    from torchpeer.cli import main

    form = "; give NAME=SOURCE with both, e.g. test=ptb:test, or the source alone (ptb:test, named ptb_test)"
    parse = data_command.parse_valid_args
    for item, empty in (
        ("=ptb:test", "the name before '=' is"),
        (" = ptb:test", "the name before '=' is"),
        ("mine=", "the source after '=' is"),
        ("mine= ", "the source after '=' is"),
        ("=", "the name and the source around '=' are"),
    ):
        with pytest.raises(ValueError) as e:
            parse([item])
        assert str(e.value) == f"--valid {item!r}: {empty} empty{form}"
    assert parse(["dir/a=b.txt"]) == {"a_b": "dir/a=b.txt"}  # a path holding '=' is still a source
    assert main(["data", "--valid", "=ptb:test", "--no-progress"]) == 2  # the CLI's error path: one line
    assert capsys.readouterr().err == f"error: --valid '=ptb:test': the name before '=' is empty{form}\n"


def test_a_missing_source_names_the_option_it_came_from(tmp_path, capsys):
    """One error line that starts with the option (or config field) of the missing source, as in
    torchpeer train / eval; before, only 'source ... does not exist'."""
    from torchpeer.cli import main

    (tmp_path / "t.txt").write_text("\n".join(corpus_text(50)), encoding="utf-8")
    cache = ["--cache-dir", str(tmp_path / "c"), "--no-progress"]
    cases = [
        (["--train", str(tmp_path / "nope.txt")], "error: --train: source "),
        (["--train", str(tmp_path / "t.txt"), "--valid", f"v={tmp_path / 'nope.txt'}"], "error: --valid v: source "),
        (["--train", str(tmp_path / "t.txt"), "--valid", "ptb:tset"], "error: --valid ptb_tset: unknown Penn "),
    ]
    for argv, start in cases:
        assert main(["data", *argv, *cache]) == 2
        err = capsys.readouterr().err
        assert err.startswith(start) and err.count("\n") == 1, err
    (tmp_path / "run.toml").write_text(f'[data]\ntrain = "{tmp_path / "gone.txt"}"\n')
    assert main(["data", "--config", str(tmp_path / "run.toml"), *cache]) == 2
    assert capsys.readouterr().err.startswith("error: data.train: source ")
    assert not (tmp_path / "c").exists()  # nothing tokenised


def test_config_takes_a_run_folder_as_train_and_info_do(tmp_path, capsys):
    """`torchpeer data --config runs/x` said "config 'runs/x' is neither a file nor a shipped config"
    of a run folder that train and info read; now its saved [data] table is the starting point (also
    its config.json), and a folder without a config says so."""
    import json

    from torchpeer.cli import main
    from torchpeer.lm.config import RunConfig

    write_jsonl(tmp_path / "t.jsonl", DOCS)
    (tmp_path / "v.txt").write_text(DOCS[1], encoding="utf-8")
    cfg = RunConfig()
    cfg.data.train, cfg.data.valid = str(tmp_path / "t.jsonl"), {"mine": str(tmp_path / "v.txt")}
    cfg.data.cache_dir = str(tmp_path / "c")
    cfg.train.max_steps = 10
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "config.json").write_text(json.dumps(cfg.to_dict()))
    for config in (tmp_path / "run", tmp_path / "run" / "config.json"):
        assert main(["data", "--config", str(config), "--no-progress"]) == 0
        rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()[3:]}
        assert set(rows) == {"train", "valid/mine"} and rows["train"][0] == "4"
    (tmp_path / "empty").mkdir()
    assert main(["data", "--config", str(tmp_path / "empty")]) == 2
    assert "empty is a folder without config.json: not a run, checkpoint" in capsys.readouterr().err


def test_without_config_it_prepares_what_train_reads_by_default():
    """`torchpeer data` alone prepared PTB with the byte tokenizer, which `torchpeer train` (ptb-tiny, BPE
    4096) never reads: the first training run tokenised everything again. Now both start from ptb-tiny."""
    from torchpeer.lm.config_io import DEFAULT_CONFIG, load_config

    parser = argparse.ArgumentParser(prog="torchpeer")
    data_command.add_parser(parser.add_subparsers(dest="command"))
    want = load_config(DEFAULT_CONFIG).data
    got = data_command.data_config_from_args(parser.parse_args(["data"]))
    assert got == want and (got.tokenizer, got.vocab_size) == ("bpe", 4096)
    # a flag overrides that starting point as `torchpeer train --data.tokenizer byte` would
    got = data_command.data_config_from_args(parser.parse_args(["data", "--tokenizer", "byte"]))
    assert got.tokenizer == "byte" and got.train == want.train and got.valid == want.valid
