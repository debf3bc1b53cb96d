"""``torchpeer report RUNS_DIR``: markdown tables and PNG figures from results.jsonl.

Per sweep found in the results (written to RUNS_DIR/report/ unless another folder is given):

* every run: size, tokens, FLOPs, loss / ppl on the ranking eval set, usage %, KL, tokens/s;
* isoFLOP sweeps: per (budget, family) the fitted optimum and the best run, the isoFLOP figure,
  and a Table-1-style table: perplexity on every eval set of each family's best run per budget;
* the data rule (``max_epochs``: recorded in the results lines from the spec, or ``--max-epochs``):
  runs that repeat the train split more often are marked in the runs table, left out of the fits
  and everything built on them, drawn hollow in the isoFLOP figure, and set against the fit;
* ablations: loss, usage % and KL against the ablated field, one line per series, and its figure;
  each value against the series' first, paired by seed (experiments/paired.py);
* training curves of every run (from RUN_DIR/metrics.jsonl, or .xz), and, for runs evaluated more than
  once, the ranking eval set's perplexity, usage and KL at each evaluated step.
"""

from __future__ import annotations

import os
import time

from torchpeer.experiments import figures
from torchpeer.experiments.against import against_lines
from torchpeer.experiments.ahead import ahead_lines
from torchpeer.experiments.compare import NON_CAUSAL_FAMILIES, design_rows, eval_stats, format_spread, optimum_runs
from torchpeer.experiments.eval_history import (
    during_table,
    evals_during_training,
    gap_table,
    records_during_training,
    train_valid_gaps,
)
from torchpeer.experiments.fit import isoflop_fits, outside_fit_runs
from torchpeer.experiments.markdown import fmt as _fmt
from torchpeer.experiments.markdown import table as _table
from torchpeer.experiments.paired import paired_table, series_cell, with_shared_points
from torchpeer.experiments.results import (
    breaks_epoch_rule,
    epochs_cell,
    epochs_text,
    eval_rows_csv,
    pool_usage,
    primary_loss,
    primary_ppl,
    read_results,
    results_path,
    routed_usage,
    seed_of,
    short_count,
)
from torchpeer.experiments.usage_history import usage_section
from torchpeer.jsonl import run_metrics_path

# write_report's max_epochs default: each sweep's rule is the one its results lines recorded.
RECORDED = "recorded"


def write_report(
    runs_dir: str,
    out_dir: str | None = None,
    params_key: str = "active_params",
    max_epochs: float | str | None = RECORDED,
    against: str | None = None,
) -> dict[str, str]:
    """Write report.md, the PNGs and rows.csv (every run on every eval set, one row each: the long
    format for other tools); returns {what: path} of every file written.

    max_epochs: the data rule. RECORDED (default) = each sweep's own, from its results lines
    (none when no line has one, e.g. runs from before the field existed); a number = that rule for
    every sweep (``--max-epochs``); None = no rule. against: another runs folder; its runs of the same
    names are set beside these (against.py)."""
    if not os.path.isdir(runs_dir):
        raise ValueError(f"{runs_dir} is not a folder; give the runs folder of a sweep (it holds results.jsonl)")
    if not os.path.exists(results_path(runs_dir)) and run_metrics_path(runs_dir) is not None:
        raise ValueError(  # 'torchpeer train' made it: 'run torchpeer sweep --runs-dir RUN' would be no advice
            f"{runs_dir} is one training run, not a sweep's runs folder (no results.jsonl); "
            f"its curves: torchpeer plot {runs_dir}"
        )
    if not os.path.exists(results_path(runs_dir)):
        raise ValueError(
            f"{results_path(runs_dir)} is missing: {runs_dir} is not a sweep's runs folder, or no run of it has "
            f"finished yet; run 'torchpeer sweep SPEC --runs-dir {runs_dir}'"
        )
    records = read_results(runs_dir)
    if not records:
        raise ValueError(f"{results_path(runs_dir)} has no finished runs; run 'torchpeer sweep SPEC --runs-dir ...'")
    out_dir = out_dir or os.path.join(runs_dir, "report")
    os.makedirs(out_dir, exist_ok=True)
    written: dict[str, str] = {}
    lines = [
        f"# Sweep report: {os.path.basename(os.path.abspath(runs_dir))}",
        "",
        f"Made by `torchpeer report {runs_dir}{_rule_flag(max_epochs)}` from {len(records)} finished runs in "
        "results.jsonl "
        f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}). Loss = mean next-token loss (nats) on the "
        "ranking eval set; usage % and KL (of the expert-usage distribution from uniform) are averaged over "
        "the routed layers on that set.",
    ]
    sweeps: dict[str, list[dict]] = {}
    for r in records:
        sweeps.setdefault(r.get("sweep", "sweep"), []).append(r)
    for name, recs in sweeps.items():
        kind = recs[0].get("kind", "grid")
        rule, source = sweep_rule(recs, max_epochs)
        lines += ["", f"## {name} ({kind})", "", "### Runs", "", *runs_table(recs, rule), "", code_line(recs)]
        if rule is not None:
            lines += ["", rule_note(recs, rule, source, kind)]
        if kind == "isoflop":
            fits = isoflop_fits(recs, params_key, rule)
            outside = outside_fit_runs(recs, rule)
            if fits:
                png = figures.isoflop_figure(
                    fits, os.path.join(out_dir, f"isoflop-{name}.png"), _set(recs), params_key, outside, rule
                )
                written[f"isoflop-{name}"] = png
                lines += ["", "### isoFLOP fits", "", *fits_table(fits, params_key), "", _img(png, out_dir)]
                if outside:
                    lines += ["", f"### Runs beyond {epochs_text(rule)} epochs (outside the fits)", ""]
                    lines += outside_lines(fits, outside, rule, params_key)
                lines += ["", "### Who is ahead", "", *ahead_lines(fits)]
                lines += ["", "### Perplexity on every eval set (at the size nearest each family's optimum)", ""]
                lines += table1(fits)
        if kind == "ablation" and recs[0].get("x_field"):
            x_field, series_field = recs[0]["x_field"], recs[0].get("series_field")
            lined = with_shared_points(recs) if series_field else recs  # a shared point on every line it lies on
            png = figures.ablation_figure(lined, os.path.join(out_dir, f"ablation-{name}.png"), x_field, series_field)
            written[f"ablation-{name}"] = png
            lines += ["", f"### Ablation over {x_field}", "", *ablation_table(lined, x_field, series_field)]
            if series_field:
                lines += ["", "As the paper lays it out (a row per value; per series ppl, usage %, KL; seeds s0 / s1):"]
                lines += ["", *ablation_pivot(lined, series_field)]
            lines += [  # also with no series: the best lr of a one-line lr sweep, and whether it is bracketed
                "",
                f"Best {x_field} per series (seed-mean loss; '(edge)': no measured value on one side; "
                "'(one value)': nothing to compare it with):",
            ]
            lines += ["", *best_per_series(recs, x_field)]
            if paired := paired_table(lined):  # loss differences in nats, same seed = same data order
                lines += ["", "Paired by seed against each series' first value (loss difference, nats):", "", *paired]
            lines += ["", _img(png, out_dir)]
        if kind == "grid" and len({seed_of(r) for r in recs}) > 1:
            header, rows = design_rows(recs)
            lines += ["", "### Designs (seeds paired)", "", *_table(header, rows, right_from=1)]
        png = figures.curves_figure(recs, runs_dir, os.path.join(out_dir, f"curves-{name}.png"))
        if png:
            written[f"curves-{name}"] = png
            lines += ["", "### Training curves", "", _img(png, out_dir)]
        lines += usage_section(recs, runs_dir, os.path.join(out_dir, f"usage-{name}.png"))  # train.track_usage
        during = evals_during_training(recs, runs_dir)
        if during:
            lines += ["", "### Evaluations during training (ranking eval set)", "", *during_table(during)]
        if gaps := train_valid_gaps(recs, runs_dir):  # memorisation: the training loss falls, valid does not
            lines += ["", "### Train-valid gap (nats; late batches repeat seen text)", "", *gap_table(gaps)]
    if against is not None:
        here, there = (os.path.basename(os.path.normpath(d)) for d in (runs_dir, against))
        here, there = (here, there) if here != there else ("here", "there")
        other = _other(against)
        rules = (sweep_rule(records, max_epochs)[0], sweep_rule(other, max_epochs)[0])
        lines += [
            "",
            f"## Against {against}",
            "",
            *(against_lines(records, other, here, there, rules) or ["No twins."]),
        ]
    from torchpeer.data.atomic import write_text_atomic

    rows = os.path.join(out_dir, "rows.csv")  # every (run, eval set) in one long table, for other tools
    write_text_atomic(rows, eval_rows_csv(records_during_training(records, runs_dir)))
    written["rows"] = rows
    lines += [
        "",
        "Every run on every eval set, a row each (loss, ppl, usage, KL, FLOPs, tokens/s; also the evaluations"
        " made during training, `final` false): ",
    ]
    lines[-1] += "[rows.csv](rows.csv)."

    md = os.path.join(out_dir, "report.md")
    write_text_atomic(md, "\n".join(lines) + "\n")
    written["report"] = md
    return written


def _other(runs_dir: str) -> list[dict]:
    if not os.path.exists(results_path(runs_dir)):
        raise ValueError(f"--against {runs_dir}: no results.jsonl there; give another sweep's runs folder")
    return read_results(runs_dir)


def _set(recs: list[dict]) -> str:
    return recs[0].get("eval_set") or "valid"


def _img(png: str, out_dir: str) -> str:
    rel = os.path.relpath(png, out_dir)
    return f"![{os.path.splitext(rel)[0]}]({rel})"


def _rule_flag(max_epochs: float | str | None) -> str:
    """The --max-epochs of the command that made the report ("" for the recorded rule), so that the
    header's command makes the same report again."""
    if max_epochs == RECORDED:
        return ""
    return " --max-epochs none" if max_epochs is None else f" --max-epochs {epochs_text(float(max_epochs))}"


def sweep_rule(recs: list[dict], max_epochs: float | str | None = RECORDED) -> tuple[float | None, str]:
    """The data rule of one sweep's report and where it comes from: ``max_epochs`` when given
    (None: no rule), else the max_epochs of its latest results line that has one (the spec's rule
    when that run finished; the lines of older runs have none and are judged by it too)."""
    if max_epochs != RECORDED:
        return (None, "") if max_epochs is None else (float(max_epochs), "given by --max-epochs")
    recorded = [r["max_epochs"] for r in recs if r.get("max_epochs") is not None]
    return (float(recorded[-1]), "the spec's, recorded in results.jsonl") if recorded else (None, "")


def rule_note(recs: list[dict], rule: float, source: str, kind: str) -> str:
    """The sentence under the runs table: the rule, how many runs break it and what that does."""
    n = epochs_text(rule)
    over = [r for r in recs if breaks_epoch_rule(r.get("epochs"), rule)]
    unknown = sum(1 for r in recs if r.get("epochs") is None)
    text = f"Data rule: no run in the fits repeats the train split more than {n} times (max_epochs = {n}, {source}); "
    if not over:
        text += "every run keeps it"
    else:
        what = (
            "left out of the isoFLOP fits, the best runs and every table built on them, drawn hollow in the "
            "isoFLOP figure"
            if kind == "isoflop"
            else "this kind of sweep has no fit to leave them out of"
        )
        text += f"{len(over)} run{' breaks' if len(over) == 1 else 's break'} it, marked '> {n}' above: {what}"
    if unknown:
        text += f"; {unknown} run{'s' if unknown != 1 else ''} without recorded epochs cannot be checked"
    return text + "."


def outside_lines(fits: dict, outside: list[dict], rule: float, params_key: str) -> list[str]:
    """Per budget, the runs beyond the data rule and what their loss says against the fit of their
    family at that budget (made from the runs inside the rule): the gap to the fitted curve at the
    run's size (an extrapolation when it lies beyond the fitted sizes) and to the best run inside the
    rule. A run below every allowed run is evidence that the optimum lies where the rule forbids."""
    n = epochs_text(rule)
    what = "active params" if params_key == "active_params" else "params"
    out = []
    for budget in sorted({float(r["budget_flops"]) for r in outside}):
        runs = [r for r in outside if float(r["budget_flops"]) == budget]
        out.append(
            f"- **{budget:.3g} FLOPs**: {len(runs)} run{' repeats' if len(runs) == 1 else 's repeat'} the train "
            f"split more than {n} times, outside the fits:"
        )
        for r in runs:
            fam, loss, size = r.get("family", ""), primary_loss(r), r.get(params_key)
            head = f"  - {r['run']} ({fam}, {short_count(size)} {what}, {epochs_cell(r['epochs'])} epochs)"
            head += f": loss {loss:.4f}"
            g = fits.get((fam, budget))
            if g is None:
                out.append(f"{head}; {fam} has no run inside the rule at this budget to compare it with.")
                continue
            parts = []
            fit = g["fit"]
            if fit is not None and size:
                gap = loss - float(fit.predict([size])[0])
                side = "left of" if size < fit.min_params else ("right of" if size > fit.max_params else "")
                where = f" (extrapolated {side} the fitted sizes)" if side else ""
                parts.append(f"{_gap(gap)} {fam}'s fitted curve at its size{where}")
            best = g["best"]
            gap_best = loss - primary_loss(best)
            best_size = short_count(best.get(params_key))
            parts.append(f"{_gap(gap_best)} {fam}'s best run inside the rule ({best['run']}, {best_size})")
            verdict = (
                f"evidence that {fam}'s optimum at this budget lies in the region the rule forbids"
                if gap_best < 0
                else "no evidence that the optimum lies beyond the rule"
            )
            out.append(f"{head}, {' and '.join(parts)}: {verdict}.")
    return out


def _gap(diff: float) -> str:
    """-0.03 -> "0.0300 below", 0.01 -> "0.0100 above" (nats)."""
    return f"{abs(diff):.4f} {'below' if diff < 0 else 'above'}"


def runs_table(recs: list[dict], rule: float | None = None) -> list[str]:
    """One row per run; with a data rule, the epochs of a run that breaks it read "5.10 (> 4, outside
    fit)" (isoFLOP sweeps; "5.10 (> 4)" where there is no fit)."""
    set_name = _set(recs)
    mark = ""
    if rule is not None:
        mark = f" (> {epochs_text(rule)}{', outside fit' if recs[0].get('kind') == 'isoflop' else ''})"
    header = ["run", "family", "seed", "params", "active", "tokens", "epochs", "FLOPs", f"loss ({set_name})", "ppl"]
    header += ["usage %", "KL"]
    # layers sharing one expert pool: the pool's union usage besides the per-layer mean
    pools = any(pool_usage(r)[0] is not None for r in recs)
    header += ["pool usage %", "pool KL", "tokens/s"] if pools else ["tokens/s"]
    rows = []
    for r in recs:
        loss = primary_loss(r)
        usage, kl = routed_usage(r)
        pool = [_fmt(v, f) for v, f in zip(pool_usage(r), (".1f", ".3f"))] if pools else []
        ppl = primary_ppl(r)
        rows.append(
            [
                r["run"],
                r.get("family", ""),
                str(seed_of(r)),
                short_count(r.get("total_params")),
                short_count(r.get("active_params")),
                f"{r.get('tokens', 0):,}",
                epochs_cell(r.get("epochs")) + (mark if breaks_epoch_rule(r.get("epochs"), rule) else ""),
                _fmt(r.get("train_flops"), ".3g"),
                _fmt(loss),
                _fmt(ppl, ".2f"),
                _fmt(usage, ".1f"),
                _fmt(kl, ".3f"),
                *pool,
                _fmt(r.get("tokens_per_s"), ",.0f"),
            ]
        )
    return _table(header, rows, right_from=3)


def fits_table(fits: dict, params_key: str) -> list[str]:
    what = "active params" if params_key == "active_params" else "params"
    header = ["budget", "family", "runs", f"fitted optimum ({what})", "fitted loss", "best run", what, "best loss"]
    rows = []
    for (fam, budget), g in fits.items():
        fit, best = g["fit"], g["best"]
        opt = "-" if fit is None or fit.optimum_params is None else short_count(fit.optimum_params)
        if fit is not None and fit.optimum_params is not None and not fit.bracketed:
            opt += " (edge)" if fit.best_at_edge else " (outside)"
        rows.append(
            [
                f"{budget:.3g}",
                fam,
                str(len(g["runs"])),
                opt,
                _fmt(None if fit is None else fit.optimum_loss),
                best["run"],
                short_count(best[params_key]),
                _fmt(primary_loss(best)),
            ]
        )
    notes = [f"- {fam} at {b:.3g}: {g['note']}" for (fam, b), g in fits.items() if g["note"]]
    return _table(header, rows, right_from=2) + ([""] + notes if notes else [])


def table1(fits: dict) -> list[str]:
    """Rows: (budget, family) at the size nearest its optimum; columns: perplexity on every eval set
    (the mean over its seeds, with min..max when there are several)."""
    sets: list[str] = []
    for g in fits.values():
        for r in g["runs"]:
            for s in r.get("valid", {}):
                if s not in sets:
                    sets.append(s)
    header = ["budget", "family", "run (size nearest the optimum)", "seeds", "active params", *sets]
    rows = []
    for (fam, budget), g in fits.items():
        runs = optimum_runs(g)
        cells = [format_spread(eval_stats(runs, s), ".2f") for s in sets]
        name = runs[0]["run"] + (" *" if fam in NON_CAUSAL_FAMILIES else "")
        seeds = ",".join(str(seed_of(r)) for r in runs)
        rows.append([f"{budget:.3g}", fam, name, seeds, short_count(runs[0].get("active_params")), *cells])
    note = []
    if any(fam in NON_CAUSAL_FAMILIES for fam, _ in fits):
        note = ["", "\\* expert-choice routing sees later tokens of the batch: not a causal LM's perplexity."]
    return _table(header, rows, right_from=3) + note


def ablation_table(recs: list[dict], x_field: str, series_field: str | None) -> list[str]:
    header = [x_field.split(".")[-1] if "*" not in x_field else x_field, "series", "run", "loss", "ppl", "usage %"]
    header.append("KL")
    rows = []
    for r in sorted(recs, key=lambda r: (str(r.get("series")), float(r["x"]) if r.get("x") is not None else 0.0)):
        usage, kl = routed_usage(r)
        ppl = primary_ppl(r)
        rows.append(
            [
                str(r.get("x")),
                str(r.get("series")) if series_field else "-",
                r["run"] + (f" (the {r['shared_from']} run)" if r.get("shared_from") else ""),
                _fmt(primary_loss(r)),
                _fmt(ppl, ".2f"),
                _fmt(usage, ".1f"),
                _fmt(kl, ".3f"),
            ]
        )
    return _table(header, rows, right_from=3)


def best_per_series(recs: list[dict], x_field: str) -> list[str]:
    """A row per series, best first: the value of the ablated field with the lowest seed-mean loss,
    that loss, the series' values measured, and "(edge)" when the best is the smallest or largest of
    them (the optimum is then not bracketed: lr-check's dense at its largest lr), "(one value)" when
    the series ran one value (lr-check's warm-up and tables series before their brackets). Its own runs only
    (no shared points): a series' best is what was run for it."""
    by_series: dict[str, dict] = {}
    for r in recs:
        loss = primary_loss(r)
        if r.get("x") is not None and loss is not None:
            by_series.setdefault(str(r.get("series")), {}).setdefault(r["x"], []).append(loss)
    rows = []
    for s, cells in by_series.items():
        xs = sorted(cells, key=float)
        mean = {x: sum(v) / len(v) for x, v in cells.items()}
        best = min(xs, key=lambda x: mean[x])
        # one value run is not a best at all: say so rather than print it as an optimum
        edge = " (one value)" if len(xs) == 1 else " (edge)" if best in (xs[0], xs[-1]) else ""
        seeds = max(len(v) for v in cells.values())
        rows.append(
            (mean[best], [series_cell(s), f"{best}{edge}", _fmt(mean[best]), ", ".join(map(str, xs)), str(seeds)])
        )
    header = ["series", f"best {x_field.split('.')[-1]}", "loss", "values run", "seeds (most)"]
    return _table(header, [row for _, row in sorted(rows, key=lambda t: t[0])], right_from=2)


def ablation_pivot(recs: list[dict], series_field: str) -> list[str]:
    """The paper's Table 2 layout: a row per x, three columns (ppl, usage %, KL) per series; a cell
    with several seeds lists them in seed order ("20.11 / 20.43"), so the seed spread stays visible."""
    series = sorted({str(r.get("series")) for r in recs})
    xs = sorted({r.get("x") for r in recs}, key=lambda x: float(x) if x is not None else 0.0)
    header = [series_field.split(".")[-1] + " ->"] + [f"{s} {m}" for s in series for m in ("ppl", "usage %", "KL")]
    rows = []
    for x in xs:
        row = [str(x)]
        for s in series:
            cell = sorted((r for r in recs if r.get("x") == x and str(r.get("series")) == s), key=seed_of)
            ppl = [primary_ppl(r) for r in cell]
            usage = [routed_usage(r) for r in cell]
            for values, spec in ((ppl, ".2f"), ([u for u, _ in usage], ".1f"), ([k for _, k in usage], ".3f")):
                row.append(" / ".join(_fmt(v, spec) for v in values) if values else "")
        rows.append(row)
    return _table(header, rows, right_from=1)


def code_line(recs: list[dict]) -> str:
    """Which code trained the runs: each recorded commit with its number of runs (records from
    before the "code" field count as unrecorded), and the torch versions."""
    commits: dict[str, int] = {}
    torches: set[str] = set()
    for r in recs:
        code = r.get("code") or {}
        key = code.get("commit") or "unrecorded"
        commits[key] = commits.get(key, 0) + 1
        if code.get("torch"):
            torches.add(code["torch"])
    parts = ", ".join(f"{c} ({n} run{'s' if n != 1 else ''})" for c, n in sorted(commits.items()))
    return f"Code: commit {parts}" + (f"; torch {', '.join(sorted(torches))}." if torches else ".")
