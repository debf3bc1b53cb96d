"""Do lr-check's 15 % warm-up brackets leave isoflop-lrw's family lrs as they are? (campaign.md Batch 20)

    python scripts/lr_check_gate.py runs/lr-check && bash scripts/device_sweep.sh isoflop-lrw ...

Why a script: isoflop-lrw's lrs (each family's best at d_model 128) were chosen at 5 % warm-up, and the
spec now warms up for 15 %. lr-check's ``<family>-wu15`` series run each family at 15 % at its chosen lr
and one grid step either side (x 0.5 and x 2), and PEER also with its tables at 8e-3 beside a base lr of
4e-3 (``peer-tables8e-3-wu15``). If every family's best 15 % run is at its chosen lr and PEER's tables
setting does not win, isoflop-lrw can start on the same warm device machine in the next command; a
device machine goes back 30 s after a command ends, too soon to read a report by hand.

Reads RUNS/results.jsonl (lr-check's runs, seed 0) and isoflop-lrw's plan (its lr at d_model 128 per
family). Prints a line per family; exit status 0: the lrs stand; 1: a family's best moved, or PEER's
tables setting won (change the spec before isoflop-lrw runs); 2: a bracket is incomplete or the input
is missing. A neighbour (or the tables setting) that beats the chosen lr by less than TOL nats (0.02,
``--tol``; a third of the seed range measured at lr 1e-3) does not move it: one seed cannot tell them
apart, and a lease is not spent re-planning on a difference below the noise. moe-ec (it takes
token-choice MoE's lr) and multi-peer (chosen on the CPU proxy and at 1e16) are not checked here.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile

from torchpeer.experiments.plan import plan_sweep
from torchpeer.experiments.results import primary_loss, read_results, seed_of
from torchpeer.experiments.spec import load_spec

FAMILIES = ("dense", "peer", "pkm", "moe")
PEER_TABLES = "peer-tables8e-3-wu15"
TOL = 0.02  # nats: a smaller win does not move a chosen lr (see above)


def chosen_lrs(spec: str = "isoflop-lrw") -> dict[str, float]:
    """family -> the lr the spec trains it at d_model 128 (its runs at that width; before any scaling)."""
    with tempfile.TemporaryDirectory() as tmp:
        runs = plan_sweep(load_spec(spec), tmp)
    return {r.family: r.cfg.train.lr for r in runs if r.cfg.model.d_model == 128 and r.family in FAMILIES}


def _lr(record: dict) -> float | None:
    value = (record.get("overrides") or {}).get("train.lr")
    return None if value is None else float(value)


def gate(records: list[dict], chosen: dict[str, float], tol: float = TOL) -> tuple[int, list[str]]:
    """-> (exit status, lines): 0 the lrs stand, 1 one moved (or PEER's tables won) by >= tol nats,
    2 incomplete."""
    recs = [r for r in records if seed_of(r) == 0 and primary_loss(r) is not None]
    lines, status = [], 0
    best_peer = None
    for fam in FAMILIES:
        lr = chosen[fam]
        runs = {_lr(r): primary_loss(r) for r in recs if r.get("family") == f"{fam}-wu15" and _lr(r) is not None}
        wanted = [lr / 2, lr, lr * 2]
        have = {w: next((v for k, v in runs.items() if math.isclose(k, w, rel_tol=1e-6)), None) for w in wanted}
        if any(v is None for v in have.values()):
            missing = ", ".join(f"{w:g}" for w, v in have.items() if v is None)
            lines.append(f"{fam}: incomplete at 15 % warm-up (no run at lr {missing})")
            status = max(status, 2)
            continue
        best = min(have, key=have.get)
        cells = "  ".join(f"{w:g}: {v:.4f}" for w, v in have.items())
        at_chosen = have[next(w for w in have if math.isclose(w, lr, rel_tol=1e-6))]
        moved = at_chosen - have[best] >= tol
        if moved:
            verdict = f"  MOVED from {lr:g}"
        elif math.isclose(best, lr, rel_tol=1e-6):
            verdict = "  (stands)"
        else:
            verdict = f"  (stands: {lr:g} within {tol:g} of it)"
        lines.append(f"{fam}: {cells}  best {best:g}{verdict}")
        if moved and status < 2:
            status = 1
        if fam == "peer":
            best_peer = at_chosen if not moved else have[best]
    tables = [primary_loss(r) for r in recs if r.get("family") == PEER_TABLES]
    if not tables:
        lines.append(f"peer: no {PEER_TABLES} run")
        status = 2
    elif best_peer is not None:
        won = best_peer - tables[0] >= tol
        verdict = "WINS: isoflop-lrw's PEER takes base 4e-3, tables 8e-3" if won else "(loses)"
        lines.append(f"peer, tables 8e-3 beside base 4e-3: {tables[0]:.4f} against {best_peer:.4f}  {verdict}")
        if won and status < 2:
            status = 1
    lines.append(
        {
            0: "isoflop-lrw's family lrs stand: run it",
            1: "isoflop-lrw's lrs need a change before it runs",
            2: "incomplete: run lr-check's -wu15 runs first",
        }[status]
    )
    return status, lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="Details: the module docstring.")
    ap.add_argument("runs", help="lr-check's runs folder (with results.jsonl)")
    ap.add_argument("--tol", type=float, default=TOL, help=f"nats a neighbour must win by to move an lr ({TOL})")
    args = ap.parse_args(argv)
    try:
        records = read_results(args.runs)
    except (OSError, ValueError) as e:
        print(f"lr_check_gate: {e}", file=sys.stderr)
        return 2
    if not records:
        print(f"lr_check_gate: no results in {args.runs}: run lr-check first", file=sys.stderr)
        return 2
    status, lines = gate(records, chosen_lrs(), args.tol)
    print("\n".join(lines))
    return status


if __name__ == "__main__":
    sys.exit(main())
