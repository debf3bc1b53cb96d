"""scripts/ingest_device.py: a device call's tgz and logs merged into a local runs folder."""

import json
import os
import sys
import tarfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "scripts"))
try:
    import ingest_device
finally:
    sys.path.remove(os.path.join(REPO, "scripts"))


def _write_records(path, records):
    with open(path, "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in records)


def _device_call(root, name, records, runs, log_text):
    """A files_at folder as device_sweep.sh leaves it: NAME.tgz (runs/NAME), sweep_NAME.log, smi_NAME.csv."""
    src = root / "src" / "runs" / name
    src.mkdir(parents=True)
    if records is not None:  # None: every run was cut before one was recorded (no results.jsonl yet)
        _write_records(src / "results.jsonl", records)
    for run in runs:
        (src / run).mkdir()
        (src / run / "sweep_run.json").write_text(json.dumps({"name": run}))
        (src / run / "summary.json").write_text(json.dumps({"run": run}))
    out = root / "out"
    out.mkdir()
    with tarfile.open(out / f"{name}.tgz", "w:gz") as tar:
        tar.add(src, arcname=f"runs/{name}")
    (out / f"sweep_{name}.log").write_text(log_text)
    (out / f"smi_{name}.csv").write_text("utilization.gpu [%], memory.used [MiB]\n" + log_text)
    return str(out)


def test_new_records_and_runs_are_added_logs_numbered_and_a_repeat_changes_nothing(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    old = {"run": "a", "loss": 3.0}
    _write_records(runs / "results.jsonl", [old])
    (runs / "sweep_command2.log").write_text("an earlier command\n")
    dev = _device_call(
        tmp_path / "d1", "x", [{"run": "b", "loss": 2.9}, {"run": "c", "loss": 2.8}], ["b", "c"], "cmd 3\n"
    )
    added = ingest_device.ingest([dev], str(runs))
    assert added["records"] == ["b", "c"]
    lines = [json.loads(x) for x in (runs / "results.jsonl").read_text().splitlines()]
    assert [r["run"] for r in lines] == ["a", "b", "c"] and lines[0] == old  # local lines kept, first
    assert json.loads((runs / "c" / "summary.json").read_text()) == {"run": "c"}
    assert (runs / "sweep_command3.log").read_text() == "cmd 3\n"  # the next free number after 2
    assert (runs / "smi_command1.csv").exists()
    again = ingest_device.ingest([dev], str(runs))
    assert again["records"] == [] and again["logs"] == []
    assert len((runs / "results.jsonl").read_text().splitlines()) == 3
    assert sorted(p.name for p in runs.glob("sweep_command*.log")) == ["sweep_command2.log", "sweep_command3.log"]


def test_a_run_recorded_on_both_sides_keeps_the_local_record_and_says_so(tmp_path, capsys):
    runs = tmp_path / "runs"
    runs.mkdir()
    _write_records(runs / "results.jsonl", [{"run": "a", "loss": 3.0}])
    dev = _device_call(tmp_path / "d1", "x", [{"run": "a", "loss": 3.1}], ["a"], "log\n")
    assert ingest_device.ingest([dev], str(runs))["records"] == []
    assert json.loads((runs / "results.jsonl").read_text())["loss"] == 3.0
    assert "kept the local record" in capsys.readouterr().err


def test_a_damaged_tgz_stops_before_anything_changes(tmp_path, capsys):
    runs = tmp_path / "runs"
    runs.mkdir()
    _write_records(runs / "results.jsonl", [{"run": "a"}])
    good = _device_call(tmp_path / "d1", "x", [{"run": "b"}], ["b"], "log\n")
    bad = tmp_path / "d2"
    bad.mkdir()
    (bad / "x.tgz").write_bytes(b"not a tar file")
    with pytest.raises(SystemExit) as e:
        ingest_device.main([good, str(bad), "--runs", str(runs)])
    assert e.value.code == 2 and "cannot be unpacked" in capsys.readouterr().err
    assert (runs / "results.jsonl").read_text().count("\n") == 1 and not (runs / "b").exists()
    with pytest.raises(SystemExit):
        ingest_device.main([str(tmp_path / "missing"), "--runs", str(runs)])
    assert "is not a folder" in capsys.readouterr().err


def test_a_command_whose_runs_were_all_cut_brings_their_folders_and_no_record(tmp_path):
    runs = tmp_path / "runs"
    cut = _device_call(tmp_path / "d1", "x", None, ["a", "b"], "stopped\n")
    done = _device_call(tmp_path / "d2", "x", [{"run": "a", "loss": 3.0}], ["a", "b"], "finished\n")
    added = ingest_device.ingest([cut, done], str(runs))
    assert added["records"] == ["a"] and sorted(set(added["runs"])) == ["a", "b"]
    assert [json.loads(x)["run"] for x in (runs / "results.jsonl").read_text().splitlines()] == ["a"]
    assert (runs / "sweep_command1.log").read_text() == "stopped\n"
    assert (runs / "sweep_command2.log").read_text() == "finished\n"


def test_a_tgz_with_two_runs_folders_is_refused(tmp_path, capsys):
    dev = _device_call(tmp_path / "d1", "x", [{"run": "a"}], ["a"], "log\n")
    other = tmp_path / "d1" / "src" / "runs" / "y"
    (other / "c").mkdir(parents=True)
    (other / "c" / "sweep_run.json").write_text("{}")
    with tarfile.open(os.path.join(dev, "x.tgz"), "w:gz") as tar:
        tar.add(tmp_path / "d1" / "src" / "runs", arcname="runs")
    with pytest.raises(SystemExit) as e:
        ingest_device.main([dev, "--runs", str(tmp_path / "runs")])
    assert e.value.code == 2 and "holds 2 runs folders" in capsys.readouterr().err


def test_a_command_of_two_sweeps_gives_each_runs_folder_its_own_tgz_and_logs(tmp_path, capsys):
    """Two sweeps side by side in one command leave a.tgz and b.tgz in one folder: RUNS named b takes
    b's runs, records and logs only; RUNS named after neither is refused with both names."""
    one = _device_call(tmp_path / "d1", "a", [{"run": "ra", "loss": 3.0}], ["ra"], "log a\n")
    two = _device_call(tmp_path / "d2", "b", [{"run": "rb", "loss": 2.9}], ["rb"], "log b\n")
    for f in os.listdir(two):
        os.replace(os.path.join(two, f), os.path.join(one, f))  # one device folder holding both trios
    runs = tmp_path / "runs" / "b"
    added = ingest_device.ingest([one], str(runs))
    assert added["records"] == ["rb"]
    assert sorted(p.name for p in runs.iterdir()) == ["rb", "results.jsonl", "smi_command1.csv", "sweep_command1.log"]
    assert (runs / "sweep_command1.log").read_text() == "log b\n"
    with pytest.raises(SystemExit):
        ingest_device.ingest([one], str(tmp_path / "runs" / "c"))
    assert "a.tgz, b.tgz and no c.tgz" in capsys.readouterr().err
