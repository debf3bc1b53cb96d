"""Tests for the baseline FFW modules: DenseFFW, MoE (expert / token choice) and PKM.

Every module is checked against a float64 reference written here from the definitions (loops over
experts / tokens, brute-force top-k over all keys, materialised value gathers), plus gradients,
capacity rules, accounting against hand arithmetic, usage tracking and constructor errors.
"""

from __future__ import annotations

import math

import pytest
import torch

from torchpeer.layers.dense import DenseFFW
from torchpeer.layers.moe import MoE
from torchpeer.layers.pkm import PKM
from torchpeer.usage import enable_usage_tracking, usage_report


def gelu64(h):
    return 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))


def silu64(h):
    return h * torch.sigmoid(h)


def relu64(h):
    return h.clamp_min(0)


ACT64 = {"gelu": gelu64, "silu": silu64, "relu": relu64}


def assert_grads(module, loss):
    loss.backward()
    for name, p in module.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


# --------------------------------------------------------------------------- DenseFFW


def dense_reference(m: DenseFFW, x):
    """float64 from the definition y = W2 act(W1 x) (gated: W2 (act(Wg x) * Wu x))."""
    x = x.double()
    lin = lambda layer, h: h @ layer.weight.double().t() + (0 if layer.bias is None else layer.bias.double())  # noqa: E731
    h = ACT64[m.activation](lin(m.fc_in, x))
    if m.swiglu:
        h = h * lin(m.fc_up, x)
    return lin(m.fc_out, h)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"activation": "relu", "bias": True},
        {"swiglu": True, "d_hidden": 24},
        {"swiglu": True, "activation": "gelu"},
    ],
)
def test_dense_matches_reference_and_grads(kw):
    torch.manual_seed(0)
    m = DenseFFW(16, **kw)
    x = torch.randn(2, 5, 16)
    y = m(x)
    assert y.shape == (2, 5, 16)
    ref = dense_reference(m, x)
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m.double()(x.double()), ref, atol=1e-12, rtol=1e-12)
    assert_grads(m, (m(x.double()) ** 2).sum())


def test_dense_defaults():
    assert DenseFFW(16).d_hidden == 64 and DenseFFW(16).activation == "gelu"
    g = DenseFFW(16, swiglu=True)
    assert g.activation == "silu" and g.fc_up is not None


def test_dense_cost_by_hand():
    # plain, d=16, hidden=64: W1 16*64 + W2 64*16 = 2048 params; 2 matmuls of 2*16*64 = 4096 FLOPs.
    assert tuple(vars(DenseFFW(16, 64).cost()).values()) == (2048, 2048, 4096)
    # with biases: + 64 + 16 = 2128 params; FLOPs unchanged (bias adds are elementwise).
    assert DenseFFW(16, 64, bias=True).cost().total_params == 2128
    assert DenseFFW(16, 64, bias=True).cost().forward_flops == 4096
    # SwiGLU d=16, hidden=48: 3 * 16 * 48 = 2304 params, 3 * 2 * 16 * 48 = 4608 FLOPs; train = 3x.
    c = DenseFFW(16, 48, swiglu=True).cost()
    assert (c.total_params, c.active_params, c.forward_flops, c.train_flops) == (2304, 2304, 4608, 13824)


def test_dense_errors():
    with pytest.raises(ValueError, match="d_model must be a positive integer"):
        DenseFFW(0)
    with pytest.raises(ValueError, match="d_hidden must be a positive integer"):
        DenseFFW(8, d_hidden=-4)
    with pytest.raises(ValueError, match="unknown activation 'tanh'; use one of"):
        DenseFFW(8, activation="tanh")
    with pytest.raises(ValueError, match=r"expected input last dimension d_model=8, got 7"):
        DenseFFW(8)(torch.randn(2, 3, 7))


# --------------------------------------------------------------------------- MoE


def expert64(m: MoE, e: int, xt):
    """float64 output of expert e for one token vector xt: (d,)."""
    h = ACT64[m.activation](xt @ m.w_in[e].double())
    return h @ m.w_out[e].double()


def moe_reference(m: MoE, x):
    """float64 MoE by loops over experts and tokens, straight from the routing rules."""
    x = x.double().reshape(-1, m.d_model)
    T, E = x.shape[0], m.n_experts
    probs = torch.softmax(x @ m.router.weight.double().t(), dim=-1)
    C = min(T, max(1, math.ceil(m.capacity_factor * m.top_k * T / E)))
    y = torch.zeros_like(x)
    if m.routing == "expert_choice":
        for e in range(E):
            chosen = sorted(range(T), key=lambda t: -probs[t, e].item())[:C]
            for t in chosen:
                y[t] += probs[t, e] * expert64(m, e, x[t])
        return y
    choices = []  # (rank, token, expert, gate)
    for t in range(T):
        experts = sorted(range(E), key=lambda e: -probs[t, e].item())[: m.top_k]
        total = sum(probs[t, e] for e in experts) if m.top_k > 1 else 1.0
        choices += [(r, t, e, probs[t, e] / total) for r, e in enumerate(experts)]
    load = [0] * E
    for _, t, e, g in sorted(choices, key=lambda c: (c[0], c[1])):
        if load[e] < C:
            load[e] += 1
            y[t] += g * expert64(m, e, x[t])
    return y


MOE_CONFIGS = [
    dict(routing="expert_choice"),
    dict(routing="expert_choice", capacity_factor=2.0),
    dict(routing="expert_choice", capacity_factor=0.6, activation="relu"),
    dict(routing="token_choice", top_k=1),
    dict(routing="token_choice", top_k=2, capacity_factor=1.0),
    dict(routing="token_choice", top_k=2, capacity_factor=0.5),
]


@pytest.mark.parametrize("kw", MOE_CONFIGS)
def test_moe_matches_reference(kw):
    torch.manual_seed(1)
    m = MoE(8, n_experts=4, d_expert=16, **kw)
    x = torch.randn(3, 10, 8)
    y = m(x)
    assert y.shape == (3, 10, 8)
    ref = moe_reference(m, x).view(3, 10, 8)
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(m.double()(x.double()), ref, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize(
    "kw", [dict(routing="expert_choice"), dict(routing="token_choice", top_k=2, capacity_factor=2.0)]
)
def test_moe_grads(kw):
    torch.manual_seed(2)
    m = MoE(8, n_experts=4, d_expert=16, **kw).double()
    x = torch.randn(64, 8, dtype=torch.float64, requires_grad=True)
    assert_grads(m, (m(x) ** 2).sum())
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_moe_token_choice_top1_router_gets_task_gradient():
    # top_k=1 uses the raw probability as gate (Switch), so the router learns from the task loss.
    torch.manual_seed(3)
    m = MoE(8, n_experts=4, d_expert=16, routing="token_choice", top_k=1, capacity_factor=4.0)
    m(torch.randn(32, 8)).pow(2).sum().backward()
    assert m.router.weight.grad.abs().sum() > 0


def test_expert_choice_capacity():
    torch.manual_seed(4)
    m = MoE(8, n_experts=4, d_expert=16, routing="expert_choice")
    # C = ceil(cf * top_k * T / E), clamped to [1, T]; T = 24, E = 4.
    assert m.capacity(24) == 6  # 1.0 * 24 / 4
    for cf, c in [(0.5, 3), (1.3, 8), (100.0, 24), (0.01, 1)]:  # 3; ceil(7.8) = 8; min(T, 600); max(1, .06)
        assert MoE(8, n_experts=4, d_expert=16, capacity_factor=cf).capacity(24) == c
    assert MoE(8, n_experts=4, d_expert=16, top_k=2).capacity(24) == 12

    m.enable_usage_tracking()
    x = torch.randn(24, 8)
    y = m(x)
    probs = torch.softmax(m.router(x), dim=-1)
    tokens, gates, experts = m._expert_choice(probs, m.capacity(24))
    picked = tokens.view(4, 6)
    for e in range(4):  # each expert takes exactly C distinct tokens, the C most probable for it
        assert len(set(picked[e].tolist())) == 6
        assert set(picked[e].tolist()) == set(probs[:, e].topk(6).indices.tolist())
    times = torch.bincount(tokens, minlength=24)
    assert times.sum() == 24 and (times == 0).any() and (times >= 2).any()
    # A token no expert picked gets exactly zero output; the others do not.
    assert (y[times == 0] == 0).all() and (y[times > 0].abs().sum(-1) > 0).all()
    # Usage: every expert processed C tokens; accumulated scores are the gates of its tokens.
    s = m.usage_tracker.scores
    torch.testing.assert_close(s, probs.detach().double().t().topk(6).values.sum(-1))
    summary = m.usage_tracker.summary()
    assert summary["usage_pct"] == 100.0 and 0 <= summary["kl"] < math.log(4)
    # Changing capacity_factor changes the number of tokens each expert processes.
    m.capacity_factor = 0.5
    assert torch.bincount(m._expert_choice(probs, m.capacity(24))[2]).tolist() == [3, 3, 3, 3]
    assert isinstance(m.balance_loss, torch.Tensor) and m.balance_loss.item() == 0.0


def test_token_choice_overflow_dropping():
    torch.manual_seed(5)
    T, E = 12, 4
    m = MoE(8, n_experts=E, d_expert=16, routing="token_choice", top_k=1)
    with torch.no_grad():  # every (positive) token strongly prefers expert 0
        m.router.weight.zero_()
        m.router.weight[0] = 5.0
    x = torch.rand(T, 8) + 0.5
    y = m(x)
    C = m.capacity(T)
    assert C == 3  # ceil(1.0 * 1 * 12 / 4)
    p0 = torch.softmax(m.router(x).double(), -1)[:, 0]
    expected = torch.stack([p0[t] * expert64(m, 0, x[t].double()) for t in range(C)])
    torch.testing.assert_close(y[:C].double(), expected, atol=1e-5, rtol=1e-4)
    assert (y[C:] == 0).all()  # the later tokens overflowed expert 0 and were dropped
    # Switch aux loss: all assignments on expert 0 (f = [1, 0, 0, 0]) -> E * P_0 ~ E.
    torch.testing.assert_close(m.balance_loss, E * torch.softmax(m.router(x), -1)[:, 0].mean())
    assert m.balance_loss.item() > 3.9
    # With enough capacity nothing is dropped.
    m.capacity_factor = E
    assert (m(x).abs().sum(-1) > 0).all()


def test_token_choice_aux_loss_formula_and_gradient():
    torch.manual_seed(6)
    m = MoE(8, n_experts=4, d_expert=16, routing="token_choice", top_k=2)
    x = torch.randn(40, 8)
    m(x)
    probs = torch.softmax(m.router(x), -1)
    frac = torch.bincount(probs.topk(2, -1).indices.reshape(-1), minlength=4).float() / 80
    torch.testing.assert_close(m.balance_loss, 4 * (frac * probs.mean(0)).sum())
    assert 0.9 < m.balance_loss.item() < 2.0  # ~1 for near-uniform routing
    m.router.weight.grad = None
    m.balance_loss.backward()
    assert m.router.weight.grad.abs().sum() > 0
    # aux_loss() is the weighted term the trainer adds (Switch weight 0.01 by default; 0 = off).
    torch.testing.assert_close(m.aux_loss(), 0.01 * m.balance_loss)
    m.aux_loss_weight = 0.5
    torch.testing.assert_close(m.aux_loss(), 0.5 * m.balance_loss)
    assert MoE(8, n_experts=4, aux_loss_weight=0.0, routing="token_choice")(x).shape == x.shape
    assert MoE(8, n_experts=4).aux_loss() is None  # no forward yet


def test_token_choice_usage_counts_only_kept_assignments():
    torch.manual_seed(7)
    m = MoE(8, n_experts=4, d_expert=16, routing="token_choice", top_k=1)
    with torch.no_grad():
        m.router.weight.zero_()
        m.router.weight[0] = 5.0
    assert enable_usage_tracking(m) == 1
    x = torch.rand(12, 8) + 0.5
    m(x)
    p0 = torch.softmax(m.router(x).double(), -1)[:3, 0].sum()
    torch.testing.assert_close(m.usage_tracker.scores, torch.tensor([p0.item(), 0, 0, 0], dtype=torch.float64))
    rep = usage_report(m)["."]
    assert rep["usage_pct"] == 25.0
    assert rep["kl"] == pytest.approx(math.log(4))  # all mass on one expert


def test_moe_cost_by_hand():
    # d=8, E=4, d_expert=32: router 8*4 = 32 params; each expert 2*8*32 = 512; total 32 + 4*512 = 2080.
    # FLOPs: router 2*8*4 = 64; one expert 2*8*32 + 2*32*8 = 1024.
    ec = MoE(8, n_experts=4, d_expert=32).cost()
    assert (ec.total_params, ec.active_params, ec.forward_flops) == (2080, 32 + 512, 64 + 1024)
    ec2 = MoE(8, n_experts=4, d_expert=32, capacity_factor=2.0).cost()  # 2 experts per token on average
    assert (ec2.active_params, ec2.forward_flops) == (32 + 1024, 64 + 2048)
    tc = MoE(8, n_experts=4, d_expert=32, routing="token_choice", top_k=2, capacity_factor=1.25).cost()
    assert (tc.total_params, tc.active_params, tc.forward_flops) == (2080, 32 + 1024, 64 + 2048)
    assert MoE(8, n_experts=4).d_expert == 32  # default 4 * d_model


def test_moe_errors():
    with pytest.raises(ValueError, match="unknown routing 'topk'"):
        MoE(8, routing="topk")
    with pytest.raises(ValueError, match="capacity_factor must be a positive number"):
        MoE(8, capacity_factor=0)
    with pytest.raises(ValueError, match="n_experts must be a positive integer"):
        MoE(8, n_experts=0)
    with pytest.raises(ValueError, match="top_k=5 must be <= n_experts=4"):
        MoE(8, n_experts=4, routing="token_choice", top_k=5)
    with pytest.raises(ValueError, match="unknown activation"):
        MoE(8, n_experts=4, activation="swish")
    with pytest.raises(ValueError, match=r"expected input last dimension d_model=8, got 9"):
        MoE(8, n_experts=4)(torch.randn(3, 9))


# --------------------------------------------------------------------------- PKM


def pkm_reference(m: PKM, x):
    """float64 PKM: explicit query norm, all n_keys**2 full keys scored, top-k, gathered values."""
    x = x.double().reshape(-1, m.d_model)
    H, dk, n = m.heads, m.d_key, m.n_keys
    q = x @ m.query_proj.weight.double().t() + m.query_proj.bias.double()
    if m.query_norm == "batch":  # training-mode BatchNorm: biased batch statistics
        q = (q - q.mean(0)) / torch.sqrt(q.var(0, unbiased=False) + m.norm.eps)
        q = q * m.norm.weight.double() + m.norm.bias.double()
    q = q.view(-1, H, dk)
    if m.query_norm == "layer":
        q = (q - q.mean(-1, keepdim=True)) / torch.sqrt(q.var(-1, unbiased=False, keepdim=True) + m.norm.eps)
        q = q * m.norm.weight.double() + m.norm.bias.double()
    sk = m.sub_keys.double()
    y = torch.zeros(x.shape[0], m.value_dim, dtype=torch.float64)
    for h in range(H):
        full = torch.stack([torch.cat([sk[h, 0, i // n], sk[h, 1, i % n]]) for i in range(n * n)])  # (N, dk)
        scores, idx = (q[:, h] @ full.t()).topk(m.top_k, dim=-1)
        w = torch.softmax(scores, -1)
        y += (w.unsqueeze(-1) * m.values.double()[idx]).sum(1)  # materialises (T, k, value_dim)
    if m.out_proj is not None:
        y = y @ m.out_proj.weight.double().t()
    return y


PKM_CONFIGS = [
    dict(query_norm="batch"),
    dict(query_norm="layer"),
    dict(query_norm="none"),
    dict(query_norm="batch", value_dim=12),
]


@pytest.mark.parametrize("kw", PKM_CONFIGS)
def test_pkm_matches_reference(kw):
    torch.manual_seed(8)
    m = PKM(16, n_keys=8, heads=2, top_k=4, d_key=8, **kw)
    x = torch.randn(2, 7, 16)
    y = m(x)
    assert y.shape == (2, 7, 16)
    ref = pkm_reference(m, x).view(2, 7, 16)
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(m.double()(x.double()), ref, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("kw", PKM_CONFIGS)
def test_pkm_grads(kw):
    torch.manual_seed(9)
    m = PKM(16, n_keys=8, heads=2, top_k=4, d_key=8, **kw)
    x = torch.randn(20, 16, requires_grad=True)
    assert_grads(m, (m(x) ** 2).sum())
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_pkm_query_and_retrieve():
    from torchpeer.ops import product_key_topk_reference as brute_force_topk

    torch.manual_seed(10)
    m = PKM(16, n_keys=8, heads=2, top_k=4, d_key=8)
    x = torch.randn(3, 5, 16)
    q = m.query(x)
    assert q.shape == (3, 5, 2, 8)
    assert m.sub_keys.shape == (2, 2, 8, 4) and m.values.shape == (64, 16)
    scores, idx = m.retrieve(x)
    assert scores.shape == idx.shape == (3, 5, 2, 4) and idx.dtype == torch.int64
    assert scores.dtype == torch.float32 and ((idx >= 0) & (idx < 64)).all()
    assert (scores[..., :-1] >= scores[..., 1:]).all()  # best first
    ref_s, ref_i = brute_force_topk(q.reshape(15, 2, 8).double(), m.sub_keys.double(), 4)
    torch.testing.assert_close(scores.reshape(15, 2, 4).double(), ref_s, atol=1e-5, rtol=1e-5)
    assert torch.equal(idx.reshape(15, 2, 4), ref_i)


def test_pkm_usage_tracking():
    torch.manual_seed(11)
    m = PKM(16, n_keys=8, heads=2, top_k=4, d_key=8)
    enable_usage_tracking(m)
    m(torch.randn(6, 16))
    s = m.usage_tracker.scores
    assert s.shape == (64,)
    assert s.sum().item() == pytest.approx(6 * 2)  # each token's heads each spread weight 1
    summary = m.usage_tracker.summary()
    # 6 tokens * 2 heads * 4 memories = 48 retrievals over 64 slots: some, not all, are used.
    assert 0 < summary["usage_pct"] <= 100 * 48 / 64
    assert summary["usage_pct"] == 100 * (s > 0).sum().item() / 64
    assert 0 < summary["kl"] < math.log(64)


def test_pkm_cost_by_hand():
    # d=16, n_keys=8 (N=64), H=2, k=4, d_key=8, BatchNorm queries:
    #   query net: W 16*(2*8) = 256 + bias 16 + BN weight/bias 2*16 = 304
    #   sub-keys: 2 heads * 2 halves * 8 keys * 4 = 128;  values: 64 * 16 = 1024
    #   total = 304 + 128 + 1024 = 1456; active = 304 + 128 + 2*4 rows * 16 = 560
    #   FLOPs: query 2*16*16 = 512; sub-key scores 2*2*2*8*4 = 256; value sum 2*2*4*16 = 256 -> 1024
    c = PKM(16, n_keys=8, heads=2, top_k=4, d_key=8).cost()
    assert (c.total_params, c.active_params, c.forward_flops) == (1456, 560, 1024)
    # value_dim=12 adds out_proj 12*16 = 192 params and 2*12*16 = 384 FLOPs; values 64*12 = 768;
    # value rows 2*4*12 = 96 (sum FLOPs 2*96 = 192): total 304+128+768+192 = 1392,
    # active 304+128+96+192 = 720, FLOPs 512+256+192+384 = 1344.
    c = PKM(16, n_keys=8, heads=2, top_k=4, d_key=8, value_dim=12).cost()
    assert (c.total_params, c.active_params, c.forward_flops) == (1392, 720, 1344)
    # LayerNorm(d_key) has 2*8 = 16 params instead of BN's 32; no norm: 0.
    assert PKM(16, n_keys=8, heads=2, top_k=4, d_key=8, query_norm="layer").cost().total_params == 1456 - 16
    assert PKM(16, n_keys=8, heads=2, top_k=4, d_key=8, query_norm="none").cost().active_params == 560 - 32


def test_pkm_errors():
    with pytest.raises(ValueError, match="d_key must be even"):
        PKM(16, n_keys=8, heads=2, top_k=4, d_key=7)
    with pytest.raises(ValueError, match=r"top_k=9 must be <= n_keys=8"):
        PKM(16, n_keys=8, heads=2, top_k=9, d_key=8)
    with pytest.raises(ValueError, match="unknown query_norm 'rms'"):
        PKM(16, n_keys=8, heads=2, top_k=4, d_key=8, query_norm="rms")
    with pytest.raises(ValueError, match="n_keys must be a positive integer"):
        PKM(16, n_keys=0)
    with pytest.raises(ValueError, match=r"expected input last dimension d_model=16, got 15"):
        PKM(16, n_keys=8, heads=2, top_k=4, d_key=8)(torch.randn(4, 15))
