"""PNG figures of a sweep (matplotlib, drawn off-screen with the Agg canvas; no pyplot state).

* ``isoflop_figure``: loss against parameters, one panel per budget, one line per family, with
  the quadratic fit in log(params) and its optimum (star); runs beyond the data rule hollow;
* ``ablation_figure``: loss, expert usage % and KL against the ablated field, one line per series;
* ``curves_figure``: training loss against tokens of every run (RUN_DIR/metrics.jsonl, or .xz).

Each PNG is written atomically (temp file + rename).
"""

from __future__ import annotations

import io
import math
import os

import numpy as np

FAMILY_COLOURS = {"dense": "#1f77b4", "peer": "#d62728", "pkm": "#2ca02c", "moe": "#ff7f0e", "multi-peer": "#6b0f1a"}
OTHER_COLOURS = ["#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]


def _figure(n_panels: int, width: float = 4.6, height: float = 3.6):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = min(n_panels, 3)
    rows = math.ceil(n_panels / cols)
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]


def save_png(fig, path: str) -> str:
    """Render ``fig`` and write it to ``path`` atomically."""
    from torchpeer.data.atomic import atomic_open

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    with atomic_open(path, "wb") as fh:
        fh.write(buf.getvalue())
    return path


def colour(name: str, i: int = 0) -> str:
    return FAMILY_COLOURS.get(name, OTHER_COLOURS[i % len(OTHER_COLOURS)])


def isoflop_figure(
    fits: dict,
    path: str,
    eval_set: str,
    params_key: str = "active_params",
    outside: list[dict] = (),
    max_epochs: float | None = None,
) -> str:
    """fits: the output of ``fit.isoflop_fits`` -> one panel per budget. outside: runs the data
    rule ``max_epochs`` keeps out of the fits (``fit.outside_fit_runs``): drawn hollow in their
    family's colour, with the fit continued dotted to them, under one legend entry."""
    return save_png(isoflop_plot(fits, eval_set, params_key, outside, max_epochs), path)


def isoflop_plot(
    fits: dict,
    eval_set: str,
    params_key: str = "active_params",
    outside: list[dict] = (),
    max_epochs: float | None = None,
):
    """The matplotlib Figure of ``isoflop_figure`` (separate so that tests can read its legends)."""
    budgets = sorted({b for _, b in fits} | {float(r["budget_flops"]) for r in outside})
    fig, axes = _figure(len(budgets))
    stars = outside_optima = 0
    for ax, budget in zip(axes, budgets):
        families = [f for f, b in fits if b == budget]
        # families with only runs beyond the rule still get a colour of their own
        families += sorted({r["family"] for r in outside if float(r["budget_flops"]) == budget} - set(families))
        for i, fam in enumerate(families):
            g = fits.get((fam, budget), {"runs": [], "fit": None})
            c = colour(fam, i)
            xs = [r[params_key] for r in g["runs"]]
            ys = [_loss(r) for r in g["runs"]]
            if xs:
                ax.plot(xs, ys, "o", color=c, label=fam)
            beyond = [r for r in outside if r.get("family") == fam and float(r["budget_flops"]) == budget]
            if beyond:  # hollow: measured, but not part of the fit
                bx = [r[params_key] for r in beyond]
                ax.plot(bx, [_loss(r) for r in beyond], "o", mfc="none", mec=c, mew=1.5, markersize=8)
            fit = g["fit"]
            if fit is not None:
                grid = np.geomspace(min(xs) / 1.3, max(xs) * 1.3, 100)
                ax.plot(grid, fit.predict(grid), "-", color=c, alpha=0.7)
                if beyond:  # the fit continued to the hollow points: how far they lie from its curve
                    lo, hi = min(bx + [grid[0]]), max(bx + [grid[-1]])
                    for a, b in ((lo, grid[0]), (grid[-1], hi)):
                        if a < b:
                            ext = np.geomspace(a, b, 30)
                            ax.plot(ext, fit.predict(ext), ":", color=c, alpha=0.7)
                if fit.optimum_params is not None and fit.bracketed:
                    ax.plot([fit.optimum_params], [fit.optimum_loss], "*", color=c, markersize=14, mec="black")
                    stars += 1
                elif fit.optimum_params is not None:
                    outside_optima += 1
        if any(float(r["budget_flops"]) == budget for r in outside):
            label = f"> {max_epochs:g} epochs, outside fit" if max_epochs is not None else "outside fit"
            ax.plot([], [], "o", mfc="none", mec="black", mew=1.5, markersize=8, label=label)
        ax.set_xscale("log")
        _compact_log_ticks(ax)
        ax.set_title(f"{budget:.3g} training FLOPs")
        ax.set_xlabel("active parameters" if params_key == "active_params" else "parameters")
        ax.set_ylabel(f"loss ({eval_set})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    # the title names only what is drawn: a star per fit that brackets its optimum (fit.bracketed)
    notes = []
    if stars:
        notes.append("star: fitted optimum")
    if outside_optima:
        notes.append(f"no star: {outside_optima} fit(s) with the vertex outside the sizes or the best run at an edge")
    fig.suptitle("isoFLOP curves" + (f" ({'; '.join(notes)})" if notes else ""))
    return fig


def _compact_log_ticks(ax) -> None:
    """Label a log x-axis at 1, 2 and 5 x 10^n as "2M", "500k" (matplotlib's default labels the
    minor ticks of a narrow range as "3 x 10^6" and they overlap)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _pos: human_count(x)))
    ax.xaxis.set_minor_formatter(NullFormatter())


def human_count(x: float) -> str:
    """1.2e6 -> "1.2M", 5e5 -> "500k", 2e9 -> "2G", 30 -> "30"."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{suffix}"
    return f"{x:.3g}"


def ablation_figure(records: list[dict], path: str, x_field: str, series_field: str | None) -> str:
    """Loss / usage % / KL against ``x`` (records carry "x" and "series"), written to ``path``."""
    return save_png(ablation_plot(records, x_field, series_field), path)


def ablation_plot(records: list[dict], x_field: str, series_field: str | None):
    """The figure of ablation_figure: three panels, per series a line through the mean at each x and
    a dot per run."""
    from torchpeer.experiments.results import primary_loss, routed_usage

    series = sorted({str(r.get("series")) for r in records})
    fig, axes = _figure(3)
    eval_set = records[0].get("eval_set") if records else None
    metrics = [
        (f"loss ({eval_set})" if eval_set else "loss", lambda r: primary_loss(r)),
        ("expert usage %", lambda r: routed_usage(r)[0]),
        ("KL(usage || uniform)", lambda r: routed_usage(r)[1]),
    ]
    xs_all = [float(r["x"]) for r in records if r.get("x") is not None]
    # a log axis once the values span 4x (N = 128^2..1024^2, h*k = 32..512, lr 5e-4..4e-3); fractional
    # values (an lr) get their own ticks, as written ("0.002"), where base-2 ticks would read 2^-9
    log_x = bool(xs_all) and min(xs_all) > 0 and max(xs_all) / min(xs_all) >= 4
    own_ticks = log_x and any(x != int(x) for x in xs_all)
    several = False
    for ax, (label, get) in zip(axes, metrics):
        for i, s in enumerate(series):
            pts = [(float(r["x"]), get(r)) for r in records if str(r.get("series")) == s and r.get("x") is not None]
            pts = [(x, y) for x, y in pts if y is not None]
            if not pts:
                continue
            xs, means = mean_by_x(pts)
            c = colour(s, i)
            ax.plot(xs, means, "-", color=c, label=s if series_field else None)
            # every run a dot, so the seeds' spread at one x shows beside the mean
            ax.plot(*zip(*pts), "o", color=c, alpha=0.8 if len(xs) == len(pts) else 0.55, markersize=5)
            several = several or len(xs) < len(pts)
        if log_x:
            ax.set_xscale("log", base=2)
        if own_ticks:
            ticks = sorted(set(xs_all))
            ax.set_xticks(ticks, [f"{x:g}" for x in ticks])
            ax.minorticks_off()
        ax.set_xlabel(x_field)
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        if series_field and ax.get_legend_handles_labels()[0]:
            ax.legend(title=series_field.split(".")[-1], fontsize=8)
    fig.suptitle(f"ablation over {x_field}" + (" (line: mean over seeds; dots: runs)" if several else ""))
    return fig


def mean_by_x(points: list[tuple[float, float]]) -> tuple[list[float], list[float]]:
    """(sorted distinct x, mean y at each): the line of a series whose x repeats (several seeds);
    a line through every run would zigzag between seeds at one x."""
    by_x: dict[float, list[float]] = {}
    for x, y in points:
        by_x.setdefault(x, []).append(y)
    xs = sorted(by_x)
    return xs, [sum(by_x[x]) / len(by_x[x]) for x in xs]


def read_curve(run_dir: str) -> tuple[list[float], list[float]]:
    """(tokens, train loss) of the log records in RUN_DIR/metrics.jsonl (or .xz), parsed by
    ``torchpeer.viz.metrics.read_metrics`` (cut lines skipped; empty lists when there is no log yet)."""
    from torchpeer.viz.metrics import read_metrics_if_logged

    if (run := read_metrics_if_logged(run_dir)) is None:
        return [], []
    tokens, losses = run.train.get("tokens"), run.train.get("loss")
    if tokens is None or losses is None:
        return [], []
    tokens_at = dict(zip(tokens.steps, tokens.values))
    pairs = [(tokens_at[s], v) for s, v in zip(losses.steps, losses.values) if s in tokens_at]
    return [t for t, _ in pairs], [v for _, v in pairs]


def curves_figure(records: list[dict], runs_dir: str, path: str) -> str | None:
    """Training curves of every run, one panel per budget (None when no run has a log)."""
    groups: dict[str, list[dict]] = {}
    for r in records:
        b = r.get("budget_flops")
        key = f"{b:.3g} FLOPs" if b is not None else f"{r.get('token_budget') or 0:.3g} tokens"
        groups.setdefault(key, []).append(r)
    curves = {r["run"]: read_curve(os.path.join(runs_dir, r["run"])) for r in records}
    if not any(t for t, _ in curves.values()):
        return None
    fig, axes = _figure(len(groups))
    for ax, (key, runs) in zip(axes, groups.items()):
        seen: dict[str, int] = {}
        for r in runs:
            t, y = curves[r["run"]]
            fam = r.get("family", "")
            j = seen[fam] = seen.get(fam, -1) + 1  # line style tells the sizes of one family apart
            if t:
                style = ["-", "--", ":", "-."][j % 4]
                ax.plot(t, y, style, color=colour(fam, len(seen)), label=r["variant"], linewidth=1.2)
        tails = [curves[r["run"]][1][len(curves[r["run"]][1]) // 10 :] for r in runs]
        tails = [y for t in tails for y in t]
        if tails:  # the first 10% of each run (the steep start) may leave the frame, the rest is legible
            lo, hi = min(tails), max(tails)
            ax.set_ylim(lo - 0.05 * (hi - lo + 1e-9), hi + 0.05 * (hi - lo + 1e-9))
        ax.set_title(key)
        ax.set_xlabel("tokens")
        ax.set_ylabel("training loss")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    fig.suptitle("training curves")
    return save_png(fig, path)


def _loss(record: dict) -> float | None:
    from torchpeer.experiments.results import primary_loss

    return primary_loss(record)
