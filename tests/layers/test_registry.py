"""FFW registry: kinds, configs beside their layers, build(), the errors; LM consumers (aux loss, optim groups)."""

import dataclasses

import pytest
import torch
from torch import nn

from torchpeer.layers import (
    PEER,
    PKM,
    DenseConfig,
    DenseFFW,
    MoE,
    MoEConfig,
    PEERConfig,
    PKMConfig,
    build,
    ffw_kinds,
    get_ffw,
    register_ffw,
)
from torchpeer.layers import registry as registry_mod
from torchpeer.lm.config import ModelConfig, TrainConfig
from torchpeer.lm.model import TransformerLM
from torchpeer.lm.optim import param_groups


def test_builtin_kinds_in_order_with_their_configs():
    assert ffw_kinds()[:4] == ["dense", "peer", "pkm", "moe"]
    for name, cfg_cls, cls in [
        ("dense", DenseConfig, DenseFFW),
        ("peer", PEERConfig, PEER),
        ("pkm", PKMConfig, PKM),
        ("moe", MoEConfig, MoE),
    ]:
        kind = get_ffw(name)
        assert kind.name == name and kind.config_cls is cfg_cls
        assert dataclasses.is_dataclass(cfg_cls)
        assert isinstance(kind.build(16, cfg_cls(**_small(name))), cls)


def _small(name):
    return {
        "dense": {},
        "peer": {"n_experts": 16, "heads": 2, "top_k": 2, "d_key": 4},
        "pkm": {"n_keys": 4, "heads": 2, "top_k": 2, "d_key": 4},
        "moe": {"n_experts": 2},
    }[name]


def test_config_fields_and_defaults_unchanged():
    # The [model.<kind>] sections of old TOML files and checkpoints' config.json must keep loading.
    defaults = {k: {f.name: f.default for f in dataclasses.fields(get_ffw(k).config_cls)} for k in ffw_kinds()[:4]}
    assert defaults["dense"] == {"d_hidden": None, "activation": None, "swiglu": False}
    assert defaults["peer"] == {
        "n_experts": 1024**2, "heads": 8, "top_k": 16, "d_key": 128, "activation": "gelu",
        "gate": "softmax", "query_norm": "ema", "shared_keys": True, "backend": "auto",
        "up_init_std": None,  # new; "ema" was "batch" (old sections name their query_norm, or get "ema")
        # new (issue 18), each default the paper's layer as before
        "readout": "paper", "shared_pool": False, "balance_weight": 0.0, "balance_stride": 1,
        "key_lr_scale": 1.0, "query_lr_scale": 1.0, "key_init": "random", "key_norm": "none", "dense_hidden": 0,
        "query_norm_momentum": None,  # new (issue 18, P26-i): None keeps each norm's own rate, as before
    }  # fmt: skip
    assert defaults["pkm"] == {
        "n_keys": 1024, "heads": 8, "top_k": 32, "d_key": None, "query_norm": "batch", "value_dim": None,
        "backend": "auto",  # new (PKM on the shared router); old sections without it load
    }  # fmt: skip
    assert defaults["moe"] == {
        "n_experts": 128, "d_expert": None, "routing": "expert_choice", "capacity_factor": 1.0,
        "top_k": 1, "activation": "gelu", "aux_loss_weight": 0.01,
    }  # fmt: skip


def test_build_dispatches_on_the_config_type_and_passes_every_field():
    torch.manual_seed(0)
    m = build(16, PEERConfig(n_experts=16, heads=2, top_k=3, d_key=4, gate="sigmoid", query_norm="layer"))
    assert isinstance(m, PEER) and (m.top_k, m.gate, m.query_norm, m.d_model) == (3, "sigmoid", "layer", 16)
    pkm = build(16, PKMConfig(n_keys=4, heads=2, top_k=2))  # d_key None -> the module default 256
    assert pkm.d_key == 256 and pkm.value_dim == 16
    moe = build(8, MoEConfig(n_experts=2, routing="token_choice", aux_loss_weight=0.5))
    assert moe.aux_loss_weight == 0.5 and moe.routing == "token_choice"
    x = torch.randn(5, 16)
    assert m(x).shape == x.shape


def test_unknown_kind_lists_the_registered_ones():
    with pytest.raises(ValueError, match="unknown FFW kind 'mlp'; registered kinds: dense, peer, pkm, moe"):
        get_ffw("mlp")

    @dataclasses.dataclass
    class NotRegistered:
        width: int = 3

    with pytest.raises(TypeError, match="not the config of a registered FFW kind; registered: dense"):
        build(8, NotRegistered())


def test_register_a_new_kind_and_the_registration_errors(monkeypatch):
    monkeypatch.setattr(registry_mod, "_KINDS", dict(registry_mod._KINDS))  # undone after the test

    @dataclasses.dataclass
    class ScaleConfig:
        factor: float = 2.0

    class Scale(nn.Module):
        def __init__(self, d_model, factor):
            super().__init__()
            self.w = nn.Parameter(torch.full((d_model,), factor))

        def forward(self, x):
            return x * self.w

    register_ffw("scale", ScaleConfig, lambda d, cfg: Scale(d, cfg.factor))
    assert ffw_kinds()[-1] == "scale"
    y = build(4, ScaleConfig(factor=3.0))(torch.ones(2, 4))
    torch.testing.assert_close(y, torch.full((2, 4), 3.0))
    with pytest.raises(ValueError, match="already registered"):
        register_ffw("scale", ScaleConfig, lambda d, cfg: Scale(d, cfg.factor))
    with pytest.raises(ValueError, match="identifier"):
        register_ffw("my-kind", ScaleConfig, lambda d, cfg: None)
    with pytest.raises(TypeError, match="dataclass"):
        register_ffw("other", dict, lambda d, cfg: None)

    @dataclasses.dataclass
    class NoDefault:
        width: int

    with pytest.raises(TypeError, match="needs a default"):
        register_ffw("nodefault", NoDefault, lambda d, cfg: None)


def _lm(ffw, **sections):
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=2, seq_len=16, vocab_size=50, ffw=ffw, placement="all")
    for k, v in sections.items():
        setattr(cfg, k, v)
    return TransformerLM(cfg)


def test_lm_aux_loss_is_the_sum_of_the_weighted_ffw_terms():
    torch.manual_seed(5)
    model = _lm("moe", moe=MoEConfig(n_experts=4, d_expert=32, routing="token_choice", aux_loss_weight=0.1))
    x = torch.randint(0, 50, (2, 16))
    model(x, x)
    aux = model.aux_loss()
    balance = [blk.ffw.balance_loss for blk in model.blocks]
    assert all(b.item() >= 1.0 - 1e-6 for b in balance)  # the Switch loss is >= 1
    torch.testing.assert_close(aux, 0.1 * (balance[0] + balance[1]))
    assert aux.requires_grad
    assert _lm("dense").aux_loss() is None
    peer = _lm("peer", peer=PEERConfig(n_experts=16, heads=2, top_k=2, d_key=4))
    peer(x)
    assert peer.aux_loss() is None


@pytest.mark.parametrize("ffw", ["peer", "pkm", "moe", "dense"])
def test_optim_groups_drive_the_lm_param_groups(ffw):
    sections = {
        "peer": PEERConfig(n_experts=16, heads=2, top_k=2, d_key=4),
        "pkm": PKMConfig(n_keys=4, heads=2, top_k=2, d_key=4),
        "moe": MoEConfig(n_experts=2, d_expert=8),
    }
    model = _lm(ffw, **{k: v for k, v in sections.items() if k == ffw})
    groups = {g["name"]: {id(p) for p in g["params"]} for g in param_groups(model, TrainConfig(max_steps=1))}
    everything = [id(p) for p in model.parameters()]
    assert sorted(everything) == sorted(i for s in groups.values() for i in s)  # each exactly once
    for blk in model.blocks:
        listed = blk.ffw.optim_groups()
        assert set(listed) == {"expert", "no_decay"}
        assert {id(p) for p in listed["expert"]} <= groups.get("experts", set())
        assert {id(p) for p in listed["no_decay"]} <= groups["no_decay"]
    experts = {"peer": lambda f: [f.down, f.up], "pkm": lambda f: [f.values]}.get(ffw, lambda f: [])
    assert {id(p) for blk in model.blocks for p in experts(blk.ffw)} == groups.get("experts", set())
    if ffw == "moe":  # expert banks are dense 3-D weights: decayed like any matrix
        assert id(model.blocks[0].ffw.w_in) in groups["decay"]


def test_the_add_an_ffw_kind_example_in_the_docs_runs(monkeypatch):
    import os
    import re

    doc = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "architecture.md")
    text = open(doc, encoding="utf-8").read()
    (code,) = re.findall(r"```python\n(# torchpeer/layers/glu.py\n.*?)```", text, flags=re.S)
    monkeypatch.setattr(registry_mod, "_KINDS", dict(registry_mod._KINDS))
    namespace = {}
    exec(compile(code, "docs/architecture.md", "exec"), namespace)
    assert ffw_kinds()[-1] == "glu"
    torch.manual_seed(0)
    m = build(8, namespace["GLUConfig"](d_hidden=12))
    x = torch.randn(3, 5, 8)
    assert m(x).shape == x.shape
    assert m.cost().forward_flops == 3 * 2 * 8 * 12 and m.cost().total_params == 3 * 8 * 12
