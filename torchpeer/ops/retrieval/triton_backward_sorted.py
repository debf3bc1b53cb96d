"""The "sorted" sub-key gradient of the Triton retrieval: dC by sorted segment sums, no dense G.

dC_half[a] = sum over the selections (t, h, k) whose half index is a of ds[t, h, k] * q_half[t, h]
(triton_backward.py). The "dense" path materialises G (T*H, n) fp32 per half and multiplies:
~4.6 GB of traffic per half at 65536 tokens (NOTES_retrieval.md section 6). Here the 2 * T*H*k
(half, selection) pairs are sorted by their table row ((key set * 2 + half) * n + a), and each
row's sorted list is cut into segments of at most SEGMENT_BLOCKS * BLOCK_S entries (the mixing
backward's plan, ops/triton_segments.py, so a hot sub-key is spread over many programs: skew-robust);
each program gathers its entries' query half rows (128 B in bf16) and sums ds * q in fp32, and the extra
segments' partial sums are added to their row in segment order: deterministic, no atomics,
~1.1 GB of gathers per half at 65536 tokens.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from torchpeer.ops.dispatch import triton_interpreting
from torchpeer.ops.triton_segments import LaggedSplitCheck, hot_row_of_program, segment_of_program, segment_plan

from .triton_common import next_pow2

INT16_KEY_ROWS = torch.iinfo(torch.int16).max  # up to this many table rows the sort keys are int16
# Segment length in blocks of BLOCK_S: at 65536 tokens (H 8, k 16, 2048 rows: 8192 entries per row)
# 32 blocks of 64 gave 4 programs per row, 7.23 ms retrieval fwd+bwd on an H200 against 9.49 ms
# for the hybrid backward (benchmarks/results/bench_retrieval_onepass_2026-12-05.md)
SEGMENT_BLOCKS = 32
_rows_need_split = LaggedSplitCheck()


@triton.jit
def _dkeys_sorted_kernel(
    perm_ptr, offsets_ptr, seg_row_ptr, seg_index_ptr, ds_ptr, q_ptr, dk_ptr, partial_ptr,
    RK, n, n_rows, SEG, stride_qt, stride_qh, stride_qd,
    H: tl.constexpr, K: tl.constexpr, DH: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One program per segment: at most SEG (a multiple of BLOCK_S) consecutive sorted entries of one
    table row g, summing ds[s] * q_half[t, h] over them (entry e = half * RK + s).

    Programs 0..n_rows-1 take segment 0 of row g = program id and write dk[g] (every row, zeros for
    an unused one); programs n_rows.. take the extra segments of long lists (seg_row/seg_index name
    them, -1: nothing) and write partial[q]; _dkeys_reduce_kernel adds those to dk in segment order.
    No atomics: deterministic. The products accumulate in a (BLOCK_S, BLOCK_D) register tile reduced
    over the rows once per program (a reduction per block crosses the warps through shared memory
    with a barrier, ~128 of them per row list at 65536 tokens)."""
    pid = tl.program_id(0).to(tl.int64)
    g, seg, valid, first, last, start, end = segment_of_program(
        pid, n_rows, seg_row_ptr, seg_index_ptr, offsets_ptr, SEG
    )
    half = (g // n) % 2
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < DH
    acc = tl.zeros((BLOCK_S, BLOCK_D), tl.float32)
    for p0 in range(start, end, BLOCK_S):
        pos = p0 + tl.arange(0, BLOCK_S)
        m = pos < end
        s = tl.load(perm_ptr + pos, mask=m, other=0) - half * RK  # selection id t * H * K + h * K + k
        gs = tl.load(ds_ptr + s, mask=m, other=0.0)
        r = s // K
        q_ptrs = q_ptr + (r // H)[:, None] * stride_qt + (r % H)[:, None] * stride_qh
        q = tl.load(q_ptrs + (half * DH + offs_d)[None, :] * stride_qd, mask=m[:, None] & d_mask[None, :], other=0.0)
        acc += gs[:, None] * q.to(tl.float32)
    total = tl.sum(acc, axis=0)
    tl.store(dk_ptr + g * DH + offs_d, total, mask=offs_d < tl.where(pid < n_rows, DH, 0))
    slot = tl.maximum(pid - n_rows, 0) * DH
    tl.store(partial_ptr + slot + offs_d, total, mask=offs_d < tl.where(valid & (pid >= n_rows), DH, 0))


@triton.jit
def _dkeys_reduce_kernel(hot_ptr, nseg_ptr, pbase_ptr, partial_ptr, dk_ptr, DH: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program per hot row g = hot[q] (-1: none): adds its extra segments' partials
    partial[pbase[g] : pbase[g] + nseg[g] - 1] to dk[g] (segment 0's sum), in segment order."""
    g, valid, extra, first = hot_row_of_program(tl.program_id(0), hot_ptr, nseg_ptr, pbase_ptr)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < tl.where(valid, DH, 0)
    base = first * DH
    acc = tl.load(dk_ptr + g * DH + offs_d, mask=d_mask, other=0.0)
    for i in range(0, extra):
        acc += tl.load(partial_ptr + base + i * DH + offs_d, mask=d_mask, other=0.0)
    tl.store(dk_ptr + g * DH + offs_d, acc, mask=d_mask)


@triton.jit
def _table_rows_kernel(idx_ptr, rows_ptr, RK, n, H: tl.constexpr, K: tl.constexpr, PER_HEAD: tl.constexpr,
                       BLOCK: tl.constexpr):  # fmt: skip
    """rows[half * RK + s] = (key set * 2 + half) * n + (a if half == 0 else b), a * n + b = idx[s]:
    the sort keys of the (half, selection) pairs, split from the int64 indices in registers (one
    launch instead of the divmod, stack, broadcast arithmetic and cast of the torch expression)."""
    s = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = s < RK
    e = tl.load(idx_ptr + s, mask=m, other=0).to(tl.int32)  # expert < 2**31 (checks.py)
    a = e // n
    b = e - a * n
    s_set = (s // K) % H if PER_HEAD else 0
    out = rows_ptr.dtype.element_ty
    tl.store(rows_ptr + s, ((s_set * 2) * n + a).to(out), mask=m)
    tl.store(rows_ptr + RK + s, ((s_set * 2 + 1) * n + b).to(out), mask=m)


def sorted_block_s() -> int:
    """BLOCK_S, the entries a segment program reads per step: 16 in the interpreter (numpy emulation), 64
    on a GPU; segments are SEGMENT_BLOCKS of it."""
    return 16 if triton_interpreting() else 64


def row_segments(offsets: torch.Tensor, entries: int, block_s: int):
    """(SEG, nseg, pbase, seg_row, seg_index, hot): the table rows' sorted lists cut into segments of
    at most SEG entries (the mixing backward's plan, torchpeer/ops/triton_segments.py: sizes
    from shapes only, no host sync). SEG = SEGMENT_BLOCKS blocks of block_s. When no list is longer
    than SEG (judged from an earlier call's count, LaggedSplitCheck), SEG = 2**31 - 1 and empty
    plans: one program per row walks its whole list."""
    seg = SEGMENT_BLOCKS * block_s
    if not _rows_need_split(offsets, seg):
        none = torch.empty(0, dtype=torch.int64, device=offsets.device)
        return 2**31 - 1, none, none, none, none, none
    return seg, *segment_plan(offsets, entries, seg)


def dkeys_sorted(ds: torch.Tensor, queries: torch.Tensor, sub_keys: torch.Tensor, indices: torch.Tensor):
    """dL/dsub_keys (S, 2, n, d_key // 2) in sub_keys' dtype (fp32 sums) from ds (T, H, K)."""
    T, H, _ = queries.shape
    S, _, n, dh = sub_keys.shape
    K = indices.shape[-1]
    dev = queries.device
    RK = T * H * K
    n_rows = S * 2 * n  # < 2**31: n <= 46340 (the index packing) and S <= H
    # The radix sort makes one pass per key byte: 16-bit keys (2048 table rows with shared keys,
    # 16384 per head at n = 1024) take 2 passes instead of 4. Same stable order, same sums.
    key_dtype = torch.int16 if n_rows <= INT16_KEY_ROWS else torch.int32
    keys = torch.empty((2 * RK,), device=dev, dtype=key_dtype)  # (half, t, h, k) order, as before
    if RK:
        block = 256 if triton_interpreting() else 1024
        _table_rows_kernel[(triton.cdiv(RK, block),)](
            indices.contiguous(), keys, RK, n, H=H, K=K, PER_HEAD=S > 1, BLOCK=block, num_warps=4
        )
    sorted_rows, perm = torch.sort(keys, stable=True)
    offsets = torch.searchsorted(sorted_rows, torch.arange(n_rows + 1, device=dev, dtype=keys.dtype))
    block_s = sorted_block_s()
    block_d = max(16, next_pow2(dh))
    seg, nseg, pbase, seg_row, seg_index, hot = row_segments(offsets, 2 * RK, block_s)
    dk = torch.empty((n_rows, dh), device=dev, dtype=torch.float32)
    partial = torch.empty((max(1, seg_row.numel()), dh), device=dev, dtype=torch.float32)
    _dkeys_sorted_kernel[(n_rows + seg_row.numel(),)](
        perm, offsets, seg_row, seg_index, ds.contiguous().float(), queries, dk, partial,
        RK, n, n_rows, seg, *queries.stride(), H=H, K=K, DH=dh, BLOCK_S=block_s, BLOCK_D=block_d, num_warps=4,
    )  # fmt: skip
    if hot.numel():
        _dkeys_reduce_kernel[(hot.numel(),)](hot, nseg, pbase, partial, dk, DH=dh, BLOCK_D=block_d, num_warps=1)
    return dk.view(S, 2, n, dh).to(sub_keys.dtype)
