"""The "sorted" sub-key gradient of the Triton retrieval: dC by sorted segment sums, no dense G.

dC_half[a] = sum over the selections (t, h, k) whose half index is a of ds[t, h, k] * q_half[t, h]
(triton_backward.py). The "dense" path materialises G (T*H, n) fp32 per half and multiplies:
~4.6 GB of traffic per half at 65536 tokens (NOTES_retrieval.md section 6). Here the 2 * T*H*k
(half, selection) pairs are sorted by their table row ((key set * 2 + half) * n + a), and one
program per table row walks its sorted list, gathering the queries' half rows (128 B in bf16)
and summing ds * q in fp32, in a fixed order: deterministic, ~1.1 GB of gathers per half.
One program walks a whole list, so heavily skewed routing (one sub-key in most selections)
serialises on that program; the segmented split of the mixing backward would fix that (not built).
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
    perm_ptr, offsets_ptr, ds_ptr, q_ptr, dk_ptr, RK, n, stride_qt, stride_qh, stride_qd,
    H: tl.constexpr, K: tl.constexpr, DH: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """dk[g] = sum over sorted entries e of table row g: ds[s] * q_half[t, h], e = half * RK + s."""
    g = tl.program_id(0)
    half = (g // n) % 2
    start = tl.load(offsets_ptr + g)
    end = tl.load(offsets_ptr + g + 1)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < DH
    acc = tl.zeros((BLOCK_D,), tl.float32)
    for p0 in range(start, end, BLOCK_S):
        pos = p0 + tl.arange(0, BLOCK_S)
        m = pos < end
        s = tl.load(perm_ptr + pos, mask=m, other=0) - half * RK  # selection id t * H * K + h * K + k
        gs = tl.load(ds_ptr + s, mask=m, other=0.0)
        r = s // K
        q_ptrs = q_ptr + (r // H)[:, None] * stride_qt + (r % H)[:, None] * stride_qh
        q = tl.load(q_ptrs + (half * DH + offs_d)[None, :] * stride_qd, mask=m[:, None] & d_mask[None, :], other=0.0)
        acc += tl.sum(gs[:, None] * q.to(tl.float32), axis=0)
    tl.store(dk_ptr + g.to(tl.int64) * DH + offs_d, acc, mask=d_mask)


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
    dk = torch.empty((n_rows, dh), device=dev, dtype=torch.float32)
    block_s = 16 if triton_interpreting() else 64
    _dkeys_sorted_kernel[(n_rows,)](
        perm, offsets, ds.contiguous().float(), queries, dk, RK, n, *queries.stride(),
        H=H, K=K, DH=dh, BLOCK_S=block_s, BLOCK_D=max(16, next_pow2(dh)), num_warps=4,
    )  # fmt: skip
    return dk.view(S, 2, n, dh).to(sub_keys.dtype)
