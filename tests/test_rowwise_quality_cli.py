"""benchmarks/rowwise_quality.py's command line: --set config overrides reach every run, and a bad one
is refused in one line before any training."""

import pytest

from tests.references import import_benchmark


def test_set_parses_key_value_pairs_and_refuses_a_missing_equals_sign():
    mod = import_benchmark("rowwise_quality")
    assert mod.parse_set(["model.placement=1,3", " train.expert_weight_decay = 1.0 "]) == [
        ("model.placement", "1,3"),
        ("train.expert_weight_decay", "1.0"),
    ]
    with pytest.raises(ValueError, match="KEY=VALUE"):
        mod.parse_set(["model.placement"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--set", "model.bogus=1"], "unknown config field 'model.bogus'"),
        (["--set", "foo"], "--set takes KEY=VALUE"),
        (["--optimizers", "rowwise:xfast"], "--optimizers takes"),
    ],
)
def test_bad_arguments_exit_with_one_line_before_training(argv, message, capsys, tmp_path):
    mod = import_benchmark("rowwise_quality")
    with pytest.raises(SystemExit) as exc:
        mod.main([*argv, "--out-dir", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())  # nothing written


def test_set_overrides_the_config_of_a_run(tmp_path):
    """One 2-step run with the design's overrides (on a small written corpus): the run's config has them
    (the shared pool read by two layers), and the result records both routers."""
    from tests.lm.helpers import write_corpus

    mod = import_benchmark("rowwise_quality")
    train_txt, valid_txt = write_corpus(tmp_path, 300, 20)
    extra = mod.parse_set([
        "model.placement=1,3", "model.peer.shared_pool=true", "train.expert_weight_decay=0.5",
        "model.d_model=32", "model.peer.n_experts=256", "model.peer.d_key=16", "model.seq_len=16",
        "train.batch_size=2", f"data.train={train_txt}", f"data.valid.ptb={valid_txt}", "data.tokenizer=byte",
        f"data.cache_dir={tmp_path / 'cache'}",
    ])  # fmt: skip
    r = mod.run("ptb-tiny", "rowwise", 0, 2, str(tmp_path / "runs"), extra)
    assert r["steps"] == 2 and set(r["valid_loss"]) == {"ptb"}
    assert set(r["usage"]["ptb"]) == {"blocks.1.ffw", "blocks.3.ffw"}
