"""The one input checker of product-key top-k (every backend and the reference call it)."""

from __future__ import annotations

import torch

# Triton packs (score, index) into one int64 with a 31-bit index (see triton_common.py).
MAX_EXPERTS = 2**31 - 1


def check_topk_inputs(queries, sub_keys, top_k, *, max_top_k: int | None = None, kernel: bool = False) -> None:
    """queries: (tokens, heads, d_key) float; sub_keys: (S, 2, n, d_key // 2) float, S = 1 or heads;
    top_k an int in [1, n] (in [1, max_top_k] when given: the reference may take up to n * n).
    kernel=True adds what the Triton kernels need: n * n experts fit a 31-bit index.
    Raises TypeError / ValueError with what to change."""
    if not isinstance(queries, torch.Tensor) or not isinstance(sub_keys, torch.Tensor):
        raise TypeError("queries and sub_keys must be torch.Tensors")
    if not queries.is_floating_point() or not sub_keys.is_floating_point():
        raise TypeError(f"queries and sub_keys must be floating point, got {queries.dtype} and {sub_keys.dtype}")
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise TypeError(f"top_k must be an int, got {type(top_k).__name__}")
    if queries.dim() != 3:
        raise ValueError(f"queries must be (tokens, heads, d_key), got shape {tuple(queries.shape)}")
    if sub_keys.dim() != 4 or sub_keys.shape[1] != 2:
        raise ValueError(f"sub_keys must be (S, 2, n, d_key // 2), got shape {tuple(sub_keys.shape)}")
    _, heads, d_key = queries.shape
    key_sets, _, n, half = sub_keys.shape
    if d_key % 2 or half != d_key // 2:
        raise ValueError(
            f"d_key must be even and sub_keys.shape[3] == d_key // 2; got d_key={d_key}, sub_keys.shape[3]={half}"
        )
    if key_sets not in (1, heads):
        raise ValueError(f"sub_keys.shape[0] (key sets) must be 1 (shared keys) or heads={heads}, got {key_sets}")
    limit = n if max_top_k is None else max_top_k
    if not 1 <= top_k <= limit:
        bound = f"n={n}" if max_top_k is None else str(max_top_k)
        raise ValueError(f"top_k must be in [1, {bound}] (n = sqrt(n_experts)), got top_k={top_k}")
    if kernel and n * n > MAX_EXPERTS:
        raise ValueError(f"n*n = {n * n} experts does not fit the int32 index packing (n <= 46340)")
    if queries.device != sub_keys.device:
        raise ValueError(f"queries on {queries.device} but sub_keys on {sub_keys.device}")
