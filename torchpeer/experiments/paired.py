"""Paired comparisons inside an ablation: each value of the ablated field against the series' first
value, run by run with the same seed (same data order), over every eval set.

Why: the seed spread at one value is as large as the effects Table 2 looks for (campaign.md batch 9),
and agreement across eval sets is no evidence on its own (the eval sets share one trained model:
seed 0 put 512^2 ahead of 1024^2 on all 11 sets, seed 1 the reverse). So the table shows each seed's
difference side by side, and the seed spread at each value beside them.
"""

from __future__ import annotations

from torchpeer.experiments.markdown import fmt, table
from torchpeer.experiments.results import primary_loss, seed_of


def _x_key(x) -> float:
    return float(x) if x is not None else 0.0


def with_shared_points(recs: list[dict]) -> list[dict]:
    """``recs`` plus, for each run that also lies on another series' line, a copy labelled with that
    series (``"shared_from"``: its own). A run lies on series B's line when it agrees with every
    override that all of B's runs share: Fig. 3's h8-k16 run (heads 8, top-k 16; filed with the heads
    line) lies on the top-k line, whose runs all have heads 8. Seeds need not agree (a seed-1 run of B
    makes ``train.seed`` one of the overrides B's runs do not share). Nor does a run set a field that
    none of B's runs sets: lr-check's PEER at base lr 4e-3 with its tables at 1e-3 (train.expert_lr)
    is not a point of the one-lr PEER line."""
    series = sorted({str(r.get("series")) for r in recs if r.get("series") is not None})
    out = list(recs)
    for b in series:
        members = [r.get("overrides") or {} for r in recs if str(r.get("series")) == b]
        shared = {k: v for k, v in members[0].items() if all(k in m and m[k] == v for m in members[1:])}
        fields = set().union(*members)
        for r in recs:
            own = r.get("overrides") or {}
            on_line = shared and all(own.get(k) == v for k, v in shared.items()) and set(own) <= fields
            if str(r.get("series")) not in (b, "None") and on_line:
                out.append({**r, "series": b, "shared_from": r.get("series")})
    return out


def paired_rows(recs: list[dict]) -> list[dict]:
    """Per (series, x other than the series' smallest, seed that both have): the ranking set's loss
    difference x minus the reference (nats), the mean difference over the eval sets both runs have,
    and how many of those sets favour x (lower loss)."""
    out = []
    for s in sorted({str(r.get("series")) for r in recs}):
        runs = [r for r in recs if str(r.get("series")) == s and r.get("x") is not None]
        xs = sorted({r["x"] for r in runs}, key=_x_key)
        if len(xs) < 2:
            continue
        ref = {seed_of(r): r for r in runs if r["x"] == xs[0]}
        for x in xs[1:]:
            for r in sorted((r for r in runs if r["x"] == x), key=seed_of):
                base = ref.get(seed_of(r))
                if base is None:
                    continue
                a, b = r.get("valid") or {}, base.get("valid") or {}
                sets = sorted(k for k in a if k in b and a[k].get("loss") is not None and b[k].get("loss") is not None)
                diffs = [a[k]["loss"] - b[k]["loss"] for k in sets]
                la, lb = primary_loss(r), primary_loss(base)
                out.append(
                    {
                        "series": s,
                        "x": x,
                        "ref_x": xs[0],
                        "seed": seed_of(r),
                        "ranking": None if la is None or lb is None else la - lb,
                        "mean": sum(diffs) / len(diffs) if diffs else None,
                        "favour": sum(d < 0 for d in diffs),
                        "sets": len(diffs),
                    }
                )
    return out


def series_cell(series: str) -> str:
    """A series key as a table cell: "-" for the runs of an ablation without series (their key is
    str(None)), as the ablation table writes it."""
    return "-" if series == "None" else series


def seed_spread(recs: list[dict]) -> dict[tuple[str, object], float]:
    """(series, x) -> max minus min ranking-set loss over its seeds (only where there are several)."""
    groups: dict[tuple[str, object], list[float]] = {}
    for r in recs:
        loss = primary_loss(r)
        if loss is not None and r.get("x") is not None:
            groups.setdefault((str(r.get("series")), r["x"]), []).append(loss)
    return {k: max(v) - min(v) for k, v in groups.items() if len(v) > 1}


def paired_table(recs: list[dict]) -> list[str]:
    """Markdown lines: a row per (series, x), a column per seed ("-0.0118 (10/11)": the ranking
    set's difference and how many eval sets favour x), and the seed spread at x. Empty when no
    series has two values with a common seed."""
    rows = paired_rows(recs)
    if not rows:
        return []
    seeds = sorted({r["seed"] for r in rows})
    spread = seed_spread(recs)
    keys = sorted({(r["series"], r["x"], r["ref_x"]) for r in rows}, key=lambda k: (k[0], _x_key(k[1])))
    body = []
    for series, x, ref_x in keys:
        line = [series_cell(series), f"{x} - {ref_x}"]
        for seed in seeds:
            hit = [r for r in rows if (r["series"], r["x"], r["seed"]) == (series, x, seed)]
            line.append(f"{fmt(hit[0]['ranking'], '+.4f')} ({hit[0]['favour']}/{hit[0]['sets']})" if hit else "")
        both = [spread.get((series, v)) for v in (x, ref_x)]
        line.append(" / ".join(fmt(v, ".4f") for v in both if v is not None) or "")
        body.append(line)
    header = ["series", "x - reference"] + [f"seed {s}: ranking set (sets favouring x)" for s in seeds]
    header.append("seed spread at x / reference")
    return table(header, body, right_from=2)
