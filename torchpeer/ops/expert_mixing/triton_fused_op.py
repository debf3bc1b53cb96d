"""Expert mixing whose backward updates the tables in place with lazy Adam (no table grads): the
second moment per row ("rowwise_adam") or per element ("elementwise_adam"), as the states keep it.

Entry point expert_mix_rowwise_adam; the kernels and their byte counts are in
triton_fused_kernels.py, the update rule in torchpeer/optim/rowwise_adam.py (its spec).
The forward is the plain Triton forward (triton_op.py).
"""

import torch

from . import triton_op
from .checks import check_mix_inputs
from .triton_fused_kernels import _bwd_segment_update_kernel, _bwd_token_kernel, _reduce_update_kernel
from .triton_op import (
    SEGMENT,
    _act_id,
    _launch_config,
    _new_buffer,
    _peer_mix_fwd,
    _segment_plan,
    _sort_by_expert,
)


def _fused_backward_impl(dy, x, down, up, indices, gates, h, activation, states, hyper):
    """-> dx (x dtype), dgate (T*S,) fp32; updates down, up and the 6 state tensors in place."""
    dy = dy.contiguous()  # once for both passes
    dx, dgate, coef = token_pass(dy, x, down, up, indices, gates, h, activation)
    expert_update(x, dy, indices, gates, h, coef, activation, down, up, states, hyper)
    return dx, dgate


def token_pass(dy, x, down, up, indices, gates, h, activation):
    """Pass 1 (triton_fused_kernels.py), from the tables as they are: dy, x (T, d), indices (T, S),
    gates, h (T*S values) -> dx (T, d) x dtype, dgate (T*S,) fp32 and coef (T*S,) fp32 (g act'(h)
    (v.dy) per selection, what expert_update needs besides x, dy, indices, gates and h)."""
    T, d = x.shape
    S = indices[0].numel() if T else 0
    dev = x.device
    if T == 0 or S == 0:
        zeros = torch.zeros(T * S, dtype=torch.float32, device=dev)
        return torch.zeros_like(x), zeros, zeros
    dy = dy.contiguous()
    coef = _new_buffer((T * S,), torch.float32, dev)
    dgate = _new_buffer((T * S,), torch.float32, dev)
    dx = _new_buffer((T, d), x.dtype, dev)
    block_d, block_s, num_warps = _launch_config("fwd", d, S)
    _bwd_token_kernel[(T,)](
        dy, down, up, indices, gates, h, coef, dgate, dx,
        S, d, dy.stride(0), down.stride(0), up.stride(0), dx.stride(0),
        ACT=_act_id(activation), BLOCK_S=block_s, BLOCK_D=block_d, num_warps=num_warps,
    )  # fmt: skip
    return dx, dgate, coef


def expert_update(x, dy, indices, gates, h, coef, activation, down, up, states, hyper):
    """Passes 2-3 (triton_fused_kernels.py): each selected row's gradient summed over its selections,
    then one lazy Adam step of that row of down and up (and of the 8 state tensors) in place.
    x, dy (T, d) (dy contiguous); indices (T, S) int32 or int64; gates, h, coef (T*S values)."""
    T, d = x.shape
    N = down.shape[0]
    S = indices[0].numel() if T else 0
    if T == 0 or S == 0:
        return
    dy = dy.contiguous()
    perm, offsets = _sort_by_expert(indices, N)
    block_d, block_s, num_warps = _launch_config("expert", d, S)
    seg = triton_op.TUNING["expert"].get("segment", SEGMENT)  # looked up per call: tests patch it
    seg = 1 << 30 if seg is None else seg  # None (no splitting) = one segment per expert
    seg = max(block_s, (seg + block_s - 1) // block_s * block_s)
    nseg, _, seg_expert, seg_index, hot = _segment_plan(offsets, h.numel(), seg)
    # partial rows for EVERY segment of a hot expert (there are no gradient rows to start from)
    pcount = torch.where(nseg > 1, nseg, 0)
    pbase = torch.cumsum(pcount, 0) - pcount
    n_partial = seg_expert.numel() + hot.numel()  # >= sum(pcount): shape-only bound
    partial = torch.empty((max(1, n_partial), 2, d), dtype=torch.float32, device=x.device)
    w_down, m_down, v_down, t_down, w_up, m_up, v_up, t_up = states
    master = w_down.numel() > 0  # fp32 master tables (empty tensors: the tables are the weights)
    elementwise = v_down.dim() == 2  # (N, d) second moments, else (N,)
    if not master:
        w_down, w_up = down, up
    _bwd_segment_update_kernel[(N + seg_expert.numel(),)](
        x, dy, gates, h, coef, perm, offsets, nseg, pbase, seg_expert, seg_index, partial,
        down, w_down, m_down, v_down, t_down, up, w_up, m_up, v_up, t_up, hyper,
        N, S, d, seg, x.stride(0), dy.stride(0),
        ACT=_act_id(activation), BLOCK_S=block_s, BLOCK_D=block_d, MASTER=master, ELEMENTWISE=elementwise,
        num_warps=num_warps,
    )  # fmt: skip
    _reduce_update_kernel[(hot.numel(),)](
        hot, nseg, pbase, partial, down, w_down, m_down, v_down, t_down, up, w_up, m_up, v_up, t_up, hyper,
        d, BLOCK_D=block_d, MASTER=master, ELEMENTWISE=elementwise, num_warps=num_warps,
    )  # fmt: skip


@torch.library.custom_op("torchpeer::peer_mix_bwd_rowwise_adam", mutates_args=("tables",))
def _peer_mix_bwd_rowwise_adam(
    dy: torch.Tensor,
    x: torch.Tensor,
    tables: list[torch.Tensor],
    indices: torch.Tensor,
    gates: torch.Tensor,
    h: torch.Tensor,
    hyper: torch.Tensor,
    activation: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """tables = [down, up, then the states: w_down, m_down, v_down, t_down, w_up, m_up, v_up,
    t_up] (all updated in place; w_* are the fp32 masters or empty; v_* (N,) or (N, d))."""
    down, up, *states = tables
    return _fused_backward_impl(dy, x, down, up, indices, gates, h, activation, states, hyper)


@_peer_mix_bwd_rowwise_adam.register_fake
def _(dy, x, tables, indices, gates, h, hyper, activation):
    return x.new_empty(x.shape), x.new_empty((gates.numel(),), dtype=torch.float32)


class _RowwiseAdamMix(torch.autograd.Function):
    """Forward: the Triton mixing forward. Backward: dx and dgates for autograd; the tables are
    updated in place (they must not require grad: their gradient never exists)."""

    @staticmethod
    def forward(ctx, x, gates, down, up, indices, activation, states, hyper):
        y, h = _peer_mix_fwd(x, down, up, indices, gates, activation)
        ctx.save_for_backward(x, gates, indices, h)
        ctx.tables, ctx.states, ctx.hyper, ctx.activation = (down, up), states, hyper, activation
        return y

    @staticmethod
    def backward(ctx, dy):
        x, gates, indices, h = ctx.saved_tensors
        down, up = ctx.tables
        tables = [down, up, *ctx.states]
        dx, dgate = _peer_mix_bwd_rowwise_adam(dy, x, tables, indices, gates, h, ctx.hyper, ctx.activation)
        return dx, dgate.view(gates.shape).to(gates.dtype), None, None, None, None, None, None


def _check_state(name, table, state):
    n, d = table.shape
    m, v, t, w = state.exp_avg, state.exp_avg_sq, state.steps, state.master
    checks = [("master", w, (n, d), torch.float32)] if w is not None else []
    m_dtype = torch.bfloat16 if m.dtype == torch.bfloat16 else torch.float32  # bf16 first moments allowed
    v_shape = (n, d) if v.dim() == 2 else (n,)  # element-wise or row-wise second moments
    for what, tensor, shape, dtype in checks + [
        ("exp_avg", m, (n, d), m_dtype),
        ("exp_avg_sq", v, v_shape, torch.float32),
        ("steps", t, (n,), torch.int32),
    ]:
        if (
            tensor.shape != shape
            or tensor.dtype != dtype
            or tensor.device != table.device
            or not tensor.is_contiguous()
        ):
            raise ValueError(
                f"{name} {what} must be a contiguous {dtype} tensor of shape {shape} on {table.device}, "
                f"got {tensor.dtype} {tuple(tensor.shape)} on {tensor.device}"
            )


def check_states(down, up, state_down, state_up) -> None:
    """The two tables' RowwiseAdamStates: shapes, dtypes and devices, and one kind for both (masters
    or not, element-wise second moments or not). Also the column-sharded op's check."""
    _check_state("down", down, state_down)
    _check_state("up", up, state_up)
    if (state_down.master is None) != (state_up.master is None):
        raise ValueError("both tables or neither need an fp32 master copy")
    if state_down.elementwise != state_up.elementwise:
        raise ValueError("both tables or neither keep element-wise second moments ((N, d) exp_avg_sq)")


def expert_mix_rowwise_adam(x, down, up, indices, gates, activation, state_down, state_up, hyper):
    """expert_mix (triton) whose backward applies lazy Adam to the selected rows of down/up in place.

    x: (T, d); down, up: (N, d) contiguous tables with requires_grad=False (fp32, or bf16 working
    copies when the states hold fp32 masters: the update runs on the master and writes both);
    indices, gates: (T, H, K); state_down/state_up: RowwiseAdamState of each table (exp_avg
    (N, d) fp32 or bf16, exp_avg_sq (N,) fp32 row-wise or (N, d) fp32 element-wise, steps (N,)
    int32); hyper: (5,) fp32 device tensor [lr, beta1, beta2, eps, weight_decay], read at
    backward time (set lr before backward).
    Returns y (T, d); gradients flow to x and gates only. One backward per forward: the update
    happens there (gradient accumulation over micro-batches is not possible).
    """
    x = check_fused_inputs(x, down, up, indices, gates, activation, state_down, state_up, hyper)
    states = state_tensors(down, state_down, state_up)
    return _RowwiseAdamMix.apply(x, gates.contiguous(), down, up, indices.contiguous(), activation, states, hyper)


def check_fused_inputs(x, down, up, indices, gates, activation, state_down, state_up, hyper) -> torch.Tensor:
    """expert_mix_rowwise_adam's arguments (ValueError naming the fix) -> x in the autocast dtype, contiguous."""
    check_mix_inputs(x, down, up, indices, gates, activation, kernel=True)
    check_fused_tables(down, up, state_down, state_up, hyper)
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        x = x.to(torch.get_autocast_dtype(dev))
    return x.contiguous()


def check_fused_tables(down, up, state_down, state_up, hyper) -> None:
    """The tables, their states and hyper of a fused update (ValueError naming the fix); also the
    column-sharded op's check."""
    for name, table in (("down", down), ("up", up)):
        if table.requires_grad:
            raise ValueError(
                f"{name} must not require grad: the fused Adam updates it inside the backward "
                "(set requires_grad_(False))"
            )
        if not table.is_contiguous():
            raise ValueError(f"{name} must be contiguous for the fused update")
    check_states(down, up, state_down, state_up)
    if hyper.shape != (5,) or hyper.dtype != torch.float32 or hyper.device != down.device:
        raise ValueError(f"hyper must be a (5,) float32 tensor on {down.device}: [lr, beta1, beta2, eps, weight_decay]")


def state_tensors(down, state_down, state_up) -> tuple[torch.Tensor, ...]:
    """The 8 state tensors the kernels take: (master, exp_avg, exp_avg_sq, steps) of down, then of up;
    a missing master is an empty fp32 tensor (the table is the weights)."""
    none = down.new_empty(0, dtype=torch.float32)
    return tuple(
        t
        for s in (state_down, state_up)
        for t in (none if s.master is None else s.master, s.exp_avg, s.exp_avg_sq, s.steps)
    )
