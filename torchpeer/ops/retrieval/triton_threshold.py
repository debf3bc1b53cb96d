"""The "threshold" forward of the Triton retrieval (the default for bf16/fp16 inputs), three kernels.

1. `_half_threshold_kernel`, one (row block, head, half) work item at a time: the sub-key scores
   s = q_half @ C^T are computed twice (tensor cores; bf16 products are exact in fp32, so both
   passes give the same bits). Pass 1 keeps only an elementwise running max over the BLOCK_N-wide
   tiles: column j of it is the max of the "strided group" {j, j + BLOCK_N, ...}. theta = the k-th
   largest of those BLOCK_N group maxima is a lower bound on the k-th largest score (k distinct
   groups each hold a score >= theta). Pass 2 writes the scores >= theta (typically k..2k of the
   n = 1024) into a per-program scratch slab of CAP slots (position = running count + cumsum of
   the keep mask), and one tl.topk over CAP slots sorts them. So the expensive int64 sorting
   network runs on CAP slots instead of n. A work item with a row of more than CAP candidates
   (heavy ties, e.g. repeated key rows) sets a flag; `_half_fallback_kernel` redoes flagged items
   with the running top-k of triton_common.half_topk.
2. `_pair_topk_kernel`: with both half lists sorted descending, pair (i, j) (0-based ranks) is
   beaten or tied by the (i+1)(j+1) - 1 pairs (i' <= i, j' <= j), so only pairs with
   (i+1)(j+1) <= k can be in the top-k (50 of the 256 for k = 16). Ties keep the same answer: a
   dominating pair with an equal sum has equal half scores and no larger a, b, hence no larger
   expert index, so it also wins the (score, -index) order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from torchpeer.ops.dispatch import triton_interpreting

from .kernel_config import DEFAULT_CONFIG, RetrievalKernelConfig
from .triton_common import INTERP_PROGRAMS, dot_fp32, half_topk, next_pow2, num_sms, pack, sentinel, unpack


@triton.jit
def _score_tile(
    q, k_ptr, n0, n, DH: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr
):
    """(BLOCK_M, BLOCK_N) fp32 scores of q against sub-keys n0 .. n0 + BLOCK_N, and their columns."""
    cols = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    c = tl.load(
        k_ptr + cols[:, None] * DH + offs_d[None, :],
        mask=(cols < n)[:, None] & (offs_d < DH)[None, :],
        other=0.0,
    )
    if DOT_FP32:
        s = tl.dot(q, tl.trans(c.to(tl.float32)), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(c))
    return s, cols


@triton.jit
def _load_half_query(
    q_ptr, rows, row_mask, h, half, stride_qt, stride_qh, stride_qd,
    DH: tl.constexpr, BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr,
):  # fmt: skip
    offs_d = tl.arange(0, BLOCK_D)
    ptrs = q_ptr + rows.to(tl.int64)[:, None] * stride_qt + h * stride_qh + (half * DH + offs_d)[None, :] * stride_qd
    q = tl.load(ptrs, mask=row_mask[:, None] & (offs_d < DH)[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    return q


@triton.jit
def _store_half_list(best, top_s_ptr, top_i_ptr, rows, row_mask, h, half, H, KP: tl.constexpr):
    """best: (BLOCK_M, KP) packed, descending -> rows of the (T*H, 2, KP) half lists."""
    score, idx = unpack(best)
    out = (rows.to(tl.int64)[:, None] * H + h) * (2 * KP) + half * KP + tl.arange(0, KP)[None, :]
    tl.store(top_s_ptr + out, score, mask=row_mask[:, None])
    tl.store(top_i_ptr + out, idx, mask=row_mask[:, None])


@triton.jit
def _half_threshold_kernel(
    q_ptr, k_ptr, top_s_ptr, top_i_ptr, scratch_ptr, flag_ptr, T, H, n, top_k, n_work, stride_qt, stride_qh,
    stride_qd,
    PER_HEAD: tl.constexpr, DH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, KP: tl.constexpr, CAP: tl.constexpr, DOT_FP32: tl.constexpr,
    THETA_TOPK: tl.constexpr,
):  # fmt: skip
    """Persistent: work item w = (row block, head, half); writes that half's sorted top-KP."""
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, KP)
    offs_cap = tl.arange(0, CAP)
    # this program's candidate slab: (BLOCK_M, CAP) packed keys, reused by every work item
    slab = scratch_ptr + pid.to(tl.int64) * (BLOCK_M * CAP) + offs_m[:, None] * CAP
    for w in range(pid, n_work, tl.num_programs(0)):
        half = w % 2
        h = (w // 2) % H
        rows = (w // (2 * H)) * BLOCK_M + offs_m
        row_mask = rows < T
        s_set = h if PER_HEAD else 0
        keys = k_ptr + (s_set * 2 + half) * n * DH  # sub_keys is contiguous (S, 2, n, DH)
        q = _load_half_query(q_ptr, rows, row_mask, h, half, stride_qt, stride_qh, stride_qd, DH, BLOCK_D, DOT_FP32)

        # pass 1: strided-group maxima -> theta <= k-th largest score of each row
        gmax = tl.full((BLOCK_M, BLOCK_N), float("-inf"), tl.float32)
        for n0 in range(0, n, BLOCK_N):
            s, cols = _score_tile(q, keys, n0, n, DH, BLOCK_N, BLOCK_D, DOT_FP32)
            gmax = tl.maximum(gmax, tl.where((cols < n)[None, :], s, float("-inf")))
        # (n >= top_k real groups: every column is a group of its own when n < BLOCK_N)
        if THETA_TOPK:
            top_g = tl.topk(gmax, KP)  # descending
            theta = tl.min(tl.where(offs_k[None, :] < top_k, top_g, float("inf")), axis=1)
        else:
            # top_k rounds of "take the max, drop it": equal maxima drop together, which only
            # lowers theta (still a valid bound, a few more candidates)
            theta = tl.max(gmax, axis=1)
            for _ in range(1, top_k):
                gmax = tl.where(gmax >= theta[:, None], float("-inf"), gmax)
                theta = tl.minimum(theta, tl.max(gmax, axis=1))

        # pass 2: the same scores again; compact those >= theta into the slab
        cnt = tl.zeros((BLOCK_M,), tl.int32)
        for n0 in range(0, n, BLOCK_N):
            s, cols = _score_tile(q, keys, n0, n, DH, BLOCK_N, BLOCK_D, DOT_FP32)
            keep = (s >= theta[:, None]) & (cols < n)[None, :] & row_mask[:, None]
            keep_i = keep.to(tl.int32)
            pos = cnt[:, None] + tl.cumsum(keep_i, axis=1) - 1
            tl.store(slab + pos, pack(s, cols[None, :]), mask=keep & (pos < CAP))
            cnt += tl.sum(keep_i, axis=1)
        tl.debug_barrier()  # the slab's stores, made by other threads, are visible after this
        cand = tl.load(slab + offs_cap[None, :], mask=offs_cap[None, :] < cnt[:, None], other=sentinel(BLOCK_M, CAP))
        best = tl.topk(cand, KP)
        tl.debug_barrier()  # every thread has read the slab before the next item overwrites it
        tl.store(flag_ptr + w, (tl.max(cnt, axis=0) > CAP).to(tl.int32))
        _store_half_list(best, top_s_ptr, top_i_ptr, rows, row_mask, h, half, H, KP)


@triton.jit
def _half_fallback_kernel(
    q_ptr, k_ptr, top_s_ptr, top_i_ptr, flag_ptr, T, H, n, stride_qt, stride_qh, stride_qd,
    PER_HEAD: tl.constexpr, DH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, KP: tl.constexpr, DOT_FP32: tl.constexpr,
):  # fmt: skip
    """Redo the work items whose candidates overflowed CAP, with the running top-KP."""
    w = tl.program_id(0)
    if tl.load(flag_ptr + w) != 0:
        half = w % 2
        h = (w // 2) % H
        rows = (w // (2 * H)) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < T
        s_set = h if PER_HEAD else 0
        keys = k_ptr + (s_set * 2 + half) * n * DH
        q_rows = q_ptr + rows.to(tl.int64)[:, None] * stride_qt + h * stride_qh + half * DH * stride_qd
        running = half_topk(q_rows, stride_qd, row_mask, keys, n, DH, BLOCK_M, BLOCK_N, BLOCK_D, KP, DOT_FP32)
        best = tl.sort(running, descending=True)
        _store_half_list(best, top_s_ptr, top_i_ptr, rows, row_mask, h, half, H, KP)


@triton.jit
def _pair_topk_kernel(
    top_s_ptr, top_i_ptr, pi_ptr, pj_ptr, scores_ptr, idx_ptr, R, n, top_k, n_pairs,
    KP: tl.constexpr, NCP: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """Rows r = t * H + h: top-k of s1[i] + s2[j] over the pairs (i, j) with (i+1)(j+1) <= k."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < R
    c = tl.arange(0, NCP)
    c_mask = c < n_pairs
    pi = tl.load(pi_ptr + c, mask=c_mask, other=0)
    pj = tl.load(pj_ptr + c, mask=c_mask, other=0)
    base = rows.to(tl.int64)[:, None] * (2 * KP)
    m = row_mask[:, None] & c_mask[None, :]
    s1 = tl.load(top_s_ptr + base + pi[None, :], mask=m, other=0.0)
    s2 = tl.load(top_s_ptr + base + KP + pj[None, :], mask=m, other=0.0)
    a = tl.load(top_i_ptr + base + pi[None, :], mask=m, other=0)
    b = tl.load(top_i_ptr + base + KP + pj[None, :], mask=m, other=0)
    p = tl.where(m, pack(s1 + s2, a * n + b), sentinel(BLOCK_M, NCP))
    score, expert = unpack(tl.topk(p, KP))
    cols = tl.arange(0, KP)
    out = rows.to(tl.int64)[:, None] * top_k + cols[None, :]
    mask = row_mask[:, None] & (cols[None, :] < top_k)
    tl.store(scores_ptr + out, score, mask=mask)
    tl.store(idx_ptr + out, expert.to(tl.int64), mask=mask)


_PAIRS: dict = {}


def pair_lists(top_k: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Ranks (i, j) with (i+1)(j+1) <= top_k: the only pairs that can make the top-k."""
    key = (top_k, str(device))
    if key not in _PAIRS:
        pairs = [(i, j) for i in range(top_k) for j in range(top_k) if (i + 1) * (j + 1) <= top_k]
        pi = torch.tensor([p[0] for p in pairs], dtype=torch.int32, device=device)
        pj = torch.tensor([p[1] for p in pairs], dtype=torch.int32, device=device)
        _PAIRS[key] = (pi, pj)
    return _PAIRS[key]


def half_lists(
    queries: torch.Tensor, sub_keys: torch.Tensor, top_k: int, config: RetrievalKernelConfig = DEFAULT_CONFIG
):
    """Stage 1 of "threshold": each half's top-KP, sorted descending.

    Returns top_s (T*H, 2, KP) fp32, top_i (T*H, 2, KP) int32 (row t * H + h), and flags
    (n_work,) int32: 1 where a work item overflowed CAP and was redone by the fallback kernel.
    """
    T, H, d_key = queries.shape
    n = sub_keys.shape[2]
    dh = d_key // 2
    dev = queries.device
    kp = max(2, next_pow2(top_k))
    use_fp32 = dot_fp32(queries, sub_keys)
    interp = triton_interpreting()
    block_m, block_n, num_warps, cap, per_sm = (32, 16, 4, 16, 0) if interp else config.threshold_launch(kp, use_fp32)
    block_n = max(block_n, kp, 16)
    cap = max(next_pow2(cap), kp)
    block_d = max(16, next_pow2(dh))
    keys = sub_keys.contiguous()
    per_head = sub_keys.shape[0] > 1
    n_work = triton.cdiv(T, block_m) * H * 2
    programs = INTERP_PROGRAMS if interp else num_sms(dev) * per_sm
    programs = max(1, min(n_work, programs))
    top_s = torch.empty((T * H, 2, kp), device=dev, dtype=torch.float32)
    top_i = torch.empty((T * H, 2, kp), device=dev, dtype=torch.int32)
    scratch = torch.empty((programs, block_m, cap), device=dev, dtype=torch.int64)
    flags = torch.empty((n_work,), device=dev, dtype=torch.int32)
    strides = (queries.stride(0), queries.stride(1), queries.stride(2))
    _half_threshold_kernel[(programs,)](
        queries, keys, top_s, top_i, scratch, flags, T, H, n, top_k, n_work, *strides,
        PER_HEAD=per_head, DH=dh, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, KP=kp, CAP=cap,
        DOT_FP32=use_fp32, THETA_TOPK=config.theta == "topk", num_warps=num_warps,
    )  # fmt: skip
    # items whose rows had more than CAP candidates (ties); a no-op program per clean item
    _half_fallback_kernel[(n_work,)](
        queries, keys, top_s, top_i, flags, T, H, n, *strides,
        PER_HEAD=per_head, DH=dh, BLOCK_M=block_m, BLOCK_N=max(kp, 16 if interp else 64),
        BLOCK_D=block_d, KP=kp, DOT_FP32=use_fp32, num_warps=4 if interp else 8,
    )  # fmt: skip
    return top_s, top_i, flags


def pair_merge(
    top_s: torch.Tensor, top_i: torch.Tensor, T: int, H: int, n: int, top_k: int,
    config: RetrievalKernelConfig = DEFAULT_CONFIG,
):  # fmt: skip
    """Stage 2 of "threshold": top-k of the pruned pair sums -> scores, indices (T, H, top_k)."""
    dev = top_s.device
    kp = top_s.shape[-1]
    scores = torch.empty((T, H, top_k), device=dev, dtype=torch.float32)
    indices = torch.empty((T, H, top_k), device=dev, dtype=torch.int64)
    pi, pj = pair_lists(top_k, dev)
    n_pairs = pi.numel()
    block, warps = (16, 4) if triton_interpreting() else config.pair
    _pair_topk_kernel[(triton.cdiv(T * H, block),)](
        top_s, top_i, pi, pj, scores, indices, T * H, n, top_k, n_pairs,
        KP=kp, NCP=max(kp, next_pow2(n_pairs)), BLOCK_M=block, num_warps=warps,
    )  # fmt: skip
    return scores, indices


def launch_threshold(
    queries: torch.Tensor, sub_keys: torch.Tensor, top_k: int, config: RetrievalKernelConfig = DEFAULT_CONFIG
):
    """The "threshold" forward -> scores (T, H, top_k) fp32, indices (T, H, top_k) int64."""
    T, H, _ = queries.shape
    if T == 0:
        empty = torch.empty((T, H, top_k), device=queries.device)
        return empty, empty.long()
    top_s, top_i, _ = half_lists(queries, sub_keys, top_k, config)
    return pair_merge(top_s, top_i, T, H, sub_keys.shape[2], top_k, config)
