"""Two sweeps side by side (``torchpeer report RUNS --against OTHER``): what one change did to every run.

Why: a study re-run with one setting changed (``isoflop-lrw`` is the isoflop study with width-scaled
lrs: every run has a twin of the same name there, the same model, data and seed) is read twice: run by
run (what the change did to each size of each family) and family against family (did it change who is
ahead). Both tables come from the runs' ranking-eval-set losses; twins pair by run name, so the same
seed and data order meet.
"""

from __future__ import annotations

from torchpeer.experiments.fit import isoflop_fits
from torchpeer.experiments.markdown import fmt, table
from torchpeer.experiments.results import primary_loss, seed_of


def _lr(record: dict) -> str:
    """The run's train.lr as its overrides set it ("base" when the base config's lr applies)."""
    value = (record.get("overrides") or {}).get("train.lr")
    return "base" if value is None else f"{float(value):.3g}"


def _warmup(record: dict) -> str:
    """The run's warm-up, "<steps> (<percent of its steps>)", as its overrides set it ("base" otherwise)."""
    value = (record.get("overrides") or {}).get("train.warmup_steps")
    if value is None or value == "none":
        return "base"
    steps = record.get("steps")
    return f"{int(value)} ({100 * int(value) / steps:.0f} %)" if steps else str(int(value))


def _best_by_family(recs: list[dict], max_epochs: float | None) -> dict[tuple[float, str], dict]:
    """(budget, family) -> its seed-0 run of least loss: the report's "best run" (isoflop_fits, under
    the sweep's data rule ``max_epochs``) of the seed-0 runs, so both sweeps are read alike."""
    fits = isoflop_fits([r for r in recs if seed_of(r) == 0], max_epochs=max_epochs)
    return {(budget, fam): g["best"] for (fam, budget), g in fits.items()}


def against_lines(
    recs: list[dict], other: list[dict], here: str, there: str, rules: tuple[float | None, float | None] = (None, None)
) -> list[str]:
    """Markdown lines: the twins' losses and differences (here minus there, nats), then per budget each
    family's best seed-0 run in both sweeps and the order of the families in each. [] without twins.
    ``rules``: each sweep's data rule (max_epochs; runs beyond it are never a family's best)."""
    by_name = {r["run"]: r for r in other}
    twins = [(r, by_name[r["run"]]) for r in recs if r["run"] in by_name and primary_loss(r) is not None]
    twins = [(a, b) for a, b in twins if primary_loss(b) is not None]
    if not twins:
        return []
    # the warm-up gets columns only where some twins differ in it (isoflop-lrw moved to 15 % from the
    # isoflop study's 5 %: its differences are then the lr's and the warm-up's together)
    warm = any(_warmup(a) != _warmup(b) for a, b in twins)
    header = ["run", "family", f"lr ({here})", f"lr ({there})"]
    header += [f"warm-up ({here})", f"warm-up ({there})"] if warm else []
    header += [f"loss ({here})", f"loss ({there})", "difference"]
    rows = [
        [a["run"], a["family"], _lr(a), _lr(b), *((_warmup(a), _warmup(b)) if warm else ()),
         fmt(primary_loss(a)), fmt(primary_loss(b)), f"{primary_loss(a) - primary_loss(b):+.4f}"]
        for a, b in twins
    ]  # fmt: skip
    lines = [f"{len(twins)} runs with a twin of the same name in {there} (difference: {here} minus {there}, nats):"]
    lines += ["", *table(header, rows, right_from=2)]
    best_here, best_there = _best_by_family(recs, rules[0]), _best_by_family(other, rules[1])
    shared = sorted(k for k in best_here if k in best_there)
    if not shared:
        return lines
    header = ["budget", "family", f"best run ({here})", "loss", f"best run ({there})", "loss", "difference"]
    rows = []
    for budget, fam in shared:
        a, b = best_here[(budget, fam)], best_there[(budget, fam)]
        la, lb = primary_loss(a), primary_loss(b)
        rows.append([f"{budget:.3g}", fam, a["run"], fmt(la), b["run"], fmt(lb), f"{la - lb:+.4f}"])
    lines += ["", "Each family's best seed-0 run per budget in both (the sizes may differ):", ""]
    lines += table(header, rows, right_from=3)
    for budget in sorted({b for b, _ in shared}):
        fams = [f for b, f in shared if b == budget]
        order_here = " < ".join(sorted(fams, key=lambda f: primary_loss(best_here[(budget, f)])))
        order_there = " < ".join(sorted(fams, key=lambda f: primary_loss(best_there[(budget, f)])))
        same = "the same order" if order_here == order_there else "**the order changes**"
        lines.append(f"- {budget:.3g}: {here}: {order_here}; {there}: {order_there} ({same}).")
    return lines
