"""One expert pool shared by several PEER layers (PEERConfig.shared_pool) and PEER in several blocks:
sharing is real (one set of tables, a router per layer), gradients reach the pool from every layer
(= the sum of an unshared twin's), the pool is counted, saved and loaded once, optimised once."""

import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_model

from torchpeer.diagnostics import enable_usage_tracking, usage_report
from torchpeer.layers import ExpertPool, PEERConfig
from torchpeer.layers.accounting import count_params
from torchpeer.layers.expert_pool import pool_usage
from torchpeer.layers.peer import PEER
from torchpeer.lm.config import ModelConfig, TrainConfig
from torchpeer.lm.info import config_cost, model_cost
from torchpeer.lm.model import TransformerLM
from torchpeer.lm.optim import param_groups

N, D = 64, 32


def lm_cfg(shared=True, placement=(0, 2), n_layers=3, **peer) -> ModelConfig:
    opts = dict(n_experts=N, heads=2, top_k=4, d_key=16, query_norm="layer", shared_pool=shared, **peer)
    return ModelConfig(
        d_model=D, n_layers=n_layers, n_heads=2, seq_len=16, vocab_size=50,
        placement=list(placement) if not isinstance(placement, str) else placement, peer=PEERConfig(**opts),
    )  # fmt: skip


def unshared_twin(model: TransformerLM, cfg: ModelConfig) -> TransformerLM:
    """The same weights with the pool copied into every PEER layer (shared_pool False)."""
    twin_cfg = lm_cfg(False, cfg.placement, cfg.n_layers)
    twin_cfg.peer = PEERConfig(**{**cfg.peer.__dict__, "shared_pool": False})
    twin = TransformerLM(twin_cfg).to(next(model.parameters()).dtype)
    sd = model.state_dict()
    for name in ("down", "up", "lin"):
        table = sd.pop(f"ffw_shared.{name}", None)
        if table is not None:
            for i in cfg.sparse_blocks():
                sd[f"blocks.{i}.ffw.{name}"] = table.clone()
    twin.load_state_dict(sd)
    return twin


def test_layers_read_one_pool_through_their_own_routers():
    torch.manual_seed(0)
    model = TransformerLM(lm_cfg())
    pool = model.ffw_shared
    assert isinstance(pool, ExpertPool) and pool.down.shape == (N, D)
    a, b = model.blocks[0].ffw, model.blocks[2].ffw
    assert a.down is b.down is pool.down and a.up is b.up is pool.up and a.pool is pool
    assert a.router is not b.router and a.sub_keys is not b.sub_keys
    assert not any(p is pool.down for p in a.parameters())  # borrowed, not owned
    assert type(model.blocks[1].ffw).__name__ == "DenseFFW"
    assert "ffw_shared" not in dict(TransformerLM(lm_cfg(False)).named_children())  # default: as before


@pytest.mark.parametrize("readout", ["paper", "glu"])
def test_pool_gradient_is_the_sum_of_every_layers(readout):
    torch.manual_seed(1)
    cfg = lm_cfg(readout=readout)
    model = TransformerLM(cfg).double()
    twin = unshared_twin(model, cfg)
    ids = torch.randint(0, 50, (2, 16))
    logits, loss = model(ids, ids)
    logits_twin, loss_twin = twin(ids, ids)
    torch.testing.assert_close(logits, logits_twin, rtol=1e-12, atol=1e-12)
    loss.backward()
    loss_twin.backward()
    for name in ["down", "up"] + (["lin"] if readout == "glu" else []):
        per_layer = [getattr(twin.blocks[i].ffw, name).grad for i in (0, 2)]
        assert all(g.abs().sum() > 0 for g in per_layer), name  # both layers reach the pool
        torch.testing.assert_close(getattr(model.ffw_shared, name).grad, per_layer[0] + per_layer[1], msg=name)
    for i in (0, 2):  # each router learns from its own layer
        torch.testing.assert_close(model.blocks[i].ffw.sub_keys.grad, twin.blocks[i].ffw.sub_keys.grad)


def test_pool_parameters_counted_once():
    cfg = lm_cfg()
    model, twin = TransformerLM(cfg), TransformerLM(lm_cfg(False))
    pool = 2 * N * D
    assert count_params(model) == count_params(twin) - pool  # two layers, one pool
    cost, cost_twin = config_cost(cfg), model_cost(twin)
    assert cost.total_params == count_params(model) == sum(p.total_params for p in cost.parts)
    (shared,) = [p for p in cost.parts if p.name == "ffw_shared"]
    assert (shared.total_params, shared.active_params, shared.forward_flops) == (pool, 0, 0)
    # per-token work is the same: every layer reads its own rows
    assert (cost.active_params, cost.train_flops) == (cost_twin.active_params, cost_twin.train_flops)


def test_pool_saved_once_and_loaded_back_shared(tmp_path):
    torch.manual_seed(2)
    cfg = lm_cfg()
    model, twin = TransformerLM(cfg), TransformerLM(lm_cfg(False))
    save_model(model, str(tmp_path / "model.safetensors"))  # how torchpeer.lm.checkpoint writes and reads weights
    save_model(twin, str(tmp_path / "twin.safetensors"))
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as fh:
        keys = set(fh.keys())
    assert {"ffw_shared.down", "ffw_shared.up"} <= keys and not any(k.endswith("ffw.down") for k in keys)
    pool_bytes = 2 * N * D * 4
    size, twin_size = (os.path.getsize(tmp_path / f) for f in ("model.safetensors", "twin.safetensors"))
    assert twin_size - size == pytest.approx(pool_bytes, rel=0.05)  # one pool fewer than the unshared twin
    fresh = TransformerLM(cfg)
    load_model(fresh, str(tmp_path / "model.safetensors"), strict=True)
    ids = torch.randint(0, 50, (1, 16))
    model.eval(), fresh.eval()
    torch.testing.assert_close(fresh(ids)[0], model(ids)[0])
    assert fresh.blocks[0].ffw.down is fresh.blocks[2].ffw.down is fresh.ffw_shared.down


def test_pool_is_one_expert_group_entry():
    model = TransformerLM(lm_cfg(placement="all"))
    groups = {g["name"]: g["params"] for g in param_groups(model, TrainConfig(max_steps=1, expert_lr=3e-3))}
    experts = groups["experts"]
    assert len(experts) == 2 and experts[0] is model.ffw_shared.down and experts[1] is model.ffw_shared.up
    listed = [id(p) for ps in groups.values() for p in ps]
    assert len(listed) == len(set(listed)) == len(list(model.parameters()))


@pytest.mark.parametrize(
    "placement,n_layers,expected", [("all", 3, [0, 1, 2]), ([1, 3], 4, [1, 3]), ("middle", 4, [2])]
)
def test_placements_with_a_shared_pool(placement, n_layers, expected):
    torch.manual_seed(3)
    model = TransformerLM(lm_cfg(placement=placement, n_layers=n_layers, readout="gated", balance_weight=0.01))
    peers = [i for i, b in enumerate(model.blocks) if isinstance(b.ffw, PEER)]
    assert peers == expected and all(model.blocks[i].ffw.pool is model.ffw_shared for i in peers)
    ids = torch.randint(0, 50, (2, 16))
    _, loss = model(ids, ids)
    (loss + model.aux_loss()).backward()
    assert model.ffw_shared.down.grad.abs().sum() > 0
    assert all(model.blocks[i].ffw.out_gate.proj.weight.grad.abs().sum() > 0 for i in peers)


def test_no_pool_without_peer_blocks():
    cfg = lm_cfg()
    cfg.ffw = "dense"
    assert not hasattr(TransformerLM(cfg), "ffw_shared")


def test_pool_mismatch_and_unsupported_combinations():
    pool = ExpertPool(N, D)
    with pytest.raises(ValueError, match="pool must be an ExpertPool of n_experts=81"):
        PEER(D, n_experts=81, heads=1, top_k=2, d_key=4, shared_pool=True, pool=pool)
    with pytest.raises(ValueError, match="glu=True"):
        PEER(D, n_experts=N, heads=1, top_k=2, d_key=4, readout="glu", shared_pool=True, pool=pool)
    layer = PEER(D, n_experts=N, heads=1, top_k=2, d_key=4, shared_pool=True, pool=pool)
    with pytest.raises(ValueError, match="rowwise_adam"):
        layer.table_update = lambda *a: None  # two layers' row-wise states for one table would both step it
    with pytest.raises(ValueError, match="supports the paper's layer only"):
        layer.column_shard = object()  # torchpeer.parallel's sharded forward ignores the pool
    assert not hasattr(layer, "column_shard")
    plain = PEER(D, n_experts=N, heads=1, top_k=2, d_key=4)
    plain.column_shard = ctx = object()
    assert plain.column_shard is ctx


def test_pool_usage_is_the_union_of_its_layers():
    torch.manual_seed(4)
    model = TransformerLM(lm_cfg()).eval()
    assert pool_usage(model) is None  # nothing tracked yet
    enable_usage_tracking(model, True)
    seen = {i: [] for i in (0, 2)}
    for i in seen:  # the indices each layer's router retrieves
        model.blocks[i].ffw.router.register_forward_hook(lambda mod, inp, out, i=i: seen[i].append(out[2]))
    with torch.no_grad():
        model(torch.randint(0, 50, (1, 6)))
    used = [set(torch.cat(v).flatten().tolist()) for v in seen.values()]
    assert 0 < len(used[0] - used[1]) and 0 < len(used[1] - used[0])  # each layer adds experts of its own
    union = pool_usage(model)
    assert union["usage_pct"] == pytest.approx(100 * len(used[0] | used[1]) / N)
    per_layer = usage_report(model)
    assert union["usage_pct"] > max(v["usage_pct"] for v in per_layer.values())
    assert pool_usage(TransformerLM(lm_cfg(False))) is None
