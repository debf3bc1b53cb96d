"""Triton product-key retrieval: exact top-k over n*n product keys without the (T, H, n*n) scores.

A PEER query q (d_key) is split in two halves q1, q2. Expert i = a * n + b has key
[C[a] ; C'[b]] (C, C' = the two sub-key tables, n rows each), so its score is
q1.C[a] + q2.C'[b]. The top-k over all n*n experts is the top-k of the sums formed from the
top-k of each half (any expert outside that set is beaten by k candidates).

Forward, "threshold" implementation (the default for bf16/fp16 inputs), three kernels:
  1. `_half_threshold_kernel`, one (row block, head, half) work item at a time: the sub-key
     scores s = q_half @ C^T are computed twice (tensor cores; bf16 products are exact in fp32,
     so both passes give the same bits). Pass 1 keeps only an elementwise running max over the
     BLOCK_N-wide tiles: column j of it is the max of the "strided group" {j, j + BLOCK_N, ...}.
     theta = the k-th largest of those BLOCK_N group maxima is a lower bound on the k-th
     largest score (k distinct groups each hold a score >= theta). Pass 2 writes the scores
     >= theta (typically k..2k of the n = 1024) into a per-program scratch slab of CAP slots
     (position = running count + cumsum of the keep mask), and one tl.topk over CAP slots
     sorts them. So the expensive int64 sorting network runs on CAP slots instead of n.
     A work item with a row of more than CAP candidates (heavy ties, e.g. repeated key rows)
     sets a flag; `_half_fallback_kernel` redoes flagged items with the running top-k below.
  2. `_pair_topk_kernel`: with both half lists sorted descending, pair (i, j) (0-based ranks)
     is beaten or tied by the (i+1)(j+1) - 1 pairs (i' <= i, j' <= j), so only pairs with
     (i+1)(j+1) <= k can be in the top-k (50 of the 256 for k = 16). Ties keep the same
     answer: a dominating pair with an equal sum has equal half scores and no larger a, b,
     hence no larger expert index, so it also wins the (score, -index) order below.
The "merge" implementation (`_product_key_topk_kernel`; the default for fp32 inputs, whose fp32
dots the threshold kernel would do twice) does the whole search per (row block, head) with
tl.topk over every BLOCK_N tile plus bitonic merges.

Selection works on packed int64 keys: the high 32 bits are the fp32 score mapped to an
int32 with the same order, the low 32 bits hold (2**31 - 1 - index). One integer compare
then orders by score and breaks ties towards the smaller index, and sorting/top-k moves
scores and indices together (Triton's tl.topk / tl.bitonic_merge take one tensor).

Backward: with ds = dL/dscores and (a_k, b_k) the halves of the selected experts,
    dq[t,h] = sum_k ds[t,h,k] * [C[a_k] ; C'[b_k]],   dC[a] += ds * q1,   dC'[b] += ds * q2.
"dense" (default): the (rows, n) matrix G[r, a] = sum_{k: a_k = a} ds[r, k] built by scatter_add
per token chunk, then dq_half = G @ C and dC = G^T @ q_half (TF32 matmuls). "triton":
`_dq_kernel` gathers the k sub-key rows per (token, head) (the tables are L2-resident);
`_dkeys_kernel` builds G one (BLOCK_R, BLOCK_A) tile at a time in registers and accumulates
G^T @ q_half with tl.dot into per-split partial sums (deterministic, no (rows, n) matrix in
memory) -- measured 6x slower than "dense". "hybrid": `_dq_kernel` + the dense dC.

Selecting implementations: FORWARD_IMPL ("auto" | "threshold" | "merge") and BACKWARD_IMPL
("dense" | "hybrid" | "triton"), from the environment variables TORCHPEER_RETRIEVAL_FWD /
TORCHPEER_RETRIEVAL_BWD or set on this module. H200, T=65536, H=8, n=1024, d_key=128, k=16,
bf16: forward 5.9 ms ("merge" 15.4), backward 5.0 ms ("dense"; "triton" 29.8); benchmarks/NOTES_retrieval.md.
The default backward is "hybrid" (see BACKWARD_IMPL).
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

__all__ = ["product_key_topk_triton", "product_key_topk_bruteforce", "HAS_TRITON", "FORWARD_IMPLS", "BACKWARD_IMPLS"]

# "auto": "merge" for fp32 (or mixed-dtype) inputs with top_k <= 16, where its single pass of fp32
# dots wins (H200, T=16384: 7.8 vs 10.7 ms), else "threshold" (bf16, T=65536: 5.9 vs 15.4 ms).
FORWARD_IMPLS = ("auto", "threshold", "merge")
# "dense" is the measured fastest (5.0 ms at T=65536); "hybrid" (dq by the gather kernel, 0.4 ms,
# dkeys by the dense path) is predicted faster but not yet measured; "triton" measured 29.8 ms.
BACKWARD_IMPLS = ("dense", "hybrid", "triton")
FORWARD_IMPL = os.environ.get("TORCHPEER_RETRIEVAL_FWD", "auto")
# "hybrid" is the default: in one H200 run of benchmarks/peer_layer.py (2026-11-28) the whole layer's
# fwd+bwd at d=1024 took 33.1 ms with it against 34.4 ms with "dense" at 65536 tokens (9.8 vs 10.3 ms
# at 16384); benchmarks/results/peer_layer_2026-11-28*.json.
BACKWARD_IMPL = os.environ.get("TORCHPEER_RETRIEVAL_BWD", "hybrid")

# The kernels hold (BLOCK_M, KP * KP) int64 candidates ("merge") or pair lists of ~k ln k
# ("threshold") in registers; above this KP the PyTorch implementation (torchpeer.product_keys)
# is used instead.
MAX_KERNEL_KP = 32
# "dense" backward chunks hold a (rows, n) fp32 matrix; cap it at this many elements (256 MiB).
_BWD_CHUNK_ELEMS = 1 << 26
_IDX_MAX = 2**31 - 1

# "merge" launch tuning (BLOCK_M, BLOCK_N, num_warps). Measured on one H200 (triton 3.6, T=65536,
# H=8, n=1024, d_key=128, top_k=16, forward only): bf16 (64, 128, 16) 15.5 ms, (64, 64, 16) 25.0,
# (32, 64, 16) 32.5, (32, 128, 16) 48.8, (16, 64, 4) 37.6; fp32 (16, 64, 4) 31.3; top_k=32
# (16, 64, 8) 64.3. "half": bf16/fp16 queries and keys with top_k <= 16; "fp32": any other dtype
# mix; "wide": 16 < top_k <= 32. Mutable on purpose: benchmarks/peer_layer.py sweeps it.
TUNING = {"half": (64, 128, 16), "fp32": (16, 64, 4), "wide": (16, 64, 8)}
# "threshold" launch tuning (BLOCK_M, BLOCK_N, num_warps, CAP, programs per SM), keyed like TUNING.
# CAP: candidate slots per row (power of two >= KP). With Gaussian scores, n = 1024, k = 16 and
# BLOCK_N = 64 the candidate count has mean 18 and max 28 over 20000 rows. H200, T=65536, bf16:
# (64, 64, 4, 64, 8) 5.94 ms, CAP 32 5.67 (kept 64: twice the observed max before a work item
# falls back), (64, 64, 4, 64, 4) 5.97, (128, 64, 8, 64, 4) 6.28, (32, 64, 4, 64, 8) 6.65,
# (64, 128, 4, 64, 8) 6.74, (64, 64, 8, 64, 8) 7.33. fp32 and wide: untuned (fp32 T=16384: 10.7 ms;
# top_k=32 bf16 T=16384: 3.0 ms against 16.3 for "merge").
THRESH_TUNING = {"half": (64, 64, 4, 64, 8), "fp32": (32, 64, 4, 64, 8), "wide": (32, 64, 4, 128, 8)}
# How the threshold kernel finds the k-th largest group maximum: "topk" (tl.topk of BLOCK_N floats)
# or "max" (top_k rounds of max + drop; also much faster under the interpreter). Same speed on an
# H200 (5.67 vs 5.68 ms).
THRESH_THETA = "max"
# Stage 2 (pairs) and backward: (BLOCK, num_warps); dkeys: (BLOCK_A, BLOCK_R, num_warps, programs per SM).
# H200, T=65536: dq (32, 4) 0.37 ms, (64, 4) 0.43, (128, 8) 0.44; dkeys (128, 32, 4, 4) 28.7 ms,
# (128, 64, 8, 4) 29.6, (64, 64, 4, 4) 30.6, (256, 64, 8, 2) 40.0, (128, 64, 4, 8) 96.6.
PAIR_TUNING = (64, 4)
DQ_TUNING = (32, 4)
DKEYS_TUNING = (128, 32, 4, 4)
# persistent programs of the threshold kernel under the interpreter (small: exercises the loop)
_INTERP_PROGRAMS = 3


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _num_sms(device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


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

    # ----------------------------------------------------------------------- threshold forward

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
        q_ptr,
        rows,
        row_mask,
        h,
        half,
        stride_qt,
        stride_qh,
        stride_qd,
        DH: tl.constexpr,
        BLOCK_D: tl.constexpr,
        DOT_FP32: tl.constexpr,
    ):
        offs_d = tl.arange(0, BLOCK_D)
        ptrs = (
            q_ptr + rows.to(tl.int64)[:, None] * stride_qt + h * stride_qh + (half * DH + offs_d)[None, :] * stride_qd
        )
        q = tl.load(ptrs, mask=row_mask[:, None] & (offs_d < DH)[None, :], other=0.0)
        if DOT_FP32:
            q = q.to(tl.float32)
        return q

    @triton.jit
    def _store_half_list(best, top_s_ptr, top_i_ptr, rows, row_mask, h, half, H, KP: tl.constexpr):
        """best: (BLOCK_M, KP) packed, descending -> rows of the (T*H, 2, KP) half lists."""
        score, idx = _unpack(best)
        out = (rows.to(tl.int64)[:, None] * H + h) * (2 * KP) + half * KP + tl.arange(0, KP)[None, :]
        tl.store(top_s_ptr + out, score, mask=row_mask[:, None])
        tl.store(top_i_ptr + out, idx, mask=row_mask[:, None])

    @triton.jit
    def _half_threshold_kernel(
        q_ptr,
        k_ptr,
        top_s_ptr,
        top_i_ptr,
        scratch_ptr,
        flag_ptr,
        T,
        H,
        n,
        top_k,
        n_work,
        stride_qt,
        stride_qh,
        stride_qd,
        PER_HEAD: tl.constexpr,
        DH: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        KP: tl.constexpr,
        CAP: tl.constexpr,
        DOT_FP32: tl.constexpr,
        THETA_TOPK: tl.constexpr,
    ):
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
                tl.store(slab + pos, _pack(s, cols[None, :]), mask=keep & (pos < CAP))
                cnt += tl.sum(keep_i, axis=1)
            tl.debug_barrier()  # the slab's stores, made by other threads, are visible after this
            cand = tl.load(
                slab + offs_cap[None, :], mask=offs_cap[None, :] < cnt[:, None], other=_sentinel(BLOCK_M, CAP)
            )
            best = tl.topk(cand, KP)
            tl.debug_barrier()  # every thread has read the slab before the next item overwrites it
            tl.store(flag_ptr + w, (tl.max(cnt, axis=0) > CAP).to(tl.int32))
            _store_half_list(best, top_s_ptr, top_i_ptr, rows, row_mask, h, half, H, KP)

    @triton.jit
    def _half_fallback_kernel(
        q_ptr,
        k_ptr,
        top_s_ptr,
        top_i_ptr,
        flag_ptr,
        T,
        H,
        n,
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
            running = _half_topk(q_rows, stride_qd, row_mask, keys, n, DH, BLOCK_M, BLOCK_N, BLOCK_D, KP, DOT_FP32)
            best = tl.sort(running, descending=True)
            _store_half_list(best, top_s_ptr, top_i_ptr, rows, row_mask, h, half, H, KP)

    @triton.jit
    def _pair_topk_kernel(
        top_s_ptr,
        top_i_ptr,
        pi_ptr,
        pj_ptr,
        scores_ptr,
        idx_ptr,
        R,
        n,
        top_k,
        n_pairs,
        KP: tl.constexpr,
        NCP: tl.constexpr,
        BLOCK_M: tl.constexpr,
    ):
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
        p = tl.where(m, _pack(s1 + s2, a * n + b), _sentinel(BLOCK_M, NCP))
        score, expert = _unpack(tl.topk(p, KP))
        cols = tl.arange(0, KP)
        out = rows.to(tl.int64)[:, None] * top_k + cols[None, :]
        mask = row_mask[:, None] & (cols[None, :] < top_k)
        tl.store(scores_ptr + out, score, mask=mask)
        tl.store(idx_ptr + out, expert.to(tl.int64), mask=mask)

    # ----------------------------------------------------------------------- triton backward

    @triton.jit
    def _dq_kernel(
        ds_ptr,
        sub_ptr,
        k_ptr,
        dq_ptr,
        R,
        H,
        n,
        stride_dt,
        stride_dh,
        stride_dd,
        PER_HEAD: tl.constexpr,
        K: tl.constexpr,
        DH: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """dq[t, h, half] = sum_k ds[t, h, k] * C_half[sub[half, t, h, k]] (rows r = t * H + h)."""
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_mask = rows < R
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < DH
        t = rows // H
        h = rows % H
        s_set = h if PER_HEAD else 0
        for half in tl.static_range(2):
            acc = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
            for k in tl.static_range(K):
                g = tl.load(ds_ptr + rows * K + k, mask=row_mask, other=0.0)
                j = tl.load(sub_ptr + (half * R + rows) * K + k, mask=row_mask, other=0)
                key_row = (s_set * 2 + half) * n + j
                c = tl.load(
                    k_ptr + key_row.to(tl.int64)[:, None] * DH + offs_d[None, :],
                    mask=row_mask[:, None] & d_mask[None, :],
                    other=0.0,
                )
                acc += g[:, None] * c.to(tl.float32)
            out = (
                dq_ptr
                + t.to(tl.int64)[:, None] * stride_dt
                + h[:, None] * stride_dh
                + (half * DH + offs_d)[None, :] * stride_dd
            )
            tl.store(out, acc.to(dq_ptr.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])

    @triton.jit
    def _dkeys_kernel(
        ds_ptr,
        sub_ptr,
        q_ptr,
        part_ptr,
        T,
        H,
        n,
        rows_per_split,
        stride_qt,
        stride_qh,
        stride_qd,
        PER_HEAD: tl.constexpr,
        K: tl.constexpr,
        DH: tl.constexpr,
        BLOCK_A: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_D: tl.constexpr,
        DOT_FP32: tl.constexpr,
    ):
        """part[split, s, half, a] = sum over this split's rows r of G[r, a] * q_half[r], where
        G[r, a] = sum_{k: sub[half, r, k] = a} ds[r, k]; rows are (t, h) pairs that use key set s."""
        a_tile = tl.program_id(0)
        split = tl.program_id(1)
        sh = tl.program_id(2)
        s_set = sh // 2
        half = sh % 2
        R = T * H
        n_rows = T if PER_HEAD else R
        acols = a_tile * BLOCK_A + tl.arange(0, BLOCK_A)
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < DH
        acc = tl.zeros((BLOCK_A, BLOCK_D), tl.float32)
        r_start = split * rows_per_split
        r_end = tl.minimum(r_start + rows_per_split, n_rows)
        for r0 in range(r_start, r_end, BLOCK_R):
            local = r0 + tl.arange(0, BLOCK_R)
            m = local < r_end
            if PER_HEAD:
                rows = local * H + s_set  # row t * H + h with h = s_set
            else:
                rows = local
            t = rows // H
            h = rows % H
            q_ptrs = (
                q_ptr
                + t.to(tl.int64)[:, None] * stride_qt
                + h[:, None] * stride_qh
                + (half * DH + offs_d)[None, :] * stride_qd
            )
            q = tl.load(q_ptrs, mask=m[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
            G = tl.zeros((BLOCK_R, BLOCK_A), tl.float32)
            for k in tl.static_range(K):
                g = tl.load(ds_ptr + rows * K + k, mask=m, other=0.0)
                j = tl.load(sub_ptr + (half * R + rows) * K + k, mask=m, other=0)
                G += tl.where(j[:, None] == acols[None, :], g[:, None], 0.0)
            if DOT_FP32:
                acc += tl.dot(tl.trans(G), q, input_precision="ieee")
            else:
                acc += tl.dot(tl.trans(G), q, input_precision="tf32")
        out = part_ptr + ((split * tl.num_programs(2) + sh) * n + acols.to(tl.int64))[:, None] * DH + offs_d[None, :]
        tl.store(out, acc, mask=(acols < n)[:, None] & d_mask[None, :])


def _kernel_config(kp: int, dot_fp32: bool) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of the "merge" kernel for a padded top-k of kp, from TUNING."""
    if _interpreting():  # numpy emulation: the smallest legal tiles are the fastest
        return 16, 16, 4
    if kp > 16:
        return TUNING["wide"]
    return TUNING["fp32"] if dot_fp32 else TUNING["half"]


def _dot_fp32(queries: torch.Tensor, sub_keys: torch.Tensor) -> bool:
    # bf16/fp16 x bf16/fp16 products are exact in the fp32 accumulator (tensor cores); any other
    # mix is done in fp32 ("ieee", not tf32). The interpreter's half-precision dot is broken
    # (it multiplies the raw uint16 storage), so it always takes the fp32 path.
    half = (torch.bfloat16, torch.float16)
    return _interpreting() or not (queries.dtype == sub_keys.dtype and queries.dtype in half)


def _launch(queries: torch.Tensor, sub_keys: torch.Tensor, top_k: int, config=None):
    """The "merge" forward: one kernel, running top-KP per half + all KP*KP pair sums."""
    T, H, d_key = queries.shape
    n = sub_keys.shape[2]
    dh = d_key // 2
    kp = max(2, _next_pow2(top_k))
    dot_fp32 = _dot_fp32(queries, sub_keys)
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


_PAIRS: dict = {}


def _pair_lists(top_k: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Ranks (i, j) with (i+1)(j+1) <= top_k: the only pairs that can make the top-k."""
    key = (top_k, str(device))
    if key not in _PAIRS:
        pairs = [(i, j) for i in range(top_k) for j in range(top_k) if (i + 1) * (j + 1) <= top_k]
        pi = torch.tensor([p[0] for p in pairs], dtype=torch.int32, device=device)
        pj = torch.tensor([p[1] for p in pairs], dtype=torch.int32, device=device)
        _PAIRS[key] = (pi, pj)
    return _PAIRS[key]


def _threshold_config(kp: int, dot_fp32: bool) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, CAP, programs per SM) of the threshold kernel."""
    if _interpreting():
        return 32, 16, 4, 16, 0
    if kp > 16:
        return THRESH_TUNING["wide"]
    return THRESH_TUNING["fp32"] if dot_fp32 else THRESH_TUNING["half"]


def _half_lists(queries: torch.Tensor, sub_keys: torch.Tensor, top_k: int, config=None):
    """Stage 1 of "threshold": each half's top-KP, sorted descending.

    Returns top_s (T*H, 2, KP) fp32, top_i (T*H, 2, KP) int32 (row t * H + h), and flags
    (n_work,) int32: 1 where a work item overflowed CAP and was redone by the fallback kernel.
    """
    T, H, d_key = queries.shape
    n = sub_keys.shape[2]
    dh = d_key // 2
    dev = queries.device
    kp = max(2, _next_pow2(top_k))
    dot_fp32 = _dot_fp32(queries, sub_keys)
    block_m, block_n, num_warps, cap, per_sm = config or _threshold_config(kp, dot_fp32)
    block_n = max(block_n, kp, 16)
    cap = max(_next_pow2(cap), kp)
    block_d = max(16, _next_pow2(dh))
    keys = sub_keys.contiguous()
    per_head = sub_keys.shape[0] > 1
    n_work = triton.cdiv(T, block_m) * H * 2
    programs = _INTERP_PROGRAMS if _interpreting() else _num_sms(dev) * per_sm
    programs = max(1, min(n_work, programs))
    top_s = torch.empty((T * H, 2, kp), device=dev, dtype=torch.float32)
    top_i = torch.empty((T * H, 2, kp), device=dev, dtype=torch.int32)
    scratch = torch.empty((programs, block_m, cap), device=dev, dtype=torch.int64)
    flags = torch.empty((n_work,), device=dev, dtype=torch.int32)
    strides = (queries.stride(0), queries.stride(1), queries.stride(2))
    _half_threshold_kernel[(programs,)](
        queries, keys, top_s, top_i, scratch, flags, T, H, n, top_k, n_work, *strides,
        PER_HEAD=per_head, DH=dh, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, KP=kp, CAP=cap,
        DOT_FP32=dot_fp32, THETA_TOPK=THRESH_THETA == "topk", num_warps=num_warps,
    )  # fmt: skip
    # items whose rows had more than CAP candidates (ties); a no-op program per clean item
    _half_fallback_kernel[(n_work,)](
        queries, keys, top_s, top_i, flags, T, H, n, *strides,
        PER_HEAD=per_head, DH=dh, BLOCK_M=block_m, BLOCK_N=max(kp, 16 if _interpreting() else 64),
        BLOCK_D=block_d, KP=kp, DOT_FP32=dot_fp32, num_warps=4 if _interpreting() else 8,
    )  # fmt: skip
    return top_s, top_i, flags


def _pair_merge(top_s: torch.Tensor, top_i: torch.Tensor, T: int, H: int, n: int, top_k: int):
    """Stage 2 of "threshold": top-k of the pruned pair sums -> scores, indices (T, H, top_k)."""
    dev = top_s.device
    kp = top_s.shape[-1]
    scores = torch.empty((T, H, top_k), device=dev, dtype=torch.float32)
    indices = torch.empty((T, H, top_k), device=dev, dtype=torch.int64)
    pi, pj = _pair_lists(top_k, dev)
    n_pairs = pi.numel()
    block, warps = (16, 4) if _interpreting() else PAIR_TUNING
    _pair_topk_kernel[(triton.cdiv(T * H, block),)](
        top_s, top_i, pi, pj, scores, indices, T * H, n, top_k, n_pairs,
        KP=kp, NCP=max(kp, _next_pow2(n_pairs)), BLOCK_M=block, num_warps=warps,
    )  # fmt: skip
    return scores, indices


def _launch_threshold(queries: torch.Tensor, sub_keys: torch.Tensor, top_k: int, config=None):
    """The "threshold" forward: per-half candidates >= a group-max bound, then the pruned pair merge."""
    T, H, _ = queries.shape
    if T == 0:
        empty = torch.empty((T, H, top_k), device=queries.device)
        return empty, empty.long()
    top_s, top_i, _ = _half_lists(queries, sub_keys, top_k, config)
    return _pair_merge(top_s, top_i, T, H, sub_keys.shape[2], top_k)


# --------------------------------------------------------------------------- backward


def _backward_dense(ds, queries, sub_keys, indices, need_q, need_k):
    """The "dense" backward: G[r, a] = sum_{k: a_k = a} ds[r, k] per token chunk, then matmuls."""
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


def _backward_triton(ds, queries, sub_keys, indices, need_q, need_k):
    """The "triton" backward: dq by gathering sub-key rows, dkeys by per-split one-hot tl.dot sums."""
    T, H, d_key = queries.shape
    S, _, n, dh = sub_keys.shape
    K = indices.shape[-1]
    dev = queries.device
    R = T * H
    ds = ds.contiguous().float()
    sub = torch.stack((indices // n, indices % n)).to(torch.int32).contiguous()  # (2, T, H, K)
    keys = sub_keys.contiguous()
    block_d = max(16, _next_pow2(dh))
    per_head = S > 1
    dq = dk = None
    if need_q:
        dq = torch.empty_like(queries)
        block_r, warps = (16, 4) if _interpreting() else DQ_TUNING
        _dq_kernel[(triton.cdiv(R, block_r),)](
            ds, sub, keys, dq, R, H, n, dq.stride(0), dq.stride(1), dq.stride(2),
            PER_HEAD=per_head, K=K, DH=dh, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps,
        )  # fmt: skip
    if need_k:
        block_a, block_r, warps, per_sm = (16, 16, 4, 0) if _interpreting() else DKEYS_TUNING
        n_rows = T if per_head else R
        a_tiles = triton.cdiv(n, block_a)
        target = 4 if _interpreting() else _num_sms(dev) * per_sm
        splits = max(1, min(triton.cdiv(n_rows, block_r), target // (a_tiles * S * 2)))
        rows_per_split = triton.cdiv(triton.cdiv(n_rows, block_r), splits) * block_r
        splits = triton.cdiv(n_rows, rows_per_split)
        part = torch.empty((splits, S * 2, n, dh), device=dev, dtype=torch.float32)
        _dkeys_kernel[(a_tiles, splits, S * 2)](
            ds, sub, queries, part, T, H, n, rows_per_split, queries.stride(0), queries.stride(1), queries.stride(2),
            PER_HEAD=per_head, K=K, DH=dh, BLOCK_A=block_a, BLOCK_R=block_r, BLOCK_D=block_d,
            DOT_FP32=_dot_fp32(queries, sub_keys), num_warps=warps,
        )  # fmt: skip
        dk = part.sum(0).view(S, 2, n, dh).to(sub_keys.dtype)
    return dq, dk


def _backward(ds, queries, sub_keys, indices, need_q, need_k, impl=None):
    """Gradients of scores[t,h,k] = q1[t,h].C[a] + q2[t,h].C'[b] (see module docstring)."""
    impl = impl or BACKWARD_IMPL
    if impl not in BACKWARD_IMPLS:
        raise ValueError(f"BACKWARD_IMPL must be one of {BACKWARD_IMPLS}, got {impl!r}")
    if impl == "triton":
        return _backward_triton(ds, queries, sub_keys, indices, need_q, need_k)
    dq = None
    if impl == "hybrid" and need_q:
        dq, _ = _backward_triton(ds, queries, sub_keys, indices, True, False)
        need_q = False
        if not need_k:
            return dq, None
    # The (rows, n) x (n, d_key/2) products per half dominate; for half-precision inputs TF32 tensor
    # cores cut them at the ~1e-3 relative precision such a step has anyway. fp32 inputs keep fp32
    # (TF32 measured 1.8e-3 absolute error on fp32 key gradients on an H200). CUDA only; restored after.
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = queries.dtype in (torch.bfloat16, torch.float16) or prev
    try:
        dq_dense, dk = _backward_dense(ds, queries, sub_keys, indices, need_q, need_k)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    return (dq if dq is not None else dq_dense), dk


def _forward(queries, sub_keys, top_k, impl=None):
    impl = impl or FORWARD_IMPL
    if impl == "auto":
        half = (torch.bfloat16, torch.float16)
        both_half = queries.dtype == sub_keys.dtype and queries.dtype in half
        impl = "merge" if not both_half and top_k <= 16 else "threshold"
    if impl == "threshold":
        return _launch_threshold(queries, sub_keys, top_k)
    if impl == "merge":
        return _launch(queries, sub_keys, top_k)
    raise ValueError(f"FORWARD_IMPL must be one of {FORWARD_IMPLS}, got {impl!r}")


# torch.library custom ops make the kernels opaque to torch.compile (no tracing into the launches,
# no graph breaks; output shapes come from register_fake).


@torch.library.custom_op("torchpeer::product_key_topk_fwd", mutates_args=())
def _topk_fwd_op(queries: torch.Tensor, sub_keys: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(queries, sub_keys, top_k)


@_topk_fwd_op.register_fake
def _(queries, sub_keys, top_k):
    shape = (queries.shape[0], queries.shape[1], top_k)
    return queries.new_empty(shape, dtype=torch.float32), queries.new_empty(shape, dtype=torch.int64)


@torch.library.custom_op("torchpeer::product_key_topk_bwd", mutates_args=())
def _topk_bwd_op(
    d_scores: torch.Tensor,
    queries: torch.Tensor,
    sub_keys: torch.Tensor,
    indices: torch.Tensor,
    need_q: bool,
    need_k: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    dq, dk = _backward(d_scores.contiguous(), queries, sub_keys, indices, need_q, need_k)
    # an op cannot return None: an empty tensor stands for "not needed"
    return (dq if dq is not None else queries.new_empty(0)), (dk if dk is not None else sub_keys.new_empty(0))


@_topk_bwd_op.register_fake
def _(d_scores, queries, sub_keys, indices, need_q, need_k):
    return queries.new_empty(queries.shape if need_q else (0,)), sub_keys.new_empty(sub_keys.shape if need_k else (0,))


def _setup_context(ctx, inputs, output):
    queries, sub_keys, _ = inputs
    _, indices = output
    ctx.save_for_backward(queries, sub_keys, indices)
    ctx.mark_non_differentiable(indices)


def _backward_op(ctx, d_scores, _d_indices):
    queries, sub_keys, indices = ctx.saved_tensors
    need_q, need_k = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_q or need_k):
        return None, None, None
    dq, dk = _topk_bwd_op(d_scores, queries, sub_keys, indices, need_q, need_k)
    return (dq if need_q else None), (dk if need_k else None), None


_topk_fwd_op.register_autograd(_backward_op, setup_context=_setup_context)


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
    return _topk_fwd_op(queries, sub_keys, top_k)


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
