"""Seeds in the report: one isoFLOP point per size (the seeds' mean), the spread at the optimum, paired
PEER-minus-rival differences over common seeds, the paper's order, provisional marks; and the
results folder copied for committing (report works on the copy)."""

import json
import math
import os

import numpy as np
import pytest

from tests.experiments.test_report import rec, valid
from torchpeer.experiments import append_result, read_results, write_report
from torchpeer.experiments.compare import order_verdict, paired_difference, seed_of, seed_stats
from torchpeer.experiments.fit import isoflop_fits
from torchpeer.experiments.results import copy_results

SIZES = np.geomspace(1e6, 3e7, 4)


def parabola(p, floor, opt=4e6):
    return floor + 0.25 * (math.log10(p) - math.log10(opt)) ** 2


def seeded_runs(noise):
    """dense / peer / moe / pkm / moe-ec at 1e15, 4 sizes; seeds 0-2 at every size, loss + noise[fam][seed]."""
    floors = {"dense": 3.40, "peer": 3.30, "moe": 3.35, "pkm": 3.38, "moe-ec": 3.20}
    out = []
    for fam, floor in floors.items():
        for i, p in enumerate(SIZES):
            for seed in (0, 1, 2):
                loss = parabola(p, floor) + noise[fam][seed]
                out.append(
                    rec(
                        f"{fam}-s{i}-seed{seed}-1e15",
                        family=fam,
                        seed=seed,
                        budget_flops=1e15,
                        active_params=float(p),
                        valid=valid(loss),
                    )
                )
    return out


NOISE = {fam: [0.0, 0.02, -0.01] for fam in ("dense", "peer", "moe", "pkm", "moe-ec")}
NOISE["peer"] = [0.01, -0.03, 0.02]


def test_fit_uses_the_seed_mean_per_size():
    recs = seeded_runs(NOISE)
    fits = isoflop_fits(recs)
    g = fits[("dense", 1e15)]
    assert g["n_sizes"] == 4 and len(g["runs"]) == 12
    # the noise of the three seeds averages to +0.00333 at every size: the parabola shifted up
    a, b, c = g["fit"].coeffs
    assert g["fit"].optimum_params == pytest.approx(4e6, rel=1e-6)
    assert g["fit"].optimum_loss == pytest.approx(3.40 + 0.01 / 3, abs=1e-9)


def test_paired_difference_over_common_seeds_only():
    peer = [rec("p", seed=s, valid=valid(3.3 + d)) for s, d in ((0, 0.01), (1, -0.03), (2, 0.02))]
    dense = [rec("d", seed=s, valid=valid(3.4 + d)) for s, d in ((0, 0.0), (1, 0.02), (3, 0.5))]
    d = paired_difference(peer, dense)
    assert d["seeds"] == [0, 1] and d["n"] == 2
    diffs = [3.31 - 3.40, 3.27 - 3.42]
    assert d["mean"] == pytest.approx(sum(diffs) / 2) and d["min"] == pytest.approx(min(diffs))
    assert d["ppl_pct"] == pytest.approx(100 * (math.exp(d["mean"]) - 1))
    assert paired_difference(peer, [rec("x", seed=7, valid=valid(3.0))]) is None
    assert seed_of({"overrides": {"train.seed": "2"}}) == 2 and seed_of({}) == 0
    assert seed_stats([1.0, 3.0]) == {"mean": 2.0, "min": 1.0, "max": 3.0, "n": 2}


def test_order_verdict():
    assert "holds" in order_verdict({"peer": 3.3, "moe": 3.35, "pkm": 3.4, "dense": 3.45})
    v = order_verdict({"peer": 3.5, "moe": 3.35, "dense": 3.45})
    assert "does NOT hold" in v and "moe < dense < peer" in v


def test_report_with_seeds_ranks_pairs_and_marks(tmp_path):
    runs = tmp_path / "runs"
    for r in seeded_runs(NOISE):
        append_result(str(runs), r)
    # a family with 3 sizes only: provisional
    for i, p in enumerate(SIZES[:3]):
        append_result(
            str(runs),
            rec(
                f"few-s{i}-1e15", family="few", budget_flops=1e15, active_params=float(p), valid=valid(parabola(p, 3.1))
            ),
        )
    md = open(write_report(str(runs))["report"]).read()
    ahead = md[md.index("### Who is ahead") :]
    assert "moe-ec 3.2033 = ppl" in ahead and "non-causal, not ranked" in ahead
    assert "few 3.1000 = ppl 22.20 (fit; provisional)" in ahead
    # PEER minus dense at the optimum size (4e6 is a trained size? nearest in log): seeds 0,1,2 paired
    line = next(x for x in ahead.splitlines() if "PEER minus dense" in x)
    diffs = [0.01 - 0.0, -0.03 - 0.02, 0.02 + 0.01]
    mean_diff = 3.30 - 3.40 + sum(diffs) / 3
    assert f"{mean_diff:+.4f} nats" in line and "seeds [0, 1, 2]" in line and "PEER ahead of dense." in line
    assert "paper's order (peer < moe < pkm < dense) holds" in ahead
    t1 = md[md.index("### Perplexity on every eval set") :]
    peer_row = next(x for x in t1.splitlines() if x.startswith("| 1e+15 | peer |"))
    assert "| 0,1,2 |" in peer_row and "3 seeds)" in peer_row
    assert "moe-ec-" in t1 and "not a causal LM's perplexity" in t1
    runs_md = md[md.index("### Runs") : md.index("### isoFLOP fits")]
    assert "| seed |" in runs_md and "| epochs |" in runs_md


def test_copied_results_are_a_runs_folder(tmp_path):
    runs = tmp_path / "runs"
    for r in seeded_runs(NOISE)[:6]:
        append_result(str(runs), r)
        os.makedirs(runs / r["run"], exist_ok=True)
        for name in ("config.json", "summary.json", "metrics.jsonl", "worker.log"):
            (runs / r["run"] / name).write_text("{}\n" if name != "worker.log" else "log\n")
    (runs / recs_name(runs) / "checkpoints").mkdir()
    dest = tmp_path / "results"
    assert copy_results(str(runs), str(dest)) == 6
    assert [r["run"] for r in read_results(str(dest))] == [r["run"] for r in read_results(str(runs))]
    one = dest / recs_name(runs)
    assert sorted(os.listdir(one)) == ["config.json", "metrics.jsonl.xz", "summary.json"]  # no logs, no checkpoints


def test_copied_metrics_are_xz_of_the_same_bytes_and_replace_a_plain_copy(tmp_path):
    """copy_results writes each run's metrics.jsonl as metrics.jsonl.xz (the committed folders travel
    with every device command): it decompresses to the source's bytes, a plain metrics.jsonl left in
    dest by an older copy is removed, and a source that only has the .xz (a committed folder copied
    again) gives the same bytes."""
    import lzma

    from torchpeer.jsonl import read_json_lines

    runs = tmp_path / "runs"
    log = "".join(json.dumps({"step": s, "tokens": 100 * s, "loss": 4 - s / 10}) + "\n" for s in range(1, 30))
    for r in seeded_runs(NOISE)[:2]:
        append_result(str(runs), r)
        os.makedirs(runs / r["run"], exist_ok=True)
        (runs / r["run"] / "metrics.jsonl").write_text(log + '{"step": 30, "lo')  # cut by a kill: kept as is
    name = recs_name(runs)
    dest = tmp_path / "results"
    (dest / name).mkdir(parents=True)
    (dest / name / "metrics.jsonl").write_text("an older plain copy\n")
    copy_results(str(runs), str(dest))
    packed = dest / name / "metrics.jsonl.xz"
    assert lzma.decompress(packed.read_bytes()) == (runs / name / "metrics.jsonl").read_bytes()
    assert sorted(os.listdir(dest / name)) == ["metrics.jsonl.xz"]  # one form, no temp file
    assert len(read_json_lines(str(packed)).records) == 29
    again = tmp_path / "again"
    copy_results(str(dest), str(again))
    assert (again / name / "metrics.jsonl.xz").read_bytes() == packed.read_bytes()


def recs_name(runs):
    return read_results(str(runs))[0]["run"]


def test_report_of_a_folder_without_results_names_the_file(tmp_path):
    from torchpeer.cli import main

    with pytest.raises(ValueError, match="results.jsonl is missing"):
        write_report(str(tmp_path))
    with pytest.raises(ValueError, match="is not a folder"):
        write_report(str(tmp_path / "nope"))
    assert main(["report", str(tmp_path), "--with-runs"]) == 2


def test_design_table_pairs_seeds_against_dense(tmp_path):
    """kind = grid with seeds: one row per design; its paired ppl change against dense over common seeds,
    FLOPs ratio, and on how many eval sets it beats dense."""
    from torchpeer.experiments.compare import design_of, design_rows

    assert design_of({"variant": "seed=1-multi-shared"}) == "multi-shared"
    assert design_of({"variant": "peer-s2-seed2"}) == "peer-s2"
    recs = []
    for seed, noise in ((0, 0.0), (1, 0.05)):
        recs.append(
            rec(
                f"seed={seed}-dense-tok6e7",
                variant=f"seed={seed}-dense",
                seed=seed,
                kind="grid",
                train_flops_per_token=100,
                tokens_per_s=1000.0,
                valid=valid(3.0 + noise, other=0.1),
            )
        )
        recs.append(
            rec(
                f"seed={seed}-multi-tok6e7",
                variant=f"seed={seed}-multi",
                seed=seed,
                kind="grid",
                train_flops_per_token=95,
                tokens_per_s=800.0,
                valid=valid(2.9 + noise, usage=90.0, kl=1.2, other=0.3),
            )
        )
    header, rows = design_rows(recs)
    row = dict(zip(header, next(r for r in rows if r[0] == "multi")))
    assert row["seeds"] == "0,1" and row["FLOPs/token"] == "0.950x" and row["tokens/s"] == "800"
    assert row["vs dense (paired)"] == f"{100 * (math.exp(-0.1) - 1):+.1f} % (-9.5..-9.5)"
    assert row["usage %"] == "90.0" and row["KL"] == "1.20"
    assert row["eval sets better than dense"] == "1/2"  # 'all' better, 'books' (+0.3 vs +0.1) worse
    for r in recs:
        append_result(str(tmp_path), r)
    md = open(write_report(str(tmp_path))["report"]).read()
    assert "### Designs (seeds paired)" in md and "| multi | 0,1 |" in md


def test_the_fifth_family_is_paired_against_the_papers_peer_and_its_rivals(tmp_path):
    """Issue 17's fifth family (issue 18's winner, ``multi-peer``) gets its own paired lines, including
    one against the paper's PEER; it is ranked with the causal families but not part of the paper's order."""
    runs = tmp_path / "runs"
    for r in seeded_runs(NOISE):
        append_result(str(runs), r)
    multi_noise = [-0.02, 0.0, 0.01]
    for i, p in enumerate(SIZES):
        for seed in (0, 1, 2):
            loss = parabola(p, 3.20) + multi_noise[seed]
            append_result(str(runs), rec(f"multi-peer-s{i}-seed{seed}-1e15", family="multi-peer", seed=seed,
                                         budget_flops=1e15, active_params=float(p), valid=valid(loss)))  # fmt: skip
    ahead = open(write_report(str(runs))["report"]).read().split("### Who is ahead")[1]
    line = next(x for x in ahead.splitlines() if "multi-PEER minus peer" in x)
    diffs = [(3.20 + m) - (3.30 + n) for m, n in zip(multi_noise, NOISE["peer"])]
    assert f"{sum(diffs) / 3:+.4f} nats" in line and "multi-PEER ahead of peer." in line
    assert [x.split(" minus ")[1].split(",")[0] for x in ahead.splitlines() if "multi-PEER minus" in x] == [
        "dense", "moe", "pkm", "peer"
    ]  # fmt: skip
    assert "PEER minus dense" in ahead and "paper's order (peer < moe < pkm < dense) holds" in ahead
