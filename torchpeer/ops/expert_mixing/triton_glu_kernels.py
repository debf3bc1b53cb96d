"""Triton kernels of the GLU read-out's mixing: y[t] = sum_s g act(x[t] . u_e) (x[t] . w_e) v_e.

Shapes: x: (T, d); down (u), lin (w), up (v): (N, d); indices, gates: (T, H, K); S = H * K.
The same three passes as the paper's read-out (triton_kernels.py, whose docstring explains the
design), with a third table row per selection:

forward (one program per token): gather u, w, v rows; h = x . u and z = x . w are saved (T, S)
    fp32 for backward; acc += g act(h) z v.                          bytes ~ T*S * 3 rows
backward pass 1 (one program per segment of <= SEG selections of one expert e, sorted by expert):
    s = dy[t] . v_e,  dgate = act(h) z s,  cu = g act'(h) z s,  cw = g act(h) s,
    du_e += cu x[t],  dw_e += cw x[t],  dv_e += g act(h) z dy[t]; cu, cw, dgate stored per
    selection; segment 0 writes the expert's three gradient rows, extra segments of hot experts
    write fp32 partials (3 rows each) that
backward reduce (one program per hot expert) adds in segment order;
backward pass 2 (one program per token): dx[t] = sum_s cu u_e + cw w_e.   bytes ~ T*S * 2 rows
No atomics, fixed order: bitwise deterministic, like the paper's kernels.
"""

import triton
import triton.language as tl

from ..triton_segments import hot_row_of_program
from .triton_kernels import _act, _act_and_grad, _segment_of_program


@triton.jit
def _glu_fwd_kernel(
    x_ptr, down_ptr, lin_ptr, up_ptr, idx_ptr, gate_ptr, y_ptr, h_ptr, z_ptr,
    S, D, stride_x, stride_down, stride_lin, stride_up, stride_y,
    ACT: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One program per token t: y[t] = sum_s g act(x . u) (x . w) v; saves h = x . u, z = x . w."""
    t = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    x = tl.load(x_ptr + t * stride_x + offs_d, mask=dmask, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s0 in range(0, S, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        smask = offs_s < S
        e = tl.load(idx_ptr + t * S + offs_s, mask=smask, other=0).to(tl.int64)
        g = tl.load(gate_ptr + t * S + offs_s, mask=smask, other=0.0).to(tl.float32)
        m2 = smask[:, None] & dmask[None, :]
        # all three gathers issued before any use, so they are in flight together
        u = tl.load(down_ptr + e[:, None] * stride_down + offs_d[None, :], mask=m2, other=0.0)
        w = tl.load(lin_ptr + e[:, None] * stride_lin + offs_d[None, :], mask=m2, other=0.0)
        v = tl.load(up_ptr + e[:, None] * stride_up + offs_d[None, :], mask=m2, other=0.0)
        h = tl.sum(u.to(tl.float32) * x[None, :], axis=1)  # (BLOCK_S,)
        z = tl.sum(w.to(tl.float32) * x[None, :], axis=1)
        tl.store(h_ptr + t * S + offs_s, h, mask=smask)
        tl.store(z_ptr + t * S + offs_s, z, mask=smask)
        c = g * _act(h, ACT) * z  # masked lanes: g = 0
        acc += tl.sum(c[:, None] * v.to(tl.float32), axis=0)
    tl.store(y_ptr + t * stride_y + offs_d, acc.to(y_ptr.dtype.element_ty), mask=dmask)


@triton.jit
def _glu_bwd_segment_kernel(
    x_ptr, dy_ptr, up_ptr, gate_ptr, h_ptr, z_ptr, perm_ptr, offsets_ptr,
    seg_expert_ptr, seg_index_ptr, partial_ptr, ddown_ptr, dlin_ptr, dup_ptr, cu_ptr, cw_ptr, dgate_ptr,
    N, S, D, SEG, stride_x, stride_dy, stride_up, stride_ddown, stride_dlin, stride_dup,
    ACT: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One program per segment of one expert's sorted selections (as _mix_bwd_segment_kernel):
    du, dw, dv of the segment; per selection cu = dL/dh, cw = dL/dz and dgate. Segment 0 writes the
    gradient rows, extra segment q writes partial[q] (fp32, rows du, dw, dv)."""
    pid = tl.program_id(0).to(tl.int64)
    e, seg, valid, first, last, start, end = _segment_of_program(
        pid, N, seg_expert_ptr, seg_index_ptr, offsets_ptr, SEG
    )
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    v_e = tl.load(up_ptr + e * stride_up + offs_d, mask=offs_d < tl.where(end > start, D, 0), other=0.0)
    v_e = v_e.to(tl.float32)
    du = tl.zeros([BLOCK_D], dtype=tl.float32)
    dw = tl.zeros([BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_D], dtype=tl.float32)
    offs_p = start + tl.arange(0, BLOCK_S)
    p_next = tl.load(perm_ptr + offs_p, mask=offs_p < end, other=0).to(tl.int64)
    for p0 in range(start, end, BLOCK_S):
        offs_p = p0 + tl.arange(0, BLOCK_S)
        pmask = offs_p < end
        p = p_next  # flat selection ids t * S + s of this block
        tok = p // S
        g = tl.load(gate_ptr + p, mask=pmask, other=0.0).to(tl.float32)
        h = tl.load(h_ptr + p, mask=pmask, other=0.0)
        z = tl.load(z_ptr + p, mask=pmask, other=0.0)
        m2 = pmask[:, None] & dmask[None, :]
        xt = tl.load(x_ptr + tok[:, None] * stride_x + offs_d[None, :], mask=m2, other=0.0).to(tl.float32)
        dyt = tl.load(dy_ptr + tok[:, None] * stride_dy + offs_d[None, :], mask=m2, other=0.0).to(tl.float32)
        # the next block's ids while these rows are in flight (as _mix_bwd_segment_kernel)
        offs_n = offs_p + BLOCK_S
        p_next = tl.load(perm_ptr + offs_n, mask=offs_n < end, other=0).to(tl.int64)
        s = tl.sum(dyt * v_e[None, :], axis=1)  # dy[t] . v_e
        a, da = _act_and_grad(h, ACT)
        cu = g * da * z * s
        cw = g * a * s
        tl.store(dgate_ptr + p, a * z * s, mask=pmask)
        tl.store(cu_ptr + p, cu, mask=pmask)
        tl.store(cw_ptr + p, cw, mask=pmask)
        du += tl.sum(cu[:, None] * xt, axis=0)
        dw += tl.sum(cw[:, None] * xt, axis=0)
        dv += tl.sum((g * a * z)[:, None] * dyt, axis=0)
    direct = offs_d < tl.where(pid < N, D, 0)
    tl.store(ddown_ptr + e * stride_ddown + offs_d, du.to(ddown_ptr.dtype.element_ty), mask=direct)
    tl.store(dlin_ptr + e * stride_dlin + offs_d, dw.to(dlin_ptr.dtype.element_ty), mask=direct)
    tl.store(dup_ptr + e * stride_dup + offs_d, dv.to(dup_ptr.dtype.element_ty), mask=direct)
    slot = tl.maximum(pid - N, 0) * 3 * D
    partial = offs_d < tl.where(valid & (pid >= N), D, 0)
    tl.store(partial_ptr + slot + offs_d, du, mask=partial)
    tl.store(partial_ptr + slot + D + offs_d, dw, mask=partial)
    tl.store(partial_ptr + slot + 2 * D + offs_d, dv, mask=partial)


@triton.jit
def _add_partials(ptr, stride, e, partial_ptr, base, n, D, offs_d, dmask):
    """row ptr[e] += sum_{i < n} partial[base + i * 3 * D + offs_d], in order, fp32."""
    acc = tl.load(ptr + e * stride + offs_d, mask=dmask, other=0.0).to(tl.float32)
    for i in range(0, n):
        acc += tl.load(partial_ptr + base + i * 3 * D + offs_d, mask=dmask, other=0.0)
    tl.store(ptr + e * stride + offs_d, acc.to(ptr.dtype.element_ty), mask=dmask)


@triton.jit
def _glu_bwd_reduce_kernel(
    hot_ptr, nseg_ptr, pbase_ptr, partial_ptr, ddown_ptr, dlin_ptr, dup_ptr,
    D, stride_ddown, stride_dlin, stride_dup, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One program per hot expert e = hot[q] (-1: none): adds its extra segments' partial rows to
    the three gradient rows segment 0 wrote, in segment order."""
    e, valid, n, first = hot_row_of_program(tl.program_id(0), hot_ptr, nseg_ptr, pbase_ptr)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < tl.where(valid, D, 0)
    base = first * 3 * D
    _add_partials(ddown_ptr, stride_ddown, e, partial_ptr, base, n, D, offs_d, dmask)
    _add_partials(dlin_ptr, stride_dlin, e, partial_ptr, base + D, n, D, offs_d, dmask)
    _add_partials(dup_ptr, stride_dup, e, partial_ptr, base + 2 * D, n, D, offs_d, dmask)


@triton.jit
def _glu_bwd_dx_kernel(
    down_ptr, lin_ptr, idx_ptr, cu_ptr, cw_ptr, dx_ptr,
    S, D, stride_down, stride_lin, stride_dx,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One program per token t: dx[t] = sum_s cu[t, s] u[idx] + cw[t, s] w[idx]."""
    t = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s0 in range(0, S, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        smask = offs_s < S
        e = tl.load(idx_ptr + t * S + offs_s, mask=smask, other=0).to(tl.int64)
        cu = tl.load(cu_ptr + t * S + offs_s, mask=smask, other=0.0)
        cw = tl.load(cw_ptr + t * S + offs_s, mask=smask, other=0.0)
        m2 = smask[:, None] & dmask[None, :]
        u = tl.load(down_ptr + e[:, None] * stride_down + offs_d[None, :], mask=m2, other=0.0)
        w = tl.load(lin_ptr + e[:, None] * stride_lin + offs_d[None, :], mask=m2, other=0.0)
        acc += tl.sum(cu[:, None] * u.to(tl.float32) + cw[:, None] * w.to(tl.float32), axis=0)
    tl.store(dx_ptr + t * stride_dx + offs_d, acc.to(dx_ptr.dtype.element_ty), mask=dmask)
