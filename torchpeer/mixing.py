"""Expert mixing y[t] = sum_{h,k} g[t,h,k] * act(x[t] . u[i]) * v[i], i = indices[t,h,k], in PyTorch.

Two implementations with one signature (the Triton one lives in torchpeer/kernels/mixing.py):

* ``peer_mix_reference``: gathers the (T, H, K, d) expert rows and lets autograd keep them.
  Simple and obviously right; memory grows with T*H*K*d. Tests only.
* ``peer_mix_torch``: a custom autograd function that processes tokens in chunks, saves only
  x, the indices and the gates for backward, and re-gathers the rows chunk by chunk in backward.
  Peak extra memory: one chunk of gathered rows (about ``chunk_elements`` elements) plus
  (T, H, K)-sized tensors, plus the fp32 gradient tables.

Shapes: x (T, d); down = u table, up = v table: (N, d); indices (T, H, K) integer; gates (T, H, K).
The tables may be in a wider dtype than x (fp32 master weights under bf16 autocast): rows are
gathered and then cast to x's dtype, so the tables themselves are never copied.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ACTIVATIONS = ("gelu", "relu")
# Gathered-row elements per chunk: 32 MiB of fp32 on the CPU; on GPUs larger chunks (256 MiB of
# bf16) keep the number of kernel launches per step small.
_CHUNK_ELEMENTS = {"cpu": 1 << 23, "cuda": 1 << 27}


def activation_fn(name: str):
    if name == "gelu":
        return F.gelu
    if name == "relu":
        return F.relu
    raise ValueError(f"unknown activation {name!r}; use one of {ACTIVATIONS}")


def activation_grad(name: str, h: torch.Tensor) -> torch.Tensor:
    """d act(h) / dh, elementwise (exact-erf GELU, as F.gelu's default)."""
    if name == "relu":
        return (h > 0).to(h.dtype)
    cdf = 0.5 * (1.0 + torch.erf(h * (1.0 / math.sqrt(2.0))))
    pdf = torch.exp(-0.5 * h * h) * (1.0 / math.sqrt(2.0 * math.pi))
    return cdf + h * pdf


def check_mix_inputs(x, down, up, indices, gates) -> None:
    if x.dim() != 2:
        raise ValueError(f"x must be (tokens, d_model), got shape {tuple(x.shape)}")
    if down.dim() != 2 or down.shape != up.shape or down.shape[1] != x.shape[1]:
        raise ValueError(
            f"down and up must both be (n_experts, d_model={x.shape[1]}), got {tuple(down.shape)} and {tuple(up.shape)}"
        )
    if indices.dim() != 3 or indices.shape[0] != x.shape[0] or gates.shape != indices.shape:
        raise ValueError(
            f"indices and gates must be (tokens={x.shape[0]}, heads, top_k) and equal, "
            f"got {tuple(indices.shape)} and {tuple(gates.shape)}"
        )
    if indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"indices must be int32 or int64, got {indices.dtype}")


def peer_mix_reference(x, down, up, indices, gates, activation: str = "gelu") -> torch.Tensor:
    """Naive mixing: materialises (T, H, K, d) gathered rows (kept alive by autograd)."""
    check_mix_inputs(x, down, up, indices, gates)
    act = activation_fn(activation)
    u = down[indices].to(x.dtype)  # (T, H, K, d)
    v = up[indices].to(x.dtype)
    h = torch.einsum("td,thkd->thk", x, u)
    w = gates.to(h.dtype) * act(h)
    return torch.einsum("thk,thkd->td", w, v)


def _chunk_tokens(heads_k: int, d: int, device: torch.device) -> int:
    budget = _CHUNK_ELEMENTS["cuda" if device.type == "cuda" else "cpu"]
    return max(1, budget // max(1, heads_k * d))


class _LeanMix(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, down, up, indices, gates, activation, chunk):
        act = activation_fn(activation)
        y = torch.empty_like(x)
        with torch.no_grad():
            for t0 in range(0, x.shape[0], chunk):
                sl = slice(t0, t0 + chunk)
                idx = indices[sl]
                h = torch.einsum("td,thkd->thk", x[sl], down[idx].to(x.dtype))
                w = gates[sl].to(h.dtype) * act(h)
                y[sl] = torch.einsum("thk,thkd->td", w, up[idx].to(x.dtype))
        ctx.save_for_backward(x, down, up, indices, gates)
        ctx.activation, ctx.chunk = activation, chunk
        return y

    @staticmethod
    def backward(ctx, dy):
        x, down, up, indices, gates = ctx.saved_tensors
        act = activation_fn(ctx.activation)
        acc = torch.promote_types(down.dtype, torch.float32)  # table gradients accumulate in >= fp32
        d_down = torch.zeros(down.shape, device=down.device, dtype=acc) if ctx.needs_input_grad[1] else None
        d_up = torch.zeros(up.shape, device=up.device, dtype=acc) if ctx.needs_input_grad[2] else None
        dx = torch.empty_like(x)
        d_gates = torch.empty(gates.shape, device=gates.device, dtype=gates.dtype)
        dy = dy.to(x.dtype)
        d = x.shape[1]
        for t0 in range(0, x.shape[0], ctx.chunk):
            sl = slice(t0, t0 + ctx.chunk)
            idx, g = indices[sl], gates[sl]
            u = down[idx].to(x.dtype)  # (c, H, K, d): one chunk at a time
            v = up[idx].to(x.dtype)
            h = torch.einsum("td,thkd->thk", x[sl], u)
            s = torch.einsum("td,thkd->thk", dy[sl], v)  # dy . v
            a = act(h)
            d_gates[sl] = (a * s).to(gates.dtype)
            coef = g.to(h.dtype) * activation_grad(ctx.activation, h) * s  # dL/dh
            dx[sl] = torch.einsum("thk,thkd->td", coef, u)
            flat = idx.reshape(-1)
            if d_down is not None:
                d_down.index_add_(0, flat, (coef.unsqueeze(-1) * x[sl, None, None, :]).reshape(-1, d).to(acc))
            if d_up is not None:
                w = g.to(h.dtype) * a
                d_up.index_add_(0, flat, (w.unsqueeze(-1) * dy[sl, None, None, :]).reshape(-1, d).to(acc))
        d_down = d_down.to(down.dtype) if d_down is not None else None
        d_up = d_up.to(up.dtype) if d_up is not None else None
        return dx, d_down, d_up, None, d_gates, None, None


def peer_mix_torch(x, down, up, indices, gates, activation: str = "gelu", chunk: int | None = None) -> torch.Tensor:
    """Memory-lean mixing (see module docstring). Returns y: (T, d) in x's dtype."""
    check_mix_inputs(x, down, up, indices, gates)
    activation_fn(activation)  # validates the name
    if chunk is None:
        chunk = _chunk_tokens(indices.shape[1] * indices.shape[2], x.shape[1], x.device)
    return _LeanMix.apply(x, down, up, indices, gates, activation, chunk)
