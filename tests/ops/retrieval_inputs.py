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
