"""Separate learning rates for PEER's sub-keys and query network (key_lr_scale, query_lr_scale): the
parameters land in their own optimizer groups at the scaled lr, the schedule keeps the ratio, a first
Adam step moves them by the scaled lr; defaults leave the groups exactly as before."""

import pytest
import torch
from torch import nn

from torchpeer.layers import PEERConfig
from torchpeer.layers.peer import PEER
from torchpeer.lm.config import ModelConfig, TrainConfig
from torchpeer.lm.model import TransformerLM
from torchpeer.lm.optim import build_optimizer, param_groups, set_lr


def lm(**peer) -> TransformerLM:
    torch.manual_seed(0)
    p = PEERConfig(n_experts=64, heads=2, top_k=4, d_key=16, query_norm="layer", **peer)
    cfg = ModelConfig(d_model=32, n_layers=3, n_heads=2, seq_len=16, vocab_size=50, placement=[0, 2], peer=p)
    return TransformerLM(cfg)


def by_param(groups) -> dict[int, dict]:
    return {id(p): g for g in groups for p in g["params"]}


def test_defaults_keep_the_three_groups():
    groups = param_groups(lm(), TrainConfig(max_steps=1))
    assert [g["name"] for g in groups] == ["decay", "no_decay", "experts"]


def test_scaled_parameters_land_in_their_own_groups():
    model = lm(key_lr_scale=3.0, query_lr_scale=0.5)
    train = TrainConfig(max_steps=1, lr=2e-3, expert_lr=5e-3, weight_decay=0.1)
    groups = param_groups(model, train)
    names = [g["name"] for g in groups]
    assert names[:3] == ["decay", "no_decay", "experts"]  # the unscaled groups first, then by first use
    assert sorted(names[3:]) == ["decay*0.5", "no_decay*0.5", "no_decay*3"]
    where = by_param(groups)
    for i in (0, 2):
        layer = model.blocks[i].ffw
        g = where[id(layer.sub_keys)]
        assert (g["name"], g["lr"], g["base_lr"], g["weight_decay"]) == ("no_decay*3", 6e-3, 6e-3, 0.0)
        g = where[id(layer.query_proj.weight)]
        assert (g["name"], g["lr"], g["weight_decay"]) == ("decay*0.5", 1e-3, 0.1)
        for p in layer.norm.parameters():  # the query network includes its norm's affine parameters
            assert (where[id(p)]["name"], where[id(p)]["lr"]) == ("no_decay*0.5", 1e-3)
        assert where[id(layer.down)]["name"] == "experts" and where[id(layer.down)]["lr"] == 5e-3
    listed = [id(p) for g in groups for p in g["params"]]
    assert len(listed) == len(set(listed)) == len(list(model.parameters()))
    opt = build_optimizer(model, train)
    set_lr(opt, 0.25)  # a schedule step: every group scaled alike, the ratios kept
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["no_decay*3"] == pytest.approx(3 * lrs["no_decay"]) == pytest.approx(3 * 2e-3 * 0.25)
    assert lrs["decay*0.5"] == pytest.approx(0.5 * lrs["decay"]) == pytest.approx(0.5 * 2e-3 * 0.25)


def test_first_adam_step_moves_sub_keys_by_the_scaled_lr():
    # Adam's first step moves every entry with a non-zero gradient by lr (m_hat / sqrt(v_hat) = sign(g)).
    steps = {}
    for scale in (1.0, 4.0):
        model = lm(key_lr_scale=scale)
        opt = build_optimizer(model, TrainConfig(max_steps=1, lr=1e-3, eps=1e-12))
        keys = model.blocks[0].ffw.sub_keys
        before = keys.detach().clone()
        ids = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(0))
        model(ids, ids)[1].backward()
        moved = keys.grad != 0
        opt.step()
        steps[scale] = (keys.detach() - before)[moved].abs()
    torch.testing.assert_close(steps[1.0], torch.full_like(steps[1.0], 1e-3), rtol=1e-3, atol=0)
    torch.testing.assert_close(steps[4.0], torch.full_like(steps[4.0], 4e-3), rtol=1e-3, atol=0)


def test_bad_scales_and_conflicts():
    for name in ("key_lr_scale", "query_lr_scale"):
        for bad in (0.0, -1.0, float("inf")):
            with pytest.raises(ValueError, match=f"{name} must be a finite number > 0"):
                PEER(8, n_experts=16, heads=1, top_k=2, d_key=4, **{name: bad})

    class Twice(nn.Module):  # two modules giving one parameter different multipliers
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(2, 2))
            self.inner = nn.Module()
            self.inner.lr_scales = lambda: [(2.0, [self.w])]

        def lr_scales(self):
            return [(3.0, [self.w])]

    with pytest.raises(ValueError, match="two lr multipliers"):
        param_groups(Twice(), TrainConfig(max_steps=1))
