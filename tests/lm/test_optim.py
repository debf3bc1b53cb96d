"""AdamW parameter groups (from the FFWs' optim_groups()) and learning-rate schedules."""

import pytest
import torch

from torchpeer.lm.config import ModelConfig, PEERConfig, PKMConfig, TrainConfig
from torchpeer.lm.model import TransformerLM
from torchpeer.lm.optim import LRSchedule, param_groups


def test_param_groups():
    torch.manual_seed(0)
    cfg = ModelConfig(
        d_model=32,
        n_layers=2,
        n_heads=2,
        seq_len=8,
        vocab_size=40,
        ffw="peer",
        placement="all",
        peer=PEERConfig(n_experts=64, heads=2, top_k=4, d_key=16),
        tie_embeddings=False,
    )
    model = TransformerLM(cfg)
    groups = {g["name"]: g for g in param_groups(model, TrainConfig(lr=1e-3, expert_lr=5e-3, weight_decay=0.1))}
    ids = {k: {id(p) for p in g["params"]} for k, g in groups.items()}
    all_ids = [id(p) for p in model.parameters()]
    assert sorted(all_ids) == sorted(i for s in ids.values() for i in s)  # each parameter exactly once
    for blk in model.blocks:
        assert {id(blk.ffw.down), id(blk.ffw.up)} <= ids["experts"]
        assert id(blk.ffw.sub_keys) in ids["no_decay"]  # product keys
        assert id(blk.norm1.weight) in ids["no_decay"] and id(blk.attn.qkv.weight) in ids["decay"]
    assert id(model.tok_emb.weight) in ids["no_decay"]
    assert groups["experts"]["lr"] == 5e-3 and groups["experts"]["weight_decay"] == 0.0
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0

    pkm = TransformerLM(
        ModelConfig(
            d_model=32,
            n_layers=2,
            n_heads=2,
            vocab_size=40,
            ffw="pkm",
            pkm=PKMConfig(n_keys=8, heads=2, top_k=4, d_key=16),
        )
    )
    groups = {g["name"]: {id(p) for p in g["params"]} for g in param_groups(pkm, TrainConfig())}
    assert id(pkm.blocks[1].ffw.values) in groups["experts"]
    assert id(pkm.blocks[1].ffw.query_proj.bias) in groups["no_decay"]


def test_lr_schedules():
    cos = LRSchedule("cosine", total_steps=110, warmup=10, min_ratio=0.1, decay_frac=0.2)
    assert cos(0) == pytest.approx(0.1) and cos(9) == pytest.approx(1.0)
    assert cos(10) == pytest.approx(1.0) and cos(109) == pytest.approx(0.1)
    assert cos(59) == pytest.approx(0.55, abs=0.01)  # halfway down the cosine
    wsd = LRSchedule("wsd", total_steps=110, warmup=10, min_ratio=0.0, decay_frac=0.2)
    assert wsd(50) == 1.0 and wsd(87) == 1.0 and wsd(109) == pytest.approx(0.0)
    assert 0.0 < wsd(100) < 1.0
    assert LRSchedule("constant", 100, 10, 0.1, 0.2)(99) == 1.0


def test_table_decay_shrinks_every_row_of_a_shared_pool_once_per_step():
    """train.expert_weight_decay with the dense AdamW (issue 18's winner): a row no token selected has a
    zero gradient, so AdamW's update is zero and only the decoupled decay moves it, by exactly
    (1 - expert_lr * wd); the pool that four layers share is one parameter, decayed once per step."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        d_model=16, n_layers=4, n_heads=2, seq_len=8, vocab_size=40, ffw="peer", placement=[1, 3],
        peer=PEERConfig(n_experts=1024, heads=1, top_k=2, d_key=8, shared_pool=True),
    )  # fmt: skip
    model = TransformerLM(cfg).double()
    train = TrainConfig(lr=1e-3, expert_lr=3e-3, expert_weight_decay=1.0, weight_decay=0.1)
    groups = param_groups(model, train)
    experts = next(g for g in groups if g["name"] == "experts")
    pool = [p for p in model.ffw_shared.parameters()]
    assert len(pool) == 2 and {id(p) for p in experts["params"]} == {id(p) for p in pool}  # each table once
    opt = torch.optim.AdamW(groups, foreach=False)
    seq = torch.randint(0, 40, (2, 9))
    _, loss = model(seq[:, :-1], seq[:, 1:])
    loss.backward()
    before = [p.detach().clone() for p in pool]
    opt.step()
    shrink = 1 - 3e-3 * 1.0
    for p, old in zip(pool, before):
        idle = (p.grad == 0).all(dim=1)  # rows no token of the batch selected (most of the 1024)
        assert 0 < idle.sum() < len(idle)
        torch.testing.assert_close(p.detach()[idle], old[idle] * shrink, rtol=1e-12, atol=0)
        assert not torch.allclose(p.detach()[~idle], old[~idle] * shrink)  # touched rows also take Adam's step
