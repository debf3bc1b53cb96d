"""The "sorted" sub-key gradient of the Triton retrieval: dC by sorted segment sums, no dense G.

dC_half[a] = sum over the selections (t, h, k) whose half index is a of ds[t, h, k] * q_half[t, h]
(triton_backward.py). The "dense" path materialises G (T*H, n) fp32 per half and multiplies:
~4.6 GB of traffic per half at 65536 tokens (NOTES_retrieval.md section 6). Here the 2 * T*H*k
(half, selection) pairs are sorted by their table row ((key set * 2 + half) * n + a), and one
few programs per table row (`segment_splits`) walk equal slices of its sorted list, gathering
the queries' half rows (128 B in bf16) and summing ds * q in fp32; their partial sums add in a
fixed order: deterministic, ~1.1 GB of gathers per half. The splits follow the mean list length,
so heavily skewed routing (one sub-key in most selections) still serialises on that row's few
programs; the load-balanced segments of the mixing backward would fix that (not built).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from torchpeer.ops.dispatch import triton_interpreting

from .triton_common import next_pow2

INT16_KEY_ROWS = torch.iinfo(torch.int16).max  # up to this many table rows the sort keys are int16


@triton.jit
def _dkeys_sorted_kernel(
    perm_ptr, offsets_ptr, ds_ptr, q_ptr, part_ptr, RK, n, n_rows, stride_qt, stride_qh, stride_qd,
    H: tl.constexpr, K: tl.constexpr, DH: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """part[split, g] = sum over this split's share of the sorted entries e of table row g:
    ds[s] * q_half[t, h], e = half * RK + s. Program (g, split) takes the split-th of
    num_programs(1) equal, BLOCK_S-aligned slices of row g's list.

    The products accumulate in a (BLOCK_S, BLOCK_D) register tile reduced over the rows once at the
    end: a reduction per block (as before) crossed warps through shared memory with a barrier on
    every one of the ~128 blocks of a row's list at 65536 tokens."""
    g = tl.program_id(0)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    half = (g // n) % 2
    start = tl.load(offsets_ptr + g)
    end = tl.load(offsets_ptr + g + 1)
    blocks = tl.cdiv(end - start, BLOCK_S)
    share = tl.cdiv(blocks, splits)
    lo = start + split * share * BLOCK_S
    hi = tl.minimum(lo + share * BLOCK_S, end)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < DH
    acc = tl.zeros((BLOCK_S, BLOCK_D), tl.float32)
    for p0 in range(lo, hi, BLOCK_S):
        pos = p0 + tl.arange(0, BLOCK_S)
        m = pos < hi
        s = tl.load(perm_ptr + pos, mask=m, other=0) - half * RK  # selection id t * H * K + h * K + k
        gs = tl.load(ds_ptr + s, mask=m, other=0.0)
        r = s // K
        q_ptrs = q_ptr + (r // H)[:, None] * stride_qt + (r % H)[:, None] * stride_qh
        q = tl.load(q_ptrs + (half * DH + offs_d)[None, :] * stride_qd, mask=m[:, None] & d_mask[None, :], other=0.0)
        acc += gs[:, None] * q.to(tl.float32)
    out = part_ptr + (split.to(tl.int64) * n_rows + g) * DH + offs_d
    tl.store(out, tl.sum(acc, axis=0), mask=d_mask)


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


def segment_splits(entries: int, n_rows: int, block_s: int, blocks_per_program: int = 32, most: int = 8) -> int:
    """Programs per table row: enough that each walks ~blocks_per_program blocks of an average row's
    list (at 65536 tokens, H 8, k 16 and 2048 rows: 8192 entries, 128 blocks of 64 -> 4 splits,
    8192 programs instead of 2048, each a quarter of the dependent load chain)."""
    mean_blocks = -(-entries // max(1, n_rows * block_s))
    return max(1, min(most, -(-mean_blocks // blocks_per_program)))


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
    block_s = 16 if triton_interpreting() else 64
    splits = segment_splits(2 * RK, n_rows, block_s)
    part = torch.empty((splits, n_rows, dh), device=dev, dtype=torch.float32)
    _dkeys_sorted_kernel[(n_rows, splits)](
        perm, offsets, ds.contiguous().float(), queries, part, RK, n, n_rows, *queries.stride(),
        H=H, K=K, DH=dh, BLOCK_S=block_s, BLOCK_D=max(16, next_pow2(dh)), num_warps=4,
    )  # fmt: skip
    dk = part[0] if splits == 1 else part.sum(0)  # a fixed order: deterministic
    return dk.view(S, 2, n, dh).to(sub_keys.dtype)
