"""The chunked PyTorch retrieval == the reference (all n*n full keys); gradients vs float64 autograd."""

import pytest
import torch

from torchpeer.ops import product_key_topk_reference, product_key_topk_torch


@pytest.mark.parametrize(
    "n,top_k,heads,d_key,shared",
    [(4, 2, 1, 4, True), (8, 8, 2, 6, True), (8, 3, 3, 8, False), (16, 5, 4, 12, True), (16, 16, 2, 4, False)],
)
def test_retrieval_matches_reference(n, top_k, heads, d_key, shared):
    g = torch.Generator().manual_seed(n * 100 + top_k)
    T = 37
    q = torch.randn(T, heads, d_key, generator=g, dtype=torch.float64)
    keys = torch.randn(1 if shared else heads, 2, n, d_key // 2, generator=g, dtype=torch.float64)
    scores, idx = product_key_topk_torch(q, keys, top_k, chunk=5)
    ref_scores, ref_idx = product_key_topk_reference(q, keys, top_k)
    assert idx.dtype == torch.int64 and idx.shape == (T, heads, top_k)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(scores, ref_scores, rtol=1e-12, atol=1e-12)
    assert (scores[..., :-1] >= scores[..., 1:]).all()  # sorted descending


def test_retrieval_float32_same_experts_as_float64():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(64, 2, 8, generator=g)
    keys = torch.randn(1, 2, 32, 4, generator=g)
    _, idx = product_key_topk_torch(q, keys, 7)
    _, ref = product_key_topk_reference(q.double(), keys.double(), 7)
    assert torch.equal(idx, ref)


@pytest.mark.parametrize("shared", [True, False])
def test_retrieval_gradients_match_autograd(shared):
    g = torch.Generator().manual_seed(2)
    heads = 3
    q = torch.randn(29, heads, 8, generator=g, dtype=torch.float64, requires_grad=True)
    keys = torch.randn(1 if shared else heads, 2, 6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    scores, _ = product_key_topk_torch(q, keys, 4, chunk=6)
    ref, _ = product_key_topk_reference(q, keys, 4)
    w = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad((scores * w).sum(), (q, keys))
    want = torch.autograd.grad((ref * w).sum(), (q, keys))
    for a, b in zip(got, want):
        assert b.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "q_shape,k_shape,top_k,match",
    [
        ((5, 2, 8), (1, 2, 4, 4), 5, "top_k=5"),
        ((5, 2, 8), (1, 2, 4, 3), 2, r"== d_key // 2"),
        ((5, 2, 8), (3, 2, 4, 4), 2, "key sets"),
        ((5, 8), (1, 2, 4, 4), 2, "queries must be"),
        ((5, 2, 8), (1, 3, 4, 4), 2, "sub_keys must be"),
    ],
)
def test_retrieval_bad_inputs(q_shape, k_shape, top_k, match):
    with pytest.raises(ValueError, match=match):
        product_key_topk_torch(torch.randn(q_shape), torch.randn(k_shape), top_k)


def test_retrieval_ignores_enclosing_autocast():
    """An enclosing bf16 autocast must not round the scores (it would reorder near-tied keys)."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(256, 2, 32, generator=g, requires_grad=True)
    keys = torch.randn(1, 2, 64, 16, generator=g, requires_grad=True)
    want_s, want_i = product_key_topk_torch(q, keys, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got_s, got_i = product_key_topk_torch(q, keys, 8)
    assert got_s.dtype == torch.float32
    assert torch.equal(got_i, want_i)
    torch.testing.assert_close(got_s, want_s)
    w = torch.randn(want_s.shape, generator=g)
    want_g = torch.autograd.grad((want_s * w).sum(), (q, keys))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got_g = torch.autograd.grad((got_s * w).sum(), (q, keys))
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b)
