"""Query norms: today's kinds reproduced exactly; the new kinds are causal-safe in train mode."""

import pytest
import torch
from torch import nn

from torchpeer.layers.query_norm import QUERY_NORM_KINDS, build_query_norm

H, DK = 3, 8


def _q(T=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    # anisotropic, non-centred queries (as trained ones are)
    return torch.randn(T, H, DK, generator=g) @ torch.randn(DK, DK, generator=g) + 0.5


def test_batch_matches_batchnorm1d_and_keeps_state_dict_keys():
    ref = nn.BatchNorm1d(H * DK)
    norm = build_query_norm("batch", H, DK)
    assert set(norm.state_dict()) == set(ref.state_dict())
    q = _q()
    for mode in (True, False):
        ref.train(mode), norm.train(mode)
        torch.testing.assert_close(norm(q), ref(q.reshape(len(q), -1)).view_as(q))
    torch.testing.assert_close(norm.running_mean, ref.running_mean)


def test_layer_and_none_match():
    ref = nn.LayerNorm(DK)
    norm = build_query_norm("layer", H, DK)
    assert set(norm.state_dict()) == set(ref.state_dict())
    q = _q()
    torch.testing.assert_close(norm(q), ref(q))
    assert torch.equal(build_query_norm("none", H, DK)(q), q)


@pytest.mark.parametrize("kind", ["ema", "ema_white", "l2", "layer", "none"])
def test_causal_in_train_mode(kind):
    """The query at position t does not change when later positions of the batch change."""
    torch.manual_seed(0)
    a, b = build_query_norm(kind, H, DK), build_query_norm(kind, H, DK)
    a.train(), b.train()
    for step in range(3):  # also after the running statistics moved
        b.load_state_dict(a.state_dict())
        q1 = _q(seed=step).requires_grad_()
        q2 = q1.detach().clone()
        q2[20:] = torch.randn(12, H, DK) * 5 - 3  # later positions differ wildly
        y1, y2 = a(q1), b(q2)
        assert torch.equal(y1[:20], y2[:20]), kind
        y1.square().sum().backward()  # the BN-style gradient path runs
        assert torch.isfinite(q1.grad).all()


def test_batch_is_not_causal():
    a = build_query_norm("batch", H, DK).train()
    q1 = _q()
    q2 = q1.clone()
    q2[20:] += 3.0
    assert not torch.allclose(a(q1)[:20], a(q2)[:20])


def test_ema_value_uses_running_stats_and_bn_gradient():
    torch.manual_seed(1)
    norm = build_query_norm("ema", H, DK, momentum=0.5).train()
    with torch.no_grad():
        norm.running_mean.normal_()
        norm.running_var.uniform_(0.5, 2.0)
    mu, var = norm.running_mean.clone(), norm.running_var.clone()
    q = _q().double().requires_grad_()
    y = norm(q)
    expect = (q.reshape(len(q), -1) - mu) / torch.sqrt(var + norm.eps)
    torch.testing.assert_close(y.reshape(len(q), -1).double(), expect.double(), rtol=1e-5, atol=1e-5)
    # BatchNorm's gradient: removing the batch mean makes a constant upstream gradient vanish
    (y.sum()).backward()
    assert q.grad.abs().max() < 1e-4
    # the running stats moved towards the batch (first update: bias-corrected, momentum 1)
    x = q.detach().reshape(len(q), -1).float()
    torch.testing.assert_close(norm.running_mean, x.mean(0))


def test_ema_white_whitens_after_warmup():
    torch.manual_seed(2)
    norm = build_query_norm("ema_white", H, DK, momentum=1.0, refresh=1).train()
    q = _q(T=4096)
    norm(q)  # update stats from this batch
    norm.eval()
    y = norm(q).reshape(4096, 2 * H, DK // 2).double()
    y = y - y.mean(0)
    cov = torch.einsum("tgi,tgj->gij", y, y) / 4095
    eye = torch.eye(DK // 2, dtype=cov.dtype).expand_as(cov)
    torch.testing.assert_close(cov, eye, atol=0.05, rtol=0)


def test_l2_half_norms():
    norm = build_query_norm("l2", H, DK)
    y = norm(_q()).reshape(-1, H, 2, DK // 2)
    torch.testing.assert_close(y.norm(dim=-1), torch.full(y.shape[:-1], (DK // 2) ** 0.5))


def test_bad_input():
    with pytest.raises(ValueError, match="use one of"):
        build_query_norm("bogus", H, DK)
    with pytest.raises(ValueError, match="bad options"):
        build_query_norm("ema", H, DK, nonsense=1)
    with pytest.raises(ValueError, match="expected queries"):
        build_query_norm("ema", H, DK)(torch.randn(4, H, DK + 2))
    assert set(QUERY_NORM_KINDS) >= {"batch", "layer", "none"}


@pytest.mark.parametrize("kind", QUERY_NORM_KINDS)
def test_runs_under_bf16_autocast(kind):
    norm = build_query_norm(kind, H, DK).train()
    q = _q().to(torch.bfloat16).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for _ in range(2):
            y = norm(q)
    assert y.shape == q.shape and torch.isfinite(y.float()).all()
    y.float().sum().backward()


@pytest.mark.parametrize("kind", ["ema", "ema_white", "batch"])
def test_router_queries_causal_in_train_mode(kind):
    """End to end through the product-key router: with a causal-safe norm, token t's query and its
    retrieved experts do not depend on later tokens of the batch (BatchNorm's do)."""
    from torchpeer.layers.router import ProductKeyRouter

    torch.manual_seed(0)
    a = ProductKeyRouter(16, n_keys=8, heads=2, top_k=3, d_key=8, query_norm=kind, backend="torch")
    b = ProductKeyRouter(16, n_keys=8, heads=2, top_k=3, d_key=8, query_norm=kind, backend="torch")
    b.load_state_dict(a.state_dict())
    a.train(), b.train()
    x1 = torch.randn(40, 16)
    x2 = x1.clone()
    x2[25:] = torch.randn(15, 16) * 4 + 2
    (q1, s1, i1), (q2, s2, i2) = a(x1), b(x2)
    same = torch.equal(q1[:25], q2[:25]) and torch.equal(i1[:25], i2[:25]) and torch.equal(s1[:25], s2[:25])
    assert same == (kind != "batch")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
@pytest.mark.parametrize("kind", ["ema", "ema_white", "l2"])
def test_modules_cast_to_another_dtype_match_fp32(kind, dtype):
    """A module cast with .to(bf16) or .double() (benchmarks, float64 reference tests) trains and gives
    the fp32 module's values within that dtype's precision; its statistics are kept in >= fp32."""
    opts = {} if kind == "l2" else {"momentum": 0.5}
    ref = build_query_norm(kind, H, DK, **opts).train()
    norm = build_query_norm(kind, H, DK, **opts).to(dtype).train()
    norm.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in ref.state_dict().items()})
    # bf16 rounds the queries (8 bits of mantissa) and whitening amplifies small directions: compare
    # against the largest value instead of elementwise.
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-6
    for step in range(3):
        q = _q(seed=step)
        qc = q.to(dtype).requires_grad_()
        y, y_ref = norm(qc), ref(q)
        assert y.dtype == dtype
        err = (y.double() - y_ref.double()).abs().max() / y_ref.double().abs().max()
        assert err < tol, f"step {step}: max error {err:.2e} relative to the largest value"
        y.float().pow(2).sum().backward()
        assert qc.grad is not None and torch.isfinite(qc.grad.float()).all()


@pytest.mark.parametrize("kind", ["ema", "ema_white"])
def test_ema_peer_compiles_and_trains(kind):
    """torch.compile (inductor) of a PEER layer with the default 'ema' norm runs its backward: the
    running statistics are updated in place, so the graph must not save the buffers themselves."""
    from torchpeer import PEER

    torch.manual_seed(0)
    layer = PEER(16, n_experts=64, heads=2, top_k=4, d_key=8, query_norm=kind, backend="torch").train()
    compiled = torch.compile(layer)
    for _ in range(2):
        x = torch.randn(12, 16, requires_grad=True)
        compiled(x).sum().backward()
        assert torch.isfinite(x.grad).all()
    assert int(layer.router.norm.num_updates) == 2
