"""Random retrieval inputs shared by the retrieval kernel tests: queries and sub-key tables from
one seeded generator (the same values on the CPU and a GPU), on the GPU when there is one."""

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def retrieval_inputs(T, H, S, n, d_key, dtype, key_dtype=None, seed=0):
    """(q (T, H, d_key), keys (S, 2, n, d_key // 2)): standard normal; keys in ``key_dtype`` if given."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(T, H, d_key, generator=g).to(DEVICE, dtype)
    keys = torch.randn(S, 2, n, d_key // 2, generator=g).to(DEVICE, key_dtype or dtype)
    return q, keys


def cap_overflow_inputs(cap):
    """(q (3, 1, 8), keys (1, 2, n, 4), n = 2 * cap) whose first half overflows a kernel's ``cap``
    candidate slots: sub-keys 0..cap+8 tie at score 1 for every query, sub-key n-1 scores 2, the rest
    -5, so a group-max threshold keeps cap + 10 candidates and the best sub-key (n-1) lies beyond the
    first cap of them in column order; without an exact fallback it would be lost. Half 1 is random."""
    n, dh, ties = 2 * cap, 4, cap + 9
    keys = torch.randn(1, 2, n, dh, generator=torch.Generator().manual_seed(7))
    keys[0, 0, :, 0] = -5.0
    keys[0, 0, :ties, 0] = 1.0
    keys[0, 0, n - 1, 0] = 2.0
    q = torch.randn(3, 1, 2 * dh, generator=torch.Generator().manual_seed(8))
    q[..., :dh] = torch.tensor([1.0, 0.0, 0.0, 0.0])  # half-0 score = first coordinate of the sub-key
    return q.to(DEVICE), keys.to(DEVICE), n


def one_hot_half0(n, scores):
    """q (2, 1, 8), keys (1, 2, n, 4) whose half-0 score of sub-key j is scores[j] (query = e_0)."""
    q, keys = retrieval_inputs(2, 1, 1, n, 8, torch.float32, seed=9)
    keys[0, 0, :, 0] = scores
    q[:, 0, :4] = torch.tensor([1.0, 0.0, 0.0, 0.0])
    return q, keys


def same_result(a, b) -> bool:
    """Two (scores, indices) results equal bit for bit."""
    return torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def check_brute_force(q, keys, k, got, tol):
    """``got`` (scores, indices) against the float64 brute force: the same indices in the same order,
    scores within ``tol``."""
    from torchpeer.ops import product_key_topk_reference

    ref_s, ref_i = product_key_topk_reference(q.double(), keys.double(), k)
    assert torch.equal(got[1].cpu(), ref_i.cpu())
    torch.testing.assert_close(got[0].double(), ref_s, rtol=tol, atol=tol)
