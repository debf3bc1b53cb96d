"""The "queue" forward of the Triton retrieval: per (row, strided column group) a sorted register queue of
the D best 32-bit keys, filled elementwise in the score tiles' own (tensor-core accumulator) layout.

Why (benchmarks/NOTES_retrieval.md sections 8 and 9): ~2/3 of "onepass" is pass 2, the compaction of
the scores >= theta into a scratch list, because tl.cumsum / tl.store of an accumulator tile convert its
layout through shared memory (~41 SASS per score). Here no score tile is ever stored or scanned:

1. per half, one pass over the tiles (BLOCK_N columns, tile t = columns t*BLOCK_N ..; group c = the
   columns {c, c + BLOCK_N, ...}): key = order-preserving int32 image of the fp32 score with its low
   TBITS bits replaced by LOW - t (LOW = 2**TBITS - 1; unique within a group). Each (row, group) keeps
   q_0 >= .. >= q_{D-1}, the D best keys, by a compare-exchange bubble (2D integer max/min per score),
   and o, the best key that fell off the end (one more max; only its row max is used, so o is kept
   folded to 8 columns): no stores, no theta, no payload.
2. k rounds of "row max of the queue heads q_0, pop that group's queue" give the winners w_1..w_k in
   key order; the round's group g (a second row max over the groups whose head matched) and the tile
   in the key's low bits give the column. Its exact fp32 score (the key lost TBITS bits) comes from a
   tensor-core product of the block's queries with the BLOCK_M gathered key rows of the round's columns,
   diagonal taken: the same dot instructions as the score tile, so the same bits.
3. Exactness, per row (T(x) = key with the low bits cleared, F = the best key left after round k over
   the heads and every group's o): the winners and their order are those of the exact (score, -column)
   order if T(w_1) > .. > T(w_k) > T(F) and exactly k queue entries were popped. Proof: say e is not a
   winner and beats winner w exactly; then T(e) >= T(w) >= T(w_k). If e is still in a queue, T(e) <=
   T(F); if e fell off group g's queue, its key is <= o_g, so T(e) <= T(o_g) <= T(F); both contradict
   T(F) < T(w_k). The winners' T are strictly decreasing, so their order is the exact one. Equal keys in
   two groups pop together in one round: the pop count catches it. Rows whose check fails (ties, near
   ties, a group holding more than D of the row's top-k, fewer than k + 1 real keys): that half of the
   work item is redone by "packed"'s exact path (theta + compaction + int64 rounds; flag bit 4).
4. The pair stage as "onepass"/"packed" (the two half lists through the program's scratch, int64 rounds
   over the pruned rank pairs): scores and indices equal "merge"/"threshold"/"onepass" bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .kernel_config import DEFAULT_CONFIG, RetrievalKernelConfig
from .triton_common import dot_fp32, unpack
from .triton_onepass import _pair_stage, launch_onepass_family, onepass_launch
from .triton_packed import SENT32, _exact_rounds, _mono32, _slab_candidates
from .triton_threshold import _load_half_query, _score_tile


@triton.jit
def _fill_queues(
    q, keys, n, DH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    D: tl.constexpr, TBITS: tl.constexpr, EVEN_N: tl.constexpr, DOT_FP32: tl.constexpr,
):  # fmt: skip
    """Step 1 for one half -> q0..q3 (BLOCK_M, BLOCK_N) int32 (q3 unused when D == 3) and o (BLOCK_M, OW):
    per row, partial maxima of the dropped keys (only their row max is used)."""
    LOW: tl.constexpr = (1 << TBITS) - 1
    # o folded to 8 columns (column c into c % 8): a thread of a tensor-core tile holds columns r, r + 8, ..
    # of its rows, so the fold is 28 max per tile in registers and o is 4 registers instead of 32 (with 32
    # the loop spilled 26 values: NOTES_retrieval.md section 9b). fp32 keys (FMA tile: the fold would take
    # shuffles) keep o unfolded; by key dtype, not DOT_FP32, so the interpreter (always DOT_FP32) runs both.
    OW: tl.constexpr = min(8, BLOCK_N) if keys.dtype.element_ty.primitive_bitwidth == 16 else BLOCK_N
    q0 = tl.full((BLOCK_M, BLOCK_N), SENT32, tl.int32)
    q1 = q0
    q2 = q0
    q3 = q0
    o = tl.full((BLOCK_M, OW), SENT32, tl.int32)
    # not software-pipelined: the prefetched key tiles would hold ~32 more registers next to the queues
    for n0 in tl.range(0, n, BLOCK_N, num_stages=1):
        s, cols = _score_tile(q, keys, n0, n, DH, BLOCK_N, BLOCK_D, DOT_FP32)
        # low bits := LOW - t on the raw bits, then the order-preserving map (3 instructions per score; a
        # negative score's low bits come out flipped, = t: _column decodes it, and the exactness check
        # does not depend on the tie direction)
        c = _mono32((s.to(tl.int32, bitcast=True) & ~LOW) | (LOW - n0 // BLOCK_N))
        if not EVEN_N:  # columns past n never enter (n % BLOCK_N == 0 needs no per-score select)
            c = tl.where((cols < n)[None, :], c, SENT32)
        # compare-exchange down the queue: c carries the smaller key on, o keeps the best dropped one
        hi = tl.maximum(q0, c)
        c = tl.minimum(q0, c)
        q0 = hi
        hi = tl.maximum(q1, c)
        c = tl.minimum(q1, c)
        q1 = hi
        hi = tl.maximum(q2, c)
        c = tl.minimum(q2, c)
        q2 = hi
        if D == 4:
            hi = tl.maximum(q3, c)
            c = tl.minimum(q3, c)
            q3 = hi
        if OW < BLOCK_N:
            o = tl.maximum(o, tl.max(tl.reshape(c, (BLOCK_M, BLOCK_N // OW, OW)), axis=1))
        else:
            o = tl.maximum(o, c)
    return q0, q1, q2, q3, o


@triton.jit
def _select(
    q, keys, q0, q1, q2, q3, o, n, top_k, DH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, KP: tl.constexpr, D: tl.constexpr, TBITS: tl.constexpr, DOT_FP32: tl.constexpr,
):  # fmt: skip
    """Steps 2-3 -> top_s (BLOCK_M, KP) fp32 exact scores, top_i (BLOCK_M, KP) int32 columns (descending;
    past top_k: -inf / 0) and ambiguous (BLOCK_M,): rows whose check failed (module docstring)."""
    LOW: tl.constexpr = (1 << TBITS) - 1
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, KP)
    offs_d = tl.arange(0, BLOCK_D)
    diag = offs_m[:, None] == offs_m[None, :]
    top_s = tl.full((BLOCK_M, KP), float("-inf"), tl.float32)
    top_i = tl.zeros((BLOCK_M, KP), tl.int32)
    prev = tl.full((BLOCK_M,), 1, tl.int32)  # low bit set: equals no T(key)
    amb = tl.zeros((BLOCK_M,), tl.int1)
    for r in tl.range(top_k, num_stages=1):  # (a pipelined gather load costs ~100 selects per round)
        best = tl.max(q0, axis=1)
        # the groups whose head is the best, one of them if several (then amb, below)
        g = tl.max(tl.where(q0 == best[:, None], offs_n[None, :], -1), axis=1)
        # the same mask as >= (q0 <= best): a second compare instead of 32 masks kept as packed bits
        eq = q0 >= best[:, None]
        q0 = tl.where(eq, q1, q0)
        q1 = tl.where(eq, q2, q1)
        if D == 4:
            q2 = tl.where(eq, q3, q2)
            q3 = tl.where(eq, SENT32, q3)
        else:
            q2 = tl.where(eq, SENT32, q2)
        amb = amb | ((best & ~LOW) == prev)
        prev = best & ~LOW
        col = tl.where(best < 0, best & LOW, LOW - (best & LOW)) * BLOCK_N + g
        # the exact score of (row m, col[m]): q @ C[col]^T on the tensor cores, element (m, m)
        ck = tl.load(
            keys + col[:, None] * DH + offs_d[None, :], mask=(col < n)[:, None] & (offs_d < DH)[None, :], other=0.0
        )
        if DOT_FP32:
            prod = tl.dot(q, tl.trans(ck.to(tl.float32)), input_precision="ieee")
        else:
            prod = tl.dot(q, tl.trans(ck))
        s_r = tl.max(tl.where(diag, prod, float("-inf")), axis=1)  # a max: keeps -0.0 (a sum would not)
        top_s = tl.where(offs_k[None, :] == r, s_r[:, None], top_s)
        top_i = tl.where(offs_k[None, :] == r, col[:, None], top_i)
    # F: the best key left in any queue or dropped off one; T(F) < T(w_k) needed
    if o.shape[1] == BLOCK_N:
        f = tl.max(tl.maximum(q0, o), axis=1)
    else:  # o folded (_fill_queues)
        f = tl.maximum(tl.max(q0, axis=1), tl.max(o, axis=1))
    amb = amb | ((f & ~LOW) >= prev)
    # exactly top_k real keys popped (equal keys in two groups pop together; sentinels pop no real key)
    real = tl.where(offs_n < n, (n - offs_n + BLOCK_N - 1) // BLOCK_N, 0)
    full = tl.sum(tl.minimum(real, D), axis=0)
    left = (q0 != SENT32).to(tl.int32) + (q1 != SENT32).to(tl.int32) + (q2 != SENT32).to(tl.int32)
    if D == 4:
        left += (q3 != SENT32).to(tl.int32)
    amb = amb | (full - tl.sum(left, axis=1) != top_k)
    return top_s, top_i, amb


@triton.jit
def _queue_kernel(
    q_ptr, k_ptr, pi_ptr, pj_ptr, scores_ptr, idx_ptr, scr_s_ptr, scr_i_ptr, flag_ptr,
    T, H, n, top_k, n_pairs, n_work, stride_qt, stride_qh, stride_qd,
    PER_HEAD: tl.constexpr, DH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, KP: tl.constexpr, CAP: tl.constexpr, NCP: tl.constexpr,
    FB_BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr, EVEN_N: tl.constexpr, D: tl.constexpr, TBITS: tl.constexpr,
):  # fmt: skip
    """Persistent: work item w = (row block, head) -> scores/indices (T, H, top_k) of its rows.

    Arguments as `_onepass_kernel` (scr_s, scr_i: (programs, 2, BLOCK_M, CAP), used by the exact path and
    for the two half lists). flag: (n_work,) int32 = (exact-path halves that overflowed CAP) + 4 *
    (halves with a row whose queue check failed: redone by the exact path)."""
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
            q0, q1, q2, q3, o = _fill_queues(q, keys, n, DH, BLOCK_M, BLOCK_N, BLOCK_D, D, TBITS, EVEN_N, DOT_FP32)
            top_s, top_i, amb = _select(
                q, keys, q0, q1, q2, q3, o, n, top_k, DH, BLOCK_M, BLOCK_N, BLOCK_D, KP, D, TBITS, DOT_FP32
            )
            if tl.max((amb & row_mask).to(tl.int32), axis=0) > 0:
                # the exact path ("packed"'s): theta + compaction into the slab, int64 rounds
                cnt, overflowed = _slab_candidates(
                    q, q_ptr, keys, slab_s, slab_i, row_off, rows, row_mask, h, half, n, stride_qt, stride_qh,
                    stride_qd, DH, BLOCK_M, BLOCK_N, BLOCK_D, CAP, KP, FB_BLOCK_N, top_k, EVEN_N, DOT_FP32,
                )  # fmt: skip
                flag += overflowed
                in_list = offs_cap[None, :] < cnt[:, None]
                cand_s = tl.load(slab_s + (row_off + offs_cap[None, :]), mask=in_list, other=0.0)
                cand_i = tl.load(slab_i + (row_off + offs_cap[None, :]), mask=in_list, other=0)
                top_s, top_i = unpack(_exact_rounds(cand_s, cand_i, in_list, top_k, BLOCK_M, CAP, KP))
                flag += 4
                tl.debug_barrier()  # every thread has read the candidates before the list overwrites them
            tl.store(slab_s + (row_off + offs_k[None, :]), top_s)
            tl.store(slab_i + (row_off + offs_k[None, :]), top_i)

        # the pair sums of the pruned rank pairs and their top-k: as "onepass" (exact int64 keys)
        _pair_stage(
            pi_ptr, pj_ptr, scr_s_ptr, scr_i_ptr, scores_ptr, idx_ptr, pid, rows, row_mask, h, H, n, top_k, n_pairs,
            BLOCK_M, CAP, KP, NCP,
        )  # fmt: skip
        tl.store(flag_ptr + w, flag)


MAX_TILE_BITS = 8  # a key's low bits hold the tile index: at most 256 tiles of BLOCK_N sub-keys


def queue_takes(n: int, top_k: int, fp32: bool, config: RetrievalKernelConfig) -> bool:
    """Whether the queue kernel takes n sub-keys per half (its tile index fits MAX_TILE_BITS)."""
    return queue_launch(n, top_k, fp32, config)["TBITS"] <= MAX_TILE_BITS


def queue_launch(n: int, top_k: int, fp32: bool, config: RetrievalKernelConfig) -> dict:
    """onepass_launch's parameters (BLOCK_M, BLOCK_N, num_warps, CAP for the exact path, ...) + D (queue
    depth, config.queue_depth) and TBITS (bits of the tile index in a key)."""
    lc = onepass_launch(top_k, fp32, config)
    tiles = triton.cdiv(n, lc["BLOCK_N"])
    return dict(lc, D=config.queue_depth, TBITS=max(1, (tiles - 1).bit_length()))


def launch_queue(
    queries: torch.Tensor, sub_keys: torch.Tensor, top_k: int, config: RetrievalKernelConfig = DEFAULT_CONFIG,
    return_flags: bool = False,
):  # fmt: skip
    """The "queue" forward -> scores (T, H, top_k) fp32, indices (T, H, top_k) int64.

    queries: (T, H, d_key), any strides; sub_keys: (S, 2, n, d_key // 2), S = 1 or H.
    return_flags: also return flags (n_work,) int32 per work item (row block w // H, head w % H):
    overflowed exact-path halves + 4 * halves redone by the exact path (tests, benchmarks).
    """
    n = sub_keys.shape[2]
    use_fp32 = dot_fp32(queries, sub_keys)
    lc = queue_launch(n, top_k, use_fp32, config)
    if lc["TBITS"] > MAX_TILE_BITS and queries.shape[0] > 0:  # (no rows: nothing to launch, as before)
        raise ValueError(f"queue forward: n = {n} is more than 256 tiles of {lc['BLOCK_N']} sub-keys")
    extra = dict(EVEN_N=n % lc["BLOCK_N"] == 0, D=lc["D"], TBITS=lc["TBITS"])
    return launch_onepass_family(_queue_kernel, queries, sub_keys, top_k, lc, use_fp32, return_flags, **extra)
