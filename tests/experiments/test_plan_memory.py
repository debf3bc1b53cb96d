"""The --dry-run table's GiB column: each run's estimated step memory (torchpeer.lm.memory), so that a
GPU job can be planned (how many runs of a sweep fit one GPU side by side) before it starts."""

from tests.experiments.test_epoch_rule import tiny
from torchpeer.experiments import parse_spec, plan_sweep
from torchpeer.experiments.runner import format_plan
from torchpeer.lm.memory import estimate_step_memory


def test_dry_run_table_shows_each_runs_estimated_memory(tmp_path):
    spec = parse_spec(tiny())
    runs = plan_sweep(spec, str(tmp_path))
    text = format_plan(spec, runs, [])
    lines = text.splitlines()
    header = next(line.split() for line in lines if line.startswith("run "))
    col = header.index("GiB")
    for run in runs:
        row = next(line.split() for line in lines if line.startswith(run.name + " "))
        want = estimate_step_memory(run.cfg, "cuda").total / 2**30  # ptb-tiny's device is auto: a GPU's
        assert row[col] == f"{want:.1f}"
    assert "GiB: a run's estimated peak memory on a CUDA GPU" in text
    # a CPU run is estimated for the CPU (its optimizer step holds one more fp32 copy of the largest tensor)
    spec_cpu = parse_spec({**tiny(), "base": {**tiny()["base"], "train.device": "cpu"}})
    run = plan_sweep(spec_cpu, str(tmp_path / "cpu"))[0]
    row = next(line.split() for line in format_plan(spec_cpu, [run], []).splitlines() if line.startswith(run.name))
    assert row[col] == f"{estimate_step_memory(run.cfg, 'cpu').total / 2**30:.1f}"
