"""Exact product-key top-k in chunked PyTorch (the "torch" backend; runs on any device).

With two sub-key tables C, C' of n keys each (d_key/2 wide), the n*n full keys are
[C[a] ; C'[b]], expert i = a*n + b. A query q = [q1 ; q2] scores q.[C[a];C'[b]] = q1.C[a] + q2.C'[b].
The top-k over all n*n keys is found exactly from the top-k of each half (Lample et al. 2019):
any key in the overall top-k has its a among the k best q1.C[a] (else k keys with the same b and
better a would beat it), and likewise for b, so the top-k of the k*k candidate sums is exact.

Work is chunked over tokens so that at most (chunk, heads, max(n, k*k)) scores live at once, and
the backward pass recomputes what it needs, chunk by chunk: nothing of size (T, H, k, d_key) is
kept for backward.
"""

from __future__ import annotations

import torch

from .checks import check_topk_inputs

# Elements of the largest per-chunk temporary: small on the CPU (cache-friendly), large on GPUs where
# each chunk costs several kernel launches.
_CHUNK_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 26}


def score_dtype(queries: torch.Tensor) -> torch.dtype:
    """Scores are computed in float32 (float64 when the queries are float64)."""
    return torch.promote_types(queries.dtype, torch.float32)


def _half_scores(q_half: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """q_half: (c, H, d/2); table: (S, n, d/2) -> (c, H, n) scores in score_dtype."""
    dt = score_dtype(q_half)
    if table.shape[0] == 1:
        return q_half.to(dt) @ table[0].to(dt).t()
    return torch.einsum("chd,hnd->chn", q_half.to(dt), table.to(dt))


def _select(queries: torch.Tensor, sub_keys: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk: queries (c, H, d_key) -> scores (c, H, k) fp32 and indices (c, H, k) int64."""
    half = sub_keys.shape[-1]
    n = sub_keys.shape[2]
    s1 = _half_scores(queries[..., :half], sub_keys[:, 0])
    s2 = _half_scores(queries[..., half:], sub_keys[:, 1])
    v1, i1 = s1.topk(top_k, dim=-1)  # (c, H, k), sorted descending
    v2, i2 = s2.topk(top_k, dim=-1)
    cand = (v1.unsqueeze(-1) + v2.unsqueeze(-2)).flatten(-2)  # (c, H, k*k)
    scores, flat = cand.topk(top_k, dim=-1)
    a = i1.gather(-1, flat // top_k)
    b = i2.gather(-1, flat % top_k)
    return scores, a * n + b


def default_chunk(heads: int, n: int, top_k: int, d_key: int, device: torch.device | str = "cpu") -> int:
    """Tokens per chunk so that the largest temporary stays near _CHUNK_ELEMENTS elements."""
    widest = heads * max(n, top_k * top_k, top_k * d_key // 2)
    budget = _CHUNK_ELEMENTS["cuda" if torch.device(device).type == "cuda" else "cpu"]
    return max(1, budget // widest)


class _ProductKeyTopK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, queries, sub_keys, top_k, chunk):
        T, H, _ = queries.shape
        scores = torch.empty(T, H, top_k, device=queries.device, dtype=score_dtype(queries))
        indices = torch.empty(T, H, top_k, device=queries.device, dtype=torch.int64)
        with torch.no_grad():
            for t0 in range(0, T, chunk):
                scores[t0 : t0 + chunk], indices[t0 : t0 + chunk] = _select(queries[t0 : t0 + chunk], sub_keys, top_k)
        ctx.save_for_backward(queries, sub_keys, indices)
        ctx.chunk = chunk
        ctx.mark_non_differentiable(indices)
        return scores, indices

    @staticmethod
    def backward(ctx, d_scores, _d_indices):
        queries, sub_keys, indices = ctx.saved_tensors
        with torch.autocast(device_type=queries.device.type, enabled=False):  # as in forward
            return _ProductKeyTopK._backward(ctx, d_scores, queries, sub_keys, indices)

    @staticmethod
    def _backward(ctx, d_scores, queries, sub_keys, indices):
        T, H, _ = queries.shape
        S, _, n, half = sub_keys.shape
        dt = score_dtype(queries)
        d_q = torch.empty(queries.shape, device=queries.device, dtype=dt)
        d_keys = torch.zeros(S, 2, n, half, device=sub_keys.device, dtype=dt)
        flat_keys = sub_keys.to(dt).reshape(S * 2 * n, half)
        # Row of the sub-key table used by (head h, half j): ((h if per-head else 0) * 2 + j) * n + a.
        head_set = torch.arange(H, device=queries.device) if S > 1 else torch.zeros(H, device=queries.device)
        head_set = head_set.long().view(1, H, 1)
        for t0 in range(0, T, ctx.chunk):
            ds = d_scores[t0 : t0 + ctx.chunk].to(dt)  # (c, H, k)
            idx = indices[t0 : t0 + ctx.chunk]
            q = queries[t0 : t0 + ctx.chunk].to(dt)
            for j, part in enumerate((idx // n, idx % n)):
                rows = (head_set * 2 + j) * n + part  # (c, H, k)
                keys = flat_keys[rows]  # (c, H, k, half): one chunk only
                d_q[t0 : t0 + ctx.chunk, :, j * half : (j + 1) * half] = torch.einsum("chk,chkd->chd", ds, keys)
                contrib = ds.unsqueeze(-1) * q[:, :, None, j * half : (j + 1) * half]
                d_keys.view(S * 2 * n, half).index_add_(0, rows.reshape(-1), contrib.reshape(-1, half))
        return d_q.to(queries.dtype), d_keys.to(sub_keys.dtype), None, None


def product_key_topk_torch(
    queries: torch.Tensor, sub_keys: torch.Tensor, top_k: int, chunk: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k over all n*n product keys, chunked over tokens.

    queries: (tokens, heads, d_key); sub_keys: (key_sets, 2, n, d_key // 2), key_sets 1 or heads.
    Returns scores (tokens, heads, top_k) float32 (float64 for float64 queries), differentiable
    w.r.t. queries and sub_keys, and indices (tokens, heads, top_k) int64 in [0, n*n), sorted by descending score.
    """
    check_topk_inputs(queries, sub_keys, top_k)
    if chunk is None:
        chunk = default_chunk(queries.shape[1], sub_keys.shape[2], top_k, queries.shape[2], queries.device)
    # Scores must not be rounded to bf16 by an enclosing autocast: the top-k of a million keys is
    # decided by small score gaps (measured on an H200: only 58 % of indices agreed with bf16 matmuls).
    with torch.autocast(device_type=queries.device.type, enabled=False):
        return _ProductKeyTopK.apply(queries, sub_keys, top_k, chunk)
