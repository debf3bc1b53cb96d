"""The "merge" forward of the Triton retrieval: one kernel per (row block, head) does the whole search.

Each half keeps a running top-KP over its BLOCK_N-wide sub-key tiles (tl.topk per tile plus a
bitonic merge, `half_topk`), then all KP*KP pair sums are formed and their top-KP taken. The
default for fp32 inputs, whose fp32 dots the threshold kernel would do twice (kernel_config.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from torchpeer.ops.dispatch import triton_interpreting

from .kernel_config import DEFAULT_CONFIG, RetrievalKernelConfig
from .triton_common import dot_fp32, half_topk, next_pow2, pack, sentinel, unpack


@triton.jit
def _product_key_topk_kernel(
    q_ptr, k_ptr, scores_ptr, idx_ptr, T, n, top_k, stride_qt, stride_qh, stride_qd,
    PER_HEAD: tl.constexpr, DH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, KP: tl.constexpr, DOT_FP32: tl.constexpr,
):  # fmt: skip
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
    run1 = half_topk(q_rows, stride_qd, row_mask, k1, n, DH, BLOCK_M, BLOCK_N, BLOCK_D, KP, DOT_FP32)
    run2 = half_topk(q2_rows, stride_qd, row_mask, k2, n, DH, BLOCK_M, BLOCK_N, BLOCK_D, KP, DOT_FP32)

    # stage 2: all KP*KP candidate sums, then their top-KP
    s1, a = unpack(run1)
    s2, b = unpack(run2)
    total = s1[:, :, None] + s2[:, None, :]
    expert = a[:, :, None] * n + b[:, None, :]
    p = pack(total, expert)
    # a half can hold fewer than KP real entries (n < KP); sentinels must stay out
    sent = sentinel(BLOCK_M, KP)
    valid = (run1 > sent)[:, :, None] & (run2 > sent)[:, None, :]
    p = tl.where(valid, p, tl.full((BLOCK_M, KP, KP), -2147483647, tl.int64) << 32)
    best = tl.topk(tl.reshape(p, (BLOCK_M, KP * KP)), KP)  # descending
    score, expert = unpack(best)

    cols = tl.arange(0, KP)
    out = (rows.to(tl.int64)[:, None] * H + h) * top_k + cols[None, :]
    mask = row_mask[:, None] & (cols[None, :] < top_k)
    tl.store(scores_ptr + out, score, mask=mask)
    tl.store(idx_ptr + out, expert.to(tl.int64), mask=mask)


def launch_merge(
    queries: torch.Tensor, sub_keys: torch.Tensor, top_k: int, config: RetrievalKernelConfig = DEFAULT_CONFIG
):
    """The "merge" forward -> scores (T, H, top_k) fp32, indices (T, H, top_k) int64."""
    T, H, d_key = queries.shape
    n = sub_keys.shape[2]
    dh = d_key // 2
    kp = max(2, next_pow2(top_k))
    use_fp32 = dot_fp32(queries, sub_keys)
    # numpy emulation: the smallest legal tiles are the fastest
    block_m, block_n, num_warps = (16, 16, 4) if triton_interpreting() else config.merge_launch(kp, use_fp32)
    block_n = max(block_n, kp, 16)
    scores = torch.empty((T, H, top_k), device=queries.device, dtype=torch.float32)
    indices = torch.empty((T, H, top_k), device=queries.device, dtype=torch.int64)
    if T == 0:
        return scores, indices
    keys = sub_keys.contiguous()
    _product_key_topk_kernel[(triton.cdiv(T, block_m), H)](
        queries, keys, scores, indices, T, n, top_k, queries.stride(0), queries.stride(1), queries.stride(2),
        PER_HEAD=sub_keys.shape[0] > 1, DH=dh, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=max(16, next_pow2(dh)), KP=kp, DOT_FP32=use_fp32, num_warps=num_warps,
    )  # fmt: skip
    return scores, indices
