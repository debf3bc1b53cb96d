"""Triton kernels of column-sliced expert mixing: one rank's share of y = sum_s g act(x . u_i) v_i when
the tables are split by columns (the rank holds u_i[cols], v_i[cols] of every expert, c = d/W columns
of each row) and sees all T tokens (torchpeer/parallel/sharded_layers.py, docs/parallel.md).

Each dot product over d is a sum over the ranks' column slices, so it is computed in two halves
with an all-reduce of the (T, S) partial dots between them (the caller's; the kernels never
communicate). S = H * K selections per token; a, rows: (T, c) activations (x or dy, my columns).

forward:
    dots (token-centric)   h_r[t, s] = x[t, cols] . u_i[cols]                 reads T*S u rows
    [all-reduce h_r -> h]
    rows (token-centric)   Y[t, cols] = sum_s g act(h) v_i[cols]              reads T*S v rows
backward (selections sorted by expert and cut into segments, as in triton_kernels.py):
    up pass (expert)       s_r[p] = dy[t_p, cols] . v_e;  dv_e = sum_p g act(h) dy[t_p, cols]
    [all-reduce s_r -> s = dy . v]
    token pass             coef = g act'(h) s, dgate = act(h) s, dx[t, cols] = sum_s coef u_i[cols]
    down pass (expert)     du_e = sum_p coef_p x[t_p, cols]
    then the hot experts' extra segments are summed by triton_kernels._mix_bwd_reduce_kernel.

Bytes per selection are those of the one-GPU kernels (forward: a u and a v row; backward: dy and x
rows in the expert passes, a u row in the token pass), on c = d/W columns: the one-GPU expert pass
computes dy . v_e where it reads dy anyway, and so does the up pass here, so that splitting the
dot across ranks costs no extra row reads, only a second read of the sorted ids and the (T, S)
scalars. No atomics, fixed summation order: deterministic, like the one-GPU kernels.

With the fused row-wise Adam (torchpeer/optim/rowwise_adam.py) a row's second moment needs
mean(g^2) over ALL d columns, i.e. over every rank's slice, so its update is split in two:
moment kernels (in place of the gradient rows): m <- b1 m + (1 - b1) g, sq[e] = sum(g^2) of my columns
[all-reduce sq (N,) per table]
apply kernel: t, v from the global sq, w <- w (1 - lr wd) - lr m_hat / (sqrt(v_hat) + eps)
(it reads the moment as stored: with bf16 first moments, rounded, where the one-GPU kernel uses
the fp32 value it has just computed).
With the element-wise second moment ((N, c) per rank, sharded like m) every element's update needs
only its own column, so the moment kernels apply the whole rule where they have the row's gradient
(triton_fused_kernels._rowwise_adam_row, as the one-GPU kernel): no sq, no all-reduce, no apply
kernel. The up pass may update v rows in place because the token pass reads only the down table;
the down pass runs after the token pass has read the old down rows.
"""

import triton
import triton.language as tl

from .triton_fused_kernels import _rowwise_adam_row
from .triton_kernels import _act, _act_and_grad, _segment_of_program


@triton.jit
def _cols_dots_kernel(
    a_ptr, table_ptr, idx_ptr, out_ptr, S, C, stride_a, stride_t,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """One program per token t: out[t, s] = a[t] . table[idx[t, s]] (fp32), for every selection s."""
    t = tl.program_id(0).to(tl.int64)
    offs_c = tl.arange(0, BLOCK_C)
    cmask = offs_c < C
    a = tl.load(a_ptr + t * stride_a + offs_c, mask=cmask, other=0.0).to(tl.float32)
    for s0 in range(0, S, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        smask = offs_s < S
        e = tl.load(idx_ptr + t * S + offs_s, mask=smask, other=0).to(tl.int64)
        m2 = smask[:, None] & cmask[None, :]
        rows = tl.load(table_ptr + e[:, None] * stride_t + offs_c[None, :], mask=m2, other=0.0)
        tl.store(out_ptr + t * S + offs_s, tl.sum(rows.to(tl.float32) * a[None, :], axis=1), mask=smask)


@triton.jit
def _cols_rows_kernel(
    h_ptr, gate_ptr, table_ptr, idx_ptr, y_ptr, S, C, stride_t, stride_y,
    ACT: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """One program per token t: y[t] = sum_s g[t, s] act(h[t, s]) table[idx[t, s]]."""
    t = tl.program_id(0).to(tl.int64)
    offs_c = tl.arange(0, BLOCK_C)
    cmask = offs_c < C
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for s0 in range(0, S, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        smask = offs_s < S
        e = tl.load(idx_ptr + t * S + offs_s, mask=smask, other=0).to(tl.int64)
        g = tl.load(gate_ptr + t * S + offs_s, mask=smask, other=0.0).to(tl.float32)
        h = tl.load(h_ptr + t * S + offs_s, mask=smask, other=0.0)
        m2 = smask[:, None] & cmask[None, :]
        rows = tl.load(table_ptr + e[:, None] * stride_t + offs_c[None, :], mask=m2, other=0.0)
        acc += tl.sum((g * _act(h, ACT))[:, None] * rows.to(tl.float32), axis=0)
    tl.store(y_ptr + t * stride_y + offs_c, acc.to(y_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _cols_token_kernel(
    dots_ptr, gate_ptr, h_ptr, table_ptr, idx_ptr, coef_ptr, dgate_ptr, dx_ptr,
    S, C, stride_t, stride_dx, gate_scale,
    ACT: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """One program per token t, from the full dots s = dy . v: coef = g act'(h) s, dgate =
    gate_scale act(h) s (both stored per selection) and dx[t] = sum_s coef table[idx[t, s]]."""
    t = tl.program_id(0).to(tl.int64)
    offs_c = tl.arange(0, BLOCK_C)
    cmask = offs_c < C
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for s0 in range(0, S, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        smask = offs_s < S
        e = tl.load(idx_ptr + t * S + offs_s, mask=smask, other=0).to(tl.int64)
        m2 = smask[:, None] & cmask[None, :]
        u = tl.load(table_ptr + e[:, None] * stride_t + offs_c[None, :], mask=m2, other=0.0)
        g = tl.load(gate_ptr + t * S + offs_s, mask=smask, other=0.0).to(tl.float32)
        h = tl.load(h_ptr + t * S + offs_s, mask=smask, other=0.0)
        s = tl.load(dots_ptr + t * S + offs_s, mask=smask, other=0.0)
        a, da = _act_and_grad(h, ACT)
        coef = g * da * s
        tl.store(coef_ptr + t * S + offs_s, coef, mask=smask)
        tl.store(dgate_ptr + t * S + offs_s, a * s * gate_scale, mask=smask)
        acc += tl.sum(coef[:, None] * u.to(tl.float32), axis=0)
    tl.store(dx_ptr + t * stride_dx + offs_c, acc.to(dx_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _segment_sum(
    pid, N, S, C, SEG, rows_ptr, stride_r, gate_ptr, h_ptr, coef_ptr, v_ptr, stride_v, dots_ptr,
    perm_ptr, offsets_ptr, seg_expert_ptr, seg_index_ptr,
    ACT: tl.constexpr, UP: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """The sum over segment pid's selections p (of expert e, see triton_kernels._segment_of_program)
    of w_p rows[t_p], with w_p = g act(h) when UP (the up pass, which also stores the partial dot
    dots[p] = rows[t_p] . v_e), else w_p = coef[p] (the down pass). -> (e, seg, valid, first,
    last, acc (BLOCK_C,) fp32)."""
    e, seg, valid, first, last, start, end = _segment_of_program(
        pid, N, seg_expert_ptr, seg_index_ptr, offsets_ptr, SEG
    )
    offs_c = tl.arange(0, BLOCK_C)
    cmask = offs_c < C
    if UP:  # (masked loads move no bytes: an expert nobody picked skips reading v_e)
        v_e = tl.load(v_ptr + e * stride_v + offs_c, mask=offs_c < tl.where(end > start, C, 0), other=0.0)
        v_e = v_e.to(tl.float32)
    else:
        v_e = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    offs_p = start + tl.arange(0, BLOCK_S)
    p_next = tl.load(perm_ptr + offs_p, mask=offs_p < end, other=0).to(tl.int64)
    for p0 in range(start, end, BLOCK_S):
        offs_p = p0 + tl.arange(0, BLOCK_S)
        pmask = offs_p < end
        p = p_next
        tok = p // S
        m2 = pmask[:, None] & cmask[None, :]
        r = tl.load(rows_ptr + tok[:, None] * stride_r + offs_c[None, :], mask=m2, other=0.0)
        offs_n = offs_p + BLOCK_S  # prefetch the next ids while the rows are in flight
        p_next = tl.load(perm_ptr + offs_n, mask=offs_n < end, other=0).to(tl.int64)
        r = r.to(tl.float32)
        if UP:
            g = tl.load(gate_ptr + p, mask=pmask, other=0.0).to(tl.float32)
            h = tl.load(h_ptr + p, mask=pmask, other=0.0)
            w = g * _act(h, ACT)
            tl.store(dots_ptr + p, tl.sum(r * v_e[None, :], axis=1), mask=pmask)
        else:
            w = tl.load(coef_ptr + p, mask=pmask, other=0.0)
        acc += tl.sum(w[:, None] * r, axis=0)
    return e, seg, valid, first, last, acc


@triton.jit
def _cols_grad_kernel(
    rows_ptr, gate_ptr, h_ptr, coef_ptr, v_ptr, dots_ptr, perm_ptr, offsets_ptr,
    seg_expert_ptr, seg_index_ptr, partial_ptr, grad_ptr,
    N, S, C, SEG, stride_r, stride_v, stride_g, scale,
    ACT: tl.constexpr, UP: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Gradient rows of one table (UP: dv, else du), times `scale`: programs 0..N-1 write segment 0
    of expert = program id into grad (zeros for experts nobody picked), programs N.. the extra
    segments into partial[q] (fp32; du in row 0, dv in row 1, the reduce kernel's layout)."""
    pid = tl.program_id(0).to(tl.int64)
    e, seg, valid, first, last, acc = _segment_sum(
        pid, N, S, C, SEG, rows_ptr, stride_r, gate_ptr, h_ptr, coef_ptr, v_ptr, stride_v, dots_ptr,
        perm_ptr, offsets_ptr, seg_expert_ptr, seg_index_ptr, ACT, UP, BLOCK_S, BLOCK_C,
    )  # fmt: skip
    acc = acc * scale
    offs_c = tl.arange(0, BLOCK_C)
    tl.store(grad_ptr + e * stride_g + offs_c, acc.to(grad_ptr.dtype.element_ty), mask=offs_c < tl.where(pid < N, C, 0))
    slot = tl.maximum(pid - N, 0) * 2 * C
    if UP:  # dv in the second row of the pair
        slot += C
    tl.store(partial_ptr + slot + offs_c, acc, mask=offs_c < tl.where(valid & (pid >= N), C, 0))


@triton.jit
def _adam_moment_row(m_ptr, sq_ptr, e, g, offs_c, mask, C, hyper_ptr):
    """Phase 1 of the row-wise rule on my columns of row e: m <- b1 m + (1 - b1) g; sq[e] = sum(g^2)."""
    b1 = tl.load(hyper_ptr + 1)
    m = tl.load(m_ptr + e * C + offs_c, mask=mask, other=0.0).to(tl.float32)
    m = b1 * m + (1.0 - b1) * g
    tl.store(m_ptr + e * C + offs_c, m.to(m_ptr.dtype.element_ty), mask=mask)
    any_lane = tl.max(mask.to(tl.int32), axis=0) > 0
    tl.store(sq_ptr + e, tl.sum(tl.where(mask, g * g, 0.0), axis=0), mask=any_lane)


@triton.jit
def _cols_moment_kernel(
    rows_ptr, gate_ptr, h_ptr, coef_ptr, v_ptr, dots_ptr, perm_ptr, offsets_ptr,
    seg_expert_ptr, seg_index_ptr, nseg_ptr, pbase_ptr, partial_ptr,
    w_ptr, master_ptr, m_ptr, sq_ptr, t_ptr, hyper_ptr,
    N, S, C, SEG, stride_r, stride_v, scale,
    ACT: tl.constexpr, UP: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
    MASTER: tl.constexpr, ELEMENTWISE: tl.constexpr,
):  # fmt: skip
    """As _cols_grad_kernel, but no gradient row is written: a one-segment expert with selections
    updates its first moment and sq (N,) in place (ELEMENTWISE: the whole rule on its row of the
    table w (N, C) (and master), with sq the (N, C) second moment and t the step counts); each
    segment of a hot expert writes partial[pbase[e] + segment] (the reduce kernel finishes it)."""
    pid = tl.program_id(0).to(tl.int64)
    e, seg, valid, first, last, acc = _segment_sum(
        pid, N, S, C, SEG, rows_ptr, stride_r, gate_ptr, h_ptr, coef_ptr, v_ptr, stride_v, dots_ptr,
        perm_ptr, offsets_ptr, seg_expert_ptr, seg_index_ptr, ACT, UP, BLOCK_S, BLOCK_C,
    )  # fmt: skip
    acc = acc * scale
    offs_c = tl.arange(0, BLOCK_C)
    nseg = tl.load(nseg_ptr + e)
    update = offs_c < tl.where(valid & (nseg == 1) & (last > first), C, 0)
    if ELEMENTWISE:
        _rowwise_adam_row(
            w_ptr, master_ptr, m_ptr, sq_ptr, t_ptr, e, acc, offs_c, update, C, hyper_ptr, MASTER, ELEMENTWISE
        )
    else:
        _adam_moment_row(m_ptr, sq_ptr, e, acc, offs_c, update, C, hyper_ptr)
    slot = (tl.load(pbase_ptr + e) + seg) * 2 * C
    if UP:
        slot += C
    tl.store(partial_ptr + slot + offs_c, acc, mask=offs_c < tl.where(valid & (nseg > 1), C, 0))


@triton.jit
def _cols_reduce_moment_kernel(
    hot_ptr, nseg_ptr, pbase_ptr, partial_ptr, m_down_ptr, sq_down_ptr, m_up_ptr, sq_up_ptr, hyper_ptr,
    C, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """One program per hot expert e = hot[q] (-1: none): sums its segments' partials in segment
    order, then phase 1 of the row-wise rule for both tables (the element-wise rule's hot experts:
    triton_fused_kernels._reduce_update_kernel)."""
    e = tl.load(hot_ptr + tl.program_id(0))
    valid = e >= 0
    e = tl.maximum(e, 0).to(tl.int64)
    offs_c = tl.arange(0, BLOCK_C)
    cmask = offs_c < tl.where(valid, C, 0)
    n = tl.where(valid, tl.load(nseg_ptr + e), 0)
    base = tl.load(pbase_ptr + e) * 2 * C
    du = tl.zeros([BLOCK_C], dtype=tl.float32)
    dv = tl.zeros([BLOCK_C], dtype=tl.float32)
    for i in range(0, n):
        du += tl.load(partial_ptr + base + i * 2 * C + offs_c, mask=cmask, other=0.0)
        dv += tl.load(partial_ptr + base + i * 2 * C + C + offs_c, mask=cmask, other=0.0)
    _adam_moment_row(m_down_ptr, sq_down_ptr, e, du, offs_c, cmask, C, hyper_ptr)
    _adam_moment_row(m_up_ptr, sq_up_ptr, e, dv, offs_c, cmask, C, hyper_ptr)


@triton.jit
def _adam_apply_row(
    w_ptr, master_ptr, m_ptr, v_ptr, t_ptr, sq, e, offs_c, mask, C, D_FULL, hyper_ptr, MASTER: tl.constexpr
):
    """Phase 2 on my columns of row e, with sq = sum(g^2) over all d = D_FULL columns (all ranks):
    the rule of triton_fused_kernels._rowwise_adam_row, reading the moment phase 1 stored."""
    lr = tl.load(hyper_ptr)
    b1 = tl.load(hyper_ptr + 1)
    b2 = tl.load(hyper_ptr + 2)
    eps = tl.load(hyper_ptr + 3)
    wd = tl.load(hyper_ptr + 4)
    t = (tl.load(t_ptr + e) + 1).to(tl.float32)
    m = tl.load(m_ptr + e * C + offs_c, mask=mask, other=0.0).to(tl.float32)
    if MASTER:
        w = tl.load(master_ptr + e * C + offs_c, mask=mask, other=0.0)
    else:
        w = tl.load(w_ptr + e * C + offs_c, mask=mask, other=0.0).to(tl.float32)
    v = b2 * tl.load(v_ptr + e) + (1.0 - b2) * (sq / D_FULL)
    bc1 = 1.0 - tl.exp(t * tl.log(b1))
    bc2 = 1.0 - tl.exp(t * tl.log(b2))
    w = w * (1.0 - lr * wd) - (lr / bc1) * m / (tl.sqrt(v / bc2) + eps)
    if MASTER:
        tl.store(master_ptr + e * C + offs_c, w, mask=mask)
    tl.store(w_ptr + e * C + offs_c, w.to(w_ptr.dtype.element_ty), mask=mask)
    any_lane = tl.max(mask.to(tl.int32), axis=0) > 0
    tl.store(v_ptr + e, v, mask=any_lane)
    tl.store(t_ptr + e, t.to(tl.int32), mask=any_lane)


@triton.jit
def _cols_adam_apply_kernel(
    offsets_ptr, sq_ptr,
    down_ptr, w_down_ptr, m_down_ptr, v_down_ptr, t_down_ptr,
    up_ptr, w_up_ptr, m_up_ptr, v_up_ptr, t_up_ptr, hyper_ptr,
    N, C, D_FULL, BLOCK_C: tl.constexpr, MASTER: tl.constexpr,
):  # fmt: skip
    """One program per expert e: if the step selected it, phase 2 for both tables (sq: (2, N),
    down then up, summed over all ranks)."""
    e = tl.program_id(0).to(tl.int64)
    picked = tl.load(offsets_ptr + e + 1) > tl.load(offsets_ptr + e)
    offs_c = tl.arange(0, BLOCK_C)
    mask = offs_c < tl.where(picked, C, 0)
    sq_d = tl.load(sq_ptr + e)
    sq_u = tl.load(sq_ptr + N + e)
    _adam_apply_row(
        down_ptr, w_down_ptr, m_down_ptr, v_down_ptr, t_down_ptr, sq_d, e, offs_c, mask, C, D_FULL, hyper_ptr, MASTER
    )
    _adam_apply_row(up_ptr, w_up_ptr, m_up_ptr, v_up_ptr, t_up_ptr, sq_u, e, offs_c, mask, C, D_FULL, hyper_ptr, MASTER)
