"""`torchpeer sweep` / `torchpeer report` through the main command line: plan output, one-line errors."""

import os

from torchpeer.cli import main


def test_sweep_dry_run_and_errors(tmp_path, capsys):
    assert main(["sweep", "cpu-smoke", "--dry-run", "--runs-dir", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "sweep cpu-smoke (isoflop): 6 runs" in out and "peer-d48-7.5e9" in out and "unknown" in out
    assert not (tmp_path / "r").exists()  # a dry run writes nothing

    bad = tmp_path / "bad.toml"
    bad.write_text('[sweep]\nbase = "ptb-tiny"\nbudgets = [1e10]\n[variants.a]\nlr = 1\n')
    assert main(["sweep", str(bad), "--runs-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "unknown field 'lr' in [variants.a]" in err and "\n" not in err

    assert main(["sweep", "cpu-smoke", "--only", "moe-*", "--dry-run"]) == 2
    assert "--only 'moe-*' matches no run" in capsys.readouterr().err


def test_report_without_results_is_one_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "results.jsonl is missing" in err and err.count("\n") == 1
    (tmp_path / "results.jsonl").write_text("")
    assert main(["report", str(tmp_path)]) == 2
    assert "has no finished runs" in capsys.readouterr().err


def test_sweep_refuses_a_training_runs_folder_as_its_runs_dir(tmp_path, capsys):
    """--runs-dir of one training run's folder (runs/x of torchpeer train) made the sweep write its run
    folders and results.jsonl among the run's files, without a word: one error line now, before
    anything is planned or written, also for --dry-run. A new, empty or sweep folder is fine."""
    run = tmp_path / "x"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    for dry in (["--dry-run"], []):
        assert main(["sweep", "cpu-smoke", "--runs-dir", str(run), "--only", "dense-d48*", *dry]) == 2
        err = capsys.readouterr().err
        assert err == (
            f"error: {run} is a training run's folder (it holds config.json, checkpoints), not a sweep's runs "
            "folder; a sweep would put its runs among the run's files, so nothing was written: give --runs-dir "
            "a new or empty folder, or a sweep's runs folder (it holds results.jsonl)\n"
        )
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.json"]
    (tmp_path / "sweep").mkdir()
    assert main(["sweep", "cpu-smoke", "--runs-dir", str(tmp_path / "sweep"), "--dry-run"]) == 0


def test_report_out_naming_a_file_is_one_error(tmp_path, capsys):
    """`report RUNS --out RUNS/report.md` made a folder called report.md; --out is a folder."""
    for out in (str(tmp_path / "report.md"), str(tmp_path / "fig.PNG")):
        assert main(["report", str(tmp_path), "--out", out]) == 2
        err = capsys.readouterr().err
        assert "names a file; --out is the folder" in err and err.count("\n") == 1
        assert not os.path.exists(out)
    (tmp_path / "notes").write_text("x")
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "notes")]) == 2
    assert "names a file" in capsys.readouterr().err


def test_an_interrupted_sweep_says_how_to_go_on(tmp_path, capsys, monkeypatch):
    """Ctrl-C in a sweep printed only "interrupted": it now names results.jsonl and the command that
    continues the sweep (its runs folder and options), and exits 130 (143 for a run's SIGTERM)."""
    import signal

    import torchpeer.experiments.runner as runner
    from torchpeer.lm.train import TrainingInterrupted

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run_sweep", interrupted)
    runs = str(tmp_path / "r")
    assert main(["sweep", "cpu-smoke", "--runs-dir", runs, "--parallel", "2", "--time-limit", "470"]) == 130
    err = capsys.readouterr().err
    assert err == (
        f"interrupted: runs finished so far are in {runs}/results.jsonl; to go on (finished runs are skipped, "
        f"an interrupted one resumes): torchpeer sweep cpu-smoke --runs-dir {runs} --time-limit 470 --parallel 2\n"
    )

    def terminated(*args, **kwargs):
        raise TrainingInterrupted(signal.SIGTERM, 12, None)

    monkeypatch.setattr(runner, "run_sweep", terminated)
    assert main(["sweep", "cpu-smoke", "--runs-dir", runs]) == 143
    assert capsys.readouterr().err.endswith(f"torchpeer sweep cpu-smoke --runs-dir {runs}\n")


def test_dry_run_builds_every_run_and_names_one_that_would_fail(tmp_path, capsys):
    """A run whose model plans but whose training build fails (here a fused table optimizer on a
    model with no PEER layer) is named by --dry-run, before any device time goes to it."""
    spec = tmp_path / "fused.toml"
    base = '[sweep]\nbase = "ptb-tiny"\nbudgets = [1e12]\n[base]\n"train.device" = "cpu"\n'
    runs = '[variants.peer]\n"train.expert_optimizer" = "rowwise_adam"\n'
    spec.write_text(base + runs)
    assert main(["sweep", str(spec), "--dry-run", "--runs-dir", str(tmp_path / "r")]) == 0
    assert "build check passed: 1 run(s) to train built" in capsys.readouterr().out
    dense = '[variants.dense]\n"model.ffw" = "dense"\n"train.expert_optimizer" = "rowwise_adam"\n'
    spec.write_text(base + runs + dense)
    assert main(["sweep", str(spec), "--dry-run", "--runs-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "1 of the 2 runs to train would fail at build" in err and "dense-1e12: ValueError: rowwise_adam needs" in err
    assert err.count("\n") == 1 and not (tmp_path / "r").exists()
