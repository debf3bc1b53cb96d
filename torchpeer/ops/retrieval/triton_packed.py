"""The "packed" forward of the Triton retrieval: "onepass" (triton_onepass.py) with each half's k
selection rounds on 32-bit packed keys, and pass 1/2 without per-element bounds masks.

Why (benchmarks/NOTES_retrieval.md section 8, the sm_90 SASS count of `_onepass_kernel`): per work
item and warp, the half rounds over the CAP candidates are ~5.4K of ~64K instructions, pass 2 (the
compaction) ~42K, pass 1 ~5K (a third of it the `cols < n` select). A round over int64 (score, -index)
keys costs a 64-bit max (2 compares + 2 selects per element) and a 64-bit compare + 2 selects for the
drop; on int32 keys it is one IMNMX and one compare + select.

The 32-bit key of candidate slot c (0 <= c < CAP) of a row: the order-preserving int32 image of its
fp32 score with the low log2(CAP) bits replaced by CAP - 1 - c. The slots hold a row's candidates in
column order, so among equal truncated scores the smaller column wins, as in the exact order. The
rounds are exact unless truncation hides an order: with T(x) the truncated score, W = (w_1..w_k) the
winners in round order and F the best key left after round k, the set W and its order are exactly
those of the (score, -index) order whenever T(w_1) > T(w_2) > ... > T(w_k) > T(F) (if an exact-order
candidate e outside W beat a winner w, then T(w) = T(e) <= T(F) <= T(w_k) <= T(w): contradiction).
That is checked per row; a work item with an ambiguous row (near or exact ties, fewer than k + 1
candidates) redoes the half's rounds on the exact int64 keys (the "onepass" rounds) from the same
candidates. The winners' exact fp32 scores and columns are read back from the slab by slot, so the
half lists, the pair stage (unchanged, int64) and the result equal "onepass", "threshold" and
"merge" bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .kernel_config import DEFAULT_CONFIG, RetrievalKernelConfig
from .triton_common import dot_fp32, half_topk, pack, sentinel, unpack
from .triton_onepass import _pair_stage, _topk_rounds, launch_onepass_family, onepass_launch
from .triton_threshold import _load_half_query, _score_tile

# below the 32-bit key of every non-NaN score (the image of -inf is -2139095041)
SENT32 = tl.constexpr(-2147483648)


@triton.jit
def _mono32(s):
    """fp32 -> int32 with the same order (negative floats: all but the sign bit flipped)."""
    bits = s.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _candidates(
    q, keys, slab_s, slab_i, row_off, row_mask, n,
    DH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, CAP: tl.constexpr,
    top_k, EVEN_N: tl.constexpr, DOT_FP32: tl.constexpr,
):  # fmt: skip
    """Passes 1 and 2 of "onepass" for one half -> cnt (BLOCK_M,) candidates per row; the first
    min(cnt, CAP) of a row are in its slab row (fp32 score, int32 column), in column order."""
    gmax = tl.full((BLOCK_M, BLOCK_N), float("-inf"), tl.float32)
    for n0 in range(0, n, BLOCK_N):
        s, cols = _score_tile(q, keys, n0, n, DH, BLOCK_N, BLOCK_D, DOT_FP32)
        if not EVEN_N:  # n % BLOCK_N == 0 needs no per-element column select
            s = tl.where((cols < n)[None, :], s, float("-inf"))
        gmax = tl.maximum(gmax, s)
    theta = tl.max(gmax, axis=1)
    for _ in range(1, top_k):
        gmax = tl.where(gmax >= theta[:, None], float("-inf"), gmax)
        theta = tl.minimum(theta, tl.max(gmax, axis=1))
    # rows past T keep nothing: one select per row here instead of an AND per score below
    theta = tl.where(row_mask, theta, float("inf"))
    cnt = tl.zeros((BLOCK_M,), tl.int32)
    for n0 in range(0, n, BLOCK_N):
        s, cols = _score_tile(q, keys, n0, n, DH, BLOCK_N, BLOCK_D, DOT_FP32)
        keep = s >= theta[:, None]
        if not EVEN_N:
            keep = keep & (cols < n)[None, :]
        keep_i = keep.to(tl.int32)
        pos = cnt[:, None] + tl.cumsum(keep_i, axis=1) - 1
        ok = keep & (pos < CAP)
        tl.store(slab_s + (row_off + pos), s, mask=ok)
        tl.store(slab_i + (row_off + pos), tl.broadcast_to(cols[None, :], (BLOCK_M, BLOCK_N)), mask=ok)
        cnt += tl.sum(keep_i, axis=1)
    return cnt


@triton.jit
def _packed_rounds(cand_s, in_list, top_k, BLOCK_M: tl.constexpr, CAP: tl.constexpr, KP: tl.constexpr):
    """k rounds of int32 max over the packed keys of (BLOCK_M, CAP) candidates -> slots (BLOCK_M, KP)
    of the winners in order (CAP - 1 past the k-th) and ambiguous (BLOCK_M,): a row whose truncated
    scores of w_1..w_k, F are not strictly decreasing (module docstring)."""
    LOW: tl.constexpr = CAP - 1
    offs_cap = tl.arange(0, CAP)
    offs_k = tl.arange(0, KP)
    key = tl.where(in_list, (_mono32(cand_s) & ~LOW) | (LOW - offs_cap[None, :]), SENT32)
    top = tl.full((BLOCK_M, KP), SENT32, tl.int32)
    prev = tl.full((BLOCK_M,), 1, tl.int32)  # low bit set: equals no truncated score
    amb = tl.zeros((BLOCK_M,), tl.int1)
    for r in range(top_k):
        best = tl.max(key, axis=1)
        key = tl.where(key == best[:, None], SENT32, key)  # keys are unique per row (slot bits)
        top = tl.where(offs_k[None, :] == r, best[:, None], top)
        amb = amb | ((best & ~LOW) == prev)
        prev = best & ~LOW
    # F: the best key left; a sentinel F equal to a sentinel w_k means fewer than k candidates
    amb = amb | ((tl.max(key, axis=1) & ~LOW) == prev)
    return LOW - (top & LOW), amb


@triton.jit
def _exact_rounds(cand_s, cand_i, in_list, top_k, BLOCK_M: tl.constexpr, CAP: tl.constexpr, KP: tl.constexpr):
    """The "onepass" rounds on int64 (score, -index) keys -> sorted top (BLOCK_M, KP) packed int64."""
    cand = tl.where(in_list, pack(cand_s, cand_i), sentinel(BLOCK_M, CAP))
    return _topk_rounds(cand, top_k, BLOCK_M, CAP, KP)


@triton.jit
def _slab_candidates(
    q, q_ptr, keys, slab_s, slab_i, row_off, rows, row_mask, h, half, n, stride_qt, stride_qh, stride_qd,
    DH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, CAP: tl.constexpr,
    KP: tl.constexpr, FB_BLOCK_N: tl.constexpr, top_k, EVEN_N: tl.constexpr, DOT_FP32: tl.constexpr,
):  # fmt: skip
    """One half's exact candidates in the program's slab: the scores >= theta (_candidates), or, where a
    row has more than CAP of them (ties), the exact running top-KP instead -> (cnt (BLOCK_M,) int32 slots
    filled per row, 1 if the running top-KP was taken else 0). The slab's stores are visible to every
    thread on return."""
    offs_k = tl.arange(0, KP)
    cnt = _candidates(
        q, keys, slab_s, slab_i, row_off, row_mask, n, DH, BLOCK_M, BLOCK_N, BLOCK_D, CAP, top_k, EVEN_N, DOT_FP32
    )
    overflowed = 0
    if tl.max(cnt, axis=0) > CAP:  # ties: the exact running top-KP replaces the candidates
        q_rows = q_ptr + rows.to(tl.int64)[:, None] * stride_qt + h * stride_qh + half * DH * stride_qd
        running = half_topk(q_rows, stride_qd, row_mask, keys, n, DH, BLOCK_M, FB_BLOCK_N, BLOCK_D, KP, DOT_FP32)
        run_s, run_i = unpack(running)
        tl.debug_barrier()  # pass 2's stores to the same slots, by other threads, come first
        tl.store(slab_s + (row_off + offs_k[None, :]), run_s)
        tl.store(slab_i + (row_off + offs_k[None, :]), run_i)
        cnt = tl.full((BLOCK_M,), KP, tl.int32)
        overflowed = 1
    tl.debug_barrier()  # the slab's stores, made by other threads, are visible after this
    return cnt, overflowed


@triton.jit
def _packed_kernel(
    q_ptr, k_ptr, pi_ptr, pj_ptr, scores_ptr, idx_ptr, scr_s_ptr, scr_i_ptr, flag_ptr,
    T, H, n, top_k, n_pairs, n_work, stride_qt, stride_qh, stride_qd,
    PER_HEAD: tl.constexpr, DH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, KP: tl.constexpr, CAP: tl.constexpr, NCP: tl.constexpr,
    FB_BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr, EVEN_N: tl.constexpr,
):  # fmt: skip
    """Persistent: work item w = (row block, head) -> scores/indices (T, H, top_k) of its rows.

    Arguments as `_onepass_kernel`. flag: (n_work,) int32 = (halves that overflowed CAP: redone by
    the running top-KP) + 4 * (halves whose packed rounds were ambiguous: redone on int64 keys).
    """
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, KP)
    offs_cap = tl.arange(0, CAP)
    row_off = offs_m[:, None] * CAP
    for w in range(pid, n_work, tl.num_programs(0)):
        h = w % H
        rows = (w // H) * BLOCK_M + offs_m
        row_mask = rows < T
        s_set = h if PER_HEAD else 0
        flag = 0
        for half in tl.static_range(2):
            keys = k_ptr + (s_set * 2 + half) * n * DH  # sub_keys is contiguous (S, 2, n, DH)
            q = _load_half_query(q_ptr, rows, row_mask, h, half, stride_qt, stride_qh, stride_qd, DH, BLOCK_D, DOT_FP32)
            slab_s = scr_s_ptr + (pid.to(tl.int64) * 2 + half) * (BLOCK_M * CAP)  # scalar bases (see onepass)
            slab_i = scr_i_ptr + (pid.to(tl.int64) * 2 + half) * (BLOCK_M * CAP)
            cnt, overflowed = _slab_candidates(
                q, q_ptr, keys, slab_s, slab_i, row_off, rows, row_mask, h, half, n, stride_qt, stride_qh, stride_qd,
                DH, BLOCK_M, BLOCK_N, BLOCK_D, CAP, KP, FB_BLOCK_N, top_k, EVEN_N, DOT_FP32,
            )  # fmt: skip
            flag += overflowed
            in_list = offs_cap[None, :] < cnt[:, None]
            cand_s = tl.load(slab_s + (row_off + offs_cap[None, :]), mask=in_list, other=0.0)
            slot, amb = _packed_rounds(cand_s, in_list, top_k, BLOCK_M, CAP, KP)
            if tl.max((amb & row_mask).to(tl.int32), axis=0) > 0:
                cand_i = tl.load(slab_i + (row_off + offs_cap[None, :]), mask=in_list, other=0)
                top_s, top_i = unpack(_exact_rounds(cand_s, cand_i, in_list, top_k, BLOCK_M, CAP, KP))
                flag += 4
            else:  # the winners' exact scores and columns, by slot (L1: the program's own slab)
                top_s = tl.load(slab_s + (row_off + slot))
                top_i = tl.load(slab_i + (row_off + slot))
            tl.debug_barrier()  # every thread has read the candidates before the list overwrites them
            tl.store(slab_s + (row_off + offs_k[None, :]), top_s)
            tl.store(slab_i + (row_off + offs_k[None, :]), top_i)

        # the pair sums of the pruned rank pairs and their top-k: as "onepass" (exact int64 keys)
        _pair_stage(
            pi_ptr, pj_ptr, scr_s_ptr, scr_i_ptr, scores_ptr, idx_ptr, pid, rows, row_mask, h, H, n, top_k, n_pairs,
            BLOCK_M, CAP, KP, NCP,
        )  # fmt: skip
        tl.store(flag_ptr + w, flag)


def launch_packed(
    queries: torch.Tensor, sub_keys: torch.Tensor, top_k: int, config: RetrievalKernelConfig = DEFAULT_CONFIG,
    return_flags: bool = False,
):  # fmt: skip
    """The "packed" forward -> scores (T, H, top_k) fp32, indices (T, H, top_k) int64; launch parameters
    are "onepass"'s (config.onepass_*).

    queries: (T, H, d_key), any strides; sub_keys: (S, 2, n, d_key // 2), S = 1 or H.
    return_flags: also return flags (n_work,) int32 per work item (row block w // H, head w % H):
    overflowed halves + 4 * halves whose packed rounds were ambiguous (tests, benchmarks).
    """
    use_fp32 = dot_fp32(queries, sub_keys)
    lc = onepass_launch(top_k, use_fp32, config)
    even_n = sub_keys.shape[2] % lc["BLOCK_N"] == 0
    return launch_onepass_family(_packed_kernel, queries, sub_keys, top_k, lc, use_fp32, return_flags, EVEN_N=even_n)
