"""The "onepass" forward of the Triton retrieval: ONE kernel per (row block, head) does both halves'
top-k and the pair merge, with no int64 sorting network (NOTES_retrieval.md section 7).

Why: in "threshold" (triton_threshold.py) ~4.5 of its 5.95 ms at 65536 tokens are three 64-wide
int64 tl.topk per (token, head) row (two in stage 1, one in stage 2), and its half lists make a
round trip through global memory between two launches. Here, per work item (BLOCK_M rows of one
head; persistent grid so the scratch stays small):

1. per half, pass 1: scores s = q_half @ C^T tile by tile (BLOCK_N columns, tensor cores) and an
   elementwise running max = the maxima of BLOCK_N strided column groups; theta = the k-th
   largest group maximum (k rounds of "row max, drop it") is <= the k-th largest score;
2. per half, pass 2: the same scores again (same instructions, so the same bits); the ones >= theta
   (k..2k of n on random keys) go to the program's scratch at running count + inclusive prefix count
   of the keep mask (tl.cumsum, or a product with a triangular ones matrix: config.onepass_prefix),
   as an fp32 score array and an int32 column array (no int64 packing of all n scores);
3. per half: the k winners, in order, by k rounds of "row max of the packed (score, -index) keys of
   the <= CAP candidates, drop it" (reductions; no sorting network), written back over the first
   KP scratch slots as the half's sorted list (the program's own scratch: L1/L2, never HBM-bound);
4. pairs: column c of a (BLOCK_M, NCP) tile is the rank pair (i_c, j_c), one of the pairs with
   (i+1)(j+1) <= k (the only ones that can make the top-k, see triton_threshold.py), gathered from
   the two lists; k rounds of max over pack(s1 + s2, a * n + b) give the sorted top-k, stored once.
   (Filling the pair tile straight from step 3's rounds kept two int64 (BLOCK_M, NCP) tiles live
   through the second half's passes: 255 registers and spills in the sm_90 compile.)
5. A row block with a row of more than CAP candidates (heavy ties, e.g. repeated key rows) redoes
   that half in the same program with the exact running top-KP of "merge" (triton_common.half_topk),
   writes it into the scratch and continues at step 3: exact for any input, no second launch.

Every selection uses the packed (score, -index) order of triton_common.pack, and the scores come
from the same dot instructions as in the other forwards, so the result equals "merge",
"threshold" and "split" bit for bit (scores and indices).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from torchpeer.ops.dispatch import triton_interpreting

from .kernel_config import DEFAULT_CONFIG, RetrievalKernelConfig
from .triton_common import INTERP_PROGRAMS, dot_fp32, half_topk, next_pow2, num_sms, pack, sentinel, unpack
from .triton_threshold import _load_half_query, _score_tile, pair_lists


@triton.jit
def _topk_rounds(keys, top_k, BLOCK_M: tl.constexpr, W: tl.constexpr, KP: tl.constexpr):
    """top_k rounds of "row max, drop it" over int64 (score, -index) keys (BLOCK_M, W), unique per row
    (one drops per round) -> the sorted top (BLOCK_M, KP), sentinels past top_k. The exact selection of
    the onepass-family kernels: their half lists and their pair sums."""
    offs_k = tl.arange(0, KP)
    top = sentinel(BLOCK_M, KP)
    for r in range(top_k):
        best = tl.max(keys, axis=1)
        keys = tl.where(keys == best[:, None], sentinel(BLOCK_M, W), keys)
        top = tl.where(offs_k[None, :] == r, best[:, None], top)
    return top


@triton.jit
def _pair_stage(
    pi_ptr, pj_ptr, scr_s_ptr, scr_i_ptr, scores_ptr, idx_ptr, pid, rows, row_mask, h, H, n, top_k, n_pairs,
    BLOCK_M: tl.constexpr, CAP: tl.constexpr, KP: tl.constexpr, NCP: tl.constexpr,
):  # fmt: skip
    """Step 4 of the onepass-family kernels (onepass, packed, queue): from the two sorted half lists in
    slots 0..KP-1 of the program's slabs, the sums of the pruned rank pairs (pi, pj) and their top-k
    by int64 (score, -index) rounds -> scores/indices of the item's rows (BLOCK_M, top_k)."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, KP)
    offs_c = tl.arange(0, NCP)
    tl.debug_barrier()  # both lists are visible to every thread
    c_valid = offs_c < n_pairs
    pi = tl.load(pi_ptr + offs_c, mask=c_valid, other=0)
    pj = tl.load(pj_ptr + offs_c, mask=c_valid, other=0)
    base = pid.to(tl.int64) * 2 * (BLOCK_M * CAP)  # half 0's slab; half 1's is BLOCK_M * CAP further
    off_a = offs_m[:, None] * CAP + pi[None, :]
    off_b = (BLOCK_M + offs_m[:, None]) * CAP + pj[None, :]
    sa = tl.load(scr_s_ptr + base + off_a)
    ia = tl.load(scr_i_ptr + base + off_a)
    sb = tl.load(scr_s_ptr + base + off_b)
    ib = tl.load(scr_i_ptr + base + off_b)
    pairs = tl.where(c_valid[None, :], pack(sa + sb, ia * n + ib), sentinel(BLOCK_M, NCP))
    tl.debug_barrier()  # every thread has read the lists before the next work item rewrites the slabs
    score, expert = unpack(_topk_rounds(pairs, top_k, BLOCK_M, NCP, KP))
    dst = (rows.to(tl.int64)[:, None] * H + h) * top_k + offs_k[None, :]
    mask = row_mask[:, None] & (offs_k[None, :] < top_k)
    tl.store(scores_ptr + dst, score, mask=mask)
    tl.store(idx_ptr + dst, expert.to(tl.int64), mask=mask)


@triton.jit
def _onepass_kernel(
    q_ptr, k_ptr, pi_ptr, pj_ptr, scores_ptr, idx_ptr, scr_s_ptr, scr_i_ptr, flag_ptr,
    T, H, n, top_k, n_pairs, n_work, stride_qt, stride_qh, stride_qd,
    PER_HEAD: tl.constexpr, DH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, KP: tl.constexpr, CAP: tl.constexpr, NCP: tl.constexpr,
    FB_BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr, PREFIX_DOT: tl.constexpr,
):  # fmt: skip
    """Persistent: work item w = (row block, head) -> scores/indices (T, H, top_k) of its rows.

    pi, pj: (n_pairs,) int32 rank pairs (i+1)(j+1) <= top_k. scr_s, scr_i: (programs, 2, BLOCK_M, CAP)
    fp32 / int32 candidate scratch, one slab per program and half. flag: (n_work,) int32, how many
    halves of the item overflowed CAP and took the fallback (0, 1 or 2; one store per item).
    """
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, KP)
    offs_cap = tl.arange(0, CAP)
    for w in range(pid, n_work, tl.num_programs(0)):
        h = w % H
        rows = (w // H) * BLOCK_M + offs_m
        row_mask = rows < T
        s_set = h if PER_HEAD else 0
        fell_back = 0
        for half in tl.static_range(2):
            keys = k_ptr + (s_set * 2 + half) * n * DH  # sub_keys is contiguous (S, 2, n, DH)
            q = _load_half_query(q_ptr, rows, row_mask, h, half, stride_qt, stride_qh, stride_qd, DH, BLOCK_D, DOT_FP32)
            # this program's slab for this half: scalar bases + int32 offsets (a (BLOCK_M, 1) pointer
            # tensor here would be broadcast and hoisted out of the tile loop as 64-bit registers)
            slab_s = scr_s_ptr + (pid.to(tl.int64) * 2 + half) * (BLOCK_M * CAP)
            slab_i = scr_i_ptr + (pid.to(tl.int64) * 2 + half) * (BLOCK_M * CAP)
            row_off = offs_m[:, None] * CAP

            # 1. strided-group maxima -> theta <= the k-th largest score of each row
            gmax = tl.full((BLOCK_M, BLOCK_N), float("-inf"), tl.float32)
            for n0 in range(0, n, BLOCK_N):
                s, cols = _score_tile(q, keys, n0, n, DH, BLOCK_N, BLOCK_D, DOT_FP32)
                gmax = tl.maximum(gmax, tl.where((cols < n)[None, :], s, float("-inf")))
            # k rounds of "take the max, drop it": equal maxima drop together, which only lowers
            # theta (a valid bound, a few more candidates)
            theta = tl.max(gmax, axis=1)
            for _ in range(1, top_k):
                gmax = tl.where(gmax >= theta[:, None], float("-inf"), gmax)
                theta = tl.minimum(theta, tl.max(gmax, axis=1))

            # 2. the same scores again; compact those >= theta as (fp32 score, int32 column)
            cnt = tl.zeros((BLOCK_M,), tl.int32)
            offs_n = tl.arange(0, BLOCK_N)
            tri = offs_n[:, None] <= offs_n[None, :]  # (BLOCK_N, BLOCK_N) upper-triangular, for PREFIX_DOT
            for n0 in range(0, n, BLOCK_N):
                s, cols = _score_tile(q, keys, n0, n, DH, BLOCK_N, BLOCK_D, DOT_FP32)
                keep = (s >= theta[:, None]) & (cols < n)[None, :] & row_mask[:, None]
                keep_i = keep.to(tl.int32)
                if PREFIX_DOT:
                    # inclusive prefix count as a (BLOCK_M, BLOCK_N) x (BLOCK_N, BLOCK_N) product with
                    # the upper-triangular ones (exact: 0/1 products, sums <= BLOCK_N): stays in the
                    # accumulator layout, where the scan converts the tile to a blocked layout and back
                    if DOT_FP32:  # tf32 holds 0 and 1 exactly (and the interpreter has no bf16 dot)
                        incl = tl.dot(keep.to(tl.float32), tri.to(tl.float32), input_precision="tf32")
                    else:
                        incl = tl.dot(keep.to(tl.bfloat16), tri.to(tl.bfloat16))
                    pos = cnt[:, None] + incl.to(tl.int32) - 1
                else:
                    pos = cnt[:, None] + tl.cumsum(keep_i, axis=1) - 1
                ok = keep & (pos < CAP)
                tl.store(slab_s + (row_off + pos), s, mask=ok)
                tl.store(slab_i + (row_off + pos), tl.broadcast_to(cols[None, :], (BLOCK_M, BLOCK_N)), mask=ok)
                cnt += tl.sum(keep_i, axis=1)
            if tl.max(cnt, axis=0) > CAP:
                # 5. overflow (ties): the exact running top-KP of this half replaces the candidates
                q_rows = q_ptr + rows.to(tl.int64)[:, None] * stride_qt + h * stride_qh + half * DH * stride_qd
                running = half_topk(
                    q_rows, stride_qd, row_mask, keys, n, DH, BLOCK_M, FB_BLOCK_N, BLOCK_D, KP, DOT_FP32
                )
                run_s, run_i = unpack(running)  # sentinels survive the unpack/pack round trip
                tl.debug_barrier()  # pass 2's stores to the same slots, by other threads, come first
                tl.store(slab_s + (row_off + offs_k[None, :]), run_s)
                tl.store(slab_i + (row_off + offs_k[None, :]), run_i)
                cnt = tl.full((BLOCK_M,), KP, tl.int32)
                fell_back += 1
            tl.debug_barrier()  # the slab's stores, made by other threads, are visible after this
            in_list = offs_cap[None, :] < cnt[:, None]
            cand_s = tl.load(slab_s + (row_off + offs_cap[None, :]), mask=in_list, other=0.0)
            cand_i = tl.load(slab_i + (row_off + offs_cap[None, :]), mask=in_list, other=0)
            cand = tl.where(in_list, pack(cand_s, cand_i), sentinel(BLOCK_M, CAP))

            # 3. the k winners of this half in order (keys are unique: one drops per round)
            top_s, top_i = unpack(_topk_rounds(cand, top_k, BLOCK_M, CAP, KP))
            tl.debug_barrier()  # every thread has read the candidates before the list overwrites them
            # the sorted list goes to slots 0..KP-1 (L1-resident), where step 4 gathers it by rank
            tl.store(slab_s + (row_off + offs_k[None, :]), top_s)
            tl.store(slab_i + (row_off + offs_k[None, :]), top_i)

        # 4. the pair sums of the pruned rank pairs, and their top-k in order
        _pair_stage(
            pi_ptr, pj_ptr, scr_s_ptr, scr_i_ptr, scores_ptr, idx_ptr, pid, rows, row_mask, h, H, n, top_k, n_pairs,
            BLOCK_M, CAP, KP, NCP,
        )  # fmt: skip
        tl.store(flag_ptr + w, fell_back)


def onepass_launch(top_k: int, fp32: bool, config: RetrievalKernelConfig) -> dict:
    """The launch parameters launch_onepass uses: BLOCK_M, BLOCK_N, num_warps, CAP, per_sm (0 under the
    interpreter: INTERP_PROGRAMS programs), KP, NCP (padded pair count), FB_BLOCK_N (fallback tiles)."""
    kp = max(2, next_pow2(top_k))
    if triton_interpreting():  # small tiles (numpy emulation); CAP 16 so that tests reach the fallback
        block_m, block_n, num_warps, cap, per_sm = 16, 16, 4, 16, 0
    else:
        block_m, block_n, num_warps, cap, per_sm = config.onepass_launch(kp, fp32)
    n_pairs = sum(top_k // (i + 1) for i in range(top_k))
    return dict(
        BLOCK_M=block_m, BLOCK_N=max(block_n, kp, 16), num_warps=num_warps, CAP=max(next_pow2(cap), kp),
        per_sm=per_sm, KP=kp, NCP=max(kp, next_pow2(n_pairs)), FB_BLOCK_N=max(kp, 16 if triton_interpreting() else 64),
    )  # fmt: skip


def launch_onepass(
    queries: torch.Tensor, sub_keys: torch.Tensor, top_k: int, config: RetrievalKernelConfig = DEFAULT_CONFIG,
    return_flags: bool = False,
):  # fmt: skip
    """The "onepass" forward -> scores (T, H, top_k) fp32, indices (T, H, top_k) int64.

    queries: (T, H, d_key), any strides; sub_keys: (S, 2, n, d_key // 2), S = 1 or H.
    return_flags: also return flags (n_work,) int32, work item w = (row block w // H, head w % H):
    how many of its halves overflowed CAP and were redone by the exact fallback (tests, benchmarks).
    """
    use_fp32 = dot_fp32(queries, sub_keys)
    lc = onepass_launch(top_k, use_fp32, config)
    prefix = dict(PREFIX_DOT=config.onepass_prefix == "dot")
    return launch_onepass_family(_onepass_kernel, queries, sub_keys, top_k, lc, use_fp32, return_flags, **prefix)


def launch_onepass_family(kernel, queries, sub_keys, top_k: int, lc: dict, use_fp32: bool, return_flags: bool, **extra):
    """Outputs, per-program scratch, the rank-pair lists and the persistent grid of a onepass-family
    kernel (onepass, packed, queue: the same arguments), then its launch with the launch parameters
    ``lc`` (onepass_launch's) and the kernel's own constexprs ``extra``. Shapes as launch_onepass."""
    T, H, d_key = queries.shape
    n = sub_keys.shape[2]
    dev = queries.device
    scores = torch.empty((T, H, top_k), device=dev, dtype=torch.float32)
    indices = torch.empty((T, H, top_k), device=dev, dtype=torch.int64)
    if T == 0:
        return (scores, indices, torch.zeros(0, device=dev, dtype=torch.int32)) if return_flags else (scores, indices)
    n_work = triton.cdiv(T, lc["BLOCK_M"]) * H
    programs = INTERP_PROGRAMS if lc["per_sm"] == 0 else num_sms(dev) * lc["per_sm"]
    programs = max(1, min(n_work, programs))
    scr_s = torch.empty((programs, 2, lc["BLOCK_M"], lc["CAP"]), device=dev, dtype=torch.float32)
    scr_i = torch.empty((programs, 2, lc["BLOCK_M"], lc["CAP"]), device=dev, dtype=torch.int32)
    flags = torch.empty((n_work,), device=dev, dtype=torch.int32)
    pi, pj = pair_lists(top_k, dev)
    dh = d_key // 2
    kernel[(programs,)](
        queries, sub_keys.contiguous(), pi, pj, scores, indices, scr_s, scr_i, flags,
        T, H, n, top_k, pi.numel(), n_work, queries.stride(0), queries.stride(1), queries.stride(2),
        PER_HEAD=sub_keys.shape[0] > 1, DH=dh, BLOCK_M=lc["BLOCK_M"], BLOCK_N=lc["BLOCK_N"],
        BLOCK_D=max(16, next_pow2(dh)), KP=lc["KP"], CAP=lc["CAP"], NCP=lc["NCP"], FB_BLOCK_N=lc["FB_BLOCK_N"],
        DOT_FP32=use_fp32, num_warps=lc["num_warps"], **extra,
    )  # fmt: skip
    return (scores, indices, flags) if return_flags else (scores, indices)
