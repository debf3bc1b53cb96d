"""Backward of the Triton retrieval: gradients of scores[t,h,k] = q1[t,h].C[a_k] + q2[t,h].C'[b_k].

With ds = dL/dscores and (a_k, b_k) the halves of the selected experts,
    dq[t,h] = sum_k ds[t,h,k] * [C[a_k] ; C'[b_k]],   dC[a] += ds * q1,   dC'[b] += ds * q2.
Three algorithms (RetrievalKernelConfig.backward; timings in kernel_config.py):
"dense": the (rows, n) matrix G[r, a] = sum_{k: a_k = a} ds[r, k] built by scatter_add per token
chunk, then dq_half = G @ C and dC = G^T @ q_half (TF32 matmuls for half-precision inputs).
"triton": `_dq_kernel` gathers the k sub-key rows per (token, head) (the tables are L2-resident);
`_dkeys_kernel` builds G one (BLOCK_R, BLOCK_A) tile at a time in registers and accumulates
G^T @ q_half with tl.dot into per-split partial sums (deterministic, no (rows, n) matrix in memory).
"hybrid": `_dq_kernel` for dq + the dense dC (the default until 2026-12-05).
"sorted" (the default): `_dq_kernel` for dq + dC by sorted, segmented sums (triton_backward_sorted.py;
no dense G; 1.49 ms against hybrid's 3.34 at 65536 tokens on an H200, kernel_config.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from torchpeer.ops.dispatch import triton_interpreting

from .kernel_config import DEFAULT_CONFIG, RetrievalKernelConfig
from .triton_backward_sorted import dkeys_sorted
from .triton_common import dot_fp32, next_pow2, num_sms


@triton.jit
def _dq_kernel(
    ds_ptr, idx_ptr, k_ptr, dq_ptr, R, H, n, stride_dt, stride_dh, stride_dd,
    PER_HEAD: tl.constexpr, K: tl.constexpr, DH: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """dq[t, h] = sum_k ds[t, h, k] * [C[a_k] ; C'[b_k]] (rows r = t * H + h), a_k, b_k = divmod(idx, n).

    idx: the forward's (T, H, K) int64 indices, split here in registers (expert < 2**31, checks.py),
    so the host launches no index-splitting ops. Each half sums over k in ascending order.
    """
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < R
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < DH
    t = rows // H
    h = rows % H
    s_set = h if PER_HEAD else 0
    acc_a = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
    acc_b = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
    m2 = row_mask[:, None] & d_mask[None, :]
    for k in tl.static_range(K):
        g = tl.load(ds_ptr + rows * K + k, mask=row_mask, other=0.0)
        e = tl.load(idx_ptr + rows.to(tl.int64) * K + k, mask=row_mask, other=0).to(tl.int32)
        a = e // n
        b = e - a * n
        row_a = ((s_set * 2 + 0) * n + a).to(tl.int64)
        row_b = ((s_set * 2 + 1) * n + b).to(tl.int64)
        c_a = tl.load(k_ptr + row_a[:, None] * DH + offs_d[None, :], mask=m2, other=0.0)
        c_b = tl.load(k_ptr + row_b[:, None] * DH + offs_d[None, :], mask=m2, other=0.0)
        acc_a += g[:, None] * c_a.to(tl.float32)
        acc_b += g[:, None] * c_b.to(tl.float32)
    out = dq_ptr + t.to(tl.int64)[:, None] * stride_dt + h[:, None] * stride_dh + offs_d[None, :] * stride_dd
    tl.store(out, acc_a.to(dq_ptr.dtype.element_ty), mask=m2)
    tl.store(out + DH * stride_dd, acc_b.to(dq_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _dkeys_kernel(
    ds_ptr, idx_ptr, q_ptr, part_ptr, T, H, n, rows_per_split, stride_qt, stride_qh, stride_qd,
    PER_HEAD: tl.constexpr, K: tl.constexpr, DH: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr,
):  # fmt: skip
    """part[split, s, half, a] = sum over this split's rows r of G[r, a] * q_half[r], where
    G[r, a] = sum_{k: a_k(r) = a} ds[r, k], a_k = idx // n (half 0) or idx % n (half 1) from the int64
    (T, H, K) indices, split in registers; rows are (t, h) pairs that use key set s."""
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
            e = tl.load(idx_ptr + rows.to(tl.int64) * K + k, mask=m, other=0).to(tl.int32)
            j = tl.where(half == 0, e // n, e % n)
            G += tl.where(j[:, None] == acols[None, :], g[:, None], 0.0)
        if DOT_FP32:
            acc += tl.dot(tl.trans(G), q, input_precision="ieee")
        else:
            acc += tl.dot(tl.trans(G), q, input_precision="tf32")
    out = part_ptr + ((split * tl.num_programs(2) + sh) * n + acols.to(tl.int64))[:, None] * DH + offs_d[None, :]
    tl.store(out, acc, mask=(acols < n)[:, None] & d_mask[None, :])


def backward_dense(ds, queries, sub_keys, indices, need_q, need_k, config: RetrievalKernelConfig = DEFAULT_CONFIG):
    """The "dense" backward: G[r, a] = sum_{k: a_k = a} ds[r, k] per token chunk, then matmuls."""
    T, H, d_key = queries.shape
    S, _, n, dh = sub_keys.shape
    keys = sub_keys.float()
    dq = torch.empty_like(queries) if need_q else None
    dkeys = torch.zeros(keys.shape, device=keys.device, dtype=torch.float32) if need_k else None
    chunk = max(1, config.backward_chunk_elements // (H * n))
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


def backward_triton(ds, queries, sub_keys, indices, need_q, need_k, config: RetrievalKernelConfig = DEFAULT_CONFIG):
    """The "triton" backward: dq by gathering sub-key rows, dkeys by per-split one-hot tl.dot sums."""
    T, H, d_key = queries.shape
    S, _, n, dh = sub_keys.shape
    K = indices.shape[-1]
    dev = queries.device
    R = T * H
    ds = ds.contiguous().float()
    idx = indices.contiguous()  # (T, H, K) int64: the kernels split a * n + b in registers
    keys = sub_keys.contiguous()
    block_d = max(16, next_pow2(dh))
    per_head = S > 1
    dq = dk = None
    if need_q:
        dq = torch.empty_like(queries)
        block_r, warps = (16, 4) if triton_interpreting() else config.dq
        _dq_kernel[(triton.cdiv(R, block_r),)](
            ds, idx, keys, dq, R, H, n, dq.stride(0), dq.stride(1), dq.stride(2),
            PER_HEAD=per_head, K=K, DH=dh, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps,
        )  # fmt: skip
    if need_k:
        block_a, block_r, warps, per_sm = (16, 16, 4, 0) if triton_interpreting() else config.dkeys
        n_rows = T if per_head else R
        a_tiles = triton.cdiv(n, block_a)
        target = 4 if triton_interpreting() else num_sms(dev) * per_sm
        splits = max(1, min(triton.cdiv(n_rows, block_r), target // (a_tiles * S * 2)))
        rows_per_split = triton.cdiv(triton.cdiv(n_rows, block_r), splits) * block_r
        splits = triton.cdiv(n_rows, rows_per_split)
        part = torch.empty((splits, S * 2, n, dh), device=dev, dtype=torch.float32)
        _dkeys_kernel[(a_tiles, splits, S * 2)](
            ds, idx, queries, part, T, H, n, rows_per_split, queries.stride(0), queries.stride(1), queries.stride(2),
            PER_HEAD=per_head, K=K, DH=dh, BLOCK_A=block_a, BLOCK_R=block_r, BLOCK_D=block_d,
            DOT_FP32=dot_fp32(queries, sub_keys), num_warps=warps,
        )  # fmt: skip
        dk = part.sum(0).view(S, 2, n, dh).to(sub_keys.dtype)
    return dq, dk


def backward(ds, queries, sub_keys, indices, need_q, need_k, config: RetrievalKernelConfig = DEFAULT_CONFIG):
    """-> (dq or None, dkeys or None) by the algorithm config.backward (see the module docstring)."""
    impl = config.backward
    if impl == "triton":
        return backward_triton(ds, queries, sub_keys, indices, need_q, need_k, config)
    if impl == "sorted":
        dq = backward_triton(ds, queries, sub_keys, indices, True, False, config)[0] if need_q else None
        return dq, (dkeys_sorted(ds, queries, sub_keys, indices) if need_k else None)
    dq = None
    if impl == "hybrid" and need_q:
        dq, _ = backward_triton(ds, queries, sub_keys, indices, True, False, config)
        need_q = False
        if not need_k:
            return dq, None
    # The (rows, n) x (n, d_key/2) products per half dominate; for half-precision inputs TF32 tensor
    # cores cut them at the ~1e-3 relative precision such a step has anyway. fp32 inputs keep fp32
    # (TF32 measured 1.8e-3 absolute error on fp32 key gradients on an H200). CUDA only; restored after.
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = queries.dtype in (torch.bfloat16, torch.float16) or prev
    try:
        dq_dense, dk = backward_dense(ds, queries, sub_keys, indices, need_q, need_k, config)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    return (dq if dq is not None else dq_dense), dk
