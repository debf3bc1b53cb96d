"""Report: markdown tables and PNG figures from synthetic results; the PNGs are real plots."""

import json
import os

import numpy as np
import pytest

from torchpeer.experiments import append_result, write_report
from torchpeer.experiments.fit import fit_isoflop


def load_png(path) -> np.ndarray:
    """(H, W, 3) uint8 pixels of a PNG (PIL if installed, else matplotlib)."""
    try:
        from PIL import Image

        return np.asarray(Image.open(path).convert("RGB"))
    except ImportError:
        import matplotlib.image

        return (matplotlib.image.imread(path)[..., :3] * 255).astype(np.uint8)


def assert_real_plot(path, colours=()):
    """Not blank: pixel variance, many distinct colours, and each expected line colour present."""
    px = load_png(path)
    assert px.shape[0] > 200 and px.shape[1] > 300, px.shape
    assert px.std() > 20
    distinct = np.unique(px.reshape(-1, 3), axis=0)
    assert len(distinct) > 30, len(distinct)
    for hex_colour in colours:
        rgb = np.array([int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)])
        near = (np.abs(px.astype(int) - rgb).sum(-1) < 30).sum()
        assert near > 50, f"{hex_colour} hardly drawn in {os.path.basename(path)} ({near} pixels)"


def rec(run, **kw):
    base = {
        "run": run,
        "sweep": "study",
        "kind": "isoflop",
        "variant": run.rsplit("-", 1)[0],
        "eval_set": "all",
        "tokens": 1000,
        "train_flops": 1e12,
        "tokens_per_s": 5e5,
        "total_params": 10**7,
    }
    return {**base, **kw}


def valid(loss, usage=None, kl=None, other=0.1):
    layer = {"blocks.2.ffw": {"usage_pct": usage, "kl": kl}} if usage is not None else {}
    return {
        "all": {"loss": loss, "ppl": float(np.exp(loss)), "bpb": loss / 2, "usage": layer},
        "books": {"loss": loss + other, "ppl": float(np.exp(loss + other)), "bpb": 1.0, "usage": layer},
    }


@pytest.fixture
def runs_dir(tmp_path):
    d = tmp_path / "runs"
    optimum = {1e15: 3e6, 1e16: 1e7}
    for budget in (1e15, 1e16):
        for fam, floor in (("dense", 3.3), ("peer", 3.2)):
            for i, p in enumerate(np.geomspace(1e6, 3e7, 5)):
                loss = floor + 0.25 * (np.log10(p) - np.log10(optimum[budget])) ** 2 - (0.2 if budget == 1e16 else 0)
                name = f"{fam}-s{i}-{budget:.0e}"
                append_result(
                    str(d),
                    rec(
                        name,
                        family=fam,
                        budget_flops=budget,
                        active_params=float(p),
                        valid=valid(float(loss), 40.0 if fam == "peer" else None, 1.0),
                    ),
                )
                run_dir = d / name
                run_dir.mkdir(parents=True)
                with open(run_dir / "metrics.jsonl", "w") as fh:
                    fh.write(json.dumps({"step": 0, "event": "start"}) + "\n")
                    for step in range(1, 40):
                        fh.write(json.dumps({"step": step, "tokens": step * 100, "loss": loss + 3 / step}) + "\n")
    for norm, shift in (("batch", 0.0), ("none", 0.15)):
        for n in (128**2, 256**2, 512**2, 1024**2):
            u = np.log2(n)
            append_result(
                str(d),
                rec(
                    f"n{n}-{norm}-1e15",
                    sweep="ablate",
                    kind="ablation",
                    family="peer",
                    budget_flops=1e15,
                    active_params=5e6,
                    x_field="model.peer.n_experts",
                    x=n,
                    series_field="model.peer.query_norm",
                    series=norm,
                    valid=valid(3.5 - 0.02 * u + shift, 90 - 3 * u - 40 * shift, 0.1 * u + shift),
                ),
            )
    return d


def test_report_writes_tables_and_real_pngs(runs_dir):
    written = write_report(str(runs_dir))
    # no curves figure for the ablation: its runs have no metrics.jsonl here
    assert set(written) == {"report", "rows", "isoflop-study", "curves-study", "ablation-ablate"}
    md = open(written["report"]).read()
    assert "## study (isoflop)" in md and "## ablate (ablation)" in md
    # isoFLOP fits: the fitted optimum of each (budget, family) is the synthetic one (3M at 1e15, 10M at 1e16)
    fit_rows = [line for line in md.splitlines() if line.startswith("| 1e+15 | peer | 5 |")]
    assert len(fit_rows) == 1 and "| 3M |" in fit_rows[0] and "| 3.2000 |" in fit_rows[0]
    assert any(line.startswith("| 1e+16 | dense | 5 | 10M |") for line in md.splitlines())
    # the closing note: each family's optimal loss per budget, PEER's paired difference, the paper's order
    ahead = "- **1e+15 FLOPs**: peer 3.2000 = ppl 24.53 (fit), dense 3.3000 = ppl 27.11 (fit)."
    assert ahead in md
    assert "PEER minus dense, paired at each family's optimum size: -0.1000 nats (-9.5 % ppl) (seed 0): PEER" in md
    # Table 1: every eval set is a column, the run nearest each family's fitted optimum per budget a row
    head = next(line for line in md.splitlines() if line.startswith("| budget | family | run (size nearest"))
    assert head.endswith("| all | books |")
    assert "| 1e+15 | peer | peer-s1-1e+15 | 0 | 2.34M | 24.60 | 27.19 |" in md
    # the ablation table: x, series, usage and KL columns from the records
    assert "| 16384 | batch | n16384-batch-1e15 | 3.2200 |" in md and "| 1048576 | none |" in md
    for key in ("isoflop-study", "ablation-ablate", "curves-study"):
        assert f"({os.path.basename(written[key])})" in md  # linked from the markdown
    assert_real_plot(written["isoflop-study"], colours=("#1f77b4", "#d62728"))
    assert_real_plot(written["ablation-ablate"])
    assert_real_plot(written["curves-study"], colours=("#1f77b4", "#d62728"))
    assert [f for f in os.listdir(runs_dir / "report") if f.endswith(".tmp")] == []


def test_report_params_choice_and_empty(tmp_path, runs_dir):
    out = tmp_path / "elsewhere"
    written = write_report(str(runs_dir), str(out), params_key="total_params")
    assert os.path.dirname(written["report"]) == str(out)
    assert "fitted optimum (params)" in open(written["report"]).read()
    (tmp_path / "nothing").mkdir()
    (tmp_path / "nothing" / "results.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="has no finished runs"):
        write_report(str(tmp_path / "nothing"))


def test_report_of_one_training_run_points_to_plot(tmp_path):
    """A run folder of 'torchpeer train' (metrics.jsonl, no results.jsonl) is not advised to be made a
    sweep's runs folder ('run torchpeer sweep SPEC --runs-dir RUN'): it names torchpeer plot."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 3.0}) + "\n")
    with pytest.raises(ValueError) as e:
        write_report(str(run))
    assert str(e.value) == (
        f"{run} is one training run, not a sweep's runs folder (no results.jsonl); its curves: torchpeer plot {run}"
    )
    assert not (run / "report").exists()


def test_blank_png_fails_the_check(tmp_path):
    """The plot check itself can fail: a figure with nothing drawn is rejected."""
    from torchpeer.experiments.figures import _figure, save_png

    fig, axes = _figure(1)
    axes[0].set_axis_off()
    path = save_png(fig, str(tmp_path / "blank.png"))
    with pytest.raises(AssertionError):
        assert_real_plot(path)
    assert fit_isoflop([1, 2, 4], [3, 2, 3]).bracketed


def test_code_line_counts_runs_per_commit():
    """The line under each Runs table says which commits trained the runs (a sweep can span
    commits); records from before the "code" field count as unrecorded."""
    from torchpeer.experiments.report import code_line

    recs = [
        {"code": {"commit": "abc1234", "torch": "2.11.0"}},
        {"code": {"commit": "abc1234", "torch": "2.11.0"}},
        {"code": {"commit": "def5678", "torch": "2.13.0"}},
        {},
    ]
    assert code_line(recs) == (
        "Code: commit abc1234 (2 runs), def5678 (1 run), unrecorded (1 run); torch 2.11.0, 2.13.0."
    )
    assert code_line([{}]) == "Code: commit unrecorded (1 run)."


def test_human_count_and_the_isoflop_axis_labels():
    """The isoFLOP x-axis reads "2M", "5M" at 1, 2, 5 x 10^n and has no minor labels (the default
    "3 x 10^6" minor labels of a narrow range overlapped in the 3e15 panel)."""
    from torchpeer.experiments.figures import _compact_log_ticks, _figure, human_count

    assert [human_count(x) for x in (30, 5e5, 1.2e6, 2e7, 2e9)] == ["30", "500k", "1.2M", "20M", "2G"]
    fig, (ax,) = _figure(1)
    ax.plot([2.9e6, 7.4e6], [3.4, 3.5], "o")
    ax.set_xscale("log")
    _compact_log_ticks(ax)
    fig.canvas.draw()
    major = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    assert "5M" in major and all(t[-1] in "kMG" or t.isdigit() for t in major), major
    assert not [t.get_text() for t in ax.get_xticklabels(minor=True) if t.get_text()]


def test_runs_table_shows_a_shared_pool_union_usage_only_when_a_run_has_one():
    from torchpeer.experiments.report import runs_table
    from torchpeer.experiments.results import pool_usage

    def rec(name, routing):
        layers = {"blocks.1.ffw": {"usage_pct": 50.0, "kl": 0.7}, "blocks.3.ffw": {"usage_pct": 60.0, "kl": 0.5}}
        valid = {"corpus": {"loss": 3.0, "ppl": 20.1, "usage": layers, "routing": routing}}
        return {"run": name, "family": "peer", "eval_set": "corpus", "valid": valid, "tokens": 10, "seed": 0}

    shared = rec("shared", {"ffw_shared": {"usage_pct": 98.5, "kl": 0.25, "layers": ["blocks.1.ffw", "blocks.3.ffw"]}})
    separate = rec("separate", {"blocks.1.ffw": {"usage_pct": 50.0, "kl": 0.7}})
    assert pool_usage(shared) == (98.5, 0.25) and pool_usage(separate) == (None, None)
    table = runs_table([shared, separate])
    assert "pool usage %" in table[0] and "pool KL" in table[0]
    row = {line.split(" | ")[0].strip("| "): line for line in table[2:]}
    assert "| 55.0 | 0.600 | 98.5 | 0.250 |" in row["shared"]  # per-layer mean, then the pool's union
    assert "| 55.0 | 0.600 | - | - |" in row["separate"]
    assert "pool usage %" not in runs_table([separate])[0]


def test_rows_csv_has_every_run_on_every_eval_set(runs_dir):
    """rows.csv (the issues' "one row per (variant, seed, tokens, eval set)"): a row per run and eval
    set with that set's loss, ppl, bpb and routed usage/KL, the run's size, FLOPs and speed."""
    import csv

    written = write_report(str(runs_dir))
    with open(written["rows"], newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 * (20 + 8)  # 20 isoflop + 8 ablation runs, eval sets "all" and "books"
    by_key = {(r["run"], r["eval_set"]): r for r in rows}
    books = by_key[("n65536-none-1e15", "books")]
    loss = 3.5 - 0.02 * 16 + 0.15 + 0.1  # the fixture's valid(): books = all + 0.1
    assert float(books["loss"]) == pytest.approx(loss) and float(books["ppl"]) == pytest.approx(np.exp(loss))
    assert float(books["usage_pct"]) == pytest.approx(90 - 3 * 16 - 40 * 0.15) and books["ranking"] == "False"
    assert float(books["kl"]) == pytest.approx(0.1 * 16 + 0.15) and books["seed"] == "0"
    assert by_key[("n65536-none-1e15", "all")]["ranking"] == "True"
    dense = by_key[("dense-s0-1e+15", "all")]
    assert dense["usage_pct"] == "" and dense["pool_usage_pct"] == "" and float(dense["train_flops"]) == 1e12
    assert dense["family"] == "dense" and float(dense["tokens_per_s"]) == 5e5
    assert "[rows.csv](rows.csv)" in open(written["report"]).read()


def test_eval_rows_per_set_usage_and_the_shared_pool():
    from torchpeer.experiments.results import eval_rows

    layers = {"blocks.1.ffw": {"usage_pct": 50.0, "kl": 0.7}, "blocks.3.ffw": {"usage_pct": 70.0, "kl": 0.5}}
    pool = {"ffw_shared": {"usage_pct": 97.0, "kl": 0.3, "layers": ["blocks.1.ffw", "blocks.3.ffw"]}}
    valid = {
        "corpus": {"loss": 3.0, "ppl": 20.1, "usage": layers, "routing": pool},
        "brown": {"loss": 4.0, "ppl": 54.6, "usage": {"blocks.1.ffw": {"usage_pct": 10.0, "kl": 3.0}}},
    }
    record = {"run": "x", "eval_set": "corpus", "valid": valid, "overrides": {"train.seed": 1}}
    record["code"] = {"commit": "abc"}
    rows = {r["eval_set"]: r for r in eval_rows([record])}
    assert rows["corpus"]["usage_pct"] == 60.0 and rows["corpus"]["kl"] == pytest.approx(0.6)
    assert rows["corpus"]["pool_usage_pct"] == 97.0 and rows["brown"]["pool_usage_pct"] is None
    assert rows["brown"]["usage_pct"] == 10.0 and rows["brown"]["seed"] == 1 and rows["brown"]["commit"] == "abc"
    assert rows["brown"]["tokens"] is None  # absent fields stay empty, not invented


def test_ablation_pivot_is_the_papers_table_2_layout_with_seeds_side_by_side(tmp_path):
    """A row per N, (ppl, usage %, KL) per query norm; a cell with two seeds shows both, seed 0 first,
    whatever order the results arrived in; a missing cell stays empty."""
    d = tmp_path / "runs"
    cells = [  # (n, norm, seed, loss, usage, kl)
        (16384, "ema", 1, 3.10, 99.0, 0.30),
        (16384, "ema", 0, 3.00, 98.0, 0.20),
        (16384, "batch", 0, 3.05, 97.5, 0.25),
        (65536, "ema", 0, 2.90, 91.0, 0.80),
    ]
    for n, norm, seed, loss, usage, kl in cells:
        append_result(
            str(d),
            rec(
                f"n{n}-{norm}-s{seed}",
                sweep="t2",
                kind="ablation",
                family="peer",
                seed=seed,
                x_field="model.peer.n_experts",
                x=n,
                series_field="model.peer.query_norm",
                series=norm,
                valid=valid(loss, usage, kl),
            ),
        )
    md = open(write_report(str(d))["report"]).read()
    head = next(line for line in md.splitlines() if line.startswith("| query_norm -> |"))
    assert head == "| query_norm -> | batch ppl | batch usage % | batch KL | ema ppl | ema usage % | ema KL |"
    lines = md.splitlines()
    rows = lines[lines.index(head) + 2 : lines.index(head) + 4]  # below the header and its rule
    e0, e1 = np.exp(3.00), np.exp(3.10)
    assert rows == [
        f"| 16384 | {np.exp(3.05):.2f} | 97.5 | 0.250 | {e0:.2f} / {e1:.2f} | 98.0 / 99.0 | 0.200 / 0.300 |",
        f"| 65536 |  |  |  | {np.exp(2.90):.2f} | 91.0 | 0.800 |",
    ]


def test_evaluations_during_training_table_only_for_runs_evaluated_more_than_once(tmp_path):
    """A run whose metrics.jsonl holds several evaluations (train.eval_interval) gets a row per
    evaluated step on its ranking set: ppl, epochs (tokens over the train split), the routed layers'
    mean usage and KL; a run evaluated once adds no row, and no run evaluated twice: no section."""
    d = tmp_path / "runs"

    def write_run(name, evals):
        append_result(str(d), rec(name, sweep="t2", kind="ablation", train_split_tokens=400, valid=valid(3.0, 90, 1)))
        (d / name).mkdir(parents=True)
        with open(d / name / "metrics.jsonl", "w") as fh:
            fh.write(json.dumps({"step": 0, "event": "start", "tokens_per_step": 100}) + "\n")
            for step in range(1, 13):
                fh.write(json.dumps({"step": step, "tokens": step * 100, "loss": 4 - step / 10}) + "\n")
            for step, loss, usage in evals:
                layers = {"blocks.1.ffw": {"usage_pct": usage, "kl": 1.0}, "blocks.3.ffw": {"usage_pct": usage + 2}}
                result = {"all": {"loss": loss, "ppl": float(np.exp(loss)), "usage": layers}, "books": {"loss": 9.0}}
                fh.write(json.dumps({"step": step, "eval": result, "final": step == 12}) + "\n")

    write_run("once", [(12, 3.0, 90.0)])
    md = open(write_report(str(d))["report"]).read()
    assert "Evaluations during training" not in md
    write_run("thrice", [(4, 3.4, 60.0), (8, 3.2, 70.0), (12, 3.0, 80.0)])
    md = open(write_report(str(d))["report"]).read()
    lines = md.splitlines()
    i = lines.index("### Evaluations during training (ranking eval set)")
    assert lines[i + 2] == "| run | step | tokens | epochs | ppl | usage % | KL |"
    assert lines[i + 4 : i + 7] == [
        f"| thrice | 4 | 400 | 1.00 | {np.exp(3.4):.2f} | 61.0 | 1.000 |",
        f"| thrice | 8 | 800 | 2.00 | {np.exp(3.2):.2f} | 71.0 | 1.000 |",
        f"| thrice | 12 | 1.2k | 3.00 | {np.exp(3.0):.2f} | 81.0 | 1.000 |",
    ]
    section = lines[i : next((j for j in range(i + 1, len(lines)) if lines[j].startswith("#")), len(lines))]
    assert not any(line.startswith("| once |") for line in section)


def test_rows_csv_has_a_row_per_evaluation_during_training_on_every_eval_set(tmp_path):
    """rows.csv: a run evaluated at steps 4 and 8 of 12 (train.eval_interval) gets rows at those steps on
    every set the evaluation made, with that step's tokens, epochs and FLOPs and final false, before
    its final rows; the final eval line of metrics.jsonl is not repeated."""
    import csv

    d = tmp_path / "runs"
    run = rec("r", sweep="g", kind="grid", steps=12, tokens=1200, train_split_tokens=400, train_flops_per_token=6.0,
              train_flops=7200.0, epochs=3.0, valid=valid(3.0, 90, 1))  # fmt: skip
    append_result(str(d), run)
    (d / "r").mkdir(parents=True)
    with open(d / "r" / "metrics.jsonl", "w") as fh:
        for step, loss in ((4, 3.4), (8, 3.2), (12, 3.0)):
            fh.write(json.dumps({"step": step, "eval": valid(loss, 60 + step, 2.0), "final": step == 12}) + "\n")
    rows = list(csv.DictReader(open(write_report(str(d))["rows"])))
    got = [(r["eval_set"], r["steps"], r["tokens"], r["epochs"], r["train_flops"], r["final"]) for r in rows]
    assert got == [
        ("all", "4", "400", "1.0", "2400.0", "False"), ("books", "4", "400", "1.0", "2400.0", "False"),
        ("all", "8", "800", "2.0", "4800.0", "False"), ("books", "8", "800", "2.0", "4800.0", "False"),
        ("all", "12", "1200", "3.0", "7200.0", "True"), ("books", "12", "1200", "3.0", "7200.0", "True"),
    ]  # fmt: skip
    assert [float(r["loss"]) for r in rows if r["eval_set"] == "all"] == [3.4, 3.2, 3.0]
    assert [float(r["usage_pct"]) for r in rows if r["eval_set"] == "all"] == [64.0, 68.0, 90.0]


def test_train_valid_gap_is_valid_loss_less_the_mean_training_loss_of_the_last_tenth(tmp_path):
    """The gap table: per run, the mean of the logged training losses over the last 10 % of its steps,
    the ranking set's final loss, and their difference; a run without a metrics.jsonl has no row."""
    d = tmp_path / "runs"
    rng = np.random.default_rng(1)
    losses = {}
    for name, valid_loss in (("a", 3.3), ("b", 3.1)):
        append_result(str(d), rec(name, sweep="g", kind="grid", valid=valid(valid_loss)))
        (d / name).mkdir(parents=True)
        losses[name] = rng.uniform(2.5, 4.0, 40)  # logged every 5 steps: steps 5..200
        with open(d / name / "metrics.jsonl", "w") as fh:
            for i, loss in enumerate(losses[name]):
                fh.write(json.dumps({"step": 5 * (i + 1), "tokens": 500 * (i + 1), "loss": float(loss)}) + "\n")
    append_result(str(d), rec("no-metrics", sweep="g", kind="grid", valid=valid(3.0)))
    lines = open(write_report(str(d))["report"]).read().splitlines()
    i = lines.index("### Train-valid gap (nats; late batches repeat seen text)")
    assert lines[i + 2] == "| run | train loss (last 10 %) | valid loss | gap |"
    rows = [line for line in lines[i + 4 :] if line.startswith("| ")][:3]
    expect = []
    for name, valid_loss in (("a", 3.3), ("b", 3.1)):
        train = float(np.mean(losses[name][-4:]))  # steps 185..200: those above 200 x 0.9 = 180
        expect.append(f"| {name} | {train:.4f} | {valid_loss:.4f} | {valid_loss - train:.4f} |")
    assert rows[:2] == expect
    assert not any(line.startswith("| no-metrics |") for line in lines[i:])


def test_ablation_line_runs_through_the_seed_mean_and_every_run_is_a_dot(tmp_path):
    """Two seeds at one x: the series line goes through their mean (a line through every run zigzagged
    between the seeds at one x), each run is drawn as a dot, and the title says which is which."""
    from torchpeer.experiments import figures

    rng = np.random.default_rng(0)
    pts = [(float(x), float(y)) for x, y in zip(rng.choice([1.0, 4.0, 16.0], 12), rng.normal(3.0, 0.1, 12))]
    xs, means = figures.mean_by_x(pts)
    assert xs == sorted({x for x, _ in pts})
    for x, m in zip(xs, means):
        assert m == pytest.approx(np.mean([y for px, y in pts if px == x]))

    cells = [(16384, 0, 3.00, 99.0, 0.2), (16384, 1, 3.10, 98.0, 0.4), (65536, 0, 2.90, 91.0, 0.8)]
    records = [
        rec(f"n{n}-s{seed}", kind="ablation", seed=seed, x=n, series="ema", valid=valid(loss, usage, kl))
        for n, seed, loss, usage, kl in cells
    ]
    fig = figures.ablation_plot(records, "model.peer.n_experts", "model.peer.query_norm")
    line, dots = fig.axes[0].lines[:2]  # the loss panel
    assert list(line.get_ydata()) == pytest.approx([3.05, 2.90])
    assert sorted(dots.get_ydata()) == pytest.approx([2.90, 3.00, 3.10])
    assert "mean over seeds" in fig._suptitle.get_text()
    one_seed = figures.ablation_plot(records[:1] + records[2:], "model.peer.n_experts", "model.peer.query_norm")
    assert "mean over seeds" not in one_seed._suptitle.get_text()
    path = figures.ablation_figure(records, str(tmp_path / "a.png"), "model.peer.n_experts", "model.peer.query_norm")
    assert_real_plot(path, colours=(figures.colour("ema", 0),))


def test_best_value_per_series_by_seed_mean_marks_an_unbracketed_best(tmp_path):
    """lr-check's question, per family: which lr is best (mean over seeds), and is it bracketed? A series
    of one value is marked as such, not printed as an optimum."""
    d = tmp_path / "runs"
    cells = [  # (series, lr, seed, loss)
        ("dense", 1e-3, 0, 4.36),
        ("dense", 2e-3, 0, 3.75),
        ("dense", 4e-3, 0, 3.54),  # the largest lr run: best at the edge
        ("peer", 1e-3, 0, 4.35),
        ("peer", 2e-3, 0, 3.90),
        ("peer", 2e-3, 1, 4.10),  # seed mean 4.00: still best, between 1e-3 and 4e-3
        ("peer", 4e-3, 0, 4.05),
        ("peer-wu15", 8e-3, 0, 3.45),  # one value run: not an optimum, and said so
    ]
    for series, lr, seed, loss in cells:
        run = f"{series}-lr{lr}-s{seed}"
        fields = dict(sweep="lr", kind="ablation", family=series, seed=seed, x_field="train.lr", x=lr)
        append_result(str(d), rec(run, **fields, series_field="family", series=series, valid=valid(loss)))
    md = open(write_report(str(d))["report"]).read().splitlines()
    head = md.index("| series | best lr | loss | values run | seeds (most) |")
    assert md[head + 2 : head + 5] == [
        "| peer-wu15 | 0.008 (one value) | 3.4500 | 0.008 | 1 |",
        "| dense | 0.004 (edge) | 3.5400 | 0.001, 0.002, 0.004 | 1 |",
        "| peer | 0.002 | 4.0000 | 0.001, 0.002, 0.004 | 2 |",
    ]


def test_an_ablation_without_series_says_its_best_value_and_writes_no_none(tmp_path):
    """A researcher's own lr sweep (kind = "ablation", x = "train.lr", no series): the report names the
    best lr and whether the values run bracket it (it used to show this only with a series), and the
    series cells read "-", not "None"."""
    d = tmp_path / "runs"
    for lr, loss in ((1e-3, 4.53), (3e-3, 3.28), (1e-2, 2.94)):
        fields = dict(sweep="lr", kind="ablation", seed=0, x_field="train.lr", x=lr, series_field=None, series=None)
        append_result(str(d), rec(f"lr={lr}-tok2e4", **fields, valid=valid(loss)))
    md = open(write_report(str(d))["report"]).read().splitlines()
    head = md.index("| series | best lr | loss | values run | seeds (most) |")
    assert md[head + 2] == "| - | 0.01 (edge) | 2.9400 | 0.001, 0.003, 0.01 | 1 |"
    head = md.index(
        "| series | x - reference | seed 0: ranking set (sets favouring x) | seed spread at x / reference |"
    )
    assert md[head + 2].startswith("| - | 0.003 - 0.001 | -1.2500 (2/2) |")
    assert not any("None" in line for line in md)


def test_an_lr_ablation_is_drawn_on_a_log_axis_ticked_at_the_values_run():
    """lr 5e-4..4e-3 on a linear axis ran its tick labels together ("0.00050.0010..."); a span of 4x or
    more is drawn on a log axis, and fractional values are ticked where they were run, as written."""
    from torchpeer.experiments import figures

    lrs = [5e-4, 1e-3, 2e-3, 4e-3]
    records = [rec(f"lr{lr}", kind="ablation", seed=0, x=lr, series="dense", valid=valid(4.0 - lr)) for lr in lrs]
    ax = figures.ablation_plot(records, "train.lr", "family").axes[0]
    assert ax.get_xscale() == "log" and list(ax.get_xticks()) == pytest.approx(lrs)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0.0005", "0.001", "0.002", "0.004"]
    narrow = [rec(f"lr{lr}", kind="ablation", seed=0, x=lr, series="dense", valid=valid(4.0)) for lr in (1e-3, 2e-3)]
    assert figures.ablation_plot(narrow, "train.lr", "family").axes[0].get_xscale() == "linear"


def test_a_committed_folder_with_metrics_jsonl_xz_reports_as_the_runs_folder(tmp_path):
    """copy_results stores each run's log as metrics.jsonl.xz: the evaluations during training, the
    train-valid gaps, the curves and the whole report (tables, rows.csv) read from it are those of the
    runs folder with the plain logs."""
    import csv

    from torchpeer.experiments.eval_history import evals_during_training, records_during_training, train_valid_gaps
    from torchpeer.experiments.figures import read_curve
    from torchpeer.experiments.results import copy_results, read_results

    d = tmp_path / "runs"
    for name in ("a", "b"):
        append_result(str(d), rec(name, sweep="g", kind="grid", steps=12, tokens=1200, train_split_tokens=400,
                                  valid=valid(3.0, 90, 1)))  # fmt: skip
        (d / name).mkdir(parents=True)
        with open(d / name / "metrics.jsonl", "w") as fh:
            fh.write(json.dumps({"step": 0, "event": "start", "tokens_per_step": 100}) + "\n")
            for step in range(1, 13):
                fh.write(json.dumps({"step": step, "tokens": step * 100, "loss": 4 - step / 10}) + "\n")
                if step % 4 == 0:
                    layers = {"blocks.1.ffw": {"usage_pct": 50 + step, "kl": 1.0}}
                    result = {"all": {"loss": 3.5 - step / 20, "usage": layers}, "books": {"loss": 9.0}}
                    fh.write(json.dumps({"step": step, "eval": result, "final": step == 12}) + "\n")
    committed = tmp_path / "committed" / "runs"  # the same name: the report's title is the folder's
    copy_results(str(d), str(committed))
    assert sorted(os.listdir(committed / "a")) == ["metrics.jsonl.xz"]
    recs = read_results(str(d))
    during = evals_during_training(recs, str(d))
    assert len(during) == 6 and during == evals_during_training(recs, str(committed))
    assert len(records_during_training(recs, str(d))) == 6 == len(records_during_training(recs, str(committed)))
    assert records_during_training(recs, str(d)) == records_during_training(recs, str(committed))
    assert train_valid_gaps(recs, str(d)) == train_valid_gaps(recs, str(committed)) != []
    assert read_curve(str(d / "a")) == read_curve(str(committed / "a")) != ([], [])

    plain, packed = write_report(str(d)), write_report(str(committed))
    assert set(plain) == set(packed) and "curves-g" in packed

    def body(path):  # the report less its "Made by `torchpeer report RUNS_DIR` ... (time)" line
        return [line for line in open(path).read().splitlines() if not line.startswith("Made by")]

    assert body(plain["report"]) == body(packed["report"])
    assert list(csv.DictReader(open(plain["rows"]))) == list(csv.DictReader(open(packed["rows"])))
    with pytest.raises(ValueError, match="is one training run, not a sweep's runs folder"):
        write_report(str(committed / "a"))  # a run folder with only the .xz is still told apart
