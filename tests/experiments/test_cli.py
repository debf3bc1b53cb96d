"""`torchpeer sweep` / `torchpeer report` through the main command line: plan output, one-line errors."""

from torchpeer.cli import main


def test_sweep_dry_run_and_errors(tmp_path, capsys):
    assert main(["sweep", "cpu-smoke", "--dry-run", "--runs-dir", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "sweep cpu-smoke (isoflop): 6 runs" in out and "peer-d48-1.5e10" in out and "unknown" in out
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
