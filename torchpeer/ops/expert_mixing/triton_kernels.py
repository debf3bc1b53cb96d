"""Triton kernels of expert mixing: y[t] = sum_{h,k} g[t,h,k] * act(x[t] . u[i]) * v[i], i = idx[t,h,k].

Shapes: x: (T, d); down (the u table), up (the v table): (N, d); indices, gates: (T, H, K).
S = H * K is the number of selections (retrieved experts) per token.

The op is memory-bound: every selection touches a random 2-row slice of two huge tables
(N = 1024^2 experts), so the kernels are organised around the bytes they move, and never
write (T*S, d)-sized gathered rows:

forward (token-centric, one program per token):
    for each block of selections: gather u rows, h = x . u, save h (T, S) for backward,
    gather v rows, acc += g * act(h) * v.          bytes ~ T*S * 2 rows
backward pass 1 (expert-centric, one program per expert segment):
    selections are sorted by expert id (a stable sort of the T*S indices), and each expert's list
    is cut into segments of at most SEG selections, so a hot expert (a collapsed router) is
    walked by many programs instead of one; a program loads v_e once (u_e is not needed) and
    walks its segment reading x[t] and dy[t]:
        s = dy[t] . v_e,  dgate = act(h) * s,  coef = g * act'(h) * s
        du_e += coef * x[t],  dv_e += g * act(h) * dy[t]
    and writes each table-gradient row exactly once (zero for experts nobody picked), plus
    dgate and coef into (T, S) buffers.            bytes ~ T*S * 2 rows + 1 table read + 2 written
    Experts with more than one segment write their extra segments' sums to partial rows (fp32),
    and a small reduce pass (one program per hot expert) adds them in segment order.
backward pass 2 (token-centric): dx[t] = sum_s coef[t, s] * u[idx[t, s]].   bytes ~ T*S * 1 row

No atomics anywhere and a fixed summation order, so forward and backward are deterministic
(bit-identical across runs); the `deterministic` flag is therefore a documented no-op.
Table gradients come out in the table dtype (bf16 tables -> bf16 grads), accumulated in fp32.
On one H200 (T = 65536, d = 1024, N = 1024^2, H*K = 128, bf16) fwd + bwd takes 24.1 ms against a
~22.5 ms byte floor, with 4.8 GiB of memory above the tables; benchmarks/NOTES_mixing.md has the
byte counts and every measured version.
"""

import triton
import triton.language as tl

from ..triton_segments import hot_row_of_program
from ..triton_segments import segment_of_program as _segment_of_program


@triton.jit
def _act(h, ACT: tl.constexpr):
    # ACT 0: exact (erf) GELU, as torch.nn.functional.gelu's default; 1: ReLU; 2: identity (linear
    # read-out). The indices are checks.ACTIVATIONS'.
    if ACT == 0:
        return 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))
    elif ACT == 1:
        return tl.maximum(h, 0.0)
    else:
        return h


@triton.jit
def _act_and_grad(h, ACT: tl.constexpr):
    """Returns (act(h), act'(h)); ReLU'(0) = 0 like torch's relu backward."""
    if ACT == 0:
        cdf = 0.5 * (1.0 + tl.math.erf(h * 0.7071067811865476))
        pdf = tl.exp(-0.5 * h * h) * 0.3989422804014327  # 1 / sqrt(2 pi)
        return h * cdf, cdf + h * pdf
    elif ACT == 1:
        return tl.maximum(h, 0.0), tl.where(h > 0.0, 1.0, 0.0)
    else:
        return h, tl.full(h.shape, 1.0, tl.float32)


@triton.jit
def _gather_selections(
    t, s0, S, end, idx_ptr, gate_ptr, down_ptr, up_ptr, stride_down, stride_up, offs_d, dmask, BLOCK_S: tl.constexpr
):
    """Selections s0 .. min(s0 + BLOCK_S, end) of token t (S selections per token; end <= S bounds a
    chunk of them): -> (offs_s, smask, gates fp32, u rows, v rows) (rows in the table dtype; masked
    lanes are zeros)."""
    offs_s = s0 + tl.arange(0, BLOCK_S)
    smask = offs_s < end
    e = tl.load(idx_ptr + t * S + offs_s, mask=smask, other=0).to(tl.int64)
    g = tl.load(gate_ptr + t * S + offs_s, mask=smask, other=0.0).to(tl.float32)
    m2 = smask[:, None] & dmask[None, :]
    # issue both gathers before any use so both are in flight together
    u = tl.load(down_ptr + e[:, None] * stride_down + offs_d[None, :], mask=m2, other=0.0)
    v = tl.load(up_ptr + e[:, None] * stride_up + offs_d[None, :], mask=m2, other=0.0)
    return offs_s, smask, g, u, v


@triton.jit
def _mix_fwd_kernel(
    x_ptr, down_ptr, up_ptr, idx_ptr, gate_ptr, y_ptr, h_ptr,
    S, D, stride_x, stride_down, stride_up, stride_y,
    ACT: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One program per token t: y[t] = sum_s g * act(x[t] . u[idx]) * v[idx]; also saves h = x . u."""
    t = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    x = tl.load(x_ptr + t * stride_x + offs_d, mask=dmask, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s0 in range(0, S, BLOCK_S):
        offs_s, smask, g, u, v = _gather_selections(
            t, s0, S, S, idx_ptr, gate_ptr, down_ptr, up_ptr, stride_down, stride_up, offs_d, dmask, BLOCK_S
        )
        h = tl.sum(u.to(tl.float32) * x[None, :], axis=1)  # (BLOCK_S,)
        tl.store(h_ptr + t * S + offs_s, h, mask=smask)
        w = g * _act(h, ACT)  # masked lanes: g = 0
        acc += tl.sum(w[:, None] * v.to(tl.float32), axis=0)
    tl.store(y_ptr + t * stride_y + offs_d, acc.to(y_ptr.dtype.element_ty), mask=dmask)


@triton.jit
def _mix_bwd_segment_kernel(
    x_ptr, dy_ptr, up_ptr, gate_ptr, h_ptr, perm_ptr, offsets_ptr,
    seg_expert_ptr, seg_index_ptr, partial_ptr, ddown_ptr, dup_ptr, coef_ptr, dgate_ptr, keys_ptr,
    N, P, S, D, SEG, stride_x, stride_dy, stride_up, stride_ddown, stride_dup,
    ACT: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, TOUCHED: tl.constexpr,
):  # fmt: skip
    """One program per segment: SEG (a multiple of BLOCK_S) consecutive selections of one expert.

    Programs 0..N-1 take segment 0 of expert e = program id (so every expert, used or not, is
    visited once and its gradient rows are always written); programs N.. take the extra segments
    of hot experts (seg_expert/seg_index name them; -1 = nothing to do). Selections p of the
    segment (sorted by expert) give
        coef_p = g act'(h) (dy . v_e),  dgate_p = act(h) (dy . v_e)   (stored per selection),
        du = sum_p coef_p x[t_p],       dv = sum_p g_p act(h_p) dy[t_p].
    Segment 0 writes du, dv to the expert's gradient rows; extra segment q writes them to
    partial[q] (fp32, 2 rows: du then dv), and the reduce kernel adds a hot expert's partials
    to its rows in segment order: no atomics, so the result is bitwise deterministic. (With
    bf16 tables segment 0's sum is rounded to bf16 once more than an unsplit expert's.)
    u_e itself is never needed here: dU only needs coef and x.

    TOUCHED (small batches, T*S well below N): programs 0..P-1 (P = T*S) stand for the sorted
    selections keys[0..P-1] (expert ids), and program p takes segment 0 of expert keys[p] only when
    p is the first selection of that expert (the others do nothing); programs P.. take the extra
    segments. Untouched experts get no program: their gradient rows must be zeroed before (a memset,
    near the copy rate, instead of one program per empty row).
    """
    pid = tl.program_id(0).to(tl.int64)
    lead = pid >= 0  # does this program own a segment? (always, but for TOUCHED's followers)
    if TOUCHED:  # vpid: the program of the N-program layout this one stands for
        q = tl.minimum(pid, P - 1)  # (not `p`: the loop below carries a block named p)
        k = tl.load(keys_ptr + q).to(tl.int64)
        prev = tl.load(keys_ptr + tl.maximum(q - 1, 0)).to(tl.int64)
        lead = (pid >= P) | (q == 0) | (prev != k)
        pid = tl.where(pid < P, k, pid - P + N)
    e, seg, valid, first, last, start, end = _segment_of_program(
        pid, N, seg_expert_ptr, seg_index_ptr, offsets_ptr, SEG
    )
    end = tl.where(lead, end, start)  # followers walk nothing and store nothing
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    # masked loads move no bytes: unused experts skip reading v_e.
    # (the limit goes through tl.where: the interpreter rejects block & scalar-bool masks)
    v_e = tl.load(up_ptr + e * stride_up + offs_d, mask=offs_d < tl.where(end > start, D, 0), other=0.0)
    v_e = v_e.to(tl.float32)
    du = tl.zeros([BLOCK_D], dtype=tl.float32)
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
        m2 = pmask[:, None] & dmask[None, :]
        xt = tl.load(x_ptr + tok[:, None] * stride_x + offs_d[None, :], mask=m2, other=0.0)
        dyt = tl.load(dy_ptr + tok[:, None] * stride_dy + offs_d[None, :], mask=m2, other=0.0)
        # prefetch the next block's ids while these rows are in flight: one memory latency per
        # iteration instead of two (perm -> rows); 12% faster at d = 512 (NOTES_mixing.md)
        offs_n = offs_p + BLOCK_S
        p_next = tl.load(perm_ptr + offs_n, mask=offs_n < end, other=0).to(tl.int64)
        dyt = dyt.to(tl.float32)
        s = tl.sum(dyt * v_e[None, :], axis=1)  # dy[t] . v_e, (BLOCK_S,)
        a, da = _act_and_grad(h, ACT)
        coef = g * da * s
        tl.store(dgate_ptr + p, a * s, mask=pmask)
        tl.store(coef_ptr + p, coef, mask=pmask)
        du += tl.sum(coef[:, None] * xt.to(tl.float32), axis=0)
        dv += tl.sum((g * a)[:, None] * dyt, axis=0)
    # segment 0 (program e < N) writes the gradient rows; extra segment q writes partial[q]
    direct = offs_d < tl.where((pid < N) & lead, D, 0)
    tl.store(ddown_ptr + e * stride_ddown + offs_d, du.to(ddown_ptr.dtype.element_ty), mask=direct)
    tl.store(dup_ptr + e * stride_dup + offs_d, dv.to(dup_ptr.dtype.element_ty), mask=direct)
    slot = tl.maximum(pid - N, 0) * 2 * D
    partial = offs_d < tl.where(valid & (pid >= N), D, 0)
    tl.store(partial_ptr + slot + offs_d, du, mask=partial)
    tl.store(partial_ptr + slot + D + offs_d, dv, mask=partial)


@triton.jit
def _mix_bwd_reduce_kernel(
    hot_ptr, nseg_ptr, pbase_ptr, partial_ptr, ddown_ptr, dup_ptr,
    D, stride_ddown, stride_dup, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One program per hot expert e = hot[q] (-1: none): adds its extra segments' partial rows
    partial[pbase[e] : pbase[e] + nseg[e] - 1] to the rows segment 0 wrote, in segment order."""
    e, valid, n, first = hot_row_of_program(tl.program_id(0), hot_ptr, nseg_ptr, pbase_ptr)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < tl.where(valid, D, 0)
    base = first * 2 * D
    du = tl.load(ddown_ptr + e * stride_ddown + offs_d, mask=dmask, other=0.0).to(tl.float32)
    dv = tl.load(dup_ptr + e * stride_dup + offs_d, mask=dmask, other=0.0).to(tl.float32)
    for i in range(0, n):
        du += tl.load(partial_ptr + base + i * 2 * D + offs_d, mask=dmask, other=0.0)
        dv += tl.load(partial_ptr + base + i * 2 * D + D + offs_d, mask=dmask, other=0.0)
    tl.store(ddown_ptr + e * stride_ddown + offs_d, du.to(ddown_ptr.dtype.element_ty), mask=dmask)
    tl.store(dup_ptr + e * stride_dup + offs_d, dv.to(dup_ptr.dtype.element_ty), mask=dmask)


@triton.jit
def _mix_bwd_dx_kernel(
    down_ptr, idx_ptr, coef_ptr, dx_ptr,
    S, D, stride_down, stride_dx,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One program per token t: dx[t] = sum_s coef[t, s] * u[idx[t, s]]."""
    t = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s0 in range(0, S, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        smask = offs_s < S
        e = tl.load(idx_ptr + t * S + offs_s, mask=smask, other=0).to(tl.int64)
        c = tl.load(coef_ptr + t * S + offs_s, mask=smask, other=0.0)
        m2 = smask[:, None] & dmask[None, :]
        u = tl.load(down_ptr + e[:, None] * stride_down + offs_d[None, :], mask=m2, other=0.0)
        acc += tl.sum(c[:, None] * u.to(tl.float32), axis=0)
    tl.store(dx_ptr + t * stride_dx + offs_d, acc.to(dx_ptr.dtype.element_ty), mask=dmask)
