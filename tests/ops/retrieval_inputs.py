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
