"""Column-sharded PEER mixing on the Triton kernels, with the exchanges between ranks.

The per-rank kernels are torchpeer/ops/expert_mixing/triton_cols_op.py (they never communicate);
here they are composed with the collectives of collectives.py into torch.library custom ops, opaque
to torch.compile (a ShardContext is named by its ``key``). For rank r with columns cols_r (c = d/W):

forward  (x_r (T_r, d) my tokens; X (T, d) all ranks' tokens; down_r, up_r (N, c)):
    h = all_reduce(column_dots(X[:, cols_r], down_r))           (T, h, k) fp32, the full u . x
    y_r = all_to_all(column_rows(h, g, up_r))                    (T, d/W) -> (T_r, d)
backward (dy_r (T_r, d)):
    dyc = all_to_all(dy_r)                                       (T, d/W) every token, my columns
    up pass (dv rows, partial dots dy . v) / all_reduce(dots) / token pass (coef, dgate, dx columns)
    / down pass (du rows)                                        column_mix_backward
    dx_r = all_to_all(dx columns)                                (T_r, d)

Units as in sharded_layers.py: the table and gate gradients, summed over all ranks' tokens, are
scaled by 1/W inside the kernels; dx stays in local units. With the fused lazy Adam
(``sharded_mix_rowwise_adam``) no table gradient exists: each rank updates its columns; a row-wise
second moment's mean(g^2) over all d columns costs one more all-reduce, of (2, N) fp32 sums; an
element-wise second moment is sharded by columns like the first and needs none.
"""

from __future__ import annotations

import torch

from torchpeer.ops.expert_mixing.triton_cols_op import (
    check_column_inputs,
    column_mix_backward,
    column_mix_backward_rowwise_adam,
    column_mix_forward,
)
from torchpeer.optim.rowwise_adam import RowwiseAdamState
from torchpeer.parallel.collectives import (
    ShardContext,
    all_reduce_sum_,
    columns_to_tokens,
    shard_context,
    tokens_to_columns,
)


def _all_reduce(ctx: ShardContext):
    return None if ctx.world == 1 else (lambda t: all_reduce_sum_(t, ctx))


@torch.library.custom_op("torchpeer::sharded_mix_fwd", mutates_args=())
def _sharded_mix_fwd(
    x_local: torch.Tensor,
    X: torch.Tensor,
    down: torch.Tensor,
    up: torch.Tensor,
    indices: torch.Tensor,
    gates: torch.Tensor,
    activation: str,
    key: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> y (T_r, d) my tokens' output (x_local gives T_r and receives dx), h (T, H, K) fp32."""
    ctx = shard_context(key)
    xc = X[:, ctx.columns(X.shape[1])]
    y_cols, h = column_mix_forward(xc, down, up, indices, gates, activation, _all_reduce(ctx))
    return columns_to_tokens(y_cols, ctx), h


@_sharded_mix_fwd.register_fake
def _(x_local, X, down, up, indices, gates, activation, key):
    return X.new_empty(x_local.shape[0], X.shape[1]), X.new_empty(indices.shape, dtype=torch.float32)


@torch.library.custom_op("torchpeer::sharded_mix_bwd", mutates_args=())
def _sharded_mix_bwd(
    dy: torch.Tensor,
    X: torch.Tensor,
    down: torch.Tensor,
    up: torch.Tensor,
    indices: torch.Tensor,
    gates: torch.Tensor,
    h: torch.Tensor,
    activation: str,
    key: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> dx (T_r, d) local units, d_down, d_up (N, c) and d_gates (T, H, K) global units."""
    ctx = shard_context(key)
    cols = ctx.columns(X.shape[1])
    dyc = tokens_to_columns(dy.to(X.dtype).contiguous(), ctx)
    dxc, d_down, d_up, dgate = column_mix_backward(
        dyc, X[:, cols], down, up, indices, gates, h, activation, _all_reduce(ctx), 1.0 / ctx.world
    )
    return columns_to_tokens(dxc, ctx), d_down, d_up, dgate.to(gates.dtype)


@_sharded_mix_bwd.register_fake
def _(dy, X, down, up, indices, gates, h, activation, key):
    return X.new_empty(dy.shape), down.new_empty(down.shape), up.new_empty(up.shape), gates.new_empty(gates.shape)


def _setup_context(ctx, inputs, output):
    _, X, down, up, indices, gates, activation, key = inputs
    ctx.save_for_backward(X, down, up, indices, gates, output[1])
    ctx.activation, ctx.key = activation, key
    ctx.mark_non_differentiable(output[1])


def _backward(fctx, dy, _dh):
    X, down, up, indices, gates, h = fctx.saved_tensors
    dx, d_down, d_up, d_gates = _sharded_mix_bwd(dy, X, down, up, indices, gates, h, fctx.activation, fctx.key)
    return dx, None, d_down, d_up, None, d_gates, None, None


_sharded_mix_fwd.register_autograd(_backward, setup_context=_setup_context)


def _prepare(X, down, up, indices, gates, activation, ctx):
    if X.shape[1] != down.shape[1] * ctx.world:
        raise ValueError(f"tables of {down.shape[1]} columns on {ctx.world} ranks do not make d_model {X.shape[1]}")
    check_column_inputs(X[:, ctx.columns(X.shape[1])], down, up, indices, gates, activation)
    return indices.contiguous(), gates.contiguous()


def sharded_mix_triton(x_local, X, down, up, indices, gates, activation, ctx: ShardContext):
    """PEER mixing of my tokens x_local (T_r, d) with column-sharded tables down, up (N, d/W), from
    the gathered tokens X (T, d) (no gradient taken through X) and the replicated routing
    indices, gates (T, H, K). -> y (T_r, d) in X's dtype; gradients to x_local (local units),
    down, up and gates (global units)."""
    indices, gates = _prepare(X, down, up, indices, gates, activation, ctx)
    y, _ = _sharded_mix_fwd(x_local, X.contiguous(), down, up, indices, gates, activation, ctx.key)
    return y


# ----------------------------------------------------------------------------- fused row-wise Adam


@torch.library.custom_op("torchpeer::sharded_mix_bwd_rowwise_adam", mutates_args=("tables",))
def _sharded_mix_bwd_rowwise_adam(
    dy: torch.Tensor,
    X: torch.Tensor,
    tables: list[torch.Tensor],
    indices: torch.Tensor,
    gates: torch.Tensor,
    h: torch.Tensor,
    hyper: torch.Tensor,
    activation: str,
    key: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """tables = [down, up, w_down, m_down, v_down, t_down, w_up, m_up, v_up, t_up] (as
    triton_fused_op's; w_* the fp32 masters or empty; v_* (N,) or my columns (N, d/W)), updated in
    place. -> dx, d_gates."""
    ctx = shard_context(key)
    down, up, *st = tables
    states = [RowwiseAdamState(m, v, t, w if w.numel() else None) for w, m, v, t in (st[:4], st[4:])]
    dyc = tokens_to_columns(dy.to(X.dtype).contiguous(), ctx)
    dxc, dgate = column_mix_backward_rowwise_adam(
        dyc, X[:, ctx.columns(X.shape[1])], down, up, indices, gates, h, activation, *states, hyper,
        X.shape[1], _all_reduce(ctx), 1.0 / ctx.world,
    )  # fmt: skip
    return columns_to_tokens(dxc, ctx), dgate.to(gates.dtype)


@_sharded_mix_bwd_rowwise_adam.register_fake
def _(dy, X, tables, indices, gates, h, hyper, activation, key):
    return X.new_empty(dy.shape), gates.new_empty(gates.shape)


class _ShardedRowwiseAdamMix(torch.autograd.Function):
    """Forward: the sharded Triton forward. Backward: dx and dgates for autograd; the tables are
    updated in place (they must not require grad: their gradient never exists)."""

    @staticmethod
    def forward(fctx, x_local, gates, X, down, up, indices, activation, key, states, hyper):
        y, h = _sharded_mix_fwd(x_local, X, down, up, indices, gates, activation, key)
        fctx.save_for_backward(X, gates, indices, h)
        fctx.tables, fctx.hyper, fctx.activation, fctx.key = [down, up, *states], hyper, activation, key
        return y

    @staticmethod
    def backward(fctx, dy):
        X, gates, indices, h = fctx.saved_tensors
        dx, dgate = _sharded_mix_bwd_rowwise_adam(
            dy, X, fctx.tables, indices, gates, h, fctx.hyper, fctx.activation, fctx.key
        )
        return dx, dgate, None, None, None, None, None, None, None, None


def sharded_mix_rowwise_adam(x_local, X, down, up, indices, gates, activation, ctx, state_down, state_up, hyper):
    """sharded_mix_triton whose backward applies the lazy Adam rule (torchpeer/optim/rowwise_adam.py)
    to my columns of down/up in place, so that every rank's columns step as the one-process fused
    update would: a row-wise second moment takes each row's mean(g^2) over all d columns (an
    all-reduce). The states are my columns' (exp_avg, element-wise exp_avg_sq, master: (N, d/W))
    and the whole rows' (row-wise exp_avg_sq, steps (N,): the same on every rank); hyper: (5,) fp32
    [lr, beta1, beta2, eps, weight_decay]."""
    from torchpeer.ops.expert_mixing.triton_fused_op import check_fused_tables, state_tensors

    indices, gates = _prepare(X, down, up, indices, gates, activation, ctx)
    check_fused_tables(down, up, state_down, state_up, hyper)
    states = state_tensors(down, state_down, state_up)
    return _ShardedRowwiseAdamMix.apply(
        x_local, gates, X.contiguous(), down, up, indices, activation, ctx.key, states, hyper
    )
