"""`torchpeer` command line: the subcommand registry, --help of every subcommand, info, and one-line
errors (exit status 2) for bad input."""

import importlib
import json
import os

import pytest

from torchpeer.cli import main
from torchpeer.cli.registry import COMMANDS
from torchpeer.lm.config_io import list_configs, load_config

SUBCOMMANDS = ["train", "eval", "generate", "info", "data"]


def test_registry_modules_define_add_parser_and_run():
    for name in COMMANDS:
        module = importlib.import_module(name)
        assert callable(module.add_parser) and callable(module.run), name
    assert COMMANDS[:5] == [f"torchpeer.cli.{c}" for c in SUBCOMMANDS]


@pytest.mark.parametrize("cmd", SUBCOMMANDS)
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: torchpeer {cmd}")


def test_top_level_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(c in out for c in SUBCOMMANDS)


def test_shipped_configs_load_and_ptb_tiny_is_default():
    names = list_configs()
    assert "ptb-tiny" in names
    for name in names:
        cfg = load_config(name)
        assert cfg.name == name
        if cfg.model.ffw == "peer" and name.startswith("gpu"):
            assert cfg.model.peer.n_experts == 1024**2


def test_info_table_and_json(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("config ptb-tiny") and "block 2" in out and "peer" in out
    assert main(["info", "ptb-tiny", "--json", "--model.ffw", "dense", "--model.n_layers", "2"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert [p["kind"] for p in d["parts"]] == ["lookup", "dense", "dense", "unembed"]
    assert d["train_flops_per_token"] == 3 * sum(p["forward_flops"] for p in d["parts"])


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err
    assert err.startswith("error: ") and err.count("\n") == 1, err  # exactly one line
    assert "Traceback" not in err + captured.out
    return err


def _toml(tmp_path, data_lines: str, extra: str = "") -> str:
    path = tmp_path / "c.toml"
    path.write_text(
        '[model]\nd_model = 32\nn_layers = 2\nn_heads = 2\nseq_len = 16\nffw = "dense"\n'
        '[train]\ndevice = "cpu"\nmax_steps = 2\nbatch_size = 2\ntensorboard = false\n'
        f'{extra}\n[data]\ncache_dir = "{tmp_path}/cache"\n{data_lines}\n'
    )
    return str(path)


def test_error_missing_config(capsys, tmp_path):
    err = _error(capsys, ["train", str(tmp_path / "nope.toml")])
    assert "neither a file nor a shipped config" in err and "ptb-tiny" in err


def test_error_missing_data_file(capsys, tmp_path):
    cfg = _toml(tmp_path, f'train = "{tmp_path}/missing.txt"\nvalid = {{}}')
    err = _error(capsys, ["train", cfg, "--run-dir", str(tmp_path / "run")])
    assert "missing.txt" in err and "does not exist" in err
    assert not os.path.exists(tmp_path / "run")


def test_error_empty_corpus(capsys, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    cfg = _toml(tmp_path, f'train = "{tmp_path}/empty.txt"\nvalid = {{}}')
    err = _error(capsys, ["train", cfg, "--run-dir", str(tmp_path / "run")])
    assert "contains no text" in err


def test_error_unknown_ffw_kind(capsys):
    err = _error(capsys, ["train", "--model.ffw", "mlp"])
    assert "unknown FFW kind model.ffw='mlp'" in err and "peer" in err
    _error(capsys, ["info", "--model.ffw", "mlp"])


def test_rowwise_adam_without_the_triton_kernels_is_refused_before_the_data(capsys, tmp_path, monkeypatch):
    """The fused row-wise Adam needs the Triton kernels: on a CPU without the interpreter, one error that
    names the setting and the way out, before any tokenizer is trained or folder written."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    run_dir = tmp_path / "run"
    for opt in ("rowwise_adam", "rowwise_adam_bf16", "elementwise_adam_bf16"):
        args = ["train", "--train.expert_optimizer", opt, "--train.device", "cpu", "--run-dir", str(run_dir)]
        err = _error(capsys, [*args, "--data.cache_dir", str(tmp_path / "cache")])
        assert f"train.expert_optimizer={opt}" in err and "need a CUDA GPU" in err and "adamw" in err
    assert not run_dir.exists() and not (tmp_path / "cache").exists()


def test_error_unknown_field_and_bad_value(capsys):
    assert "model.d_model" in _error(capsys, ["info", "--model.d_modle", "3"])
    assert "cannot parse" in _error(capsys, ["info", "--train.lr", "fast"])
    assert "unknown config field 'data.nope'" in _error(capsys, ["info", "--data.nope", "3"])


def test_error_vocab_larger_than_token_dtype(capsys, tmp_path):
    from tokenizers import Tokenizer, models

    vocab = {"<|endoftext|>": 0, "<unk>": 1, **{f"w{i}": i + 2 for i in range(70_000)}}
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    Tokenizer(models.WordLevel(vocab, unk_token="<unk>")).save(str(tok_dir / "tokenizer.json"))
    (tmp_path / "t.txt").write_text("w1 w2 w3")
    cfg = _toml(
        tmp_path, f'train = "{tmp_path}/t.txt"\nvalid = {{}}\ntokenizer = "gpt2:{tok_dir}"\ntoken_dtype = "uint16"'
    )
    err = _error(capsys, ["train", cfg, "--run-dir", str(tmp_path / "run")])
    assert "does not fit in uint16" in err


def test_error_model_vocab_smaller_than_tokenizer(capsys, tmp_path):
    (tmp_path / "t.txt").write_text("hello world")
    cfg = _toml(tmp_path, f'train = "{tmp_path}/t.txt"\nvalid = {{}}')
    err = _error(capsys, ["train", cfg, "--model.vocab_size", "100", "--run-dir", str(tmp_path / "r")])
    assert "model.vocab_size=100 is smaller" in err


def test_error_missing_checkpoint(capsys, tmp_path):
    assert "does not exist" in _error(capsys, ["eval", str(tmp_path / "nope")])
    assert "does not exist" in _error(capsys, ["generate", str(tmp_path / "nope")])
    os.makedirs(tmp_path / "emptyrun")
    assert "no" in _error(capsys, ["generate", str(tmp_path / "emptyrun")])
    (tmp_path / "model.safetensors").write_bytes(b"x")  # a file of a checkpoint, not its folder
    for cmd in ("eval", "generate"):
        err = _error(capsys, [cmd, str(tmp_path / "model.safetensors")])
        assert "model.safetensors' is a file; give its folder (RUN_DIR/checkpoints/step_<N>) or the run folder" in err


@pytest.mark.parametrize(
    "argv, fix",
    [
        (["eval", "x", "--model.d_model", "3"], "torchpeer eval --help lists its options"),
        (["eval", "x", "--train.eval_batch_size", "8"], "did you mean --batch-size 8?"),
        (["eval", "x", "--data.valid.t", "ptb:test"], "did you mean --data t=ptb:test?"),
        (["data", "--data.train", "a.txt"], "did you mean --train a.txt?"),
        (["data", "--data.valid.mine", "v.txt"], "did you mean --valid mine=v.txt?"),
        (["generate", "x", "--train.device", "cpu"], "did you mean --device cpu?"),
        (
            ["sweep", "cpu-smoke", "--train.lr", "1e-3"],
            'a sweep\'s runs take their fields from its spec: add "train.lr" = 0.001 to the [base] table of a '
            "copy of torchpeer/experiments/specs/cpu-smoke.toml",
        ),
    ],
)
def test_overrides_given_to_a_command_without_them_say_where_the_value_goes(capsys, argv, fix):
    """`torchpeer sweep cpu-smoke --train.lr 1e-3` or `eval RUN --train.eval_batch_size 8` was argparse's
    error under the top-level usage ("config overrides ... only apply to train and info"); now one
    line that names the command's own option, or for a sweep the spec line to write."""
    key = next(a for a in argv if a.startswith("--"))
    err = _error(capsys, argv)
    head = f"error: torchpeer {argv[0]} takes no config overrides ({key} ...: they apply to train and info); "
    assert err.startswith(head), err
    assert err.rstrip().endswith(fix), err


def test_data_subcommand_accepts_config_name(capsys, tmp_path):
    (tmp_path / "t.txt").write_text("some text\n" * 20)
    argv = [
        "data",
        "--config",
        "ptb-tiny",
        "--train",
        str(tmp_path / "t.txt"),
        "--valid",
        f"v={tmp_path}/t.txt",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--no-progress",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "train" in out and "valid/v" in out


def test_data_subcommand_accepts_the_documented_config_path(capsys, tmp_path):
    """`torchpeer data --help` shows `--config configs/ptb-tiny.toml`; that form works from anywhere."""
    with pytest.raises(SystemExit):
        main(["data", "--help"])
    assert "--config configs/ptb-tiny.toml" in capsys.readouterr().out
    (tmp_path / "t.txt").write_text("some text\n" * 20)
    argv = ["data", "--config", "configs/ptb-tiny.toml", "--train", str(tmp_path / "t.txt")]
    argv += ["--valid", f"v={tmp_path}/t.txt", "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    assert main(argv) == 0
    assert "valid/v" in capsys.readouterr().out
    err = _error(capsys, ["data", "--config", str(tmp_path / "none.toml")])
    assert "neither a file nor a shipped config" in err


@pytest.mark.parametrize(
    "override, field",
    [
        (["--train.warmup_steps", "-5"], "train.warmup_steps must be >= 0, got -5"),
        (["--train.lr", "-1"], "train.lr must be a positive finite number, got -1.0"),
        (["--train.lr", "nan"], "train.lr must be a positive finite number, got nan"),
    ],
)
def test_error_invalid_values_name_their_field(capsys, override, field):
    assert field in _error(capsys, ["info", *override])
    assert field in _error(capsys, ["train", *override, "--run-dir", "/nonexistent/never-written"])


def test_error_override_without_value(capsys):
    assert "--train.lr needs a value" in _error(capsys, ["info", "--train.lr"])


@pytest.mark.parametrize("then", [["--train.max_steps", "3"], ["--run-dir", "/nonexistent/never-written"]])
def test_error_override_followed_by_another_option_is_missing_its_value(capsys, then):
    """'--train.lr --train.max_steps 3' is a forgotten value, not lr = '--train.max_steps' and a
    config named '3' (the error was about config '3', or the --run-dir path, not found)."""
    for cmd in ("info", "train"):
        err = _error(capsys, [cmd, "--train.lr", *then])
        assert err.startswith(f"error: override --train.lr needs a value (before {then[0]})"), err


@pytest.mark.parametrize("where", ["torchpeer.lm.config_io", "torchpeer.cli.info"])
def test_ctrl_c_while_a_command_starts_is_one_line(monkeypatch, capsys, where):
    """Ctrl-C while main() imports the override parser or a subcommand (seconds with torch): exit 130
    and "interrupted", not a KeyboardInterrupt traceback."""
    import builtins
    import importlib
    import sys

    real_import, real_import_module = builtins.__import__, importlib.import_module

    def interrupted(real):
        def load(name, *args, **kwargs):
            if name == where:
                raise KeyboardInterrupt
            return real(name, *args, **kwargs)

        return load

    monkeypatch.delitem(sys.modules, where, raising=False)
    monkeypatch.setattr(builtins, "__import__", interrupted(real_import))
    monkeypatch.setattr(importlib, "import_module", interrupted(real_import_module))
    assert main(["info", "--json"]) == 130
    assert capsys.readouterr() == ("", "interrupted\n")


def test_the_command_line_starts_without_torch():
    """`import torchpeer.cli` (what the `torchpeer` script runs before main) loads no torch: the seconds
    of importing torch happen inside main(), where a Ctrl-C is one "interrupted" line, and
    `from torchpeer import PEER` still works (loaded on first use)."""
    import subprocess
    import sys

    code = (
        "import sys, torchpeer.cli; assert 'torch' not in sys.modules, 'torch imported at start-up'; "
        "from torchpeer import PEER, peer_mix_torch; import torchpeer; assert torchpeer.MoE.__name__ == 'MoE'; "
        "assert set(torchpeer.__all__) <= set(dir(torchpeer)); print('ok')"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


def test_help_and_the_parser_load_no_torch():
    """`torchpeer --help` and `torchpeer train --help` build every subcommand's parser (it imports
    torchpeer.lm.config_io and torchpeer.hf.export) without importing torch, and print the help."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from torchpeer.cli import build_parser, main\n"
        "build_parser()\n"
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torchpeer'))\n"
        "for argv in (['--help'], ['train', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0\n"
        "assert 'torch' not in sys.modules\n"
        "print('no torch')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.rstrip().endswith("no torch"), res.stderr
    assert "usage: torchpeer [-h] [--version] COMMAND" in res.stdout and "usage: torchpeer train" in res.stdout


def test_lazy_packages_keep_their_names():
    """torchpeer.lm and torchpeer.hf load their exports on first use; a submodule named like its
    function (torchpeer.lm.train, .evaluate, .generate; torchpeer.hf.peerify) does not replace the
    function's name, whichever is imported first."""
    import subprocess
    import sys

    code = (
        "import types, importlib\n"
        "importlib.import_module('torchpeer.lm.train'); importlib.import_module('torchpeer.hf.peerify')\n"
        "import torchpeer.lm as lm, torchpeer.hf as hf\n"
        "from torchpeer.lm import train, evaluate, generate, TransformerLM, load_config\n"
        "for f in (train, evaluate, generate, lm.train, lm.evaluate, hf.peerify):\n"
        "    assert not isinstance(f, types.ModuleType), f\n"
        "assert lm.train is importlib.import_module('torchpeer.lm.train').train\n"
        "assert set(lm.__all__) <= set(dir(lm)) and set(hf.__all__) <= set(dir(hf))\n"
        "try:\n"
        "    lm.no_such_name\n"
        "except AttributeError as e:\n"
        "    assert 'no_such_name' in str(e)\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


def test_ctrl_c_during_start_up_is_one_line(tmp_path):
    """A real SIGINT while `torchpeer info` is importing torch: exit 130, "interrupted", no traceback."""
    import os
    import signal
    import subprocess
    import sys
    import time

    # -X importtime writes a line to stderr as each module finishes importing: the signal is sent once
    # main() has imported config_io (its first import, inside its try), i.e. while the command imports
    # torch (~1 s), whatever the machine's load (a fixed sleep could land before main() when busy)
    proc = subprocess.Popen(
        [sys.executable, "-X", "importtime", "-m", "torchpeer.cli", "info", "gpu-peer-small"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    deadline = time.monotonic() + 60
    for line in proc.stderr:
        if line.rstrip().endswith("| torchpeer.lm.config_io") or time.monotonic() > deadline:
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    err = "\n".join(x for x in err.splitlines() if not x.startswith("import time:"))
    if proc.returncode == 0:
        pytest.skip("the command finished before the signal arrived (a very fast machine)")
    assert proc.returncode == 130 and "Traceback" not in err and err.strip().endswith("interrupted"), err


@pytest.mark.parametrize(
    "override, message",
    [
        (["--model.peer.n_experts", "1000"], "[model.peer] n_experts=1000 must be a perfect square"),
        (["--model.peer.query_norm", "bn"], "[model.peer] unknown query_norm 'bn'"),
        (["--model.ffw", "pkm", "--model.pkm.top_k", "0"], "[model.pkm] top_k must be a positive integer, got 0"),
    ],
)
def test_error_bad_ffw_section_value_names_it_before_tokenising(capsys, tmp_path, override, message):
    """A value the FFW layer refuses is one line naming its [model.<kind>] section, and `train` reports
    it before the tokenizer and token files are made (minutes on a large corpus), writing nothing."""
    (tmp_path / "t.txt").write_text("some text\n" * 20)
    cfg = _toml(tmp_path, f'train = "{tmp_path}/t.txt"\nvalid = {{}}')
    argv = ["--model.ffw", "peer", "--model.placement", "1", *override]
    assert message in _error(capsys, ["info", cfg, *argv])
    assert message in _error(capsys, ["train", cfg, *argv, "--run-dir", str(tmp_path / "run")])
    assert not os.path.exists(tmp_path / "cache") and not os.path.exists(tmp_path / "run")


def test_eval_and_generate_errors_name_their_own_options(capsys, tmp_path):
    """eval's --out and eval/generate's --device are named as such (not --run-dir / train.device),
    and a bad --out fails before the evaluation runs."""
    (tmp_path / "t.txt").write_text("some text for a tiny run\n" * 40)
    cfg = _toml(tmp_path, f'train = "{tmp_path}/t.txt"\nvalid = {{}}')
    run = str(tmp_path / "run")
    assert main(["train", cfg, "--run-dir", run, "--no-progress"]) == 0
    capsys.readouterr()
    data = ["--data", f"v={tmp_path}/t.txt", "--no-progress"]
    err = _error(capsys, ["eval", run, *data, "--out", str(tmp_path)])
    assert err == f"error: --out {tmp_path} is a folder; give a JSON file path, e.g. {tmp_path}/eval.json\n"
    out = tmp_path / "t.txt" / "e.json"  # below a file
    err = _error(capsys, ["eval", run, *data, "--out", str(out)])
    assert f"{tmp_path}/t.txt is a file, not a directory; choose another --out" in err
    for cmd in ("eval", "generate"):
        assert "error: --device 'tpu' is not a device; use auto, cpu, cuda or cuda:N" in _error(
            capsys, [cmd, run, "--device", "tpu"]
        )
    assert main(["eval", run, *data, "--out", str(tmp_path / "e.json")]) == 0
    assert json.load(open(tmp_path / "e.json"))["results"]["v"]["tokens"] > 0


@pytest.mark.parametrize("cmd", SUBCOMMANDS)
def test_every_option_says_what_it_does_and_its_default(cmd):
    """--help explains each option of the core subcommands; one with a default value names it."""
    import argparse

    from torchpeer.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices[cmd]
    for action in sub._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = action.option_strings[-1] if action.option_strings else action.dest
        assert action.help, f"torchpeer {cmd} {name} has no help text"
        if action.default not in (None, False) and action.option_strings:
            assert "default" in action.help, (
                f"torchpeer {cmd} {name}: help does not give the default {action.default!r}"
            )


@pytest.mark.parametrize(
    "override, message",
    [
        (
            ["--data.valid", "ptb:valid"],
            "as dict; give one eval set as --data.valid.NAME SOURCE (e.g. --data.valid.ptb",
        ),
        (["--model.peer.shared_keys", "maybe"], "'maybe' as bool; use true or false"),
        (["--model.peer.n_experts", "abc"], "'abc' as int; give a whole number"),
        (["--train.batch_size", "2.5"], "'2.5' as int; give a whole number, e.g. 64 or 2e6"),
        (["--train.max_flops", "lots"], "'lots' as float or none; give a number, e.g. 2e6 or none"),
    ],
)
def test_error_unparsable_override_says_what_to_give(capsys, override, message):
    assert message in _error(capsys, ["info", *override])


@pytest.mark.parametrize(
    "key, suggestion",
    [
        ("model.dropout", None),  # no field like it: not model.moe.routing, which only shares "model."
        ("train.learning_rate", "train.lr"),  # another library's name for it
        ("model.n_experts", "model.peer.n_experts"),  # ptb-tiny is a PEER model: its section first
        ("trian.max_steps", "train.max_steps"),
        ("train.warmup", "train.warmup_steps"),
        # other libraries' names whose letters led elsewhere (checkpoint: the on/off switch; max_steps)
        ("train.checkpoint_every", "train.ckpt_interval"),
        ("train.save_steps", "train.ckpt_interval"),
        ("train.eval_steps", "train.eval_interval"),
        ("train.eval_iters", "train.eval_batches"),
        ("train.logging_steps", "train.log_interval"),
        ("train.wd", "train.weight_decay"),
        ("train.bf16", "train.dtype"),
        ("model.peer.key_dim", "model.peer.d_key"),  # not key_init
        ("model.num_attention_heads", "model.n_heads"),
        ("model.intermediate_size", "model.dense.d_hidden"),
    ],
)
def test_unknown_field_suggests_only_a_similar_field(capsys, key, suggestion):
    err = _error(capsys, ["info", f"--{key}", "3"])
    assert err.startswith(f"error: unknown config field {key!r}")
    if suggestion is None:
        assert "did you mean" not in err
    else:
        assert f"did you mean --{suggestion}?" in err
    if key == "model.n_experts":
        assert "did you mean --model.moe.n_experts?" in _error(capsys, ["info", "--model.ffw", "moe", f"--{key}", "3"])


def test_resume_note_suggests_no_model_override(capsys, tmp_path):
    """The resume note's example override is a field that may change on resume, never a model field
    (which the resume would refuse)."""
    (tmp_path / "t.txt").write_text("some text for a tiny run\n" * 40)
    cfg = _toml(tmp_path, f'train = "{tmp_path}/t.txt"\nvalid = {{}}')
    run = str(tmp_path / "run")
    assert main(["train", cfg, "--run-dir", run, "--model.n_layers", "1", "--train.seed", "3", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["train", cfg, "--run-dir", run, "--resume", "--train.max_steps", "3", "--no-progress"]) == 0
    note = capsys.readouterr().out.splitlines()[0]
    assert (
        note.startswith("note: the run continues under its saved config") and "model.n_layers (run 1, file 2)" in note
    )
    assert note.endswith("e.g. --train.seed 0 (model fields stay the checkpoint's)"), note
    assert "e.g. --model" not in note


def test_a_second_ctrl_c_says_what_is_left_to_resume(capsys, tmp_path, monkeypatch):
    """A second Ctrl-C stops at once, without the current step's checkpoint (KeyboardInterrupt, not
    TrainingInterrupted): it printed only "interrupted"; now it names the latest checkpoint and the
    resume command, or says that the run folder holds none, exit 130."""
    lm_train = importlib.import_module("torchpeer.lm.train")  # (torchpeer.lm.train is also the function)

    (tmp_path / "t.txt").write_text("some text for a tiny run\n" * 40)
    cfg = _toml(tmp_path, f'train = "{tmp_path}/t.txt"\nvalid = {{}}\ntokenizer = "byte"')
    run, new = str(tmp_path / "run"), str(tmp_path / "new")
    assert main(["train", cfg, "--run-dir", run, "--no-progress"]) == 0

    def second_ctrl_c(*args, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(lm_train, "train", second_ctrl_c)
    capsys.readouterr()
    assert main(["train", cfg, "--run-dir", run, "--resume", "--train.max_steps", "4", "--no-progress"]) == 130
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("interrupted at once, without a checkpoint of the current step (a second Ctrl-C")
    assert err[0].endswith(f"the latest checkpoint is {run}/checkpoints/step_00000002")
    assert err[1] == f"resume with: torchpeer train {cfg} --run-dir {run} --resume --train.max_steps=4"
    assert main(["train", cfg, "--run-dir", new, "--no-progress"]) == 130
    err = capsys.readouterr().err
    assert err.endswith(f"; {new} holds no checkpoint: nothing to resume from (the same command starts the run anew)\n")


def test_resume_note_neither_suggests_the_tokenizer_nor_compares_with_an_unnamed_config(capsys, tmp_path):
    """A resume refuses another tokenizer, so the note never gives --data.tokenizer as its example; and
    `torchpeer train --resume --run-dir X` names no config, so there is nothing to compare the run's
    config with (it used to list every field in which the run differs from ptb-tiny), and the resume
    command printed on Ctrl-C names no config either."""
    import argparse

    from torchpeer.cli.train import resume_command

    (tmp_path / "t.txt").write_text("some text for a tiny run\n" * 40)
    cfg = _toml(tmp_path, f'train = "{tmp_path}/t.txt"\nvalid = {{}}\ntokenizer = "byte"')
    run = str(tmp_path / "run")
    assert main(["train", cfg, "--run-dir", run, "--train.seed", "3", "--no-progress"]) == 0
    capsys.readouterr()
    with open(cfg) as fh:
        text = fh.read().replace('tokenizer = "byte"', 'tokenizer = "bpe"')
    with open(cfg, "w") as fh:
        fh.write(text)
    assert main(["train", cfg, "--run-dir", run, "--resume", "--train.max_steps", "3", "--no-progress"]) == 0
    note = capsys.readouterr().out.splitlines()[0]
    assert note.startswith("note: the run continues under its saved config") and "data.tokenizer" in note
    assert note.endswith("e.g. --train.seed 0"), note
    assert main(["train", "--run-dir", run, "--resume", "--train.max_steps", "4", "--no-progress"]) == 0
    assert "note:" not in capsys.readouterr().out
    args = argparse.Namespace(config=None, overrides=[("train.max_steps", "4")])
    assert resume_command(args, run) == f"torchpeer train --run-dir {run} --resume --train.max_steps=4"
    args.config = cfg
    assert resume_command(args, run) == f"torchpeer train {cfg} --run-dir {run} --resume --train.max_steps=4"


def test_a_file_where_a_folder_is_needed_is_one_clear_line(capsys, tmp_path):
    """A bare OS error from inside a command (sweep's runs folder, report's --out, export-hf's
    output made below a file) names the file in the way, not "[Errno 17] File exists: ..."."""
    from torchpeer.cli import os_error_message

    afile = tmp_path / "afile"
    afile.write_text("x")
    err = _error(capsys, ["sweep", "cpu-smoke", "--runs-dir", str(afile), "--no-progress"])
    assert err == f"error: {afile} is a file, not a folder; choose another path\n"
    err = _error(capsys, ["sweep", "cpu-smoke", "--runs-dir", str(afile / "sub"), "--no-progress"])
    assert err == f"error: {afile} is a file, not a folder (in {afile / 'sub'}); choose another path\n"
    try:
        os.makedirs(afile / "a" / "b")
    except OSError as e:
        try:
            raise ValueError(str(e)) from None  # re-raised as its text, as export-hf does
        except ValueError as wrapped:
            assert (
                os_error_message(wrapped) == f"{afile} is a file, not a folder (in {afile / 'a'}); choose another path"
            )
    missing = FileNotFoundError(2, "No such file or directory", str(tmp_path / "nope"))
    assert os_error_message(missing) == f"{tmp_path / 'nope'}: No such file or directory"
    assert os_error_message(ValueError("a message of ours")) is None
    assert os_error_message(FileNotFoundError("checkpoint 'x' does not exist")) is None


@pytest.mark.parametrize(
    "argv, example",
    [
        (
            ["train", "--model", "peer"],
            "--model is a config section, not an option; set one of its fields, e.g. --model.ffw dense",
        ),
        (
            ["info", "--train=5"],
            "--train is a config section, not an option; set one of its fields, e.g. --train.max_steps",
        ),
    ],
)
def test_a_bare_section_shows_the_dotted_form(capsys, argv, example):
    assert example in _error(capsys, argv)


def test_data_keeps_its_own_train_option(capsys, tmp_path):
    """`torchpeer data --train SPEC` is data's option, not a bare [train] section."""
    err = _error(capsys, ["data", "--train", str(tmp_path / "nope.txt"), "--no-progress"])
    assert "nope.txt' does not exist" in err


def test_info_toml_lists_every_field_and_loads_back(capsys, tmp_path):
    """`torchpeer info CONFIG --toml`: the config after overrides, every field (unset ones as comments),
    as a TOML file that loads back to the same config."""
    import functools

    from torchpeer.lm.config_io import field_names, tomllib  # tomllib, or tomli on Python 3.10

    assert main(["info", "ptb-tiny", "--toml", "--model.d_model", "64", "--train.max_tokens", "1e6"]) == 0
    text = capsys.readouterr().out
    assert "\nd_model = 64\n" in text and "\n# vocab_size = none\n" in text and "\nmax_tokens = 1000000\n" in text
    path = tmp_path / "mine.toml"
    path.write_text(text)
    cfg = load_config(str(path))
    assert cfg.to_dict() == load_config("ptb-tiny", ["--model.d_model", "64", "--train.max_tokens", "1e6"]).to_dict()
    parsed = tomllib.loads(text)
    for name in field_names(cfg):  # each set field is in the file; each unset one is a comment
        *sections, leaf = name.split(".")
        table = functools.reduce(lambda d, k: d[k], sections, parsed)
        assert leaf in table or f"\n# {leaf} = none" in text, name
    assert "argument --json: not allowed with argument --toml" in _error(capsys, ["info", "--toml", "--json"])


def test_an_int_field_takes_a_power_as_the_docs_write_n(capsys):
    """--model.peer.n_experts 256**2 (or 256^2): the docs and configs write N as a square."""
    assert load_config("ptb-tiny", ["--model.peer.n_experts", "256**2"]).model.peer.n_experts == 65536
    assert load_config("ptb-tiny", ["--model.peer.n_experts", "256^2"]).model.peer.n_experts == 65536
    assert "'2M' as int or none; give a whole number, e.g. 64 or 2e6 or none" in _error(
        capsys, ["info", "--train.max_tokens", "2M"]
    )


def test_a_missing_data_file_names_its_field_before_any_tokenising(capsys, tmp_path, monkeypatch):
    """train: a missing valid file is reported (naming data.valid.NAME and, for a relative path, the
    folder it was looked for in) before the train split is tokenised; eval: before any set is evaluated."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.txt").write_text("some text for a tiny run\n" * 40)
    cfg = _toml(tmp_path, 'train = "t.txt"\nvalid = {mine = "nope/valid.txt"}')
    err = _error(capsys, ["train", cfg, "--run-dir", str(tmp_path / "run")])
    assert err.startswith("error: data.valid.mine: source 'nope/valid.txt' does not exist")
    assert err.endswith(f"relative paths are read from the current folder, {tmp_path}\n")
    assert not os.path.exists(tmp_path / "cache") and not os.path.exists(tmp_path / "run")
    assert "data.train: no file matches the source glob pattern 'c*/*.jsonl'" in _error(
        capsys, ["train", cfg, "--data.train", "c*/*.jsonl", "--data.valid", "{}"]
    )
    run = str(tmp_path / "run")
    assert main(["train", cfg, "--run-dir", run, "--data.valid", "{}", "--no-progress"]) == 0
    capsys.readouterr()
    err = _error(capsys, ["eval", run, "--data", "a=t.txt", "--data", f"b={tmp_path}/gone.txt", "--no-progress"])
    gone = f"{tmp_path}/gone.txt"
    assert err == f"error: --data b: source '{gone}' does not exist (from the source spec '{gone}')\n"


def test_bare_torchpeer_lists_the_commands(capsys):
    """`torchpeer` alone shows what it can do (exit 2), not argparse's "arguments are required"."""
    assert main([]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("usage: torchpeer") and all(c in captured.err for c in SUBCOMMANDS)
    assert "required" not in captured.err


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["generate", "run", "--max-new-tokens", "abc"], "torchpeer generate: argument --max-new-tokens: invalid int"),
        (["generate", "run", "--prompt"], "torchpeer generate: argument --prompt: expected one argument"),
        (["generate", "run", "--decode", "foo"], "torchpeer generate: argument --decode: invalid choice: 'foo'"),
        (["eval", "run", "--max-batches", "1.5"], "torchpeer eval: argument --max-batches: invalid int value: '1.5'"),
        (["train", "--run-dir"], "torchpeer train: argument --run-dir: expected one argument"),
        (["eval"], "torchpeer eval needs CHECKPOINT: checkpoint folder, run folder or export-hf folder (examples"),
        (["plot"], "torchpeer plot needs RUN_DIR: run folder(s) written by torchpeer train (examples"),
        (["export-hf"], "torchpeer export-hf needs RUN_DIR: run folder (its newest intact checkpoint) or "),
        (["--foo"], "torchpeer has no option --foo; give a command first: train, eval, generate"),
    ],
)
def test_argparse_errors_are_one_line_naming_the_command(capsys, argv, expected):
    """argparse's own errors (a bad type, an option without its value, a missing argument, a bad
    choice) were its usage block and a second line, and `torchpeer --foo` said "the following
    arguments are required: COMMAND"; now one error line that names the command and its --help."""
    err = _error(capsys, argv)
    assert err.startswith(f"error: {expected}"), err
    assert "usage:" not in err and ("--help" in err or "(examples: " in err)


@pytest.mark.parametrize(
    "word, hint",
    [
        ("trian", "did you mean 'train'? "),
        ("gen", "did you mean 'generate'? "),  # a prefix of one command
        ("plto", "did you mean 'plot'? "),
        ("frobnicate", ""),
    ],
)
def test_a_misspelt_command_names_the_closest_one(capsys, word, hint):
    assert main([word, "ptb-tiny"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: unknown command '{word}'; {hint}commands: train, eval, generate, info, data")
    assert err.count("\n") == 1


def test_none_for_an_eval_set_removes_it(capsys, tmp_path, monkeypatch):
    """`--data.valid.ptb none` removes that eval set (the others stay); naming a set that is not
    there is one error line that lists the sets, before anything is tokenised or written."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.txt").write_text("some text for a tiny run\n" * 40)
    cfg = _toml(tmp_path, 'train = "t.txt"\nvalid = {ptb = "ptb:valid"}')
    run = str(tmp_path / "run")
    err = _error(capsys, ["train", cfg, "--run-dir", run, "--data.valid.mine", "t.txt", "--data.valid.ptv", "none"])
    assert err == "error: --data.valid.ptv none: there is no eval set 'ptv' to remove (eval sets: ptb, mine)\n"
    assert not os.path.exists(tmp_path / "cache") and not os.path.exists(run)
    argv = ["train", cfg, "--run-dir", run, "--data.valid.mine", "t.txt", "--data.valid.ptb", "none", "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "mine" in out and "(ptb)" not in out
    with open(os.path.join(run, "config.json")) as fh:
        assert json.load(fh)["data"]["valid"] == {"mine": "t.txt"}


def test_a_name_that_is_both_a_folder_here_and_a_shipped_config(capsys, tmp_path, monkeypatch):
    """`torchpeer info ptb-tiny` beside a run folder ./ptb-tiny (a --run-dir ptb-tiny) read the run's
    config under no sign of it. The rule: the path here is used, and one note on stderr says so and
    how to give the shipped config; ./NAME and configs/NAME.toml are unambiguous (no note), and a
    folder that holds no config is no candidate (the shipped config, no note)."""
    from torchpeer.lm.config_io import load_config

    monkeypatch.chdir(tmp_path)
    saved = load_config("ptb-tiny")
    saved.name = "mine"
    (tmp_path / "ptb-tiny" / "checkpoints").mkdir(parents=True)
    (tmp_path / "ptb-tiny" / "config.json").write_text(json.dumps(saved.to_dict()))
    (tmp_path / "gpu-peer-small").mkdir()  # empty: not a config

    def info(name):
        assert main(["info", name, "--json"]) == 0
        out, err = capsys.readouterr()
        return json.loads(out)["config"], err

    assert info("ptb-tiny") == (
        "mine",
        "note: 'ptb-tiny' is both a run folder here and a shipped config; using the run folder ./ptb-tiny; "
        "for the shipped config give configs/ptb-tiny.toml\n",
    )
    assert info("./ptb-tiny") == ("mine", "")
    assert info("configs/ptb-tiny.toml") == ("ptb-tiny", "")
    assert info("gpu-peer-small") == ("gpu-peer-small", "")
    (tmp_path / "gpu-peer-small").rmdir()
    (tmp_path / "gpu-peer-small").write_text("[model]\nd_model = 32\n[train]\nmax_steps = 2\n")  # a TOML file
    assert main(["info", "gpu-peer-small", "--toml"]) == 0
    out, err = capsys.readouterr()
    assert "d_model = 32" in out and err == (
        "note: 'gpu-peer-small' is both a file here and a shipped config; using the file ./gpu-peer-small; "
        "for the shipped config give configs/gpu-peer-small.toml\n"
    )


def test_a_saved_run_serves_as_config(capsys, tmp_path, monkeypatch):
    """info and train take a run folder, a checkpoint folder or their config.json as CONFIG (the config
    the run was saved with, overrides on top); train asks what is meant instead of guessing a run folder."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.txt").write_text("some text for a tiny run\n" * 40)
    cfg = _toml(tmp_path, 'train = "t.txt"\nvalid = {}')
    assert main(["train", cfg, "--run-dir", "run", "--model.d_model", "24", "--no-progress"]) == 0
    capsys.readouterr()
    ckpt = os.path.join("run", "checkpoints", "step_00000002")
    for source in ("run", ckpt, os.path.join("run", "config.json")):
        assert main(["info", source, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["config"] == "c"
        assert main(["info", source, "--toml", "--train.max_steps", "7"]) == 0
        toml = capsys.readouterr().out
        assert "d_model = 24" in toml and "max_steps = 7" in toml  # the run's value, and the override
    assert _error(capsys, ["train", "run"]) == (  # finished: --resume alone would only say so
        "error: run is a run folder whose run has finished (at step 2, train.max_steps = 2): --resume alone has "
        "nothing to do; to train it further, raise train.max_steps (or train.max_tokens / train.max_flops) with "
        "--resume, e.g. torchpeer train run --resume --train.max_steps 4; to start a new run with its config, "
        "add --run-dir NEW_FOLDER\n"
    )
    assert _error(capsys, ["train", "run", "--train.max_steps", "3"]) == (
        "error: run is a run folder: to continue its run, torchpeer train run --resume; "
        "to start a new run with its config, add --run-dir NEW_FOLDER\n"
    )
    assert "to continue its run, torchpeer train --resume --run-dir run;" in _error(capsys, ["train", ckpt, "--resume"])
    assert main(["train", "run", "--resume", "--train.max_steps", "3", "--no-progress"]) == 0
    assert "resuming run from step_00000002: step 2/3" in capsys.readouterr().out
    assert main(["train", "run", "--run-dir", "again", "--train.seed", "1", "--no-progress"]) == 0
    with open(os.path.join("again", "config.json")) as fh:
        again = json.load(fh)
    assert again["model"]["d_model"] == 24 and again["train"]["seed"] == 1 and again["train"]["max_steps"] == 3
    assert _error(capsys, ["info", "."]) == "error: . is a folder of 2 runs, not one run: give one of ./again, ./run\n"
    (tmp_path / "other.json").write_text('{"a": 1}')
    assert _error(capsys, ["info", "other.json"]) == (
        "error: other.json is not a torchpeer run config (no model, train and data sections)\n"
    )


def test_a_misspelt_config_name_names_the_closest_one(capsys):
    assert _error(capsys, ["info", "gpu-peer-smal"]).endswith("; did you mean gpu-peer-small?\n")
    assert "did you mean" not in _error(capsys, ["info", "nothing-like-it"])


def test_train_never_replaces_a_config_json_that_is_not_a_runs(capsys, tmp_path, monkeypatch):
    """--run-dir of an export-hf or transformers model folder: the run would write its config.json over
    theirs; one error line instead, and the folder is untouched. Other files (a job log) are fine."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.txt").write_text("some text for a tiny run\n" * 40)
    cfg = _toml(tmp_path, 'train = "t.txt"\nvalid = {}')
    for folder, text, kind in (
        ("hf-model", '{"model_type": "llama"}', "another"),
        ("export", '{"model_type": "torchpeer", "torchpeer": {"model": {}}}', "an export-hf folder's"),
    ):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "config.json").write_text(text)
        assert _error(capsys, ["train", cfg, "--run-dir", folder]) == (
            f"error: {folder} holds {kind} config.json, not a torchpeer run's; a run there would replace it, "
            "so nothing was written: choose another --run-dir\n"
        )
        assert os.listdir(tmp_path / folder) == ["config.json"]
        assert (tmp_path / folder / "config.json").read_text() == text
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "slurm.out").write_text("log\n")
    assert main(["train", cfg, "--run-dir", "job", "--no-progress"]) == 0
    assert (tmp_path / "job" / "slurm.out").read_text() == "log\n"


def test_train_refuses_a_non_empty_folder_that_is_not_a_run(capsys, tmp_path, monkeypatch):
    """--run-dir of a project folder or a folder of runs would mix the run's files (config.json,
    checkpoints/, summary.json) with what is there: one error line naming the folder and the fix, and
    nothing is written. An empty folder, a new one, a run folder (--resume) and one holding only a job
    log or hidden files (test above) still take the run."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.txt").write_text("some text for a tiny run\n" * 40)
    cfg = _toml(tmp_path, 'train = "t.txt"\nvalid = {}')
    (tmp_path / "proj" / "src").mkdir(parents=True)
    (tmp_path / "proj" / "README.md").write_text("mine\n")
    assert _error(capsys, ["train", cfg, "--run-dir", "proj"]) == (
        "error: proj is not empty and is not a torchpeer run folder (it holds README.md, src); a run there would "
        "write its files among them, so nothing was written: give --run-dir a new or empty folder, or the run "
        "folder to resume with --resume\n"
    )
    assert sorted(os.listdir(tmp_path / "proj")) == ["README.md", "src"]
    for folder in ("empty", "quiet"):
        (tmp_path / folder).mkdir()
    (tmp_path / "quiet" / ".gitkeep").write_text("")
    for run in ("empty", "quiet", "new"):
        assert main(["train", cfg, "--run-dir", run, "--no-progress"]) == 0
    capsys.readouterr()
    # the folder the runs are in is no run folder itself
    assert "error: . is not empty and is not a torchpeer run folder (it holds c.toml, cache, empty" in _error(
        capsys, ["train", cfg, "--run-dir", "."]
    )
    assert main(["train", cfg, "--run-dir", "new", "--resume", "--train.max_steps", "3", "--no-progress"]) == 0


def test_version_names_torchpeer_and_torch(capsys):
    from torchpeer import __version__

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"torchpeer {__version__} (torch ") and ", python 3." in out


def test_a_runs_own_unreadable_config_json_does_not_block_it(tmp_path):
    from torchpeer.lm.rundir import check_run_folder

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text('{"model": {')  # cut short
    check_run_folder(str(run))  # the run's own file: resume rewrites it
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text("not json")
    with pytest.raises(ValueError, match="holds another config.json, not a torchpeer run's"):
        check_run_folder(str(tmp_path / "other"))


def test_one_step_is_one_step(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.txt").write_text("some text for a tiny run\n" * 40)
    cfg = _toml(tmp_path, 'train = "t.txt"\nvalid = {}')
    assert main(["train", cfg, "--run-dir", "run", "--train.max_steps", "1", "--no-progress"]) == 0
    assert "\ntrained 1 step (" in capsys.readouterr().out


def test_the_session_note_of_a_resume():
    from torchpeer.cli.train import session_note

    assert session_note(None, 5) == ""
    assert session_note(12, 13) == " (the whole run; step 13 in this session)"
    assert session_note(10, 20) == " (the whole run; steps 11-20 in this session)"
    assert session_note(5, 5) == " (the whole run, as recorded; this resume trained nothing)"


def test_python_m_torchpeer_and_the_sweep_and_report_help():
    """`python -m torchpeer` is the command line; `sweep --help` names every shipped spec (from the
    spec folder, so a new spec cannot be left out) and `report --help` gives examples."""
    import subprocess
    import sys

    from torchpeer.experiments.spec import list_specs

    def run(*args):
        return subprocess.run([sys.executable, "-m", "torchpeer", *args], capture_output=True, text=True)

    res = run("sweep", "--help")
    assert res.returncode == 0, res.stderr
    text = " ".join(res.stdout.split())  # the list may be wrapped to the terminal
    named = text.split("SPEC is a shipped spec name (", 1)[1].split(")", 1)[0]
    assert named.split(", ") == list_specs() and {"lr-check", "speed-settings"} <= set(list_specs())
    res = run("report", "--help")
    assert res.returncode == 0 and "examples:" in res.stdout and "--with-runs" in res.stdout
    assert run("no-such-command").returncode == 2


def test_a_folder_that_is_not_a_run_is_named_a_folder(capsys, tmp_path):
    """An existing folder without config.json (an empty one, a data folder) is not 'neither a file nor
    a shipped config': the error says it is a folder and what folders are taken."""
    (tmp_path / "notes").mkdir()
    notes = str(tmp_path / "notes")
    for argv in (["info", notes], ["train", notes, "--run-dir", str(tmp_path / "r")]):
        err = _error(capsys, argv)
        assert err.startswith(f"error: {tmp_path / 'notes'} is a folder without config.json: not a run, "), err
        assert "ptb-tiny" in err and "neither a file" not in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["train", "--max-steps", "100"],
            "torchpeer train has no option --max-steps; config fields are set with "
            "their section: --train.max_steps VALUE (torchpeer train --help lists its options)",
        ),
        (
            ["train", "ptb-tiny", "--lr", "1e-3"],
            "torchpeer train has no option --lr; config fields are set with their section: --train.lr VALUE",
        ),
        (["train", "ptb-tiny", "--runs-dir", "x"], "torchpeer train has no option --runs-dir; did you mean --run-dir?"),
        (
            ["eval", "run", "--max_batches", "2"],
            "torchpeer eval has no option --max_batches; did you mean --max-batches?",
        ),
        (["sweep", "cpu-smoke", "--run-dir", "x"], "torchpeer sweep has no option --run-dir; did you mean --runs-dir?"),
        (
            ["info", "ptb-tiny", "--name", "x"],
            "torchpeer info has no option --name; config fields are set with their section, e.g. --train.max_steps 100",
        ),
        (
            ["generate", "run", "--prompt", "a", "b"],
            "unexpected argument 'b' for torchpeer generate (quote a value that holds spaces",
        ),
    ],
)
def test_an_unknown_option_names_its_command_and_what_was_meant(capsys, argv, message):
    """argparse's "unrecognized arguments" came with the top-level usage (torchpeer [-h] [--version]
    COMMAND ...), not the subcommand's, and `train --max-steps 100` took 100 for the config: one line
    naming the subcommand, the option spelt its way, or the dotted config field."""
    assert _error(capsys, argv).startswith("error: " + message)


def test_a_budget_given_but_never_reached_is_one_note(capsys, tmp_path, monkeypatch):
    """--train.max_tokens on a config whose max_steps stops the run sooner (ptb-tiny's 500 steps
    against --train.max_tokens 2e6) trained the shorter run without a word; now one note names the
    limit that decides and how to lift it. A budget that shortens the run, or one the config set
    itself, says nothing."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.txt").write_text("some text for a tiny run\n" * 40)
    cfg = _toml(tmp_path, 'train = "t.txt"\nvalid = {}')  # max_steps = 2, 32 tokens per step
    assert main(["train", cfg, "--run-dir", "a", "--train.max_tokens", "320", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert (
        "\nnote: train.max_steps = 2 ends the run at step 2, before train.max_tokens = 320 at 32 tokens per step "
        "(step 10) is reached; to train to it, also give --train.max_steps none\n"
    ) in out
    assert "\ntrained 2 steps (64 tokens" in out
    assert "\nnote: train.warmup_steps = 100 is longer than the run's 2 steps: the lr rises to 2e-05 at most" in out
    for argv in (["--train.max_tokens", "32"], ["--train.max_steps", "none", "--train.max_tokens", "96"], []):
        assert main(["train", cfg, "--run-dir", f"r{len(argv)}", "--no-progress", *argv]) == 0
        assert "note: train.max" not in capsys.readouterr().out


def test_info_notes_a_budget_given_but_never_reached_as_train_does(capsys):
    """`torchpeer info ptb-tiny --train.max_tokens 2e7` printed "training: 500 steps ..." with no word
    that max_steps pre-empts the given budget (train says so at its start); now the same note."""
    assert main(["info", "ptb-tiny", "--train.max_tokens", "2e7"]) == 0
    out = capsys.readouterr().out
    assert out.endswith(
        "training: 500 steps x 2,048 tokens = 1,024,000 tokens, 8.1e+12 FLOPs\n"
        "note: train.max_steps = 500 ends the run at step 500, before train.max_tokens = 2e+07 at 2,048 tokens "
        "per step (step 9,766) is reached; to train to it, also give --train.max_steps none\n"
    )
    assert main(["info", "ptb-tiny", "--train.max_tokens", "2e5"]) == 0  # it shortens the run: no note
    assert "note:" not in capsys.readouterr().out
    assert main(["info", "ptb-tiny", "--train.max_steps", "1221"]) == 0  # steps with a thousands separator
    assert "\ntraining: 1,221 steps x 2,048 tokens = 2,500,608 tokens" in capsys.readouterr().out


def test_an_override_of_a_section_the_model_does_not_read_is_noted(capsys):
    """--model.ffw pkm --model.peer.top_k 4 trained a PKM with its own top_k, and the override did nothing
    without a word; now one note names it and the field of the model's own section. [model.dense] is
    read by every model (the blocks without the sparse FFW), so its fields are never noted."""
    assert main(["info", "ptb-tiny", "--model.ffw", "pkm", "--model.peer.top_k", "4"]) == 0
    assert capsys.readouterr().out.endswith(
        "\nnote: --model.peer.top_k does nothing: model.ffw = 'pkm' reads only [model.pkm] (and [model.dense]); "
        "did you mean --model.pkm.top_k?\n"
    )
    dense = ["--model.ffw", "dense", "--model.peer.n_experts", "1024", "--model.moe.top_k", "2"]
    assert main(["info", "ptb-tiny", *dense]) == 0
    assert capsys.readouterr().out.endswith(
        "\nnote: --model.peer.n_experts, --model.moe.top_k do nothing: model.ffw = 'dense' reads only [model.dense]\n"
    )
    assert main(["info", "ptb-tiny", "--model.dense.d_hidden", "64", "--model.peer.top_k", "4"]) == 0
    assert "note:" not in capsys.readouterr().out


def test_a_run_folder_with_a_damaged_config_json_uses_its_checkpoints_config(capsys, tmp_path, monkeypatch):
    """A run folder whose config.json was cut short or hand-edited into invalid JSON (or removed)
    stopped `torchpeer train RUN --resume` (the command a finished run prints), `info RUN` and
    `data --config RUN` at "not a readable JSON config", though its checkpoints hold the config it
    trained under: now one note names the file and the checkpoint used, and the resume rewrites the
    file. A config.json outside a run folder, or a run without an intact checkpoint, is still an error."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.txt").write_text("some text for a tiny run\n" * 40)
    cfg = _toml(tmp_path, 'train = "t.txt"\nvalid = {}')
    assert main(["train", cfg, "--run-dir", "run", "--no-progress"]) == 0
    capsys.readouterr()
    (tmp_path / "run" / "config.json").write_text('{"model": {')  # cut short
    note = (
        "note: run/config.json: not a readable JSON config (Expecting property name enclosed in double quotes: "
        "line 1 column 12 (char 11)); using the config of the run's newest intact checkpoint, step_00000002 "
        "(a resume of the run writes config.json anew)\n"
    )
    assert main(["info", "run"]) == 0
    assert capsys.readouterr().err == note
    assert main(["train", "run", "--resume", "--train.max_steps", "3", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert captured.err == note and "\ntrained 3 steps (" in captured.out
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["max_steps"] == 3  # written anew
    os.remove(tmp_path / "run" / "config.json")
    assert main(["info", "run", "--json"]) == 0
    assert "note: run/config.json is missing; using the config of the run's newest" in capsys.readouterr().err
    (tmp_path / "other.json").write_text('{"model": {')
    assert "error: other.json: not a readable JSON config (" in _error(capsys, ["info", "other.json"])
    (tmp_path / "bare" / "checkpoints").mkdir(parents=True)
    (tmp_path / "bare" / "config.json").write_text("{")
    assert _error(capsys, ["info", "bare"]).endswith("; and bare has no intact checkpoint to read its config from\n")


def test_missing_config_suggests_the_toml_file_here(capsys, tmp_path, monkeypatch):
    """`torchpeer info bad` with ./bad.toml in the cwd: the error points at bad.toml."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.toml").write_text("[train]\nmax_steps = 2\n")
    err = _error(capsys, ["info", "bad"])
    assert "neither a file nor a shipped config" in err and "did you mean bad.toml?" in err
    assert "did you mean" not in _error(capsys, ["info", "nothing-like-it"])


@pytest.mark.parametrize("cmd", [*SUBCOMMANDS, "sweep", "plot", "export-hf"])
def test_help_prose_is_wrapped_to_the_terminal_and_examples_kept(cmd, capsys, monkeypatch):
    """The descriptions of eval, generate, info, train and sweep were one 150-300 character line that
    an 80-column terminal broke mid-word (RawDescriptionHelpFormatter does not wrap); now prose fits
    the terminal and the indented example lines stay as written, to copy."""
    monkeypatch.setenv("COLUMNS", "80")
    with pytest.raises(SystemExit):
        main([cmd, "--help"])
    lines = capsys.readouterr().out.splitlines()
    assert [line for line in lines if len(line) > 78 and not line.startswith("  ")] == []
    assert any(line.startswith(f"  torchpeer {cmd}") for line in lines)  # an example, unwrapped


def test_a_missing_corpus_says_where_the_shipped_configs_and_specs_read_it(capsys, tmp_path, monkeypatch):
    """Run from a folder without the corpus: the error of a shipped GPU config and of a shipped sweep
    spec says where each expects it and how to put it there."""
    monkeypatch.chdir(tmp_path)
    err = _error(capsys, ["train", "gpu-dense-small", "--train.device", "cpu", "--run-dir", str(tmp_path / "r")])
    assert "no file matches the source glob pattern '../shared/corpus/*/train.jsonl.xz'" in err
    assert "run from the repository root, or give its folder: --data.train 'DIR/*/train.jsonl.xz'" in err
    err = _error(capsys, ["sweep", "isoflop-lrw", "--runs-dir", str(tmp_path / "runs"), "--only", "dense-s0-1e15"])
    assert "'.corpus/*/train.jsonl.xz'" in err and "cp -r ../shared/corpus .corpus" in err


@pytest.mark.parametrize("value, shows", [("1", True), ("yes", True), ("0", False), ("false", False), ("", False)])
def test_torchpeer_traceback_shows_the_traceback_only_when_set_to_a_true_value(monkeypatch, capsys, value, shows):
    """TORCHPEER_TRACEBACK=1 re-raises the error for debugging; =0 (or false, or empty) keeps the one line,
    as unset does (any non-empty value used to count, so =0 showed the traceback)."""
    monkeypatch.setenv("TORCHPEER_TRACEBACK", value)
    if shows:
        with pytest.raises(FileNotFoundError, match="no-such-config"):
            main(["info", "no-such-config"])
    else:
        assert main(["info", "no-such-config"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "no-such-config" in err and err.count("\n") == 1
