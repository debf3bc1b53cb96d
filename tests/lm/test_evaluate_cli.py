"""`torchpeer eval` writes its JSON without losing what an earlier eval of the same checkpoint wrote."""

import json

from torchpeer.cli import main


def test_eval_of_other_sets_keeps_the_earlier_results(trained, capsys, tmp_path):
    root, cfg, run = trained
    out = str(tmp_path / "e.json")
    common = ["--max-batches", "1", "--out", out, "--no-progress"]
    assert main(["eval", run, "--data", f"test={root}/valid.txt", *common]) == 0
    first = json.load(open(out))["results"]["test"]
    capsys.readouterr()
    assert main(["eval", run, "--data", f"train={root}/train.txt", *common]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert last == f"wrote {out} (with the earlier results of test, same checkpoint)"
    record = json.load(open(out))
    assert set(record["results"]) == {"test", "train"} and record["results"]["test"] == first
    # the same set again replaces its entry; the other stays
    assert main(["eval", run, "--data", f"train={root}/valid.txt", *common]) == 0
    record = json.load(open(out))
    assert record["results"]["train"]["source"].endswith("valid.txt") and set(record["results"]) == {"test", "train"}


def test_eval_replaces_the_file_of_other_weights(trained, capsys, tmp_path):
    root, cfg, run = trained
    out = tmp_path / "e.json"
    assert main(["eval", run, "--data", f"a={root}/valid.txt", "--max-batches", "1", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    record["weights"] = "0" * 64  # as if the checkpoint had been written again with other weights
    out.write_text(json.dumps(record))
    capsys.readouterr()
    assert main(["eval", run, "--data", f"b={root}/valid.txt", "--max-batches", "1", "--out", str(out)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"wrote {out}"
    assert set(json.loads(out.read_text())["results"]) == {"b"}


def test_the_results_table_of_a_dense_model_has_no_empty_usage_columns():
    from torchpeer.lm.evaluate import format_results

    dense = {"tokens": 8192, "loss": 2.368, "ppl": 10.68, "bpb": 3.4163, "usage": {}}
    assert format_results({"ptb": dense, "test": dense}).splitlines() == [
        "set   tokens    loss    ppl     bpb",
        "----  ------  ------  -----  ------",
        "ptb    8,192  2.3680  10.68  3.4163",
        "test   8,192  2.3680  10.68  3.4163",
    ]
    routed = {**dense, "usage": {"blocks.1.ffw": {"usage_pct": 49.38, "kl": 2.9798}}}
    assert format_results({"ptb": routed}).splitlines()[0].split() == [
        "set",
        "tokens",
        "loss",
        "ppl",
        "bpb",
        "layer",
        "usage",
        "%",
        "KL",
    ]


def test_eval_out_never_replaces_a_file_that_is_not_an_eval_result(trained, capsys, tmp_path):
    root, cfg, run = trained
    other = tmp_path / "config.json"
    other.write_text('{"model": {"d_model": 32}}\n')
    assert main(["eval", run, "--data", f"a={root}/valid.txt", "--out", str(other), "--no-progress"]) == 2
    out, err = capsys.readouterr()
    assert err == f"error: --out {other} exists and is not a 'torchpeer eval' result file; give a new path\n"
    assert out == "" and other.read_text() == '{"model": {"d_model": 32}}\n'  # refused before evaluating


def test_a_damaged_result_at_the_default_path_is_named_as_eval_s_own(trained, capsys, tmp_path):
    """Without --out, a damaged earlier result at RUN_DIR/eval-<checkpoint>.json said "--out ... exists"
    of an option the user never gave; now the file is named as where eval writes, kept, and both ways
    out are given."""
    import shutil

    from torchpeer.cli.eval import default_out
    from torchpeer.lm.checkpoint import list_checkpoints

    root, cfg, run = trained
    copy = str(tmp_path / "run")
    shutil.copytree(run, copy)
    out = default_out(list_checkpoints(copy)[-1])
    with open(out, "w") as fh:
        fh.write('{"checkpoint": "x", "res')  # cut short
    assert main(["eval", copy, "--data", f"a={root}/valid.txt", "--no-progress"]) == 2
    assert capsys.readouterr().err == (
        f"error: {out}, where eval writes its results, exists and is not a 'torchpeer eval' result file "
        "(damaged or replaced?); it was left as it is: move it aside, or give --out a new path\n"
    )
    assert open(out).read() == '{"checkpoint": "x", "res'


def test_eval_says_which_set_it_is_evaluating(trained, capsys, tmp_path):
    """Off a terminal (no bar), one line per set before its evaluation, as tokenising prints; none with
    --no-progress."""
    root, cfg, run = trained
    argv = ["eval", run, "--data", f"a={root}/valid.txt", "--max-batches", "1", "--out", str(tmp_path / "e.json")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "evaluating a (256 tokens) ...\n" in out  # 1 batch of 8 x 32
    assert out.index("evaluating a") < out.index("checkpoint ")
    assert main([*argv, "--no-progress"]) == 0
    assert "evaluating" not in capsys.readouterr().out


def test_eval_default_out_of_a_folder_given_with_a_trailing_slash(trained, capsys, tmp_path):
    """'runs/x/' and 'runs/x/checkpoints/step_N/' (as shell completion writes them) name the same
    file as without the slash: RUN_DIR/eval-step_N.json, not 'eval-.json' inside the checkpoint."""
    import os
    import shutil

    root, cfg, run = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    step = sorted(os.listdir(copy / "checkpoints"))[-1]  # the newest, which a run folder evaluates
    data = ["--data", f"a={root}/valid.txt", "--max-batches", "1", "--no-progress"]
    for given in (f"{copy}/", f"{copy}/checkpoints/{step}/"):
        assert main(["eval", given, *data]) == 0
        out = capsys.readouterr().out
        assert out.splitlines()[-1].startswith(f"wrote {copy}/eval-{step}.json")
        assert f"checkpoint {copy}/checkpoints/{step}\n" in out
    assert not (copy / "checkpoints" / step / "eval-.json").exists()
    assert sorted(p.name for p in copy.glob("eval-*.json")) == [f"eval-{step}.json"]


def test_eval_accepts_a_bare_source_named_as_data_valid_names_it(trained, capsys, tmp_path):
    """`torchpeer eval RUN --data SOURCE` (no NAME=), as `torchpeer data --valid SOURCE` takes it."""
    from torchpeer.cli.common import named_sources
    from torchpeer.cli.data import parse_valid_args

    root, cfg, run = trained
    out = tmp_path / "e.json"
    argv = ["eval", run, "--data", f"{root}/valid.txt", "--data", f"t={root}/train.txt", "--max-batches", "1"]
    assert main([*argv, "--out", str(out), "--no-progress"]) == 0
    assert set(json.loads(out.read_text())["results"]) == {"valid", "t"}
    items = ["ptb:test", "ptb:valid", "x=ptb:train", "ptb:test"]
    assert named_sources(items) == parse_valid_args(items)
    expected = {"ptb_test": "ptb:test", "ptb": "ptb:valid", "x": "ptb:train", "ptb_test2": "ptb:test"}
    assert named_sources(items) == expected
