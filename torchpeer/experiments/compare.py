"""Seeds and paired comparisons for the report: what one run cannot decide.

Runs here differ by several percent between seeds, so a family's number at a budget is the mean
over the seeds trained at the size nearest its optimum, with the spread (min..max), and two
families are compared by *paired* differences: seed s of one against seed s of the other (the
same seed means the same data order and the same initialisation stream), never one run against
another run of a different seed.

Records carry ``seed`` (train.seed; older records without it count as seed 0).
"""

from __future__ import annotations

import math
from statistics import mean

from torchpeer.experiments.results import primary_loss

# Families whose loss is not a causal LM's (the choice sees later tokens of the batch): reported,
# marked, never ranked against the causal families.
NON_CAUSAL_FAMILIES = ("moe-ec",)
# The paper's order at every budget, best first (its Table 1 / Fig. 1).
PAPER_ORDER = ("peer", "moe", "pkm", "dense")


def seed_of(record: dict) -> int:
    seed = record.get("seed")
    if seed is None:
        seed = (record.get("overrides") or {}).get("train.seed", 0)
    return int(seed)


def by_size(runs: list[dict], params_key: str = "active_params") -> dict[float, list[dict]]:
    """Runs of one (family, budget) grouped by model size (the seeds of one size together)."""
    out: dict[float, list[dict]] = {}
    for r in runs:
        out.setdefault(float(r[params_key]), []).append(r)
    return {k: sorted(v, key=seed_of) for k, v in sorted(out.items())}


def seed_stats(values: list[float]) -> dict:
    """{"mean", "min", "max", "n"} of one number over seeds."""
    return {"mean": mean(values), "min": min(values), "max": max(values), "n": len(values)}


def nearest_size(group: dict, params_key: str = "active_params") -> float:
    """The trained size nearest (in log params) the fitted optimum; the best mean loss without a bracketing fit."""
    sizes = by_size(group["runs"], params_key)
    fit = group["fit"]
    if fit is not None and fit.bracketed:
        return min(sizes, key=lambda p: abs(math.log10(p) - math.log10(fit.optimum_params)))
    return min(sizes, key=lambda p: mean(primary_loss(r) for r in sizes[p]))


def optimum_runs(group: dict, params_key: str = "active_params") -> list[dict]:
    """The runs (one per seed) of the size nearest the family's optimum at this budget."""
    return by_size(group["runs"], params_key)[nearest_size(group, params_key)]


def eval_stats(runs: list[dict], eval_set: str, what: str = "ppl") -> dict | None:
    vals = [r["valid"][eval_set][what] for r in runs if eval_set in (r.get("valid") or {})]
    return seed_stats(vals) if vals else None


def paired_difference(a_runs: list[dict], b_runs: list[dict], eval_set: str | None = None) -> dict | None:
    """Loss of a minus loss of b over the seeds both have (each a run of one size): mean, min, max, n,
    and the same as a relative perplexity change (exp(diff) - 1, in %). None without a common seed."""
    def loss(r):
        return primary_loss(r) if eval_set is None else (r.get("valid") or {}).get(eval_set, {}).get("loss")

    a = {seed_of(r): loss(r) for r in a_runs}
    b = {seed_of(r): loss(r) for r in b_runs}
    common = sorted(s for s in a if s in b and a[s] is not None and b[s] is not None)
    if not common:
        return None
    diffs = [a[s] - b[s] for s in common]
    out = seed_stats(diffs)
    out["seeds"] = common
    out["ppl_pct"] = 100.0 * (math.exp(out["mean"]) - 1.0)
    return out


def format_spread(stats: dict | None, spec: str = ".4f") -> str:
    """'4.3472' for one seed, '4.3472 (4.3401..4.3550, 3 seeds)' for several."""
    if stats is None:
        return "-"
    if stats["n"] == 1:
        return format(stats["mean"], spec)
    return f"{stats['mean']:{spec}} ({stats['min']:{spec}}..{stats['max']:{spec}}, {stats['n']} seeds)"


def order_verdict(optimal: dict[str, float]) -> str:
    """Does the paper's order (PEER < MoE < PKM < dense) hold among the causal families measured?"""
    present = [f for f in PAPER_ORDER if f in optimal]
    if len(present) < 2:
        return "too few families to check the paper's order"
    observed = sorted(present, key=lambda f: optimal[f])
    holds = observed == present
    text = " < ".join(observed)
    want = " < ".join(present)
    return f"paper's order ({want}) {'holds' if holds else 'does NOT hold'}: measured {text}"
