"""Expert usage during training, from runs that logged it (``train.track_usage``): each log window's
usage % and KL over its training tokens, averaged over the run's routed layers. The report's
section shows when a router collapses onto few experts (in the warm-up, or later), not only that
it did: a table at fixed fractions of each run's steps and a figure of the windows against tokens.

A window's usage counts the experts selected at least once in its tokens, so it depends on how many
tokens a window holds (train.log_interval x tokens a step): compare runs with the same window, and
read the final evaluation's usage (the runs table) for the number the paper reports.
"""

from __future__ import annotations

import os

from torchpeer.experiments.markdown import fmt, table

FRACTIONS = (0.05, 0.15, 0.25, 0.5, 1.0)  # of a run's steps: the isoflop protocol's warm-ups end at 0.05 / 0.15


def usage_during_training(recs: list[dict], runs_dir: str) -> list[dict]:
    """One dict per run that logged window usage: run, variant, family, budget (the report's panel
    key), steps, tokens, usage, kl (lists, one entry per window, the mean over routed layers)."""
    from torchpeer.viz.metrics import read_metrics_if_logged

    out = []
    for r in recs:
        if (m := read_metrics_if_logged(os.path.join(runs_dir, r["run"]))) is None:
            continue
        layers = [c for (set_name, _), c in m.routing.items() if set_name == "train" and c.get("usage_pct")]
        if not layers:
            continue
        steps = sorted(set.intersection(*(set(c["usage_pct"].steps) for c in layers)))
        if not steps:
            continue

        b = r.get("budget_flops")
        out.append({
            "run": r["run"], "variant": r.get("variant", r["run"]), "family": r.get("family", ""),
            "budget": f"{b:.3g} FLOPs" if b is not None else f"{r.get('token_budget') or 0:.3g} tokens",
            "steps": steps, "tokens": [m.tokens_at(s) for s in steps],
            "usage": [_mean_at(layers, "usage_pct", s) for s in steps],
            "kl": [_mean_at(layers, "kl", s) for s in steps],
            "total_steps": r.get("steps") or steps[-1],
        })  # fmt: skip
    return out


def _mean_at(layers: list[dict], key: str, step: int) -> float | None:
    """The mean over ``layers`` (one run's routing curves) of ``key`` at ``step``; None if none has it."""
    values = [dict(zip(c[key].steps, c[key].values)).get(step) for c in layers if key in c]
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def at_fraction(run: dict, frac: float) -> float | None:
    """The usage of the first window that ends at or after ``frac`` of the run's steps (None if none)."""
    target = frac * run["total_steps"]
    return next((u for s, u in zip(run["steps"], run["usage"]) if s >= target), None)


def usage_table(hist: list[dict]) -> list[str]:
    """A row per run: window usage % at FRACTIONS of its steps, the lowest window (and where), KL at the end."""
    header = ["run", *(f"usage % at {f:.0%}" for f in FRACTIONS), "lowest (at % of steps)", "KL at end"]
    rows = []
    for h in hist:
        low = min(range(len(h["usage"])), key=lambda i: h["usage"][i] if h["usage"][i] is not None else 1e9)
        where = f"{fmt(h['usage'][low], '.1f')} ({100 * h['steps'][low] / h['total_steps']:.0f} %)"
        rows.append([h["run"], *(fmt(at_fraction(h, f), ".1f") for f in FRACTIONS), where, fmt(h["kl"][-1], ".3f")])
    return table(header, rows, right_from=1)


def usage_figure(hist: list[dict], path: str) -> str:
    """Window usage % against training tokens, one panel per budget, a line per run."""
    from torchpeer.experiments.figures import _figure, colour, save_png

    groups: dict[str, list[dict]] = {}
    for h in hist:
        groups.setdefault(h["budget"], []).append(h)
    fig, axes = _figure(len(groups))
    for ax, (key, runs) in zip(axes, groups.items()):
        seen: dict[str, int] = {}
        for h in runs:
            j = seen[h["family"]] = seen.get(h["family"], -1) + 1
            pts = [(t, u) for t, u in zip(h["tokens"], h["usage"]) if t is not None and u is not None]
            if pts:
                ax.plot(*zip(*pts), ["-", "--", ":", "-."][j % 4], color=colour(h["family"], len(seen)),
                        label=h["variant"], linewidth=1.2)  # fmt: skip
        ax.set_title(key)
        ax.set_xlabel("tokens")
        ax.set_ylabel("usage % (each log window)")
        ax.set_ylim(0, 102)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    fig.suptitle("expert usage during training (each log window's training tokens)")
    return save_png(fig, path)


def usage_section(recs: list[dict], runs_dir: str, path: str) -> list[str]:
    """The report's markdown lines (table, then the figure written to ``path``); [] when no run logged."""
    hist = usage_during_training(recs, runs_dir)
    if not hist:
        return []
    png = usage_figure(hist, path)
    rel = os.path.basename(png)
    lines = ["", "### Expert usage during training (each log window; `train.track_usage`)", ""]
    lines += [
        "Mean over each run's routed layers; at a fraction of its steps, the first window ending there. A "
        "window's usage depends on its tokens (log_interval x tokens a step): compare runs of one window "
        "size, and the runs table's final evaluation for the paper's number."
    ]
    return [*lines, "", *usage_table(hist), "", f"![{os.path.splitext(rel)[0]}]({rel})"]
