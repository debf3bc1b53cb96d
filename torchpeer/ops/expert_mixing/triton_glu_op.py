"""The GLU read-out's Triton mixing (kernels in triton_glu_kernels.py): launchers, torch.library
custom ops (opaque to torch.compile), an autograd Function over them and the entry point
``expert_mix_glu_triton``, which ``torchpeer.ops.expert_mix`` calls when it is given ``lin``.

Launch tuning and the expert sort / segment plan are the paper read-out's (triton_op.py,
_expert_segments): the same
passes with one more table row per selection. Not for the GLU read-out (they compute act(u.x) v):
the opt-in forward prototypes of TUNING["fwd"] (tiled, split-S decode), the tiled expert pass, the
fused row-wise Adam backward and the column-sharded kernels.
"""

import torch

from ..dispatch import call_implementation_directly
from .checks import check_mix_inputs
from .triton_glu_kernels import _glu_bwd_dx_kernel, _glu_bwd_reduce_kernel, _glu_bwd_segment_kernel, _glu_fwd_kernel
from .triton_op import _act_id, _expert_segments, _launch_config, _new_buffer, _sort_by_expert


def _glu_forward_impl(x, down, lin, up, indices, gates, activation):
    """-> y (T, d) in x's dtype, h = x . u[idx] and z = x . w[idx], (T, H, K) float32 each."""
    T, d = x.shape
    S = indices[0].numel() if T else 0
    y = _new_buffer((T, d), x.dtype, x.device)
    h = _new_buffer(indices.shape, torch.float32, x.device)
    z = _new_buffer(indices.shape, torch.float32, x.device)
    if T == 0 or S == 0:
        return y.zero_(), h, z
    block_d, block_s, num_warps = _launch_config("fwd", d, S)
    _glu_fwd_kernel[(T,)](
        x, down, lin, up, indices, gates, y, h, z,
        S, d, x.stride(0), down.stride(0), lin.stride(0), up.stride(0), y.stride(0),
        ACT=_act_id(activation), BLOCK_S=block_s, BLOCK_D=block_d, num_warps=num_warps,
    )  # fmt: skip
    return y, h, z


def _glu_backward_impl(dy, x, down, lin, up, indices, gates, h, z, activation):
    """-> dx (x dtype), ddown, dlin, dup (their tables' dtypes), dgates (gates dtype)."""
    T, d = x.shape
    N = down.shape[0]
    S = indices[0].numel() if T else 0
    dev = x.device
    if T == 0 or S == 0:
        return tuple(torch.zeros_like(t) for t in (x, down, lin, up, gates))
    dy = dy.contiguous()
    ddown = _new_buffer(down.shape, down.dtype, dev)
    dlin = _new_buffer(lin.shape, lin.dtype, dev)
    dup = _new_buffer(up.shape, up.dtype, dev)
    cu = _new_buffer((T * S,), torch.float32, dev)
    cw = _new_buffer((T * S,), torch.float32, dev)
    dgate = _new_buffer((T * S,), torch.float32, dev)
    perm, offsets = _sort_by_expert(indices, N)

    block_d, block_s, num_warps = _launch_config("expert", d, S)
    seg, nseg, pbase, seg_expert, seg_index, hot = _expert_segments(offsets, T * S, block_s)
    partial = torch.empty((max(1, seg_expert.numel()), 3, d), dtype=torch.float32, device=dev)
    _glu_bwd_segment_kernel[(N + seg_expert.numel(),)](
        x, dy, up, gates, h, z, perm, offsets, seg_expert, seg_index, partial,
        ddown, dlin, dup, cu, cw, dgate,
        N, S, d, seg, x.stride(0), dy.stride(0), up.stride(0), ddown.stride(0), dlin.stride(0), dup.stride(0),
        ACT=_act_id(activation), BLOCK_S=block_s, BLOCK_D=block_d, num_warps=num_warps,
    )  # fmt: skip
    if hot.numel():
        _glu_bwd_reduce_kernel[(hot.numel(),)](
            hot, nseg, pbase, partial, ddown, dlin, dup, d, ddown.stride(0), dlin.stride(0), dup.stride(0),
            BLOCK_D=block_d, num_warps=num_warps,
        )  # fmt: skip

    dx = _new_buffer((T, d), x.dtype, dev)
    block_d, block_s, num_warps = _launch_config("dx", d, S)
    _glu_bwd_dx_kernel[(T,)](
        down, lin, indices, cu, cw, dx, S, d, down.stride(0), lin.stride(0), dx.stride(0),
        BLOCK_S=block_s, BLOCK_D=block_d, num_warps=num_warps,
    )  # fmt: skip
    return dx, ddown, dlin, dup, dgate.view(gates.shape).to(gates.dtype)


# ----------------------------------------------------------------------------- torch.library ops


@torch.library.custom_op("torchpeer::peer_glu_fwd", mutates_args=())
def _peer_glu_fwd(
    x: torch.Tensor,
    down: torch.Tensor,
    lin: torch.Tensor,
    up: torch.Tensor,
    indices: torch.Tensor,
    gates: torch.Tensor,
    activation: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _glu_forward_impl(x, down, lin, up, indices, gates, activation)


@_peer_glu_fwd.register_fake
def _(x, down, lin, up, indices, gates, activation):
    f32 = dict(dtype=torch.float32)
    return x.new_empty(x.shape), x.new_empty(indices.shape, **f32), x.new_empty(indices.shape, **f32)


@torch.library.custom_op("torchpeer::peer_glu_bwd", mutates_args=())
def _peer_glu_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    down: torch.Tensor,
    lin: torch.Tensor,
    up: torch.Tensor,
    indices: torch.Tensor,
    gates: torch.Tensor,
    h: torch.Tensor,
    z: torch.Tensor,
    activation: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _glu_backward_impl(dy, x, down, lin, up, indices, gates, h, z, activation)


@_peer_glu_bwd.register_fake
def _(dy, x, down, lin, up, indices, gates, h, z, activation):
    return tuple(t.new_empty(t.shape) for t in (x, down, lin, up, gates))


def _setup_context(ctx, inputs, output):
    x, down, lin, up, indices, gates, activation = inputs
    _, h, z = output
    ctx.save_for_backward(x, down, lin, up, indices, gates, h, z)
    ctx.activation = activation
    ctx.mark_non_differentiable(h, z)
    ctx.set_materialize_grads(False)


def _backward(ctx, dy, _dh=None, _dz=None):
    if dy is None:  # the output did not reach the loss
        return None, None, None, None, None, None, None
    x, down, lin, up, indices, gates, h, z = ctx.saved_tensors
    bwd = _glu_backward_impl if call_implementation_directly(dy) else _peer_glu_bwd
    dx, ddown, dlin, dup, dgates = bwd(dy, x, down, lin, up, indices, gates, h, z, ctx.activation)
    return dx, ddown, dlin, dup, None, dgates, None


_peer_glu_fwd.register_autograd(_backward, setup_context=_setup_context)


class GluMixFunction(torch.autograd.Function):
    """y = the GLU mixing through one custom op per forward and one per backward (or their
    implementations in plain eager mode), the formula the ops' registered autograd uses."""

    @staticmethod
    def forward(ctx, x, down, lin, up, indices, gates, activation):
        fwd = _glu_forward_impl if call_implementation_directly(x) else _peer_glu_fwd
        y, h, z = fwd(x, down, lin, up, indices, gates, activation)
        ctx.save_for_backward(x, down, lin, up, indices, gates, h, z)
        ctx.activation = activation
        ctx.set_materialize_grads(False)
        return y

    @staticmethod
    def backward(ctx, dy):
        return _backward(ctx, dy)


def expert_mix_glu_triton(x, down, lin, up, indices, gates, activation="gelu"):
    """y[t] = sum_{h,k} gates[t,h,k] * act(x[t] . down[i]) * (x[t] . lin[i]) * up[i], i = indices[t,h,k].

    The GLU read-out with the Triton kernels; dtypes, autocast and gradients as expert_mix_triton
    (x: (T, d); down, lin, up: (N, d), each fp16/bf16/fp32; indices, gates: (T, H, K)).
    Returns y: (T, d) in x's dtype, differentiable w.r.t. x, the three tables and gates.
    """
    check_mix_inputs(x, down, up, indices, gates, activation, kernel=True, lin=lin)
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        x = x.to(torch.get_autocast_dtype(dev))
    tables = [t if t.stride(1) == 1 else t.contiguous() for t in (down, lin, up)]
    return GluMixFunction.apply(x.contiguous(), *tables, indices.contiguous(), gates.contiguous(), activation)
