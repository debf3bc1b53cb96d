"""Who is ahead at each budget of an isoFLOP study: every family's isoFLOP-optimal loss, the paired
differences (same seeds = same data order) of each PEER family to its rivals, and the paper's order.

Pairs: the paper's PEER against dense, token-choice MoE and PKM (the paper's Table 1 claim); issue 18's
winner (family ``multi-peer``, issue 17's fifth family) against the same and against the paper's PEER.
"""

from __future__ import annotations

import math

from torchpeer.experiments.compare import (
    NON_CAUSAL_FAMILIES,
    eval_stats,
    optimum_runs,
    order_verdict,
    paired_difference,
)
from torchpeer.experiments.results import primary_loss

# family -> the families it is paired against, in the order the lines are written
PAIRED_AGAINST = {"peer": ("dense", "moe", "pkm"), "multi-peer": ("dense", "moe", "pkm", "peer")}
FAMILY_NAMES = {"peer": "PEER", "multi-peer": "multi-PEER"}


def optimal_loss(group: dict) -> tuple[float, str]:
    """A family's isoFLOP-optimal loss at one budget: the fitted vertex when the runs bracket it,
    else the best run's loss; with which one it is."""
    fit = group["fit"]
    if fit is not None and fit.bracketed:
        return fit.optimum_loss, "fit"
    return primary_loss(group["best"]), "best run"


def complete(group: dict) -> bool:
    """At least 4 sizes whose fit has its minimum inside them: the protocol's bar for a final number."""
    return group["n_sizes"] >= 4 and group["fit"] is not None and group["fit"].bracketed


def ahead_lines(fits: dict) -> list[str]:
    """Per budget: every family's optimal loss (lowest first), the seed spread at its optimum size,
    the paired differences of each PEER family (PAIRED_AGAINST) to its rivals, and whether the paper's
    order holds. Families with fewer than 4 sizes or an unbracketed optimum are marked provisional;
    the expert-choice MoE (non-causal) is reported but not ranked."""
    out = []
    for budget in sorted({b for _, b in fits}):
        groups = {fam: g for (fam, b), g in fits.items() if b == budget}
        ranked = sorted((optimal_loss(g) + (fam,) for fam, g in groups.items()))
        cells = []
        for loss, how, fam in ranked:
            g = groups[fam]
            note = [how]
            if not complete(g):
                note.append("provisional")
            if fam in NON_CAUSAL_FAMILIES:
                note.append("non-causal, not ranked")
            at_opt = eval_stats(optimum_runs(g), g["runs"][0].get("eval_set") or "valid", "loss")
            spread = f", {at_opt['n']} seeds {at_opt['min']:.4f}..{at_opt['max']:.4f}" if at_opt["n"] > 1 else ""
            cells.append(f"{fam} {loss:.4f} = ppl {math.exp(loss):.2f} ({'; '.join(note)}{spread})")
        out.append(f"- **{budget:.3g} FLOPs**: {', '.join(cells)}.")
        for fam, rivals in PAIRED_AGAINST.items():
            for rival in rivals:
                if fam not in groups or rival not in groups:
                    continue
                d = paired_difference(optimum_runs(groups[fam]), optimum_runs(groups[rival]))
                if d is None:
                    continue
                sign = "ahead of" if d["mean"] < 0 else "behind"
                rng = f" (seed {d['seeds'][0]})"
                if d["n"] > 1:
                    rng = f" (seeds {d['seeds']}: {d['min']:+.4f}..{d['max']:+.4f})"
                prov = "" if complete(groups[fam]) and complete(groups[rival]) else " (provisional)"
                name = FAMILY_NAMES.get(fam, fam)
                out.append(
                    f"  - {name} minus {rival}, paired at each family's optimum size: {d['mean']:+.4f} nats "
                    f"({d['ppl_pct']:+.1f} % ppl){rng}: {name} {sign} {rival}{prov}."
                )
        causal = {fam: optimal_loss(g)[0] for fam, g in groups.items() if fam not in NON_CAUSAL_FAMILIES}
        final = all(complete(groups[f]) for f in causal)
        out.append(f"  - {order_verdict(causal)}{'' if final else ' (provisional: some families incomplete)'}.")
    return out
