"""`torchpeer plot`: a real tiny training run, then its PNG is opened and checked not to be blank;
metrics parsing (cut lines, repeated steps), several runs, and the error messages."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from torchpeer.lm import load_config, train
from torchpeer.viz import read_metrics

TAB_BLUE, TAB_ORANGE, TAB_GREEN = (31, 119, 180), (255, 127, 14), (44, 160, 44)  # matplotlib tab10


def tiny_run(root, name, ffw="peer", steps=24):
    """Train a tiny byte-level model for a few steps with two eval sets; returns the run dir."""
    text = "".join(f"the {i % 17} cats sat on {i % 5} mats, said line {i}.\n" for i in range(600))
    for split in ("train", "valid"):
        path = os.path.join(root, f"{split}.txt")
        if not os.path.exists(path):
            with open(path, "w") as fh:
                fh.write(text if split == "train" else text[::-1])
    cfg = load_config(
        "ptb-tiny",
        [
            *("--model.d_model 32 --model.n_layers 2 --model.n_heads 2 --model.seq_len 32").split(),
            *("--model.peer.n_experts 64 --model.peer.heads 2 --model.peer.top_k 4 --model.peer.d_key 16").split(),
            *(f"--model.ffw {ffw} --train.device cpu --train.batch_size 8 --train.max_steps {steps}").split(),
            *("--train.warmup_steps 4 --train.log_interval 2 --train.eval_interval 6 --train.eval_batches 2").split(),
            *("--train.checkpoint false --train.tensorboard false --data.tokenizer byte").split(),
            "--data.train",
            os.path.join(root, "train.txt"),
            "--data.cache_dir",
            os.path.join(root, "cache"),
            "--data.valid.held",
            os.path.join(root, "valid.txt"),
            "--data.valid.same",
            os.path.join(root, "train.txt"),
        ],
    )
    cfg.data.valid.pop("ptb", None)  # no PTB: the test does not depend on the treebank data
    run_dir = os.path.join(root, name)
    train(cfg, run_dir, progress=False)
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("plot"))
    return tiny_run(root, "peer"), tiny_run(root, "dense", ffw="dense", steps=12)


def plot_cli(argv, capsys):
    from torchpeer.cli import main

    status = main(["plot", *argv])
    out, err = capsys.readouterr()
    return status, out, err


def colour_pixels(img, rgb, tol=12):
    """Number of pixels within ``tol`` of colour ``rgb`` (0-255)."""
    px = (img[..., :3] * 255).round().astype(int)
    return int((np.abs(px - np.array(rgb)).max(axis=-1) <= tol).sum())


def test_metrics_of_a_real_run(runs):
    run = read_metrics(runs[0])
    assert run.name == "peer" and run.tokens_per_step == 8 * 32
    assert run.train["loss"].steps == list(range(2, 25, 2))
    assert run.train["loss"].values[-1] < run.train["loss"].values[0]  # it learned something
    assert set(run.evals) == {"held", "same"}
    ppl = run.evals["held"]["ppl"]
    assert ppl.steps == [6, 12, 18, 24] and ppl.final == [False, False, False, True]
    layers = {layer for _, layer in run.routing}
    assert len(layers) == 1 and all(0 < v <= 100 for v in next(iter(run.routing.values()))["usage_pct"].values)
    assert read_metrics(runs[1]).routing == {}  # dense: no routed layer


def test_plot_png_is_not_blank(runs, tmp_path, capsys):
    import matplotlib.image

    out = tmp_path / "fig.png"
    status, stdout, _ = plot_cli([runs[0], "--out", str(out)], capsys)
    assert status == 0 and str(out) in stdout
    img = matplotlib.image.imread(str(out))
    assert img.shape[0] > 500 and img.shape[1] > 1000
    assert img[..., :3].std() > 0.05  # not a uniform canvas
    colours = np.unique((img[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) > 100
    # single run: train, eval 'held', eval 'same' are the first three tab10 colours
    for rgb in (TAB_BLUE, TAB_ORANGE, TAB_GREEN):
        assert colour_pixels(img, rgb) > 200, rgb
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]  # atomic write left nothing behind


def test_default_out_and_several_runs(runs, tmp_path, capsys, monkeypatch):
    import matplotlib.image

    status, stdout, _ = plot_cli([runs[0], "--x", "tokens"], capsys)
    assert status == 0 and os.path.isfile(os.path.join(runs[0], "metrics.png"))
    monkeypatch.chdir(tmp_path)
    status, stdout, _ = plot_cli([*runs, "--x", "time"], capsys)
    assert status == 0 and stdout.strip() == "wrote runs.png"
    img = matplotlib.image.imread(str(tmp_path / "runs.png"))
    assert colour_pixels(img, TAB_BLUE) > 200 and colour_pixels(img, TAB_ORANGE) > 200  # one colour per run


def test_a_damaged_metrics_line_in_the_middle_is_said_a_cut_last_line_is_not(tmp_path, capsys):
    good = [json.dumps({"step": s, "tokens": 100 * s, "loss": 5.0 - s / 100, "lr": 1e-3}) for s in (10, 20, 30)]
    (tmp_path / "metrics.jsonl").write_text(good[0] + "\n" + '{"step": 15, "lo\n' + "\n".join(good[1:]) + "\n")
    assert read_metrics(str(tmp_path)).train["loss"].steps == [10, 20, 30]
    err = capsys.readouterr().err
    assert "line(s) 2 are not JSON objects and were skipped (a damaged file)" in err
    (tmp_path / "metrics.jsonl").write_text("\n".join(good) + '\n{"step": 40, "loss": 3.')  # cut by a kill
    assert read_metrics(str(tmp_path)).train["loss"].steps == [10, 20, 30]
    assert capsys.readouterr().err == ""


def test_a_reports_repeated_reads_of_one_log_parse_it_once_until_it_changes(tmp_path, capsys):
    """The report's sections each read every run's log; the parse is shared while the file stands (a
    damaged line is said once), and a line that lands is read."""
    from torchpeer.viz.metrics import read_metrics_if_logged

    good = [json.dumps({"step": s, "tokens": 100 * s, "loss": 5.0 - s / 100, "lr": 1e-3}) for s in (10, 20)]
    path = tmp_path / "metrics.jsonl"
    path.write_text(good[0] + "\n" + '{"step": 15, "lo\n' + good[1] + "\n")
    first = read_metrics_if_logged(str(tmp_path))
    assert first.train["loss"].steps == [10, 20] and read_metrics_if_logged(str(tmp_path) + "/") is first
    assert capsys.readouterr().err.count("a damaged file") == 1
    with open(path, "a") as f:
        f.write(json.dumps({"step": 30, "tokens": 3000, "loss": 4.5, "lr": 1e-3}) + "\n")
    assert read_metrics_if_logged(str(tmp_path)).train["loss"].steps == [10, 20, 30]
    assert read_metrics_if_logged(str(tmp_path / "nothing")) is None


def test_metrics_parsing_skips_cut_lines_and_keeps_the_last_repeat(tmp_path):
    usage = {"blocks.1.ffw": {"usage_pct": 40, "kl": 2}}
    lines = [
        {"step": 0, "event": "start", "tokens_per_step": 100},
        {"step": 10, "tokens": 1000, "loss": 5.0, "lr": 1e-3, "tok_per_s": 10.0, "time": 1.0},
        {"step": 20, "tokens": 2000, "loss": 4.0, "lr": 1e-3, "tok_per_s": 11.0, "time": 2.0},
        {"step": 20, "eval": {"v": {"loss": 4.5, "ppl": 90.0, "bpb": 2.0, "usage": usage}}},
        {"step": 20, "eval": {"v": {"loss": 4.4, "ppl": 81.0, "bpb": 1.9, "usage": {}}}, "final": True},
    ]
    text = "".join(json.dumps(r) + "\n" for r in lines) + '{"step": 30, "loss": 3.'  # cut by a kill
    (tmp_path / "metrics.jsonl").write_text(text)
    run = read_metrics(str(tmp_path))
    assert run.train["loss"].steps == [10, 20] and run.train["loss"].values == [5.0, 4.0]
    assert run.evals["v"]["ppl"].values == [81.0] and run.evals["v"]["ppl"].final == [True]
    assert run.routing[("v", "blocks.1.ffw")]["kl"].values == [2.0]
    assert run.tokens_at(30) == 3000


def test_errors_are_one_clear_line(tmp_path, capsys):
    from torchpeer.viz.plot import save_plot

    status, _, err = plot_cli([str(tmp_path / "nope")], capsys)
    assert status == 2 and err == f"error: run dir {tmp_path / 'nope'} does not exist\n"

    with pytest.raises(FileNotFoundError, match="does not exist"):
        save_plot([str(tmp_path / "nope")], str(tmp_path / "a.png"))
    with pytest.raises(FileNotFoundError, match="has no metrics.jsonl"):
        save_plot([str(tmp_path)], str(tmp_path / "a.png"))
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "event": "start"}\n')
    with pytest.raises(ValueError, match="no training or evaluation records"):
        save_plot([str(tmp_path)], str(tmp_path / "a.png"))
    with pytest.raises(ValueError, match="ending in .png"):
        save_plot([str(tmp_path)], str(tmp_path / "a.jpg"))
    assert not os.path.exists(tmp_path / "a.png")


def test_missing_matplotlib_says_how_to_install(runs, tmp_path):
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'matplotlib':\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from torchpeer.cli import main\n"
        "sys.exit(main(['plot', sys.argv[1], '--out', sys.argv[2]]))\n"
    )
    out = tmp_path / "x.png"
    proc = subprocess.run([sys.executable, "-c", code, runs[0], str(out)], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "pip install matplotlib" in proc.stderr and "[viz]" in proc.stderr
    assert not out.exists()


def test_without_matplotlib_a_wrong_folder_is_said_first(tmp_path, capsys, monkeypatch):
    """`torchpeer plot runs/nothere` without matplotlib said to install matplotlib, and after that that
    the folder does not exist: the paths are read first, matplotlib is imported after them."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    status, _, err = plot_cli([str(tmp_path / "nothere")], capsys)
    assert status == 2 and err == f"error: run dir {tmp_path / 'nothere'} does not exist\n"
    status, _, err = plot_cli([str(tmp_path)], capsys)
    assert status == 2 and "has no metrics.jsonl" in err and "pip install" not in err
    record = {"step": 10, "tokens": 1000, "loss": 5.0, "lr": 1e-3}
    (tmp_path / "metrics.jsonl").write_text(json.dumps(record) + "\n")
    status, _, err = plot_cli([str(tmp_path)], capsys)  # the run is fine: now matplotlib is what is missing
    assert status == 2 and err.count("\n") == 1 and "pip install matplotlib" in err
    assert not os.path.exists(tmp_path / "metrics.png")


def test_a_folder_of_runs_names_them_and_the_report(tmp_path, capsys):
    """`torchpeer plot SWEEP_DIR` (runs below it, each with metrics.jsonl): one line naming the runs
    to give, and `torchpeer report` when it is a sweep's folder; not 'has no metrics.jsonl'."""
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 3.0}) + "\n")
    status, _, err = plot_cli([str(tmp_path)], capsys)
    assert status == 2 and err.count("\n") == 1
    assert "is a folder of 2 runs, not one run: give the runs to draw together" in err
    assert f"e.g. torchpeer plot {tmp_path / 'a'} {tmp_path / 'b'}" in err
    assert "torchpeer report" not in err
    (tmp_path / "results.jsonl").write_text("")
    status, _, err = plot_cli([str(tmp_path)], capsys)
    assert status == 2 and err.rstrip().endswith(f"a sweep's figures: torchpeer report {tmp_path}")


def test_a_checkpoint_or_export_folder_names_its_run(tmp_path, capsys, monkeypatch):
    """`torchpeer plot RUN/checkpoints/step_N` or an export-hf folder (torchpeer_origin.json names its
    checkpoint): one line giving the run folder to plot, not 'not a torchpeer run dir'."""
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000010").mkdir(parents=True)
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 3.0}) + "\n")
    export = tmp_path / "export"
    export.mkdir()
    origin = {"checkpoint": str(run / "checkpoints" / "step_00000010")}  # absolute, as export-hf writes it
    (export / "torchpeer_origin.json").write_text(json.dumps(origin))
    monkeypatch.chdir(tmp_path)
    status, _, err = plot_cli([os.path.join("run", "checkpoints", "step_00000010") + os.sep], capsys)
    assert status == 2 and err == (
        f"error: {os.path.join('run', 'checkpoints', 'step_00000010')}{os.sep} is a checkpoint folder, which has "
        "no curves of its own: torchpeer plot run\n"
    )
    status, _, err = plot_cli(["export"], capsys)
    assert status == 2
    assert err == "error: export is an export-hf folder, which has no curves of its own: torchpeer plot run\n"
    (run / "metrics.jsonl").unlink()  # a run that never logged: the general message
    status, _, err = plot_cli(["export"], capsys)
    assert status == 2 and "export has no metrics.jsonl: not a torchpeer run dir" in err


def test_a_committed_run_with_only_metrics_jsonl_xz_is_read_found_and_plotted(runs, tmp_path, capsys):
    """A committed copy (experiments/results: metrics.jsonl.xz, no plain file) reads as the run's own
    log, counts as a run in a folder of runs, and plots; a damaged one is one error line naming it."""
    import lzma

    import matplotlib.image

    from torchpeer.viz.metrics import read_metrics_if_logged

    committed = tmp_path / "results" / "peer"
    committed.mkdir(parents=True)
    with open(os.path.join(runs[0], "metrics.jsonl"), "rb") as fh:
        (committed / "metrics.jsonl.xz").write_bytes(lzma.compress(fh.read()))
    plain, packed = read_metrics(runs[0]), read_metrics(str(committed))
    assert packed.path == str(committed) and (packed.train, packed.evals) == (plain.train, plain.evals)
    assert packed.routing == plain.routing and packed.tokens_per_step == plain.tokens_per_step
    assert read_metrics(str(committed / "metrics.jsonl.xz")).train == plain.train  # the file itself, too
    status, _, err = plot_cli([str(tmp_path / "results")], capsys)
    assert status == 2 and "is a folder of 1 runs, not one run" in err
    out = tmp_path / "fig.png"
    status, stdout, _ = plot_cli([str(committed), "--out", str(out)], capsys)
    assert status == 0 and str(out) in stdout
    assert colour_pixels(matplotlib.image.imread(str(out)), TAB_BLUE) > 200

    packed_bytes = (committed / "metrics.jsonl.xz").read_bytes()
    (committed / "metrics.jsonl.xz").write_bytes(packed_bytes[: len(packed_bytes) // 2])
    status, _, err = plot_cli([str(committed), "--out", str(out)], capsys)
    assert status == 2 and err.count("\n") == 1
    assert err.startswith(f"error: {committed / 'metrics.jsonl.xz'} is a damaged xz file (") and "git checkout" in err
    with pytest.raises(ValueError, match="damaged xz file"):  # a report says it too, not "no log yet"
        read_metrics_if_logged(str(committed))
