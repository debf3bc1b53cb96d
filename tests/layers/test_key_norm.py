"""Normalised sub-keys (PEERConfig.key_norm, Memory Layers at Scale's key side of query/key
normalisation): the normalisation by hand, retrieval = brute force over the normalised full keys on
every backend, forward and every gradient against a float64 reference written here, the balance term
on the normalised keys, and the default "none" bit-identical to the raw-key router."""

import math

import pytest
import torch

from tests.references import assert_backward_matches, brute_force_topk, naive_float64
from torchpeer.layers import PEERConfig
from torchpeer.layers.balance import subkey_balance_loss
from torchpeer.layers.peer import PEER
from torchpeer.layers.router import ProductKeyRouter, normalize_sub_keys
from torchpeer.ops import product_key_topk

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # Triton runs on the CPU only under the interpreter


def norm64(sub_keys: torch.Tensor, kind: str, d_key: int) -> torch.Tensor:
    """The normalisation written out in float64 (independently of normalize_sub_keys)."""
    k = sub_keys.double()
    m = k.shape[-1]
    if kind == "l2":
        return k / k.pow(2).sum(-1, keepdim=True).sqrt() * math.sqrt(m / d_key)
    mean = k.mean(-1, keepdim=True)
    var = (k - mean).pow(2).mean(-1, keepdim=True)  # biased, as LayerNorm
    return (k - mean) / (var + 1e-5).sqrt() / math.sqrt(d_key)


def reference64(m: PEER, x: torch.Tensor) -> torch.Tensor:
    """float64 PEER forward: query -> brute force over the normalised keys -> gates -> loop formula."""
    flat = x.reshape(-1, m.d_model)
    scores, idx = brute_force_topk(m.query(flat), norm64(m.sub_keys, m.key_norm, m.d_key), m.top_k)
    return naive_float64(flat, m.down, m.up, idx, m.gates(scores), m.activation).view(x.shape)


@pytest.mark.parametrize("kind", ["l2", "layer"])
def test_normalisation_by_hand(kind):
    torch.manual_seed(0)
    keys = torch.randn(2, 2, 5, 6, dtype=torch.float64) * 3 + 1  # far from the init's scale, non-zero mean
    out = normalize_sub_keys(keys, kind, d_key=12)
    torch.testing.assert_close(out, norm64(keys, kind, 12))
    # every row at the random init's expected norm sqrt(m / d_key) (layer: up to its eps)
    tol = 1e-4 if kind == "layer" else 1e-12
    want = torch.full((2, 2, 5), math.sqrt(6 / 12), dtype=torch.float64)
    torch.testing.assert_close(out.norm(dim=-1), want, rtol=tol, atol=0)
    if kind == "layer":
        torch.testing.assert_close(out.mean(-1), torch.zeros(2, 2, 5, dtype=torch.float64))
    k32 = keys.float()
    assert normalize_sub_keys(k32, kind, 12).dtype == torch.float32
    assert normalize_sub_keys(k32, "none", 12) is k32  # the paper's router: the same tensor


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
@pytest.mark.parametrize("kind,shared", [("l2", True), ("layer", False)])
def test_retrieval_is_brute_force_over_the_normalised_keys(backend, kind, shared):
    if backend == "triton":
        pytest.importorskip("triton")
    torch.manual_seed(1)
    heads, n, d_key, k = 3, 9, 8, 5
    r = ProductKeyRouter(16, n, heads, k, d_key, "layer", key_sets=1 if shared else heads, backend=backend)
    r.key_norm = kind  # the same router's weights, normalised
    with torch.no_grad():
        r.sub_keys.mul_(torch.rand(r.sub_keys.shape[:-1] + (1,)) * 4)  # very unequal raw norms
    r = r.to(DEVICE)
    x = torch.randn(13, 16, device=DEVICE)
    q, scores, idx = r(x)
    ref_scores, ref_idx = brute_force_topk(q.double(), norm64(r.sub_keys, kind, d_key), k)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(scores.double(), ref_scores, rtol=1e-5, atol=1e-5)
    # and it is not the raw keys' top-k (normalising changes which experts win)
    assert not torch.equal(idx, brute_force_topk(q.double(), r.sub_keys.double(), k)[1])


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("kind,query_norm,shared", [("l2", "layer", True), ("layer", "ema", False)])
def test_layer_forward_and_gradients_match_float64(backend, kind, query_norm, shared):
    torch.manual_seed(2)
    kw = dict(n_experts=49, heads=2, top_k=3, d_key=8, key_norm=kind, query_norm=query_norm, shared_keys=shared)
    m = PEER(12, backend=backend, **kw).double()
    ref = PEER(12, backend="reference", **kw).double()
    ref.load_state_dict(m.state_dict())
    x = torch.randn(2, 7, 12, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    assert_backward_matches(m, ref, x, x_ref, m(x), reference64(ref, x_ref), True, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("kind", ["l2", "layer"])
def test_triton_layer_matches_float64(kind):
    pytest.importorskip("triton")
    torch.manual_seed(3)
    kw = dict(n_experts=49, heads=2, top_k=3, d_key=8, key_norm=kind, query_norm="layer")
    m = PEER(16, backend="triton", **kw).to(DEVICE)
    assert m.op_backends() == {"product_key_topk": "triton", "expert_mix": "triton"}
    ref = PEER(16, backend="reference", **kw).double().to(DEVICE)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(13, 16, device=DEVICE, requires_grad=True)
    x_ref = x.detach().double().requires_grad_()
    assert_backward_matches(m, ref, x, x_ref, m(x), reference64(ref, x_ref), True)


def test_default_is_bit_identical_to_the_raw_key_router():
    torch.manual_seed(4)
    kw = dict(n_experts=64, heads=2, top_k=4, d_key=8, query_norm="layer", balance_weight=0.01)
    m = PEER(16, **kw)
    assert m.key_norm == "none" and m.router.retrieval_keys() is m.sub_keys
    assert PEERConfig().key_norm == "none"
    assert set(m.state_dict()) == set(PEER(16, key_norm="l2", **kw).state_dict())  # no new weights either way
    x = torch.randn(21, 16, requires_grad=True)
    m.train()
    y = m(x)
    (y.square().sum() + m.aux_loss()).backward()
    # the computation before key_norm existed, spelled out: raw sub-keys into the op and the term
    twin = PEER(16, **kw)
    twin.load_state_dict(m.state_dict())
    x2 = x.detach().clone().requires_grad_()
    q = twin.query(x2)
    scores, idx = product_key_topk(q, twin.sub_keys, twin.top_k, backend=twin.backend)
    from torchpeer.ops import expert_mix

    y2 = expert_mix(x2, twin.down, twin.up, idx, twin.gates(scores), twin.activation, backend=twin.backend)
    aux = 0.01 * subkey_balance_loss(q, twin.sub_keys, idx, 1)
    (y2.square().sum() + aux).backward()
    assert torch.equal(y, y2) and torch.equal(x.grad, x2.grad)
    for (name, p), p2 in zip(m.named_parameters(), twin.parameters()):
        assert torch.equal(p.grad, p2.grad), name


def test_balance_term_scores_the_normalised_keys():
    torch.manual_seed(5)
    m = PEER(16, n_experts=64, heads=2, top_k=4, d_key=8, query_norm="layer", key_norm="l2", balance_weight=1.0)
    x = torch.randn(9, 16)
    m.train()
    m(x)
    q = m.query(x)
    _, idx = m.retrieve(x)
    want = subkey_balance_loss(q, normalize_sub_keys(m.sub_keys, "l2", 8), idx.view(9, 2, 4))
    torch.testing.assert_close(m.aux_loss(), want)
    m.aux_loss().backward()
    assert m.sub_keys.grad.abs().sum() > 0


def test_key_norm_from_config_and_errors():
    cfg = PEERConfig(n_experts=16, heads=1, top_k=2, d_key=4, key_norm="layer")
    m = PEER.from_config(8, cfg)
    assert m.router.key_norm == "layer" and "key_norm=layer" in repr(m)
    assert "key_norm" not in repr(PEER(8, n_experts=16, heads=1, top_k=2, d_key=4))
    with pytest.raises(ValueError, match="unknown key_norm 'rms'"):
        PEER(8, n_experts=16, heads=1, top_k=2, d_key=4, key_norm="rms")
    with pytest.raises(ValueError, match="unknown key_norm"):
        normalize_sub_keys(torch.zeros(1, 2, 3, 2), "rms", 4)
