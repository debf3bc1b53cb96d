"""The "split" forward of the Triton retrieval: for a handful of tokens (decoding), two short kernels.

The "threshold" and "merge" kernels give each (row block, head[, half]) work item to ONE program
that walks all n sub-keys in sequence: at 65536 tokens there are thousands of such items for the
GPU's ~132 SMs, but a decode step (1-64 tokens) has only H or 2H of them, so the step's latency is
one program's serial walk over n / BLOCK_N tiles (with a sort per tile), while most SMs idle.
Here the sub-key axis is split across programs instead:

1. `_tile_topk_kernel`, grid (n / BLOCK_N sub-key tiles, H * 2 halves, row blocks): ONE score
   tile (BLOCK_M, BLOCK_N) and its top-KP, written as packed (score, index) keys to a
   (T * H * 2, tiles, KP) candidate buffer. 256 programs at H = 8, n = 1024, BLOCK_N = 64.
2. `_tile_merge_kernel`, grid (row blocks of T * H): per half the top-KP of the tiles' candidates
   (a half's top-KP is among the union of its tiles' top-KP), then the exact top-k of all KP * KP
   pair sums (Lample et al.'s argument, as in "merge").

Bytes at H = 8, n = 1024, d_key = 128: the sub-keys (256 KiB bf16, 512 KiB fp32) read once per row
block, the queries (1 KiB per token in bf16), candidates T * 32 KiB written and read back (L2), the
scores/indices 1.5 KiB per token: at T <= 64 every kernel is latency-bound, so what counts is the
depth of one program's work (one tile and one 64-wide sort here, against 2 x 16 tiles in "merge").
Same packed (score, -index) order as the other forwards, so the results are identical.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from torchpeer.ops.dispatch import triton_interpreting

from .kernel_config import DEFAULT_CONFIG, RetrievalKernelConfig
from .triton_common import dot_fp32, next_pow2, pack, sentinel, unpack


@triton.jit
def _tile_topk_kernel(
    q_ptr, k_ptr, cand_ptr, T, H, n, n_tiles, stride_qt, stride_qh, stride_qd,
    PER_HEAD: tl.constexpr, DH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, KP: tl.constexpr, DOT_FP32: tl.constexpr,
):  # fmt: skip
    """cand[(t * H + h) * 2 + half, tile, :] = top-KP packed keys of q_half[t, h] . C_half[tile cols]."""
    tile = tl.program_id(0)
    h = tl.program_id(1) // 2
    half = tl.program_id(1) % 2
    rows = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < T
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < DH
    q_ptrs = q_ptr + rows.to(tl.int64)[:, None] * stride_qt + h * stride_qh + (half * DH + offs_d)[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_mask[:, None] & d_mask[None, :], other=0.0)
    s_set = h if PER_HEAD else 0
    cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < n
    keys = k_ptr + (s_set * 2 + half) * n * DH  # sub_keys is contiguous (S, 2, n, DH)
    c = tl.load(keys + cols[:, None] * DH + offs_d[None, :], mask=col_mask[:, None] & d_mask[None, :], other=0.0)
    if DOT_FP32:
        s = tl.dot(q.to(tl.float32), tl.trans(c.to(tl.float32)), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(c))  # bf16/fp16 products are exact in the fp32 accumulator
    p = tl.where(col_mask[None, :], pack(s, cols[None, :]), sentinel(BLOCK_M, BLOCK_N))
    best = tl.topk(p, KP)
    out = ((rows.to(tl.int64) * H + h) * 2 + half)[:, None] * (n_tiles * KP) + tile * KP + tl.arange(0, KP)[None, :]
    tl.store(cand_ptr + out, best, mask=row_mask[:, None])


@triton.jit
def _half_best(cand_ptr, rows, row_mask, half, n_tiles, KP: tl.constexpr, NC: tl.constexpr, BLOCK_R: tl.constexpr):
    """Top-KP (descending packed keys) of one half's n_tiles * KP candidates per row."""
    c = tl.arange(0, NC)
    ptrs = cand_ptr + (rows.to(tl.int64) * 2 + half)[:, None] * (n_tiles * KP) + c[None, :]
    vals = tl.load(ptrs, mask=row_mask[:, None] & (c < n_tiles * KP)[None, :], other=sentinel(BLOCK_R, NC))
    return tl.topk(vals, KP)


@triton.jit
def _tile_merge_kernel(
    cand_ptr, scores_ptr, idx_ptr, R, n, n_tiles, top_k,
    KP: tl.constexpr, NC: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """Rows r = t * H + h: each half's top-KP from its tiles, then the top-k of the KP * KP pair sums."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < R
    run1 = _half_best(cand_ptr, rows, row_mask, 0, n_tiles, KP, NC, BLOCK_R)
    run2 = _half_best(cand_ptr, rows, row_mask, 1, n_tiles, KP, NC, BLOCK_R)
    s1, a = unpack(run1)
    s2, b = unpack(run2)
    p = pack(s1[:, :, None] + s2[:, None, :], a[:, :, None] * n + b[:, None, :])
    # a half can hold fewer than KP real entries (n < KP); sentinels must stay out
    sent = sentinel(BLOCK_R, KP)
    valid = (run1 > sent)[:, :, None] & (run2 > sent)[:, None, :]
    p = tl.where(valid, p, tl.full((BLOCK_R, KP, KP), -2147483647, tl.int64) << 32)
    score, expert = unpack(tl.topk(tl.reshape(p, (BLOCK_R, KP * KP)), KP))
    cols = tl.arange(0, KP)
    out = rows.to(tl.int64)[:, None] * top_k + cols[None, :]
    mask = row_mask[:, None] & (cols[None, :] < top_k)
    tl.store(scores_ptr + out, score, mask=mask)
    tl.store(idx_ptr + out, expert.to(tl.int64), mask=mask)


def launch_split(
    queries: torch.Tensor, sub_keys: torch.Tensor, top_k: int, config: RetrievalKernelConfig = DEFAULT_CONFIG
):
    """The "split" forward -> scores (T, H, top_k) fp32, indices (T, H, top_k) int64."""
    T, H, d_key = queries.shape
    n = sub_keys.shape[2]
    dh = d_key // 2
    kp = max(2, next_pow2(top_k))
    dev = queries.device
    scores = torch.empty((T, H, top_k), device=dev, dtype=torch.float32)
    indices = torch.empty((T, H, top_k), device=dev, dtype=torch.int64)
    if T == 0:
        return scores, indices
    block_m, block_n, warps = (16, 16, 4) if triton_interpreting() else config.split
    block_n = max(block_n, kp, 16)
    block_r, merge_warps = (4, 4) if triton_interpreting() else config.split_merge
    n_tiles = triton.cdiv(n, block_n)
    cand = torch.empty((T * H * 2, n_tiles, kp), device=dev, dtype=torch.int64)
    _tile_topk_kernel[(n_tiles, H * 2, triton.cdiv(T, block_m))](
        queries, sub_keys.contiguous(), cand, T, H, n, n_tiles, *queries.stride(),
        PER_HEAD=sub_keys.shape[0] > 1, DH=dh, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=max(16, next_pow2(dh)), KP=kp, DOT_FP32=dot_fp32(queries, sub_keys), num_warps=warps,
    )  # fmt: skip
    _tile_merge_kernel[(triton.cdiv(T * H, block_r),)](
        cand, scores, indices, T * H, n, n_tiles, top_k,
        KP=kp, NC=max(kp, next_pow2(n_tiles * kp)), BLOCK_R=block_r, num_warps=merge_warps,
    )  # fmt: skip
    return scores, indices
