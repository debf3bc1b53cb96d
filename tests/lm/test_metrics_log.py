"""metrics.jsonl on resume (MetricsLog.truncate_after through torchpeer/jsonl.py): records after the
checkpoint's step go, the final evaluation of that step goes, a cut last line goes in silence, and a
damaged line in the middle goes with one warning that names it."""

import json

from torchpeer.lm.metrics import MetricsLog


def write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))


def steps_and_final(path):
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    return [(r["step"], bool(r.get("final"))) for r in recs]


def test_resume_keeps_what_came_before_the_checkpoint(tmp_path, capsys):
    recs = [{"step": 0, "event": "start"}, {"step": 10, "loss": 3.5, "lr": 1e-3}, {"step": 20, "loss": 3.25}]
    recs += [{"step": 20, "eval": {"v": {"loss": 3.0}}, "final": True}, {"step": 30, "loss": 3.0}]
    write(tmp_path / "metrics.jsonl", [json.dumps(r) for r in recs])
    MetricsLog(str(tmp_path), tensorboard=False, start_step=20)
    assert steps_and_final(tmp_path / "metrics.jsonl") == [(0, False), (10, False), (20, False)]
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[1]) == recs[1]  # values kept exactly
    assert capsys.readouterr().err == ""


def test_a_cut_last_line_goes_silently_a_damaged_middle_line_is_named(tmp_path, capsys):
    good = [json.dumps({"step": s, "loss": 4.0 - s / 100}) for s in (10, 20, 30)]
    write(tmp_path / "metrics.jsonl", [good[0], good[1], '{"step": 35, "lo'])
    MetricsLog(str(tmp_path), tensorboard=False, start_step=100)
    assert steps_and_final(tmp_path / "metrics.jsonl") == [(10, False), (20, False)]
    assert capsys.readouterr().err == ""

    write(tmp_path / "metrics.jsonl", [good[0], "[1, 2]", '{"step": 15, "lo', good[1], good[2]])
    MetricsLog(str(tmp_path), tensorboard=False, start_step=100)
    assert steps_and_final(tmp_path / "metrics.jsonl") == [(10, False), (20, False), (30, False)]
    err = capsys.readouterr().err
    assert "metrics.jsonl: line(s) 2, 3 are not JSON objects and were dropped on resume (a damaged file)" in err
    assert err.count("\n") == 1
