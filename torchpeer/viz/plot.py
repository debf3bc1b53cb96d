"""Training curves of one or several runs as one figure (matplotlib, Agg backend).

Panels: loss and perplexity (training and every eval set), bits per byte, learning rate,
tokens/s, gradient norm, expert usage and KL(usage || uniform) of the routed layers.
One colour per run (per curve when there is a single run); training curves solid, eval sets
dashed with markers, the end-of-run evaluation (on the whole split; the periodic ones use
``train.eval_batches`` batches) as a star.
"""

from __future__ import annotations

import io
import math

from torchpeer.viz.metrics import EVAL_KEYS, RunMetrics, Series

X_AXES = ("step", "tokens", "time")
FORMATS = ("png", "svg", "pdf")
EVAL_STYLES = ("--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v", "P")


def import_pyplot():
    """matplotlib.pyplot on the Agg backend, or an ImportError that says how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError(
            "torchpeer plot needs matplotlib, which the main install does not include: "
            "pip install matplotlib (or pip install 'torchpeer[viz]')"
        ) from None
    matplotlib.use("Agg", force=True)  # no display needed; never opens a window
    import matplotlib.pyplot as plt

    return plt


def _x(run: RunMetrics, s: Series, axis: str) -> list[float] | None:
    """x values of a series on ``axis`` (None when the run does not record that axis); a run that
    continued another's weights starts where its parent stopped (``run.offset``)."""
    off = run.offset[axis]
    if axis == "step":
        return [float(v) + off for v in s.steps]
    if axis == "tokens":
        xs = [run.tokens_at(v) for v in s.steps]
        return None if any(v is None for v in xs) else [v + off for v in xs]
    t = run.train.get("time")  # training seconds at the log steps; eval steps are interpolated
    if not t or not t.steps:
        return None
    import numpy as np

    return [float(v) + off for v in np.interp(s.steps, [0, *t.steps], [0.0, *t.values])]


def _draw(ax, run, s: Series, axis: str, label: str, color, style: str, marker: str | None, transform=None) -> bool:
    xs = _x(run, s, axis)
    if xs is None or not s.values:
        return False
    ys = [transform(v) for v in s.values] if transform else list(s.values)
    ax.plot(xs, ys, style, color=color, marker=marker, markersize=3, linewidth=1.4, label=label)
    finals = [(x, y) for x, y, f in zip(xs, ys, s.final) if f]  # the end-of-run evaluation (whole split)
    if finals:
        ax.plot(*zip(*finals), "*", color=color, markersize=10)
    return True


def _exp(v: float) -> float:
    return math.exp(min(v, 700.0))


def plot_runs(runs: list[RunMetrics], x: str = "step", title: str | None = None):
    """A matplotlib Figure with the panels of the module docstring for ``runs``."""
    if x not in X_AXES:
        raise ValueError(f"x axis {x!r} is not one of {', '.join(X_AXES)}")
    if not runs:
        raise ValueError("give at least one run")
    plt = import_pyplot()
    fig, axes = plt.subplots(2, 4, figsize=(20, 8.5), constrained_layout=True)
    panels = dict(
        zip(["loss", "ppl", "bpb", "lr", "tok_per_s", "grad_norm", "usage", "kl"], axes.flatten(), strict=True)
    )
    titles = {
        "loss": "loss (nats / token)",
        "ppl": "perplexity",
        "bpb": "bits per byte (eval)",
        "lr": "learning rate",
        "tok_per_s": "training tokens / s",
        "grad_norm": "gradient norm (before clipping)",
        "usage": "expert usage % (eval; train: each log window)",
        "kl": "KL(usage || uniform) (eval; train: each log window)",
    }
    drawn = {k: False for k in panels}
    palette = plt.get_cmap("tab10").colors
    curve_colors = iter(palette * 8)  # a single run: one colour per curve

    for ri, run in enumerate(runs):
        prefix = f"{run.name}: " if len(runs) > 1 else ""
        run_color = palette[ri % len(palette)]

        def color():
            return run_color if len(runs) > 1 else next(curve_colors)  # noqa: B023 (used in this iteration)

        train_color = color()
        for key, panel in (("loss", "loss"), ("lr", "lr"), ("tok_per_s", "tok_per_s"), ("grad_norm", "grad_norm")):
            if key in run.train:
                drawn[panel] |= _draw(panels[panel], run, run.train[key], x, f"{prefix}train", train_color, "-", None)
        if "loss" in run.train:
            drawn["ppl"] |= _draw(
                panels["ppl"], run, run.train["loss"], x, f"{prefix}train", train_color, "-", None, _exp
            )
        for ei, (set_name, curves) in enumerate(run.evals.items()):
            c = color()
            style, marker = EVAL_STYLES[ei % len(EVAL_STYLES)], MARKERS[ei % len(MARKERS)]
            for key in EVAL_KEYS:
                if key in curves:
                    drawn[key] |= _draw(panels[key], run, curves[key], x, f"{prefix}eval {set_name}", c, style, marker)
        for li, ((set_name, layer), curves) in enumerate(run.routing.items()):
            c = color()
            marker = MARKERS[li % len(MARKERS)]
            for key, panel in (("usage_pct", "usage"), ("kl", "kl")):
                if key in curves:
                    label = f"{prefix}{set_name} {layer}"
                    drawn[panel] |= _draw(panels[panel], run, curves[key], x, label, c, "-", marker)

    xlabel = {"step": "optimizer step", "tokens": "training tokens", "time": "training seconds"}[x]
    for key, ax in panels.items():
        ax.set_title(titles[key], fontsize=11)
        if not drawn[key]:
            ax.text(0.5, 0.5, "no data in these runs", ha="center", va="center", transform=ax.transAxes, color="0.5")
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        ax.set_xlabel(xlabel)
        ax.grid(True, alpha=0.3)
        if key in ("ppl", "lr"):
            ax.set_yscale("log")
        ax.legend(fontsize=8, loc="best")
    fig.suptitle(title or "torchpeer: " + ", ".join(r.name for r in runs), fontsize=13)
    return fig


def figure_bytes(fig, fmt: str = "png", dpi: int = 100) -> bytes:
    """Encode ``fig`` (then closed) as ``fmt`` bytes."""
    if fmt not in FORMATS:
        raise ValueError(f"output format {fmt!r} is not one of {', '.join(FORMATS)}")
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format=fmt, dpi=dpi)
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)
    return buf.getvalue()


def save_plot(run_dirs: list[str], out: str, x: str = "step", names: list[str] | None = None) -> str:
    """Read the runs' metrics, draw them and write ``out`` atomically (format from its extension)."""
    from torchpeer.data.atomic import atomic_open
    from torchpeer.viz.metrics import read_metrics

    fmt = out.rsplit(".", 1)[-1].lower() if "." in out else ""
    if fmt not in FORMATS:
        raise ValueError(f"--out {out!r}: give a file name ending in .png (or .svg, .pdf)")
    if names is not None and len(names) != len(run_dirs):
        raise ValueError(f"give one name per run ({len(run_dirs)} runs, {len(names)} names)")
    runs = [read_metrics(d, names[i] if names else None) for i, d in enumerate(run_dirs)]
    _unique_names(runs)
    import_pyplot()  # a missing matplotlib is reported after the paths: a wrong folder is fixed first
    data = figure_bytes(plot_runs(runs, x=x), fmt)
    with atomic_open(out, "wb") as fh:
        fh.write(data)
    return out


def _unique_names(runs: list[RunMetrics]) -> None:
    """Runs whose folders share a name are labelled by their paths instead."""
    names = [r.name for r in runs]
    for r in runs:
        if names.count(r.name) > 1:
            r.name = r.path
