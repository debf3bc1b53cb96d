"""``torchpeer export-hf`` on the command line: success, and one clear error line for bad inputs."""

import os

import pytest

from torchpeer.cli import main


def test_export_hf_command(make_run, tmp_path, capsys):
    out = str(tmp_path / "exported")
    assert main(["export-hf", make_run("peer"), out]) == 0
    captured = capsys.readouterr()
    assert "exported" in captured.out
    assert captured.err == ""  # no transformers progress bar ("Writing model shards: 100%") among its lines
    assert os.path.isfile(os.path.join(out, "modeling_torchpeer.py"))
    assert main(["export-hf", make_run("peer"), out]) == 2  # exists, no --overwrite
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists" in err[0] and "--overwrite" in err[0]


@pytest.mark.parametrize("case", ["no-checkpoints", "missing"])
def test_export_hf_bad_run_dir_is_one_error_line(case, tmp_path, capsys):
    run = tmp_path / "run"
    if case == "no-checkpoints":
        (run / "checkpoints").mkdir(parents=True)
    assert main(["export-hf", str(run), str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in captured.err
    assert ("holds no checkpoint" if case == "no-checkpoints" else "does not exist") in lines[0]
    assert not (tmp_path / "out").exists()


def test_eval_and_generate_accept_an_exported_folder(make_run, train_file, tmp_path, capsys):
    import json

    run = make_run("peer")
    out = str(tmp_path / "exported")
    assert main(["export-hf", run, out]) == 0
    results = {}
    for name, path in (("run", run), ("export", out)):
        js = str(tmp_path / f"eval-{name}.json")
        argv = ["eval", path, "--data", f"t={train_file}", "--max-batches", "2", "--device", "cpu", "--out", js]
        assert main([*argv, "--cache-dir", str(tmp_path / "cache"), "--no-progress"]) == 0
        with open(js) as fh:
            results[name] = json.load(fh)["results"]["t"]["loss"]
    assert results["run"] == pytest.approx(results["export"], abs=1e-6)
    texts = []
    for path in (run, out):
        capsys.readouterr()
        argv = ["generate", path, "--prompt", "the cat", "--temperature", "0", "--max-new-tokens", "12"]
        assert main([*argv, "--device", "cpu"]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and "the cat" in texts[0]


def test_train_continues_an_exported_folder(make_run, tmp_path, capsys):
    out = str(tmp_path / "exported")
    assert main(["export-hf", make_run("peer"), out]) == 0
    more = str(tmp_path / "more")
    assert main(["train", out, "--run-dir", more, "--train.max_steps", "2", "--no-progress"]) == 0
    assert "trained 2 steps" in capsys.readouterr().out
    assert main(["train", out, "--run-dir", str(tmp_path / "x"), "--model.n_layers", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "different model" in err[0]


@pytest.fixture(scope="module")
def two_checkpoint_run(tmp_path_factory, train_file):
    """A tiny run with checkpoints at steps 2 and 4."""
    from tests.hf.conftest import tiny_run_config
    from torchpeer.lm import RunConfig, train

    root = tmp_path_factory.mktemp("two-ckpt")
    d = tiny_run_config(train_file, str(root / "cache"), "peer", steps=4)
    d["train"]["ckpt_interval"] = 2
    train(RunConfig.from_dict(d), str(root / "run"), progress=False)
    return str(root / "run")


@pytest.mark.parametrize("file", ["model.safetensors", "trainer.pt"])
@pytest.mark.parametrize("how", ["truncated", "bit-flipped"])
def test_export_hf_of_a_damaged_checkpoint(two_checkpoint_run, tmp_path, capsys, file, how):
    """A damaged newest checkpoint: exporting the run names it and exports the intact older one (its
    weights, bit for bit); exporting the damaged folder by name is one error line, nothing written."""
    import shutil

    from safetensors.torch import load_file

    from tests.lm.test_damaged_checkpoints import WHY, damage

    run = str(tmp_path / "run")
    shutil.copytree(two_checkpoint_run, run)
    bad, good = (os.path.join(run, "checkpoints", f"step_0000000{s}") for s in (4, 2))
    damage(os.path.join(bad, file), how)
    out = str(tmp_path / "exported")
    assert main(["export-hf", run, out]) == 0
    captured = capsys.readouterr()
    assert captured.err.startswith(f"checkpoint {bad} is damaged: {file} {WHY[how]}")
    assert captured.err.count(" is damaged: ") == 1 and f"exported {good} -> {out}" in captured.out
    exported = load_file(os.path.join(out, "model.safetensors"))
    intact = load_file(os.path.join(good, "model.safetensors"))
    shared = [k for k in intact if f"model.{k}" in exported]  # a tied tensor is stored under one name
    assert len(shared) >= len(intact) - 1 and all(exported[f"model.{k}"].equal(intact[k]) for k in shared)
    assert main(["export-hf", bad, str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: checkpoint {bad} is damaged: {file}") and err.count("\n") == 1
    assert f"the older checkpoint {good} beside it is intact" in err and not os.path.exists(tmp_path / "other")


def test_a_run_continued_from_an_export_is_plotted_after_its_parent(two_checkpoint_run, tmp_path):
    """export-hf records where the weights stand (step, tokens, training seconds); the run that continues
    the export carries it in its start record, and `torchpeer plot` draws it after its parent, not from 0."""
    import json

    pytest.importorskip("matplotlib")
    from torchpeer.viz.metrics import read_metrics
    from torchpeer.viz.plot import plot_runs

    parent = read_metrics(two_checkpoint_run)
    out, more = str(tmp_path / "exported"), str(tmp_path / "more")
    assert main(["export-hf", two_checkpoint_run, out]) == 0
    with open(os.path.join(out, "torchpeer_origin.json")) as fh:
        origin = json.load(fh)
    assert origin["step"] == 4 and origin["tokens"] == parent.tokens_at(4) == 4 * 4 * 32
    assert origin["time"] == parent.train["time"].values[-1] > 0
    argv = ["train", out, "--run-dir", more, "--train.max_steps", "2", "--train.log_interval", "1", "--no-progress"]
    assert main(argv) == 0
    child = read_metrics(more)
    assert child.offset == {"step": 4, "tokens": 512, "time": origin["time"]}
    fig = plot_runs([parent, child], x="tokens")
    lines = {line.get_label(): list(line.get_xdata()) for line in fig.axes[0].get_lines()}
    assert lines["more: train"] == [512 + 128, 512 + 256]  # after the parent's 512 tokens
    assert max(lines["run: train"]) == 512
    fig = plot_runs([child], x="step")
    assert [list(ln.get_xdata()) for ln in fig.axes[0].get_lines()][0] == [5.0, 6.0]


def test_export_hf_of_a_folder_of_runs_lists_them(make_run, tmp_path, capsys):
    import shutil

    sweep = tmp_path / "sweep"
    for name in ("a", "b"):
        shutil.copytree(make_run("peer"), sweep / "runs" / name)
    assert main(["export-hf", str(sweep), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: '{sweep}' is a folder of 2 runs, not one run: give one of {sweep}/runs/a, ")
    assert err.count("\n") == 1 and not (tmp_path / "out").exists()


def test_export_hf_help_loads_the_tokenizer_without_a_prompt(capsys):
    """transformers' AutoTokenizer reads config.json (model_type torchpeer, remote code): without
    trust_remote_code=True it asks on a terminal, so the help must not show the bare call."""
    with pytest.raises(SystemExit):
        main(["export-hf", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "AutoTokenizer.from_pretrained(OUT_DIR, trust_remote_code=True)" in text
    assert "AutoTokenizer.from_pretrained(OUT_DIR)" not in text


def test_info_reads_an_exported_folder(make_run, tmp_path, capsys):
    import json

    out = str(tmp_path / "exported")
    assert main(["export-hf", make_run("peer"), out]) == 0
    capsys.readouterr()
    assert main(["info", out, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["config"] == "tiny-peer"


def test_overwrite_replaces_only_an_earlier_export(make_run, tmp_path, capsys):
    """--overwrite given a folder that is not an export (the run folder itself, a data folder, /tmp)
    used to delete it whole; now it is one error line and the folder is untouched."""
    import shutil

    run = str(tmp_path / "run")
    shutil.copytree(make_run("peer"), run)
    before = sorted(os.listdir(run))
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.txt").write_text("precious\n")
    (tmp_path / "a-file").write_text("x")
    for target, message in (
        (run, f"'{run}' already exists and is not an export-hf folder (it holds checkpoints, config.json, "),
        (str(data), f"'{data}' already exists and is not an export-hf folder (it holds train.txt); "),
        (str(tmp_path / "a-file"), "is a file; export-hf writes a folder: choose a new OUT_DIR"),
    ):
        for flags in (["--overwrite"], []):
            assert main(["export-hf", run, target, *flags]) == 2
            err = capsys.readouterr().err
            assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert sorted(os.listdir(run)) == before and (data / "train.txt").read_text() == "precious\n"
    out = tmp_path / "out"
    out.mkdir()  # an empty folder may be replaced
    assert main(["export-hf", run, str(out), "--overwrite"]) == 0
    (out / "more-run" / "checkpoints").mkdir(parents=True)  # a run trained inside the export
    assert main(["export-hf", run, str(out), "--overwrite"]) == 2
    assert "with other folders inside (more-run); --overwrite would delete them" in capsys.readouterr().err
    shutil.rmtree(out / "more-run")
    assert main(["export-hf", run, str(out), "--overwrite"]) == 0  # an earlier export is replaced
