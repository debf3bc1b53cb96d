"""The spec of product-key top-k, in plain PyTorch: score all n*n full keys, take torch.topk.

Expert i = a * n + b has the full key [C[a] ; C'[b]] (C, C' = sub_keys[s, 0], sub_keys[s, 1]), so
its score for a query q = [q1 ; q2] is q1 . C[a] + q2 . C'[b]. O(T * H * n^2 * d_key): tests and
small n only. Every other implementation must return exactly these indices.
"""

from __future__ import annotations

import torch

from .checks import check_topk_inputs


def product_key_topk_reference(
    queries: torch.Tensor, sub_keys: torch.Tensor, top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """queries: (T, H, d_key); sub_keys: (S, 2, n, d_key // 2), S = 1 (shared) or H.

    Returns scores (T, H, top_k), float64 if either input is float64 else float32 (also inside an
    enclosing autocast), differentiable through plain autograd, and indices (T, H, top_k) int64 in
    [0, n*n), by descending score. top_k may be anything up to n*n here.
    """
    n = sub_keys.shape[2] if isinstance(sub_keys, torch.Tensor) and sub_keys.dim() == 4 else None
    check_topk_inputs(queries, sub_keys, top_k, max_top_k=None if n is None else n * n)
    S, _, n, half = sub_keys.shape
    dtype = torch.float64 if torch.float64 in (queries.dtype, sub_keys.dtype) else torch.float32
    c1 = sub_keys[:, 0].to(dtype)  # (S, n, half)
    c2 = sub_keys[:, 1].to(dtype)
    # full[s, a * n + b] = [C[a] ; C'[b]]: (S, n*n, d_key)
    full = torch.cat([c1[:, :, None, :].expand(S, n, n, half), c2[:, None, :, :].expand(S, n, n, half)], dim=-1)
    full = full.reshape(S, n * n, 2 * half).expand(queries.shape[1], -1, -1)
    with torch.autocast(device_type=queries.device.type, enabled=False):  # exact also inside autocast
        scores = torch.einsum("thd,hnd->thn", queries.to(dtype), full)
    return torch.topk(scores, top_k, dim=-1)
