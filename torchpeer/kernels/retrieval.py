"""Triton product-key retrieval: exact top-k over n*n product keys without the (T, H, n*n) scores.

A PEER query q (d_key) is split in two halves q1, q2. Expert i = a * n + b has key
[C[a] ; C'[b]] (C, C' = the two sub-key tables, n rows each), so its score is
q1.C[a] + q2.C'[b]. The top-k over all n*n experts is the top-k of the k*k sums formed
from the top-k of each half (any expert outside that set is beaten by k candidates).

One kernel program handles BLOCK_M tokens of one head and does the whole search in
registers:
  1. for each half: sub-key scores q_half @ C^T, one BLOCK_N tile of sub-keys at a time,
     keeping a running top-KP (KP = next power of two >= top_k) per row;
  2. the KP*KP candidate sums and their top-KP.
Nothing larger than (BLOCK_M, KP*KP) ever exists, so memory is the (T, H, top_k) outputs.

Selection works on packed int64 keys: the high 32 bits are the fp32 score mapped to an
int32 with the same order, the low 32 bits hold (2**31 - 1 - index). One integer compare
then orders by score and breaks ties towards the smaller index, and sorting/top-k moves
scores and indices together (Triton's tl.topk / tl.bitonic_merge take one tensor).

Backward (PyTorch, chunked over tokens): with ds = dL/dscores, the gradient is
    dq[t,h] = sum_k ds[t,h,k] * [C[a_k] ; C'[b_k]],   dC[a] += ds * q1,   dC'[b] += ds * q2.
Both are products with the (rows, n) matrix G[r, a] = sum_{k: a_k = a} ds[r, k]:
dq1 = G @ C and dC = G^T @ q1. G is built per chunk by scatter_add, so the backward is
two dense fp32 matmuls per half, deterministic, with no (T, H, top_k, d_key) gather.

On an H200 at T=65536, H=8, n=1024, d_key=128, k=16 (bf16): forward 15.5 ms, backward 9.1 ms
(PyTorch path: 49.3 and 24.1 ms), peak memory of forward+backward 0.86 GiB above the inputs.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only without triton
    HAS_TRITON = False

__all__ = ["product_key_topk_triton", "product_key_topk_bruteforce", "HAS_TRITON"]

# The kernel holds (BLOCK_M, KP * KP) int64 candidates in registers; above this KP the
# PyTorch implementation (torchpeer.product_keys) is used instead.
MAX_KERNEL_KP = 32
# Backward chunks hold a (rows, n) fp32 matrix; cap it at this many elements (256 MiB).
_BWD_CHUNK_ELEMS = 1 << 26
_IDX_MAX = 2**31 - 1

# Launch tuning (BLOCK_M, BLOCK_N, num_warps). Measured on one H200 (triton 3.6, T=65536 tokens,
# H=8, n=1024, d_key=128, top_k=16, forward only): bf16 (64, 128, 16) 15.5 ms, (16, 64, 4) 37.6,
# (32, 64, 8) 38.3, (32, 128, 8) 52.2; fp32 (16, 64, 4) 31.3, (32, 64, 8) 32.6; top_k=32
# (16, 64, 8) 64.3 (torch.product_keys.product_key_topk: 49.3 ms). The sorting networks dominate;
# why 16 warps are 2.5x faster than 8 is not established (all three 16-warp configs fit 128
# registers without spills; (64, 64, 16) and (32, 128, 16) are untried on a GPU).
# "half": bf16/fp16 queries and keys with top_k <= 16; "fp32": any other dtype mix; "wide":
# 16 < top_k <= 32. Mutable on purpose: benchmarks/peer_layer.py --retrieval-configs sweeps it.
TUNING = {"half": (64, 128, 16), "fp32": (16, 64, 4), "wide": (16, 64, 8)}


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


# --------------------------------------------------------------------------- kernel

if HAS_TRITON:

    @triton.jit
    def _pack(score, idx):
        """fp32 score + int32 index -> int64 whose integer order is (score, -index)."""
        bits = score.to(tl.int32, bitcast=True)
        # negative floats: flip all but the sign bit so larger float <=> larger int
        key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
        return (key.to(tl.int64) << 32) | (2147483647 - idx).to(tl.int64)

    @triton.jit
    def _unpack(packed):
        key = (packed >> 32).to(tl.int32)
        bits = key ^ ((key >> 31) & 0x7FFFFFFF)
        idx = 2147483647 - (packed & 0x7FFFFFFF).to(tl.int32)
        return bits.to(tl.float32, bitcast=True), idx

    @triton.jit
    def _sentinel(BLOCK_M: tl.constexpr, K: tl.constexpr):
        # below every packed finite score (the key of -inf is -2139095041)
        return tl.full((BLOCK_M, K), -2147483647, tl.int64) << 32

    @triton.jit
    def _half_topk(
        q_rows,
        stride_qd,
        row_mask,
        k_ptr,
        n,
        DH: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        KP: tl.constexpr,
        DOT_FP32: tl.constexpr,
    ):
        """Running top-KP (ascending packed keys) of q_half . C[j] over the n sub-keys."""
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < DH
        q = tl.load(q_rows + offs_d[None, :] * stride_qd, mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        if DOT_FP32:
            q = q.to(tl.float32)
        running = _sentinel(BLOCK_M, KP)
        for n0 in range(0, n, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_mask = cols < n
            c = tl.load(
                k_ptr + cols[:, None] * DH + offs_d[None, :],
                mask=col_mask[:, None] & d_mask[None, :],
                other=0.0,
            )
            if DOT_FP32:
                s = tl.dot(q, tl.trans(c.to(tl.float32)), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(c))  # bf16/fp16 products are exact in the fp32 accumulator
            p = _pack(s, cols[None, :])
            p = tl.where(col_mask[None, :], p, _sentinel(BLOCK_M, BLOCK_N))
            tile_top = tl.topk(p, KP)  # descending
            # max(ascending, descending) holds the top-KP of the union as a bitonic sequence
            running = tl.bitonic_merge(tl.maximum(running, tile_top), descending=False)
        return running

    @triton.jit
    def _product_key_topk_kernel(
        q_ptr,
        k_ptr,
        scores_ptr,
        idx_ptr,
        T,
        n,
        top_k,
        stride_qt,
        stride_qh,
        stride_qd,
        PER_HEAD: tl.constexpr,
        DH: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        KP: tl.constexpr,
        DOT_FP32: tl.constexpr,
    ):
        pid = tl.program_id(0)
        h = tl.program_id(1)
        H = tl.num_programs(1)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < T
        q_rows = q_ptr + rows.to(tl.int64)[:, None] * stride_qt + h * stride_qh
        s = h if PER_HEAD else 0
        # sub_keys is contiguous (S, 2, n, DH)
        k1 = k_ptr + (s * 2 + 0) * n * DH
        k2 = k_ptr + (s * 2 + 1) * n * DH
        q2_rows = q_rows + DH * stride_qd
        run1 = _half_topk(q_rows, stride_qd, row_mask, k1, n, DH, BLOCK_M, BLOCK_N, BLOCK_D, KP, DOT_FP32)
        run2 = _half_topk(q2_rows, stride_qd, row_mask, k2, n, DH, BLOCK_M, BLOCK_N, BLOCK_D, KP, DOT_FP32)

        # stage 2: all KP*KP candidate sums, then their top-KP
        s1, a = _unpack(run1)
        s2, b = _unpack(run2)
        total = s1[:, :, None] + s2[:, None, :]
        expert = a[:, :, None] * n + b[:, None, :]
        p = _pack(total, expert)
        # a half can hold fewer than KP real entries (n < KP); sentinels must stay out
        sent = _sentinel(BLOCK_M, KP)
        valid = (run1 > sent)[:, :, None] & (run2 > sent)[:, None, :]
        p = tl.where(valid, p, tl.full((BLOCK_M, KP, KP), -2147483647, tl.int64) << 32)
        best = tl.topk(tl.reshape(p, (BLOCK_M, KP * KP)), KP)  # descending
        score, expert = _unpack(best)

        cols = tl.arange(0, KP)
        out = (rows.to(tl.int64)[:, None] * H + h) * top_k + cols[None, :]
        mask = row_mask[:, None] & (cols[None, :] < top_k)
        tl.store(scores_ptr + out, score, mask=mask)
        tl.store(idx_ptr + out, expert.to(tl.int64), mask=mask)


def _kernel_config(kp: int, dot_fp32: bool) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for a padded top-k of kp, from TUNING."""
    if _interpreting():  # numpy emulation: the smallest legal tiles are the fastest
        return 16, 16, 4
    if kp > 16:
        return TUNING["wide"]
    return TUNING["fp32"] if dot_fp32 else TUNING["half"]


def _launch(queries: torch.Tensor, sub_keys: torch.Tensor, top_k: int, config=None):
    T, H, d_key = queries.shape
    n = sub_keys.shape[2]
    dh = d_key // 2
    kp = max(2, _next_pow2(top_k))
    half = (torch.bfloat16, torch.float16)
    # bf16/fp16 x bf16/fp16 products are exact in the fp32 accumulator (tensor cores); any other
    # mix is done in fp32 ("ieee", not tf32). The interpreter's half-precision dot is broken
    # (it multiplies the raw uint16 storage), so it always takes the fp32 path.
    dot_fp32 = _interpreting() or not (queries.dtype == sub_keys.dtype and queries.dtype in half)
    block_m, block_n, num_warps = config or _kernel_config(kp, dot_fp32)
    block_n = max(block_n, kp, 16)
    scores = torch.empty((T, H, top_k), device=queries.device, dtype=torch.float32)
    indices = torch.empty((T, H, top_k), device=queries.device, dtype=torch.int64)
    if T == 0:
        return scores, indices
    keys = sub_keys.contiguous()
    grid = (triton.cdiv(T, block_m), H)
    _product_key_topk_kernel[grid](
        queries,
        keys,
        scores,
        indices,
        T,
        n,
        top_k,
        queries.stride(0),
        queries.stride(1),
        queries.stride(2),
        PER_HEAD=sub_keys.shape[0] > 1,
        DH=dh,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=max(16, _next_pow2(dh)),
        KP=kp,
        DOT_FP32=dot_fp32,
        num_warps=num_warps,
    )
    return scores, indices


# --------------------------------------------------------------------------- backward


def _backward(ds, queries, sub_keys, indices, need_q, need_k):
    """Gradients of scores[t,h,k] = q1[t,h].C[a] + q2[t,h].C'[b] (see module docstring)."""
    T, H, d_key = queries.shape
    S, _, n, dh = sub_keys.shape
    keys = sub_keys.float()
    dq = torch.empty_like(queries) if need_q else None
    dkeys = torch.zeros(keys.shape, device=keys.device, dtype=torch.float32) if need_k else None
    chunk = max(1, _BWD_CHUNK_ELEMS // (H * n))
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        q = queries[t0:t1].float()  # (t, H, d_key)
        g = ds[t0:t1].float()  # (t, H, K)
        idx = indices[t0:t1]
        dq_halves = []
        for half, sub_idx in ((0, idx // n), (1, idx % n)):
            G = torch.zeros((t1 - t0, H, n), device=q.device, dtype=torch.float32)
            G.scatter_add_(2, sub_idx, g)
            qh = q[..., half * dh : (half + 1) * dh]
            if S == 1:
                C = keys[0, half]  # (n, dh)
                if need_q:
                    dq_halves.append(G @ C)
                if need_k:
                    dkeys[0, half] += G.reshape(-1, n).t() @ qh.reshape(-1, dh)
            else:
                C = keys[:, half]  # (H, n, dh)
                if need_q:
                    dq_halves.append(torch.einsum("thn,hnd->thd", G, C))
                if need_k:
                    dkeys[:, half] += torch.einsum("thn,thd->hnd", G, qh)
        if need_q:
            dq[t0:t1] = torch.cat(dq_halves, dim=-1).to(dq.dtype)
    return dq, (dkeys.to(sub_keys.dtype) if need_k else None)


class _ProductKeyTopK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, queries, sub_keys, top_k):
        scores, indices = _launch(queries, sub_keys, top_k)
        ctx.save_for_backward(queries, sub_keys, indices)
        ctx.mark_non_differentiable(indices)
        return scores, indices

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_scores, _d_indices):
        queries, sub_keys, indices = ctx.saved_tensors
        need_q, need_k = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if d_scores is None or not (need_q or need_k):
            return None, None, None
        # The two (rows, n) x (n, d_key/2) products per half dominate this backward; in plain fp32
        # they ran at ~5 ms of the 9.1 ms measured at T=65536 on an H200. TF32 tensor cores cut that,
        # at the ~1e-3 relative precision a bf16 training step has anyway (CUDA only; restored after).
        prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            dq, dk = _backward(d_scores, queries, sub_keys, indices, need_q, need_k)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = prev
        return dq, dk, None


# --------------------------------------------------------------------------- public API


def _check_inputs(queries, sub_keys, top_k, max_top_k: int | None = None) -> None:
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
    T, H, d_key = queries.shape
    S, _, n, dh = sub_keys.shape
    if d_key % 2 or dh != d_key // 2:
        raise ValueError(
            f"d_key must be even and sub_keys.shape[3] == d_key // 2; got d_key={d_key}, sub_keys.shape[3]={dh}"
        )
    if S not in (1, H):
        raise ValueError(f"sub_keys.shape[0] must be 1 (shared keys) or heads={H}, got {S}")
    if max_top_k is None and not 1 <= top_k <= n:
        raise ValueError(f"top_k must be in [1, n={n}], got {top_k}")
    if max_top_k is not None and not 1 <= top_k <= max_top_k:
        raise ValueError(f"top_k must be in [1, {max_top_k}], got {top_k}")
    if n * n > _IDX_MAX:
        raise ValueError(f"n*n = {n * n} experts does not fit the int32 index packing (n <= 46340)")
    if queries.device != sub_keys.device:
        raise ValueError(f"queries on {queries.device} but sub_keys on {sub_keys.device}")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def product_key_topk_triton(
    queries: torch.Tensor, sub_keys: torch.Tensor, top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k product-key retrieval (Triton).

    queries: (T, H, d_key), any float dtype (scores are computed in fp32).
    sub_keys: (S, 2, n, d_key // 2), S == 1 (shared by all heads) or S == H.
    Returns scores (T, H, top_k) float32, differentiable w.r.t. queries and sub_keys, and
    indices (T, H, top_k) int64 in [0, n*n), expert i = a * n + b, sorted by descending score.
    """
    _check_inputs(queries, sub_keys, top_k)
    if not HAS_TRITON:
        raise RuntimeError("product_key_topk_triton needs triton: pip install triton")
    if queries.device.type != "cuda" and not _interpreting():
        raise ValueError(
            f"product_key_topk_triton needs CUDA tensors (got {queries.device}); use "
            "torchpeer.product_keys.product_key_topk on the CPU or set TRITON_INTERPRET=1"
        )
    if max(2, _next_pow2(top_k)) > MAX_KERNEL_KP:
        # the register-resident candidate set would be too large; the chunked PyTorch version
        # has the same contract
        from torchpeer.product_keys import product_key_topk

        return product_key_topk(queries, sub_keys, top_k)
    return _ProductKeyTopK.apply(queries, sub_keys, top_k)


def product_key_topk_bruteforce(
    queries: torch.Tensor, sub_keys: torch.Tensor, top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for tests: score all n*n full keys, torch.topk. O(T * H * n^2 * d_key).

    Computes in float64 if either input is float64, else float32; differentiable.
    top_k may be anything up to n*n here.
    """
    _check_inputs(queries, sub_keys, top_k, max_top_k=sub_keys.shape[2] ** 2 if sub_keys.dim() == 4 else None)
    S, _, n, dh = sub_keys.shape
    dtype = torch.float64 if torch.float64 in (queries.dtype, sub_keys.dtype) else torch.float32
    C1 = sub_keys[:, 0].to(dtype)  # (S, n, dh)
    C2 = sub_keys[:, 1].to(dtype)
    # full keys (S, n*n, d_key): row a*n+b = [C1[a]; C2[b]]
    full = torch.cat([C1[:, :, None, :].expand(S, n, n, dh), C2[:, None, :, :].expand(S, n, n, dh)], dim=-1).reshape(
        S, n * n, 2 * dh
    )
    scores = torch.einsum("thd,hnd->thn", queries.to(dtype), full.expand(queries.shape[1], -1, -1))
    return torch.topk(scores, top_k, dim=-1)
