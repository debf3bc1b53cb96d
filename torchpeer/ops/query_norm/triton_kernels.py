"""Triton kernels of the fused ``ema`` query norm (the math: reference.py).

x is (T, F) row-major; every kernel runs on a (feature block, token split) grid: program (f, p)
owns features f*BLOCK_F.. and the rows [p * RPS, (p + 1) * RPS) of its split (RPS = rows per
split, a multiple of BLOCK_T; trailing splits may be empty). Per-feature sums across splits go
through small (splits, F) partial buffers that the next kernel reads as one (P_PAD, BLOCK_F) tile,
so there are no float atomics and every result is deterministic.

aux (2 + 2P, F) fp32, written by the forward: row 0 the running mean and row 1 the running
variance as the forward read them (the backward uses these, not the buffers, which the update
changes), rows 2 + 2p, 3 + 2p the mean and M2 (sum of squared deviations) of split p's rows.

1. `_fwd_update_kernel` (training, T > 1; the default): y = (x - mu) * rsqrt(var + eps) * w + b,
   each split's mean and M2 (per BLOCK_T tile: tile mean and M2 in registers, merged by Chan's
   formula), and the running-statistics update in the same launch: the last program of each
   feature block to finish (an int32 arrival counter per block) combines the P splits in a fixed
   order (so the result does not depend on which program came last) and lerps the running mean
   and variance of its features with rate max(momentum, 1 / (num_updates + 1)); the last feature
   block to finish increments num_updates. The counters are reset by the programs that find them
   full, so they are zero again when the kernel ends (no memset launch per step).
2. `_fwd_kernel`: the value alone (eval, T = 1), or the value and the split statistics (STATS).
3. `_update_kernel`: the update as a kernel of its own, after `_fwd_kernel` with STATS (the path
   before the in-kernel update; triton_op.FUSED_UPDATE = False selects it).
4. `_bwd_reduce_kernel`: per split A_p = sum dy, B_p = sum dy * (x - c) with c the batch mean (BN)
   or the running mean (plain; then it also writes dx = rstd * w * dy).
5. `_bwd_dx_kernel` (BN): dx = rstd * w * (dy - A / T - (x - b_mu) * B / (T * (b_var + eps))); the
   split-0 programs write dweight = rstd * (B + (b_mu - mu) * A) and dbias = A.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _offsets(stride, rows, cols):
    return rows.to(tl.int64)[:, None] * stride + cols[None, :]


@triton.jit
def batch_stats(aux_ptr, F, T, RPS, P, cols, fmask, P_PAD: tl.constexpr):
    """-> (mean, biased variance) over all T rows of the features `cols`, from the split partials."""
    p = tl.arange(0, P_PAD)
    pmask = p < P
    cnt = tl.minimum(tl.maximum(T - p * RPS, 0), RPS).to(tl.float32)
    m = pmask[:, None] & fmask[None, :]
    offs = (2 + 2 * p)[:, None].to(tl.int64) * F + cols[None, :]
    means = tl.load(aux_ptr + offs, mask=m, other=0.0)
    m2s = tl.load(aux_ptr + offs + F, mask=m, other=0.0)
    mean = tl.sum(cnt[:, None] * means, axis=0) / T
    dev = means - mean[None, :]
    m2 = tl.sum(m2s + cnt[:, None] * dev * dev, axis=0)
    return mean, m2 / T


@triton.jit
def _fwd_prologue(x_ptr, w_ptr, b_ptr, rm_ptr, rv_ptr, aux_ptr, F, eps, BLOCK_F: tl.constexpr):
    """-> (cols, fmask, running mean, running variance, scale, shift) of this program's features (fp32);
    the split-0 programs also store the running statistics they read into aux rows 0 and 1."""
    cols = tl.program_id(0) * BLOCK_F + tl.arange(0, BLOCK_F)
    fmask = cols < F
    mu = tl.load(rm_ptr + cols, mask=fmask, other=0.0).to(tl.float32)
    var = tl.load(rv_ptr + cols, mask=fmask, other=1.0).to(tl.float32)
    scale = tl.rsqrt(var + eps) * tl.load(w_ptr + cols, mask=fmask, other=0.0).to(tl.float32)
    shift = tl.load(b_ptr + cols, mask=fmask, other=0.0).to(tl.float32)
    if tl.program_id(1) == 0:  # the statistics this forward normalised with, for the backward
        tl.store(aux_ptr + cols, mu, mask=fmask)
        tl.store(aux_ptr + F + cols, var, mask=fmask)
    return cols, fmask, mu, var, scale, shift


@triton.jit
def _fwd_rows(
    x_ptr, y_ptr, aux_ptr, T, F, RPS, stride_x, stride_y, cols, fmask, mu, scale, shift,
    STATS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr,
):  # fmt: skip
    """y of this split's rows and, with STATS, the split's mean and M2 stored into aux."""
    split = tl.program_id(1)
    start = split * RPS
    end = tl.minimum(start + RPS, T)
    mean = tl.zeros((BLOCK_F,), tl.float32)
    m2 = tl.zeros((BLOCK_F,), tl.float32)
    for t0 in range(start, end, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        rmask = rows < end
        m = rmask[:, None] & fmask[None, :]
        x = tl.load(x_ptr + _offsets(stride_x, rows, cols), mask=m, other=0.0).to(tl.float32)
        y = (x - mu[None, :]) * scale[None, :] + shift[None, :]
        tl.store(y_ptr + _offsets(stride_y, rows, cols), y.to(y_ptr.dtype.element_ty), mask=m)
        if STATS:
            n_before = (t0 - start).to(tl.float32)
            n_tile = tl.minimum(end - t0, BLOCK_T).to(tl.float32)
            t_mean = tl.sum(x, axis=0) / n_tile
            dev = tl.where(m, x - t_mean[None, :], 0.0)
            t_m2 = tl.sum(dev * dev, axis=0)
            delta = t_mean - mean
            n_all = n_before + n_tile
            mean += delta * (n_tile / n_all)
            m2 += t_m2 + delta * delta * (n_before * n_tile / n_all)
    if STATS:
        tl.store(aux_ptr + (2 + 2 * split).to(tl.int64) * F + cols, mean, mask=fmask)
        tl.store(aux_ptr + (3 + 2 * split).to(tl.int64) * F + cols, m2, mask=fmask)


@triton.jit
def _fwd_kernel(
    x_ptr, w_ptr, b_ptr, rm_ptr, rv_ptr, y_ptr, aux_ptr, T, F, RPS, stride_x, stride_y, eps,
    STATS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr,
):  # fmt: skip
    cols, fmask, mu, _, scale, shift = _fwd_prologue(x_ptr, w_ptr, b_ptr, rm_ptr, rv_ptr, aux_ptr, F, eps, BLOCK_F)
    _fwd_rows(
        x_ptr, y_ptr, aux_ptr, T, F, RPS, stride_x, stride_y, cols, fmask, mu, scale, shift, STATS, BLOCK_T, BLOCK_F
    )


@triton.jit
def _lerp(start, end, w):
    # torch.lerp's formula (the reference updates the buffers with lerp_)
    return tl.where(w < 0.5, start + w * (end - start), end - (end - start) * (1.0 - w))


@triton.jit
def _update_stats(aux_ptr, rm_ptr, rv_ptr, rm, rv, n, T, F, RPS, P, momentum, cols, fmask, P_PAD: tl.constexpr):
    """Lerps the running statistics of the features `cols` (read before as rm, rv in fp32; n the
    update count read before) towards this batch's mean and unbiased variance, combined from the
    split partials in aux."""
    mean, var = batch_stats(aux_ptr, F, T, RPS, P, cols, fmask, P_PAD)
    unbiased = var * T / (T - 1)
    r = tl.maximum(1.0 / (n + 1).to(tl.float32), momentum)
    tl.store(rm_ptr + cols, _lerp(rm, mean, r).to(rm_ptr.dtype.element_ty), mask=fmask)
    tl.store(rv_ptr + cols, _lerp(rv, unbiased, r).to(rv_ptr.dtype.element_ty), mask=fmask)


@triton.jit
def _update_kernel(aux_ptr, rm_ptr, rv_ptr, n_ptr, T, F, RPS, P, momentum, P_PAD: tl.constexpr, BLOCK_F: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_F + tl.arange(0, BLOCK_F)
    fmask = cols < F
    rm = tl.load(rm_ptr + cols, mask=fmask, other=0.0).to(tl.float32)
    rv = tl.load(rv_ptr + cols, mask=fmask, other=0.0).to(tl.float32)
    _update_stats(aux_ptr, rm_ptr, rv_ptr, rm, rv, tl.load(n_ptr), T, F, RPS, P, momentum, cols, fmask, P_PAD)


@triton.jit
def _fwd_update_kernel(
    x_ptr, w_ptr, b_ptr, rm_ptr, rv_ptr, n_ptr, y_ptr, aux_ptr, sync_ptr, T, F, RPS, P, stride_x, stride_y, eps,
    momentum, P_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr,
):  # fmt: skip
    """_fwd_kernel with STATS, then the update of `_update_kernel` by the last program of each
    feature block. sync_ptr: int32 (1 + feature blocks,), zero on entry and on exit: [0] counts
    the feature blocks done, [1 + f] the splits of block f done.

    Ordering: every program reads the running statistics and num_updates before its arrival
    (acq_rel atomics), and they are written only by programs that saw all arrivals of their block
    (the statistics of that block) or of all blocks (num_updates): no program reads a value this
    launch wrote. The barrier before each arrival makes all threads' partial stores precede the
    release, and the acquire makes them visible to the last program's loads."""
    cols, fmask, mu, var, scale, shift = _fwd_prologue(x_ptr, w_ptr, b_ptr, rm_ptr, rv_ptr, aux_ptr, F, eps, BLOCK_F)
    n = tl.load(n_ptr)
    _fwd_rows(
        x_ptr, y_ptr, aux_ptr, T, F, RPS, stride_x, stride_y, cols, fmask, mu, scale, shift, True, BLOCK_T, BLOCK_F
    )
    block = tl.program_id(0)
    tl.debug_barrier()
    arrived = tl.atomic_add(sync_ptr + 1 + block, 1, sem="acq_rel", scope="gpu")
    if arrived == tl.num_programs(1) - 1:  # the last split of this feature block
        _update_stats(aux_ptr, rm_ptr, rv_ptr, mu, var, n, T, F, RPS, P, momentum, cols, fmask, P_PAD)
        tl.atomic_xchg(sync_ptr + 1 + block, 0, sem="relaxed", scope="gpu")
        tl.debug_barrier()
        done = tl.atomic_add(sync_ptr, 1, sem="acq_rel", scope="gpu")
        if done == tl.num_programs(0) - 1:  # the last feature block: every program has read n
            tl.store(n_ptr, n + 1)
            tl.atomic_xchg(sync_ptr, 0, sem="relaxed", scope="gpu")


@triton.jit
def _bwd_reduce_kernel(
    x_ptr, dy_ptr, w_ptr, aux_ptr, red_ptr, dx_ptr, T, F, RPS, P, stride_x, stride_dy, stride_dx, eps,
    BN: tl.constexpr, WRITE_DX: tl.constexpr, P_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr,
):  # fmt: skip
    cols = tl.program_id(0) * BLOCK_F + tl.arange(0, BLOCK_F)
    split = tl.program_id(1)
    fmask = cols < F
    if BN:
        center, _ = batch_stats(aux_ptr, F, T, RPS, P, cols, fmask, P_PAD)
    else:
        center = tl.load(aux_ptr + cols, mask=fmask, other=0.0)
    rstd = tl.rsqrt(tl.load(aux_ptr + F + cols, mask=fmask, other=1.0) + eps)
    scale = rstd * tl.load(w_ptr + cols, mask=fmask, other=0.0).to(tl.float32)
    a = tl.zeros((BLOCK_F,), tl.float32)
    b = tl.zeros((BLOCK_F,), tl.float32)
    start = split * RPS
    end = tl.minimum(start + RPS, T)
    for t0 in range(start, end, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        rmask = rows < end
        m = rmask[:, None] & fmask[None, :]
        x = tl.load(x_ptr + _offsets(stride_x, rows, cols), mask=m, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + _offsets(stride_dy, rows, cols), mask=m, other=0.0).to(tl.float32)
        a += tl.sum(dy, axis=0)
        b += tl.sum(dy * tl.where(m, x - center[None, :], 0.0), axis=0)
        if WRITE_DX:
            dx = dy * scale[None, :]
            tl.store(dx_ptr + _offsets(stride_dx, rows, cols), dx.to(dx_ptr.dtype.element_ty), mask=m)
    tl.store(red_ptr + (2 * split).to(tl.int64) * F + cols, a, mask=fmask)
    tl.store(red_ptr + (2 * split + 1).to(tl.int64) * F + cols, b, mask=fmask)


@triton.jit
def _bwd_dx_kernel(
    x_ptr, dy_ptr, w_ptr, aux_ptr, red_ptr, dx_ptr, dw_ptr, db_ptr, T, F, RPS, P, stride_x, stride_dy, stride_dx,
    eps, P_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr,
):  # fmt: skip
    cols = tl.program_id(0) * BLOCK_F + tl.arange(0, BLOCK_F)
    split = tl.program_id(1)
    fmask = cols < F
    b_mu, b_var = batch_stats(aux_ptr, F, T, RPS, P, cols, fmask, P_PAD)
    p = tl.arange(0, P_PAD)
    offs_p = (2 * p)[:, None].to(tl.int64) * F + cols[None, :]
    pm = (p < P)[:, None] & fmask[None, :]
    a = tl.sum(tl.load(red_ptr + offs_p, mask=pm, other=0.0), axis=0)
    b = tl.sum(tl.load(red_ptr + offs_p + F, mask=pm, other=0.0), axis=0)
    mu = tl.load(aux_ptr + cols, mask=fmask, other=0.0)
    rstd = tl.rsqrt(tl.load(aux_ptr + F + cols, mask=fmask, other=1.0) + eps)
    w = tl.load(w_ptr + cols, mask=fmask, other=0.0).to(tl.float32)
    if split == 0:
        tl.store(dw_ptr + cols, (rstd * (b + (b_mu - mu) * a)).to(dw_ptr.dtype.element_ty), mask=fmask)
        tl.store(db_ptr + cols, a.to(db_ptr.dtype.element_ty), mask=fmask)
    scale = rstd * w
    mean_dy = a / T
    coef = b / (T * (b_var + eps))
    start = split * RPS
    end = tl.minimum(start + RPS, T)
    for t0 in range(start, end, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        rmask = rows < end
        m = rmask[:, None] & fmask[None, :]
        x = tl.load(x_ptr + _offsets(stride_x, rows, cols), mask=m, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + _offsets(stride_dy, rows, cols), mask=m, other=0.0).to(tl.float32)
        dx = scale[None, :] * (dy - mean_dy[None, :] - (x - b_mu[None, :]) * coef[None, :])
        tl.store(dx_ptr + _offsets(stride_dx, rows, cols), dx.to(dx_ptr.dtype.element_ty), mask=m)
