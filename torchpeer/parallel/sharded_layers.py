"""PEER and PKM with their expert tables sharded by columns of d_model across ranks.

Rank r keeps ``down[:, cols_r]`` and ``up[:, cols_r]`` (PKM: ``values[:, cols_r]``), d/W columns
of every expert, so that it holds 1/W of the tables and of their AdamW moments. One forward,
for the T_r tokens of this rank (T = all ranks' tokens):

    X = all_gather(x_r)                          (T, d)   gather_tokens
    scores, idx = retrieve(X); g = gates(scores) (T, h, k) replicated: the same on every rank
    h_r = X[:, cols_r] . down_r[idx]             (T, h, k) partial dot products
    h = all_reduce_sum(h_r)                      (T, h, k) the full u_i . x
    Y_r = sum_hk g * act(h) * up_r[idx]          (T, d/W) my columns of every token's output
    y_r = all_to_all(Y_r)                        (T_r, d) my tokens, all columns

The retrieval runs on the gathered batch, so BatchNorm (or EMA) query statistics are the global
batch's, exactly as in one process. Backward mirrors the forward: all_to_all of dy to columns,
all_reduce of the (T, h, k) dots dy . v, local table gradients, all_to_all of dx back to token
owners.

Two implementations of PEER's mixing, chosen as the one-process layer chooses its backend
(``resolve_backend("expert_mix", layer.backend, device)``): "triton" runs the column-sliced Triton
kernels (triton_mixing.py: custom ops, the expert-sorted deterministic backward of the one-GPU
kernels, and the fused row-wise Adam when a RowwiseTableAdam is attached); otherwise (the CPU,
float64, the reference) the PyTorch path below, where the weighted row sums, the dot products (as
gradients with respect to the bag weights) and the table gradients go through ``F.embedding_bag``
and its backward, in the tables' fp32: no (T, h, k, d/W) gathered rows. PKM always takes the
PyTorch path.

Gradient units (see collectives.py): per-token gradients arrive in "local units" (W x the global
gradient, because DDP averages over ranks). Quantities summed over all ranks' tokens are divided
by W once: the table gradients, and the gate gradient that enters the replicated computation,
which therefore produces exactly the global gradient of the query network and sub-keys on every
rank (DDP's average of W equal values leaves it unchanged) and, through ``gather_tokens``,
the global gradient of the gathered input.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from torchpeer.layers.validators import check_input
from torchpeer.ops import resolve_backend
from torchpeer.ops.expert_mixing.reference import activation_fn as _act
from torchpeer.ops.expert_mixing.torch_impl import activation_grad as _act_grad
from torchpeer.parallel.collectives import (
    ShardContext,
    all_reduce_sum_,
    columns_to_tokens,
    gather_tokens,
    tokens_to_columns,
)


def _bag(table: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """out[t] = sum_hk w[t, h, k] * table[idx[t, h, k]]: (T, c) in the table's dtype, by
    F.embedding_bag (no (T, h, k, c) gathered rows)."""
    T, hk = idx.shape[0], idx.shape[1] * idx.shape[2]
    return F.embedding_bag(idx.reshape(T, hk), table, per_sample_weights=w.reshape(T, hk).to(table.dtype), mode="sum")


def _bag_vjp(table, idx, w, grad_out, want_table: bool):
    """Gradients of <_bag(table, idx, w), grad_out> through embedding_bag's own backward:
    (out, d_table or None, d_w) with d_w[t, h, k] = grad_out[t] . table[idx[t, h, k]] (the partial
    dot products) and d_table[i] = sum over idx == i of w * grad_out[t] (deterministic, dense)."""
    with torch.enable_grad():
        t_leaf = table.detach().requires_grad_(want_table)
        w_leaf = w.detach().to(table.dtype).requires_grad_(True)
        out = _bag(t_leaf, idx, w_leaf)
        leaves = [t_leaf, w_leaf] if want_table else [w_leaf]
        grads = torch.autograd.grad(out, leaves, grad_outputs=grad_out.to(out.dtype))
    d_table = grads[0] if want_table else None
    return out.detach(), d_table, grads[-1]


class _ShardedPEERMix(torch.autograd.Function):
    """y_r (T_r, d) = my tokens' PEER output from the gathered X and my table columns."""

    @staticmethod
    def forward(fctx, x_local, X, down, up, idx, gates, activation, ctx: ShardContext):
        cols = ctx.columns(X.shape[1])
        xc = X[:, cols]
        # partial dots x[cols] . u_i[cols] in the tables' precision (fp32 masters), as the gradient
        # of the weighted row sum with respect to its weights: no gathered (T, h, k, d/W) rows
        _, _, h = _bag_vjp(down, idx, torch.ones_like(gates, dtype=down.dtype), xc, want_table=False)
        h = all_reduce_sum_(h, ctx)  # (T, h, k): the full u . x
        w = gates.to(h.dtype) * _act(activation)(h)
        y = columns_to_tokens(_bag(up, idx, w).to(X.dtype), ctx)
        fctx.save_for_backward(xc, down, up, idx, gates, h)
        fctx.activation, fctx.ctx = activation, ctx
        return y

    @staticmethod
    def backward(fctx, dy):
        xc, down, up, idx, gates, h = fctx.saved_tensors
        ctx, inv_w = fctx.ctx, 1.0 / fctx.ctx.world
        dyc = tokens_to_columns(dy.to(xc.dtype).contiguous(), ctx)  # (T, d/W): every token, my columns
        a = _act(fctx.activation)(h)
        g = gates.to(h.dtype)
        _, d_up, s = _bag_vjp(up, idx, g * a, dyc, fctx.needs_input_grad[3])
        s = all_reduce_sum_(s.to(h.dtype), ctx)  # dL/dw = dy . v, (T, h, k)
        coef = g * _act_grad(fctx.activation, h) * s  # dL/dh (local units)
        dxc, d_down, _ = _bag_vjp(down, idx, coef, xc, fctx.needs_input_grad[2])  # dxc = sum coef * u
        dx = columns_to_tokens(dxc.to(xc.dtype), ctx)
        d_down = d_down * inv_w if d_down is not None else None  # summed over all ranks' tokens: global units
        d_up = d_up * inv_w if d_up is not None else None
        d_gates = (a * s * inv_w).to(gates.dtype)  # enters the replicated computation in global units
        return dx.to(dy.dtype), None, d_down, d_up, None, d_gates, None, None


class _ShardedBag(torch.autograd.Function):
    """PKM read: y_r (T_r, v) = my tokens' sum_hk w * values[idx] from my value columns."""

    @staticmethod
    def forward(fctx, values, idx, weights, ctx: ShardContext):
        fctx.save_for_backward(values, idx, weights)
        fctx.ctx = ctx
        return columns_to_tokens(_bag(values, idx, weights), ctx)

    @staticmethod
    def backward(fctx, dy):
        values, idx, weights = fctx.saved_tensors
        ctx, inv_w = fctx.ctx, 1.0 / fctx.ctx.world
        dyc = tokens_to_columns(dy.contiguous(), ctx)
        _, d_values, s = _bag_vjp(values, idx, weights, dyc, fctx.needs_input_grad[0])
        s = all_reduce_sum_(s, ctx)
        d_values = d_values * inv_w if d_values is not None else None
        return d_values, None, (s * inv_w).to(weights.dtype), None


# ---------------------------------------------------------------------------- routing


def _autocast_dtype(device: torch.device):
    if device.type in ("cuda", "cpu") and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def _peer_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """PEER.forward with column-sharded tables; x: (..., d_model) this rank's tokens."""
    check_input(x, self.d_model, "PEER")
    shard = self.column_shard
    lead = x.shape[:-1]
    flat = x.reshape(-1, self.d_model)
    compute = _autocast_dtype(x.device)
    if compute is not None:
        flat = flat.to(compute)  # gather in the compute dtype (half the bytes under bf16); the query
        # projection would cast to it under autocast anyway
    X = gather_tokens(flat, shard)  # (T, d) all ranks' tokens
    q, scores, idx = self.router(X)  # replicated: the same on every rank
    g = self.gates(scores)
    # Retrieval ran on the gathered batch, so this rank's tracker counts every rank's tokens (the
    # plan's usage reduction skips sharded layers).
    self._track_routing(q, idx, g)
    mixer = getattr(self, "table_update", None)  # a fused table optimizer (torchpeer.optim.RowwiseTableAdam)
    if mixer is not None and torch.is_grad_enabled():
        from torchpeer.parallel.triton_mixing import sharded_mix_rowwise_adam

        s_down, s_up, hyper = mixer.table_state()
        y = sharded_mix_rowwise_adam(
            flat, X.detach(), self.down, self.up, idx, g, self.activation, shard, s_down, s_up, hyper
        )
    elif mixer is not None or _mix_backend(self, X.device) == "triton":
        from torchpeer.parallel.triton_mixing import sharded_mix_triton

        y = sharded_mix_triton(flat, X.detach(), self.down, self.up, idx, g, self.activation, shard)
    else:
        y = _ShardedPEERMix.apply(flat, X.detach(), self.down, self.up, idx, g, self.activation, shard)
    return y.view(*lead, self.d_model)


def _mix_backend(layer: nn.Module, device: torch.device) -> str:
    """The mixing backend of the one-process layer: "triton" -> column-sliced kernels, else PyTorch."""
    return resolve_backend("expert_mix", layer.backend, device)


def _pkm_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """PKM.forward with column-sharded values; x: (..., d_model) this rank's tokens."""
    check_input(x, self.d_model, "PKM")
    shard = self.column_shard
    lead = x.shape[:-1]
    X = gather_tokens(x.reshape(-1, self.d_model), shard)
    q, scores, idx = self.router(X)
    weights = F.softmax(scores, dim=-1)
    self._track_routing(q, idx, weights)
    y = _ShardedBag.apply(self.values, idx, weights, shard)
    if self.out_proj is not None:
        y = self.out_proj(y)
    return y.to(x.dtype).view(*lead, self.d_model)


# ---------------------------------------------------------------------------- in-place sharding

SHARDED_TABLES = {"PEER": ("down", "up"), "PKM": ("values",)}


def sharded_tables(module: nn.Module) -> tuple[str, ...]:
    """Names of the column-sharded tables of ``module`` (empty if it is not sharded)."""
    return SHARDED_TABLES[type(module).__name__] if hasattr(module, "column_shard") else ()


def shard_layer_(layer: nn.Module, ctx: ShardContext) -> nn.Module:
    """Keep only this rank's columns of ``layer``'s expert tables and switch its forward to the
    sharded one, in place (parameter names and the other parameters are unchanged).

    Every rank must call it with the same (identically initialised) layer. Needs d_model (PKM:
    value_dim) divisible by the world size.
    """
    kind = type(layer).__name__
    if kind not in SHARDED_TABLES:
        raise TypeError(f"shard_layer_ shards PEER and PKM layers, not {kind}")
    if hasattr(layer, "column_shard"):
        raise ValueError(f"this {kind} layer is already sharded")
    full_cost = layer.cost()
    for name in SHARDED_TABLES[kind]:
        table = getattr(layer, name)
        if table.shape[1] % ctx.world:
            raise ValueError(
                f"{kind}.{name} has {table.shape[1]} columns, not divisible by {ctx.world} ranks; "
                "choose a world size that divides d_model (PKM: value_dim)"
            )
        part = table.detach()[:, ctx.columns(table.shape[1])].clone()
        setattr(layer, name, nn.Parameter(part, requires_grad=table.requires_grad))
        del table
    layer.column_shard = ctx
    layer.forward = types.MethodType(_peer_forward if kind == "PEER" else _pkm_forward, layer)
    layer.cost = lambda: full_cost  # the model's cost is the unsharded one
    if hasattr(layer, "op_backends"):  # the backend record (config.json) names what runs now
        routing = layer.router.retrieval_backend

        def op_backends(device=None):
            device = device or getattr(layer, SHARDED_TABLES[kind][0]).device
            mix = _mix_backend(layer, device) if kind == "PEER" else "torch"
            mix = "triton" if mix == "triton" else "torch"
            name = "expert_mix" if kind == "PEER" else "value_read"
            return {"product_key_topk": routing(device), name: f"column_sharded_{mix} (world {ctx.world})"}

        layer.op_backends = op_backends
    return layer


def shard_model_(model: nn.Module, ctx: ShardContext) -> list[str]:
    """Shard every PEER and PKM layer of ``model`` in place; returns their module names."""
    names = [n for n, m in model.named_modules() if type(m).__name__ in SHARDED_TABLES]
    for n in names:
        shard_layer_(model.get_submodule(n), ctx)
    return names
