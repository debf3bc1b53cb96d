"""Run configs: overrides (one parser for the CLI), TOML round trip, the FFW sections from the layer
registry, shipped-config paths, and validation messages that name their field."""

import dataclasses
import math

import pytest

from torchpeer.layers import PEERConfig, ffw_kinds, get_ffw
from torchpeer.lm.config import ModelConfig, RunConfig, TrainConfig, from_dict
from torchpeer.lm.config_io import (
    dump_toml,
    load_config,
    parse_override_args,
    resolve_config_path,
    split_overrides,
)


def test_config_overrides_and_errors():
    cfg = load_config(
        "ptb-tiny",
        [
            "--model.d_model",
            "64",
            "--train.max_flops=1e12",
            "--model.placement",
            "0,3",
            "--data.valid.test",
            "ptb:test",
            "--train.max_steps",
            "none",
        ],
    )
    assert cfg.model.d_model == 64 and cfg.train.max_flops == 1e12 and cfg.model.placement == [0, 3]
    assert cfg.data.valid == {"ptb": "ptb:valid", "test": "ptb:test"} and cfg.train.max_steps is None
    assert load_config("ptb-tiny", ["--model.placement", "1"]).model.placement == [1]
    with pytest.raises(ValueError, match="unknown config field 'model.d_modle'.*model.d_model"):
        load_config("ptb-tiny", ["--model.d_modle", "64"])
    with pytest.raises(ValueError, match="cannot parse --train.max_steps 'ten' as int"):
        load_config("ptb-tiny", ["--train.max_steps", "ten"])
    with pytest.raises(ValueError, match="unknown FFW kind"):
        load_config("ptb-tiny", ["--model.ffw", "mlp"])


@pytest.mark.parametrize(
    "where, wrong, right",
    [
        ("override", "train.max_step", "did you mean --train.max_steps?"),
        ("override", "trian.max_steps", "did you mean --train.max_steps?"),
        ("override", "model.peer.n_expert", "did you mean --model.peer.n_experts?"),
        ("toml", "[train]\nmax_step = 5", "'max_step': did you mean 'max_steps'?"),
        ("toml", "[model.peer]\ntopk = 8", "'topk': did you mean 'top_k'?"),
        ("toml", "[data]\ntokeniser = 'byte'", "'tokeniser': did you mean 'tokenizer'?"),
        # other libraries' names, too unlike ours for a spelling match (steps is nearer eps by letters)
        ("override", "train.steps", "did you mean --train.max_steps?"),
        ("override", "model.hidden_size", "did you mean --model.d_model?"),
        ("override", "model.peer.num_heads", "did you mean --model.peer.heads?"),
        ("override", "model.num_heads", "did you mean --model.n_heads?"),
        ("override", "train.epochs", "not epochs: use --train.max_tokens"),
        ("toml", "[train]\nlearning_rate = 1e-3", "'learning_rate': did you mean 'lr'?"),
    ],
)
def test_a_misspelt_field_names_the_closest_one(tmp_path, capsys, where, wrong, right):
    """The unknown-field error suggests the field the user meant, for overrides and TOML files (CLI: one line)."""
    from torchpeer.cli import main

    if where == "override":
        argv = ["info", f"--{wrong}", "5"]
    else:
        (tmp_path / "c.toml").write_text(wrong + "\n")
        argv = ["info", str(tmp_path / "c.toml")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown ") and right in err and err.count("\n") == 1
    assert "did you mean" not in _error_of(lambda: load_config("ptb-tiny", ["--zzz.qqq", "1"]))


def test_a_bare_top_level_field_names_its_table(tmp_path, capsys):
    """`d_model = 64` above [model] suggested "did you mean 'model'?": the error names the table(s) that
    have a field of that name and the line to move under it; a table [peer] at the top names [model.peer]."""
    from torchpeer.cli import main

    toml = "d_model = 64\nn_experts = 4\ntie_embeddings = false\nmax_stepz = 5\n[peer]\ntop_k = 8\n[train]\nlr = 1e-3\n"
    (tmp_path / "c.toml").write_text(toml)
    assert main(["info", str(tmp_path / "c.toml")]) == 2
    err = capsys.readouterr().err
    assert err == (
        "error: unknown config key(s) ['d_model', 'max_stepz', 'n_experts', 'peer', 'tie_embeddings'] in the top "
        "level; 'd_model' is a field of [model]: move the line d_model = 64 under [model]; 'n_experts' is a field "
        "of [model.peer] and [model.moe]: move the line n_experts = 4 under the one meant; 'peer' is a section of "
        "[model]: name its table [model.peer]; 'tie_embeddings' is a field of [model]: move the line "
        "tie_embeddings = false under [model] (valid keys: name, model, train, data)\n"
    )
    assert "did you mean 'model'" not in err  # a misspelt name that no table has gets no hint
    assert "did you mean" in _error_of(lambda: from_dict(TrainConfig, {"max_step": 5}, "train."))


def test_a_field_in_another_table_names_the_table_it_belongs_to(tmp_path, capsys):
    """`lr = 3e-3` under [model] names [train], not a close-sounding [model] field; a key of no table
    keeps the closest-name hint."""
    from torchpeer.cli import main

    (tmp_path / "c.toml").write_text("[model]\nlr = 3e-3\nd_key = 64\nd_modle = 64\n[train]\nmax_steps = 5\n")
    assert main(["info", str(tmp_path / "c.toml")]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("error: unknown config key(s) ['d_key', 'd_modle', 'lr'] in [model]; ") and err.count("\n") == 1
    )
    assert (
        "'d_key' is a field of [model.peer] and [model.pkm], not [model]: move the line d_key = 64 under the one meant"
        in err
    )
    assert "'lr' is a field of [train], not [model]: move the line lr = 0.003 under [train]" in err
    assert "'d_modle': did you mean 'd_model'?" in err and "(valid keys:" in err
    # every key only misplaced: the hints say where each goes, and [model]'s own key list would mislead
    (tmp_path / "c.toml").write_text("[model]\nlr = 3e-3\n[train]\nmax_steps = 5\n")
    assert main(["info", str(tmp_path / "c.toml")]) == 2
    err = capsys.readouterr().err
    assert err == (
        "error: unknown config key(s) ['lr'] in [model]; 'lr' is a field of [train], not [model]: "
        "move the line lr = 0.003 under [train]\n"
    )


def _error_of(fn) -> str:
    with pytest.raises((ValueError, TypeError)) as e:
        fn()
    return str(e.value)


def test_split_overrides_is_the_one_parser():
    argv = ["train", "ptb-tiny", "--model.d_model", "64", "--resume", "--train.lr=3e-4", "--run-dir", "r.x"]
    rest, pairs = split_overrides(argv)
    assert rest == ["train", "ptb-tiny", "--resume", "--run-dir", "r.x"]
    assert pairs == [("model.d_model", "64"), ("train.lr", "3e-4")]
    assert parse_override_args(["--model.peer.top_k", "8"]) == [("model.peer.top_k", "8")]
    with pytest.raises(ValueError, match="--model.d_model needs a value"):
        split_overrides(["--model.d_model"])
    with pytest.raises(ValueError, match="unknown option --resume"):
        parse_override_args(["--resume"])


def test_model_config_has_one_section_per_registered_kind():
    fields = {f.name: f.type for f in dataclasses.fields(ModelConfig)}
    for kind in ffw_kinds():
        assert isinstance(getattr(ModelConfig(), kind), get_ffw(kind).config_cls)
    assert set(ffw_kinds()) <= set(fields) and {"dense", "peer", "pkm", "moe"} <= set(ffw_kinds())
    cfg = load_config("ptb-tiny", ["--model.peer.top_k", "8", "--model.moe.routing", "token_choice"])
    assert cfg.model.peer.top_k == 8 and cfg.model.moe.routing == "token_choice"
    with pytest.raises(ValueError, match="unknown config key.*'topk'.*model.peer"):
        from_dict(RunConfig, {"model": {"peer": {"topk": 3}}})
    with pytest.raises(ValueError, match="'model.peer' is a section"):
        load_config("ptb-tiny", ["--model.peer", "3"])


def test_toml_round_trip_and_shipped_paths(tmp_path):
    cfg = load_config("ptb-tiny", ["--model.placement", "0,2", "--train.max_tokens", "2e7"])
    path = tmp_path / "c.toml"
    path.write_text(dump_toml(cfg))
    again = load_config(str(path))
    again.name = cfg.name
    assert again == cfg and again.train.max_tokens == 20_000_000
    shipped = resolve_config_path("ptb-tiny")
    assert resolve_config_path("configs/ptb-tiny.toml") == shipped  # the form the docs use
    with pytest.raises(FileNotFoundError, match="neither a file nor a shipped config"):
        resolve_config_path("elsewhere/ptb-tiny.toml")


@pytest.mark.parametrize(
    "override, field",
    [
        (["--train.warmup_steps", "-5"], "train.warmup_steps"),
        (["--train.lr", "-1"], "train.lr"),
        (["--train.lr", "nan"], "train.lr"),
        (["--train.lr", "inf"], "train.lr"),
        (["--train.expert_lr", "0"], "train.expert_lr"),
        (["--train.max_flops", "nan"], "train.max_flops"),
        (["--train.beta2", "1"], "train.beta2"),
        (["--train.grad_clip", "-1"], "train.grad_clip"),
        (["--train.eval_batches", "0"], "train.eval_batches"),
        (["--train.decay_frac", "2"], "train.decay_frac"),
        (["--train.batch_size", "0"], "train.batch_size"),
    ],
)
def test_validation_names_the_field(override, field):
    with pytest.raises(ValueError) as e:
        load_config("ptb-tiny", override)
    assert str(e.value).startswith(field) and override[1] in str(e.value)


def test_type_errors_name_the_field():
    """n_experts = 1024.0 is a type error naming model.peer.n_experts (not 'must be a perfect square')."""
    cfg = ModelConfig(peer=PEERConfig(n_experts=1024.0))
    with pytest.raises(TypeError, match=r"model\.peer\.n_experts must be of type int, got 1024\.0"):
        cfg.validate()
    with pytest.raises(TypeError, match=r"train\.warmup_steps must be of type int, got 2\.5"):
        TrainConfig(max_steps=1, warmup_steps=2.5).validate()
    with pytest.raises(TypeError, match=r"train\.compile must be of type bool"):
        TrainConfig(max_steps=1, compile="yes").validate()
    # from text (TOML values, command-line strings) an integral number is still an int
    assert load_config("ptb-tiny", ["--model.peer.n_experts", "1024.0"]).model.peer.n_experts == 1024
    assert math.isclose(load_config("ptb-tiny", ["--train.lr", "1"]).train.lr, 1.0)


def test_a_section_given_as_a_dict_in_python_is_one_clear_type_error():
    """ModelConfig(peer={"n_experts": 256}) (a TOML table's shape) failed inside dataclasses.fields with
    "must be called with a dataclass type or instance"; now the error names the field and the class."""
    cfg = ModelConfig(vocab_size=100, peer={"n_experts": 256})
    wanted = r"model\.peer must be a PEERConfig, got dict \{'n_experts': 256\}; e\.g\. peer=PEERConfig\(\.\.\.\)"
    with pytest.raises(TypeError, match=wanted):
        cfg.validate()
    assert "from torchpeer.layers.peer import PEERConfig" in str(pytest.raises(TypeError, cfg.validate).value)


def test_a_run_config_section_given_as_a_dict_is_one_clear_type_error():
    """RunConfig(model={...}) / (train={...}) failed with AttributeError "'dict' object has no attribute
    'validate'"; now the error names the section and RunConfig.from_dict, which takes nested dicts."""
    for section, value in (("model", {"d_model": 64}), ("train", {"max_steps": 3}), ("data", {"train": "x.txt"})):
        with pytest.raises(TypeError, match=rf"^{section} must be a \w+Config, got dict .*RunConfig\.from_dict"):
            RunConfig(**{section: value}).validate()
    assert RunConfig.from_dict({"model": {"d_model": 64}, "train": {"max_steps": 3}}).model.d_model == 64


def test_a_kind_registered_too_late_is_one_clear_error(monkeypatch):
    import torchpeer.layers.registry as registry

    monkeypatch.setattr(registry, "_KINDS", dict(registry._KINDS))  # undone after the test

    @dataclasses.dataclass
    class LateConfig:
        width: int = 4

    registry.register_ffw("late", LateConfig, lambda d, cfg: None)
    with pytest.raises(ValueError, match=r"registered after torchpeer.lm.config was imported.*\[model.late\]"):
        load_config("ptb-tiny", ["--model.ffw", "late"])


def test_a_quoted_number_or_boolean_in_toml_shows_the_line_without_quotes(tmp_path):
    """d_model = "128" in a TOML file said 'must be of type int, got '128'' (a newcomer reads: it is
    128); now the message shows the line as TOML wants it. A list item is named by its index."""
    from torchpeer.lm.config import quoted_hint

    lines = {
        'd_model = "128"': "model.d_model must be of type int, got '128'; a TOML number has no quotes: d_model = 128",
        'placement = [1, "2"]': "placement[1] must be of type int, got '2'; a TOML number has no quotes: 2 (in a list)",
        'tie_embeddings = "True"': "a TOML boolean has no quotes: tie_embeddings = true",
        'tie_embeddings = "yes"': "model.tie_embeddings must be of type bool, got 'yes'",
    }
    for line, message in lines.items():
        path = tmp_path / "c.toml"
        path.write_text(f"[model]\nn_layers = 4\n{line}\n")
        with pytest.raises(TypeError) as e:
            load_config(str(path))
        assert str(e.value).endswith(message), str(e.value)
    assert quoted_hint("2e-3", float, "train.lr") == "; a TOML number has no quotes: lr = 2e-3"
    assert quoted_hint("2.5", int, "train.batch_size") == ""  # not a whole number: the type error says enough
    assert quoted_hint(2.5, int, "train.batch_size") == ""
