"""scripts/lr_check_gate.py: do lr-check's 15 % warm-up brackets leave isoflop-lrw's family lrs as
they are? Exit 0 (they stand), 1 (a family's best moved, or PEER's tables setting won), 2 (incomplete)."""

import os
import sys

import pytest

from tests.experiments.test_report import rec, valid
from torchpeer.experiments import append_result

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "scripts"))
try:
    import lr_check_gate
finally:
    sys.path.remove(os.path.join(REPO, "scripts"))

CHOSEN = {"dense": 4e-3, "peer": 8e-3, "pkm": 4e-3, "moe": 8e-3}  # the gate's own tests: any lrs will do
SPEC = {"dense": 1.6e-2, "peer": 8e-3, "pkm": 8e-3, "moe": 8e-3}  # isoflop-lrw's at d_model 128 (Batch 22)


def brackets(
    best: dict[str, float] | None = None,
    tables: float | None = 3.50,
    drop: str | None = None,
    chosen: dict = CHOSEN,
    margin: float = 0.05,
) -> list:
    """lr-check's -wu15 records: each family at its chosen lr and x 0.5, x 2; the loss is lowest (3.45)
    at ``best[family]`` (default: the chosen lr), ``margin`` higher elsewhere, and PEER's tables run at
    loss ``tables``."""
    best = {**chosen, **(best or {})}
    out = []
    for fam, lr in chosen.items():
        for x in (lr / 2, lr, lr * 2):
            name = f"{fam}-wu15-s2-lr{x:g}"
            if name == drop:
                continue
            loss = 3.45 + (0.0 if x == best[fam] else margin)
            out.append(rec(name, family=f"{fam}-wu15", seed=0, overrides={"train.lr": str(x)}, valid=valid(loss)))
    if tables is not None:
        over = {"train.lr": "0.004", "train.expert_lr": "0.008"}
        out.append(rec("peer-tables8e-3-wu15-s2-lr4e-3", family="peer-tables8e-3-wu15", seed=0, overrides=over,
                       valid=valid(tables)))  # fmt: skip
    # a 5 % run and a seed-1 run of a -wu15 series are not brackets: never read
    out.append(rec("dense-s2-lr2e-3", family="dense", seed=0, overrides={"train.lr": "0.002"}, valid=valid(1.0)))
    out.append(rec("dense-wu15-seed1", family="dense-wu15", seed=1, overrides={"train.lr": "0.002"}, valid=valid(1.0)))
    return out


def test_the_lrs_stand_when_every_best_is_at_the_chosen_lr_and_the_tables_lose():
    status, lines = lr_check_gate.gate(brackets(), CHOSEN)
    assert status == 0 and lines[-1] == "isoflop-lrw's family lrs stand: run it"
    assert "dense: 0.002: 3.5000  0.004: 3.4500  0.008: 3.5000  best 0.004  (stands)" in lines
    assert any(line.startswith("peer, tables 8e-3 beside base 4e-3: 3.5000 against 3.4500  (loses)") for line in lines)


def test_a_moved_best_or_a_winning_tables_setting_says_change_first():
    status, lines = lr_check_gate.gate(brackets(best={"dense": 8e-3}), CHOSEN)
    assert status == 1 and "dense: 0.002: 3.5000  0.004: 3.5000  0.008: 3.4500  best 0.008  MOVED from 0.004" in lines
    status, lines = lr_check_gate.gate(brackets(tables=3.40), CHOSEN)
    assert status == 1 and any("WINS" in line for line in lines)
    assert lines[-1] == "isoflop-lrw's lrs need a change before it runs"


def test_an_incomplete_bracket_is_not_read_as_a_verdict():
    status, lines = lr_check_gate.gate(brackets(drop="pkm-wu15-s2-lr0.008"), CHOSEN)
    assert status == 2 and "pkm: incomplete at 15 % warm-up (no run at lr 0.008)" in lines
    status, lines = lr_check_gate.gate(brackets(best={"moe": 4e-3}, tables=None), CHOSEN)
    assert status == 2 and "peer: no peer-tables8e-3-wu15 run" in lines  # incomplete outranks a moved lr


def test_the_spec_lrs_and_the_command_line(tmp_path, capsys):
    assert lr_check_gate.chosen_lrs() == pytest.approx(SPEC)  # isoflop-lrw's lrs at d_model 128
    runs = tmp_path / "lr-check"
    for r in brackets(chosen=SPEC):
        append_result(str(runs), r)
    assert lr_check_gate.main([str(runs)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "isoflop-lrw's family lrs stand: run it"
    assert lr_check_gate.main([str(tmp_path / "nowhere")]) == 2
    assert "no results in" in capsys.readouterr().err


def test_a_win_below_the_tolerance_moves_nothing():
    """A neighbour (or PEER's tables setting) better by less than 0.02 nats, a third of the seed range,
    leaves the chosen lr standing: one seed cannot tell them apart."""
    status, lines = lr_check_gate.gate(brackets(best={"dense": 8e-3}, margin=0.015, tables=3.44), CHOSEN)
    assert (
        status == 0
        and "dense: 0.002: 3.4650  0.004: 3.4650  0.008: 3.4500  best 0.008  (stands: 0.004 within 0.02 of it)" in lines
    )
    assert any("3.4400 against 3.4500  (loses)" in line for line in lines)  # 0.01 better: below the tolerance
    status, _ = lr_check_gate.gate(brackets(best={"dense": 8e-3}, margin=0.015), CHOSEN, tol=0.01)
    assert status == 1
