"""Triton kernels of the mixing backward with a fused lazy Adam update of the table rows.

The plain backward (triton_kernels.py) writes dense (N, d) gradients of both tables, which the
optimizer then reads back (and clipping, and zero_grad): ~36 bytes per table parameter per step.
Here no table gradient exists in memory: each expert's gradient rows are summed in registers and
the update rule of torchpeer/optim/rowwise_adam.py is applied to that row right away. Bytes per
parameter of a selected row (read and write each):
    row-wise v (one per row)   fp32 table + m: 16; bf16 table + fp32 master + m: 18
    element-wise v (fp32)      fp32 table + m + v: 24; bf16 table + fp32 master + m + v: 26
plus 8 (row-wise: 12) bytes per row of scalars (step count and, row-wise, v).

Order matters: dx needs the OLD down rows, so the token-centric pass runs first:
pass 1 (token-centric, one program per token): gathers v and u rows of its selections,
    s = dy[t] . v_e, coef = g act'(h) s, dgate = act(h) s, dx[t] = sum_s coef u_e
    (bytes ~ T*S * 2 table rows, like the forward; the plain backward reads 1 here and v once
    per expert, so this design reads one more table row per selection)
pass 2 (expert-centric, one program per segment of <= SEG selections of one expert):
    du = sum_p coef_p x[t_p], dv = sum_p g_p act(h_p) dy[t_p]; an expert with one segment updates
    its rows in place; a hot expert's segments write fp32 partials and
pass 3 (one program per hot expert) sums them in segment order and updates the rows.
No atomics, fixed order: bitwise deterministic.
"""

import triton
import triton.language as tl

from .triton_kernels import _act_and_grad, _gather_selections, _segment_of_program


@triton.jit
def _bwd_token_kernel(
    dy_ptr, down_ptr, up_ptr, idx_ptr, gate_ptr, h_ptr, coef_ptr, dgate_ptr, dx_ptr,
    S, D, stride_dy, stride_down, stride_up, stride_dx,
    ACT: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One program per token t: coef, dgate of its selections and dx[t] = sum_s coef u[idx]."""
    t = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    dy = tl.load(dy_ptr + t * stride_dy + offs_d, mask=dmask, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s0 in range(0, S, BLOCK_S):
        offs_s, smask, g, u, v = _gather_selections(
            t, s0, S, S, idx_ptr, gate_ptr, down_ptr, up_ptr, stride_down, stride_up, offs_d, dmask, BLOCK_S
        )
        h = tl.load(h_ptr + t * S + offs_s, mask=smask, other=0.0)
        s = tl.sum(v.to(tl.float32) * dy[None, :], axis=1)
        a, da = _act_and_grad(h, ACT)
        coef = g * da * s
        tl.store(coef_ptr + t * S + offs_s, coef, mask=smask)
        tl.store(dgate_ptr + t * S + offs_s, a * s, mask=smask)
        acc += tl.sum(coef[:, None] * u.to(tl.float32), axis=0)
    tl.store(dx_ptr + t * stride_dx + offs_d, acc.to(dx_ptr.dtype.element_ty), mask=dmask)


@triton.jit
def _rowwise_adam_row(
    w_ptr, master_ptr, m_ptr, v_ptr, t_ptr, e, g, offs_d, mask, D, hyper_ptr,
    MASTER: tl.constexpr, ELEMENTWISE: tl.constexpr,
):  # fmt: skip
    """The rule of torchpeer/optim/rowwise_adam.py on row e (of D contiguous columns) with gradient
    g (BLOCK_D,) fp32. hyper = [lr, beta1, beta2, eps, weight_decay] (a device tensor: no recompile
    per lr). MASTER: the weights live in an fp32 master table; the working table (bf16) gets a
    rounded copy. ELEMENTWISE: v is (N, D) fp32, one per element, else (N,), one per row."""
    lr = tl.load(hyper_ptr)
    b1 = tl.load(hyper_ptr + 1)
    b2 = tl.load(hyper_ptr + 2)
    eps = tl.load(hyper_ptr + 3)
    wd = tl.load(hyper_ptr + 4)
    t = (tl.load(t_ptr + e) + 1).to(tl.float32)
    m = tl.load(m_ptr + e * D + offs_d, mask=mask, other=0.0).to(tl.float32)  # fp32 or bf16 state
    if MASTER:
        w = tl.load(master_ptr + e * D + offs_d, mask=mask, other=0.0)
    else:
        w = tl.load(w_ptr + e * D + offs_d, mask=mask, other=0.0).to(tl.float32)
    m = b1 * m + (1.0 - b1) * g
    if ELEMENTWISE:
        v = b2 * tl.load(v_ptr + e * D + offs_d, mask=mask, other=0.0) + (1.0 - b2) * (g * g)
    else:
        v = b2 * tl.load(v_ptr + e) + (1.0 - b2) * (tl.sum(g * g, axis=0) / D)
    bc1 = 1.0 - tl.exp(t * tl.log(b1))
    bc2 = 1.0 - tl.exp(t * tl.log(b2))
    w = w * (1.0 - lr * wd) - (lr / bc1) * m / (tl.sqrt(v / bc2) + eps)
    if MASTER:
        tl.store(master_ptr + e * D + offs_d, w, mask=mask)
    tl.store(w_ptr + e * D + offs_d, w.to(w_ptr.dtype.element_ty), mask=mask)
    tl.store(m_ptr + e * D + offs_d, m.to(m_ptr.dtype.element_ty), mask=mask)
    any_lane = tl.max(mask.to(tl.int32), axis=0) > 0  # the row is updated at all
    if ELEMENTWISE:
        tl.store(v_ptr + e * D + offs_d, v, mask=mask)
    else:
        tl.store(v_ptr + e, v, mask=any_lane)
    tl.store(t_ptr + e, t.to(tl.int32), mask=any_lane)


@triton.jit
def _bwd_segment_update_kernel(
    x_ptr, dy_ptr, gate_ptr, h_ptr, coef_ptr, perm_ptr, offsets_ptr,
    nseg_ptr, pbase_ptr, seg_expert_ptr, seg_index_ptr, partial_ptr,
    down_ptr, w_down_ptr, m_down_ptr, v_down_ptr, t_down_ptr,
    up_ptr, w_up_ptr, m_up_ptr, v_up_ptr, t_up_ptr, hyper_ptr,
    N, S, D, SEG, stride_x, stride_dy,
    ACT: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, MASTER: tl.constexpr,
    ELEMENTWISE: tl.constexpr,
):  # fmt: skip
    """One program per segment (programs 0..N-1: segment 0 of expert = program id; N..: extra
    segments named by seg_expert/seg_index, -1 = none). du/dv of the segment; a one-segment
    expert with selections updates both rows in place, a hot expert's segments write
    partial[pbase[e] + segment] (du row, dv row). Tables are (N, D) contiguous."""
    pid = tl.program_id(0).to(tl.int64)
    e, seg, valid, first, last, start, end = _segment_of_program(
        pid, N, seg_expert_ptr, seg_index_ptr, offsets_ptr, SEG
    )
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    du = tl.zeros([BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_D], dtype=tl.float32)
    for p0 in range(start, end, BLOCK_S):
        offs_p = p0 + tl.arange(0, BLOCK_S)
        pmask = offs_p < end
        p = tl.load(perm_ptr + offs_p, mask=pmask, other=0).to(tl.int64)
        tok = p // S
        g = tl.load(gate_ptr + p, mask=pmask, other=0.0).to(tl.float32)
        h = tl.load(h_ptr + p, mask=pmask, other=0.0)
        c = tl.load(coef_ptr + p, mask=pmask, other=0.0)
        m2 = pmask[:, None] & dmask[None, :]
        xt = tl.load(x_ptr + tok[:, None] * stride_x + offs_d[None, :], mask=m2, other=0.0)
        dyt = tl.load(dy_ptr + tok[:, None] * stride_dy + offs_d[None, :], mask=m2, other=0.0)
        a, _ = _act_and_grad(h, ACT)
        du += tl.sum(c[:, None] * xt.to(tl.float32), axis=0)
        dv += tl.sum((g * a)[:, None] * dyt.to(tl.float32), axis=0)
    nseg = tl.load(nseg_ptr + e)
    update = offs_d < tl.where(valid & (nseg == 1) & (last > first), D, 0)
    _rowwise_adam_row(
        down_ptr, w_down_ptr, m_down_ptr, v_down_ptr, t_down_ptr, e, du, offs_d, update, D, hyper_ptr,
        MASTER, ELEMENTWISE,
    )  # fmt: skip
    _rowwise_adam_row(
        up_ptr, w_up_ptr, m_up_ptr, v_up_ptr, t_up_ptr, e, dv, offs_d, update, D, hyper_ptr, MASTER, ELEMENTWISE
    )
    slot = (tl.load(pbase_ptr + e) + seg) * 2 * D
    partial = offs_d < tl.where(valid & (nseg > 1), D, 0)
    tl.store(partial_ptr + slot + offs_d, du, mask=partial)
    tl.store(partial_ptr + slot + D + offs_d, dv, mask=partial)


@triton.jit
def _reduce_update_kernel(
    hot_ptr, nseg_ptr, pbase_ptr, partial_ptr,
    down_ptr, w_down_ptr, m_down_ptr, v_down_ptr, t_down_ptr,
    up_ptr, w_up_ptr, m_up_ptr, v_up_ptr, t_up_ptr, hyper_ptr,
    D, BLOCK_D: tl.constexpr, MASTER: tl.constexpr, ELEMENTWISE: tl.constexpr,
):  # fmt: skip
    """One program per hot expert e = hot[q] (-1: none): sum its segments' partials in order,
    then update its rows. (Also the column path's, for the element-wise rule: partials of the
    same layout, D = the slice's width.)"""
    e = tl.load(hot_ptr + tl.program_id(0))
    valid = e >= 0
    e = tl.maximum(e, 0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < tl.where(valid, D, 0)
    n = tl.where(valid, tl.load(nseg_ptr + e), 0)
    base = tl.load(pbase_ptr + e) * 2 * D
    du = tl.zeros([BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_D], dtype=tl.float32)
    for i in range(0, n):
        du += tl.load(partial_ptr + base + i * 2 * D + offs_d, mask=dmask, other=0.0)
        dv += tl.load(partial_ptr + base + i * 2 * D + D + offs_d, mask=dmask, other=0.0)
    _rowwise_adam_row(
        down_ptr, w_down_ptr, m_down_ptr, v_down_ptr, t_down_ptr, e, du, offs_d, dmask, D, hyper_ptr,
        MASTER, ELEMENTWISE,
    )  # fmt: skip
    _rowwise_adam_row(
        up_ptr, w_up_ptr, m_up_ptr, v_up_ptr, t_up_ptr, e, dv, offs_d, dmask, D, hyper_ptr, MASTER, ELEMENTWISE
    )
