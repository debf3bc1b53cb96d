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

from torchpeer.experiments.results import primary_loss, seed_of

# Families whose loss is not a causal LM's (the choice sees later tokens of the batch): reported,
# marked, never ranked against the causal families.
NON_CAUSAL_FAMILIES = ("moe-ec",)
# The paper's order at every budget, best first (its Table 1 / Fig. 1).
PAPER_ORDER = ("peer", "moe", "pkm", "dense")


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


def design_of(record: dict) -> str:
    """A variant's name without its seed part ("seed=1-multi-shared" -> "multi-shared",
    "peer-s2-seed1" -> "peer-s2"): the runs of one design over several seeds."""
    import re

    name = re.sub(r"(^|-)seed=?\d+(?=-|$)", "", str(record.get("variant", record.get("run", ""))))
    return name.strip("-") or str(record.get("variant"))


def design_rows(records: list[dict], baseline: str = "dense") -> tuple[list[str], list[list[str]]]:
    """Per design (seeds together): the ranking set's ppl (mean and spread), the paired perplexity change
    against ``baseline`` (same seeds), training FLOPs per token against it, tokens/s, usage % and KL, and
    on how many eval sets the design's mean ppl beats the baseline's. Returns (header, rows)."""
    from torchpeer.experiments.results import routed_usage, short_count

    designs: dict[str, list[dict]] = {}
    for r in records:
        designs.setdefault(design_of(r), []).append(r)
    base = designs.get(baseline)
    eval_set = records[0].get("eval_set") if records else None
    header = ["design", "seeds", "params", f"ppl ({eval_set})", f"vs {baseline} (paired)", "FLOPs/token"]
    header += ["tokens/s", "usage %", "KL", f"eval sets better than {baseline}"]
    rows = []
    for name, runs in designs.items():
        runs = sorted(runs, key=seed_of)
        ppl = eval_stats(runs, eval_set)
        paired = "-"
        better = "-"
        flops = "-"
        if base is not None and name != baseline:
            d = paired_difference(runs, base)
            if d is not None:
                lo, hi = 100.0 * (math.exp(d["min"]) - 1.0), 100.0 * (math.exp(d["max"]) - 1.0)
                paired = f"{d['ppl_pct']:+.1f} %" + (f" ({lo:+.1f}..{hi:+.1f})" if d["n"] > 1 else "")
            sets = [s for s in (runs[0].get("valid") or {}) if s in (base[0].get("valid") or {})]
            wins = sum(1 for s in sets if eval_stats(runs, s)["mean"] < eval_stats(base, s)["mean"])
            better = f"{wins}/{len(sets)}"
            ratio = runs[0].get("train_flops_per_token", 0) / max(1, base[0].get("train_flops_per_token", 1))
            flops = f"{ratio:.3f}x"
        rates = [r["tokens_per_s"] for r in runs if r.get("tokens_per_s")]
        usage = [routed_usage(r) for r in runs]
        u = [x for x, _ in usage if x is not None]
        k = [y for _, y in usage if y is not None]
        rows.append(
            [
                name,
                ",".join(str(seed_of(r)) for r in runs),
                short_count(runs[0].get("total_params")),
                format_spread(ppl, ".2f"),
                paired,
                flops,
                f"{mean(rates):,.0f}" if rates else "-",
                f"{mean(u):.1f}" if u else "-",
                f"{mean(k):.2f}" if k else "-",
                better,
            ]
        )
    return header, rows
