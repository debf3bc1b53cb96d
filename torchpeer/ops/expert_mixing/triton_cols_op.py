"""Column-sliced Triton expert mixing: the launchers of triton_cols_kernels.py (one rank's part).

Every function works on one rank's column slice c of the tables ((N, c), row stride free, columns
contiguous) and of the activations ((T, c), any row stride: x[:, cols] is a view). The all-reduces
between the halves of a dot product are the caller's: ``column_mix_forward`` / ``_backward`` take
``all_reduce`` (a function summing a tensor in place over the ranks; None for one rank), and the
phase functions below let a test run W slices in lock step in one process. PyTorch references of
each phase: columns_reference.py. Launch tuning: triton_op.TUNING, by the memory pattern of each
kernel (_CONFIG); the segment plan of hot experts is triton_op's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import triton_op
from .checks import check_mix_inputs
from .triton_cols_kernels import (
    _cols_adam_apply_kernel,
    _cols_dots_kernel,
    _cols_grad_kernel,
    _cols_moment_kernel,
    _cols_reduce_moment_kernel,
    _cols_rows_kernel,
    _cols_token_kernel,
)
from .triton_fused_kernels import _reduce_update_kernel
from .triton_kernels import _mix_bwd_reduce_kernel
from .triton_op import _act_id, _launch_config, _new_buffer, _segment_plan, _sort_by_expert

# the TUNING entry each kernel uses: token-centric kernels that gather one table row per selection
# are shaped like the dx kernel, the expert passes like the one-GPU expert pass
_CONFIG = {"dots": "dx", "rows": "dx", "token": "dx", "expert": "expert"}


def check_column_inputs(a, down, up, indices, gates, activation="gelu") -> None:
    """a: (T, c) my columns of the activations; down, up: (N, c); the kernels' dtype and size rules."""
    check_mix_inputs(a, down, up, indices, gates, activation, kernel=True)
    for name, t in (("a", a), ("down", down), ("up", up)):
        if t.stride(1) != 1:
            raise ValueError(f"column mixing: {name} must have contiguous columns (stride(1) == 1)")


def _selections(indices):
    T = indices.shape[0]
    return T, (indices[0].numel() if T else 0)


def column_dots(a, table, indices) -> torch.Tensor:
    """-> (T, H, K) fp32: a[t] . table[indices[t, h, k]] over my c columns (a partial dot product)."""
    T, S = _selections(indices)
    out = _new_buffer(indices.shape, torch.float32, a.device)
    if T and S:
        block_c, block_s, warps = _launch_config(_CONFIG["dots"], a.shape[1], S)
        _cols_dots_kernel[(T,)](
            a, table, indices, out, S, a.shape[1], a.stride(0), table.stride(0),
            BLOCK_S=block_s, BLOCK_C=block_c, num_warps=warps,
        )  # fmt: skip
    return out


def column_rows(h, gates, table, indices, activation, out_dtype) -> torch.Tensor:
    """-> Y (T, c) in out_dtype: sum_hk gates * act(h) * table[indices] (h: the FULL dots)."""
    T, S = _selections(indices)
    c = table.shape[1]
    y = _new_buffer((T, c), out_dtype, table.device)
    if not (T and S):
        return y.zero_()
    block_c, block_s, warps = _launch_config(_CONFIG["rows"], c, S)
    _cols_rows_kernel[(T,)](
        h, gates, table, indices, y, S, c, table.stride(0), y.stride(0),
        ACT=_act_id(activation), BLOCK_S=block_s, BLOCK_C=block_c, num_warps=warps,
    )  # fmt: skip
    return y


@dataclass
class ExpertPlan:
    """The selections sorted by expert and cut into segments (triton_op._segment_plan), shared by
    the up and down passes of one backward; ``partial`` holds the hot experts' extra segments."""

    perm: torch.Tensor
    offsets: torch.Tensor
    seg: int
    nseg: torch.Tensor
    pbase: torch.Tensor
    seg_expert: torch.Tensor
    seg_index: torch.Tensor
    hot: torch.Tensor
    partial: torch.Tensor
    n_experts: int
    selections: int  # S per token


def expert_plan(indices, n_experts: int, c: int, fused: bool = False) -> ExpertPlan:
    """Sort and segment the selections for the expert passes. fused: every segment of a hot expert
    gets a partial row pair (there are no gradient rows to add to), and the plan is always built."""
    T, S = _selections(indices)
    perm, offsets = _sort_by_expert(indices, n_experts)
    _, block_s, _ = _launch_config(_CONFIG["expert"], c, S)
    seg = triton_op.TUNING["expert"].get("segment", triton_op.SEGMENT)  # per call: tests patch it
    none = torch.empty(0, dtype=torch.int64, device=indices.device)
    if fused or (seg is not None and triton_op._needs_split(offsets, seg)):  # attribute: tests patch it
        seg = 1 << 30 if seg is None else seg
        seg = max(block_s, (seg + block_s - 1) // block_s * block_s)  # whole blocks per segment
        nseg, pbase, seg_expert, seg_index, hot = _segment_plan(offsets, T * S, seg)
        n_partial = seg_expert.numel()
        if fused:
            pcount = torch.where(nseg > 1, nseg, 0)
            pbase, n_partial = torch.cumsum(pcount, 0) - pcount, seg_expert.numel() + hot.numel()
    else:  # no expert owns more than a segment: one program per whole expert list, no plan
        seg, nseg, pbase, seg_expert, seg_index, hot, n_partial = 2**31 - 1, none, none, none, none, none, 0
    partial = torch.empty((max(1, n_partial), 2, c), dtype=torch.float32, device=indices.device)
    return ExpertPlan(perm, offsets, seg, nseg, pbase, seg_expert, seg_index, hot, partial, n_experts, S)


def _expert_pass(plan, up, rows, table, gates, h, coef, dots, activation, scale, grad, moment):
    N, c = plan.n_experts, rows.shape[1]
    block_c, block_s, warps = _launch_config(_CONFIG["expert"], c, plan.selections)
    table = rows if table is None else table  # (not read by the down pass)
    coef = h if coef is None else coef
    args = (rows, gates, h, coef, table, dots, plan.perm, plan.offsets, plan.seg_expert, plan.seg_index)
    grid = (N + plan.seg_expert.numel(),)
    meta = dict(ACT=_act_id(activation), UP=up, BLOCK_S=block_s, BLOCK_C=block_c, num_warps=warps)
    if moment is None:
        _cols_grad_kernel[grid](
            *args, plan.partial, grad, N, plan.selections, c, plan.seg, rows.stride(0), table.stride(0),
            grad.stride(0), scale, **meta,
        )  # fmt: skip
    else:
        w, state, sq, hyper = moment
        master = state.master is not None
        _cols_moment_kernel[grid](
            *args, plan.nseg, plan.pbase, plan.partial, w, state.master if master else w, state.exp_avg,
            state.exp_avg_sq if state.elementwise else sq, state.steps, hyper,
            N, plan.selections, c, plan.seg, rows.stride(0), table.stride(0), scale, **meta,
            MASTER=master, ELEMENTWISE=state.elementwise,
        )  # fmt: skip


def column_up_pass(plan, dyc, up, gates, h, activation, scale=1.0, grad=None, moment=None) -> torch.Tensor:
    """-> (T, H, K) fp32 partial dots dy[t, cols] . v_e; writes dv rows * scale into grad (N, c),
    or, fused, moment = (table (N, c), its RowwiseAdamState, sq (N,) fp32, hyper): phase 1 of the
    row-wise rule (m and sq), or with an element-wise state the whole rule (sq unused)."""
    dots = _new_buffer(h.shape, torch.float32, dyc.device)
    _expert_pass(plan, True, dyc, up, gates, h, None, dots, activation, scale, grad, moment)
    return dots


def column_token_pass(s, gates, h, down, indices, activation, gate_scale=1.0, dx_dtype=None):
    """From the full dots s = dy . v: -> coef (T, H, K) fp32 = g act'(h) s, dgate (T, H, K) fp32 =
    gate_scale act(h) s, dx (T, c) = sum_hk coef down[indices] (in dx_dtype, default down's)."""
    T, S = _selections(indices)
    c = down.shape[1]
    coef = _new_buffer(h.shape, torch.float32, down.device)
    dgate = _new_buffer(h.shape, torch.float32, down.device)
    dx = _new_buffer((T, c), dx_dtype or down.dtype, down.device)
    if not (T and S):
        return coef, dgate, dx.zero_()
    block_c, block_s, warps = _launch_config(_CONFIG["token"], c, S)
    _cols_token_kernel[(T,)](
        s, gates, h, down, indices, coef, dgate, dx, S, c, down.stride(0), dx.stride(0), gate_scale,
        ACT=_act_id(activation), BLOCK_S=block_s, BLOCK_C=block_c, num_warps=warps,
    )  # fmt: skip
    return coef, dgate, dx


def column_down_pass(plan, xc, coef, scale=1.0, grad=None, moment=None) -> None:
    """du rows = scale * sum over each expert's selections of coef * x[t, cols], into grad (N, c),
    or, fused, the rule's update (moment as in column_up_pass)."""
    _expert_pass(plan, False, xc, None, coef, coef, coef, coef, "gelu", scale, grad, moment)


def column_reduce(plan, d_down, d_up) -> None:
    """Add the hot experts' extra segments to their gradient rows (after both passes)."""
    if plan.hot.numel():
        block_c = _launch_config(_CONFIG["expert"], d_down.shape[1], plan.selections)[0]
        _mix_bwd_reduce_kernel[(plan.hot.numel(),)](
            plan.hot, plan.nseg, plan.pbase, plan.partial, d_down, d_up, d_down.shape[1],
            d_down.stride(0), d_up.stride(0), BLOCK_D=block_c,
        )  # fmt: skip


def column_reduce_moments(plan, down, up, state_down, state_up, sq, hyper) -> None:
    """Fused: for the hot experts, from all their segments' partials, phase 1 of the row-wise rule
    (into the states' m and sq (2, N)), or with element-wise states the whole rule (sq unused)."""
    if not plan.hot.numel():
        return
    c = down.shape[1]
    block_c = _launch_config(_CONFIG["expert"], c, plan.selections)[0]
    if state_down.elementwise:  # the one-GPU kernel's: the same partials layout, D = c
        master = state_down.master is not None
        w_down, w_up = (state_down.master, state_up.master) if master else (down, up)
        _reduce_update_kernel[(plan.hot.numel(),)](
            plan.hot, plan.nseg, plan.pbase, plan.partial,
            down, w_down, state_down.exp_avg, state_down.exp_avg_sq, state_down.steps,
            up, w_up, state_up.exp_avg, state_up.exp_avg_sq, state_up.steps, hyper,
            c, BLOCK_D=block_c, MASTER=master, ELEMENTWISE=True,
        )  # fmt: skip
    else:
        _cols_reduce_moment_kernel[(plan.hot.numel(),)](
            plan.hot, plan.nseg, plan.pbase, plan.partial, state_down.exp_avg, sq[0], state_up.exp_avg, sq[1],
            hyper, c, BLOCK_C=block_c,
        )  # fmt: skip


def column_adam_apply(plan, sq, down, up, state_down, state_up, hyper, d_full: int) -> None:
    """Fused, row-wise: phase 2 of the rule on every selected row of both tables; sq (2, N) fp32 holds
    sum(g^2) of each row over all d_full columns (the ranks' phase-1 sq, summed)."""
    N, c = down.shape
    master = state_down.master is not None
    w_down = state_down.master if master else down
    w_up = state_up.master if master else up
    block_c = _launch_config(_CONFIG["expert"], c, plan.selections)[0]
    _cols_adam_apply_kernel[(N,)](
        plan.offsets, sq,
        down, w_down, state_down.exp_avg, state_down.exp_avg_sq, state_down.steps,
        up, w_up, state_up.exp_avg, state_up.exp_avg_sq, state_up.steps, hyper,
        N, c, d_full, BLOCK_C=block_c, MASTER=master,
    )  # fmt: skip


# ----------------------------------------------------------------------------- one rank, composed


def _sum(all_reduce, t):
    if all_reduce is not None:
        all_reduce(t)
    return t


def column_mix_forward(xc, down, up, indices, gates, activation, all_reduce=None):
    """-> Y (T, c) in xc's dtype, my columns of every token's output, and h (T, H, K) fp32, the full
    dots x . u (all-reduced)."""
    h = _sum(all_reduce, column_dots(xc, down, indices))
    return column_rows(h, gates, up, indices, activation, xc.dtype), h


def column_mix_backward(dyc, xc, down, up, indices, gates, h, activation, all_reduce=None, scale=1.0):
    """-> dx (T, c) in xc's dtype, d_down, d_up (N, c) in the tables' dtypes (times ``scale``) and
    dgate (T, H, K) fp32 (times ``scale``). dyc: (T, c) my columns of dy."""
    if h.numel() == 0:  # no selection: nothing flows back (as the one-GPU backward)
        return torch.zeros_like(xc), torch.zeros_like(down), torch.zeros_like(up), torch.zeros_like(h)
    plan = expert_plan(indices, down.shape[0], down.shape[1])
    d_down, d_up = _new_buffer(down.shape, down.dtype, down.device), _new_buffer(up.shape, up.dtype, up.device)
    s = _sum(all_reduce, column_up_pass(plan, dyc, up, gates, h, activation, scale, grad=d_up))
    coef, dgate, dx = column_token_pass(s, gates, h, down, indices, activation, scale, xc.dtype)
    column_down_pass(plan, xc, coef, scale, grad=d_down)
    column_reduce(plan, d_down, d_up)
    return dx, d_down, d_up, dgate


def column_mix_backward_rowwise_adam(
    dyc, xc, down, up, indices, gates, h, activation, state_down, state_up, hyper, d_full, all_reduce=None, scale=1.0
):
    """As column_mix_backward, but down/up (and their RowwiseAdamStates) are updated in place by the
    lazy Adam rule (torchpeer/optim/rowwise_adam.py) with gradient scale * (the gradient): no table
    gradient exists. d_full: the tables' full width (all ranks). -> dx, dgate. A row-wise second
    moment costs a (2, N) all-reduce of sum(g^2) and the apply pass; an element-wise one (sharded
    by columns like m) neither."""
    if h.numel() == 0:  # no selection, no row to update (every rank sees the same replicated routing)
        return torch.zeros_like(xc), torch.zeros_like(h)
    plan = expert_plan(indices, down.shape[0], down.shape[1], fused=True)
    elementwise = state_down.elementwise
    sq = torch.zeros((2, 0 if elementwise else down.shape[0]), dtype=torch.float32, device=down.device)
    up_update = (up, state_up, sq[1], hyper)
    s = _sum(all_reduce, column_up_pass(plan, dyc, up, gates, h, activation, scale, moment=up_update))
    coef, dgate, dx = column_token_pass(s, gates, h, down, indices, activation, scale, xc.dtype)  # old u rows
    column_down_pass(plan, xc, coef, scale, moment=(down, state_down, sq[0], hyper))
    column_reduce_moments(plan, down, up, state_down, state_up, sq, hyper)
    if not elementwise:
        column_adam_apply(plan, _sum(all_reduce, sq), down, up, state_down, state_up, hyper, d_full)
    return dx, dgate
