"""PKM against a float64 reference (brute-force top-k over all keys, materialised value gathers);
gradients, query/retrieve, usage tracking, cost by hand, errors."""

from __future__ import annotations

import math

import pytest
import torch

from torchpeer.layers.pkm import PKM
from torchpeer.usage import enable_usage_tracking

from .float64 import assert_grads


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
