"""Expert mixing in chunked PyTorch (the "torch" backend; runs on any device).

A custom autograd function that processes tokens in chunks, saves only x, the tables, the indices
and the gates for backward, and re-gathers the rows chunk by chunk in backward. Also the GLU
read-out (``lin``: act(x.u) (x.w) v) and the linear one (activation "identity"). Peak extra memory: one
chunk of gathered rows (about ``_CHUNK_ELEMENTS`` elements) plus (T, H, K)-sized tensors, plus the
fp32 gradient tables.

The tables may be in a wider dtype than x (fp32 master weights under bf16 autocast): rows are
gathered and then cast to x's dtype, so the tables themselves are never copied.
"""

from __future__ import annotations

import math

import torch

from .checks import check_mix_inputs
from .reference import activation_fn

# Gathered-row elements per chunk: 32 MiB of fp32 on the CPU; on GPUs larger chunks (256 MiB of
# bf16) keep the number of kernel launches per step small.
_CHUNK_ELEMENTS = {"cpu": 1 << 23, "cuda": 1 << 27}


def activation_grad(name: str, h: torch.Tensor) -> torch.Tensor:
    """d act(h) / dh, elementwise (exact-erf GELU, as F.gelu's default)."""
    if name == "relu":
        return (h > 0).to(h.dtype)
    if name == "identity":
        return torch.ones_like(h)
    cdf = 0.5 * (1.0 + torch.erf(h * (1.0 / math.sqrt(2.0))))
    pdf = torch.exp(-0.5 * h * h) * (1.0 / math.sqrt(2.0 * math.pi))
    return cdf + h * pdf


def _chunk_tokens(heads_k: int, d: int, device: torch.device) -> int:
    budget = _CHUNK_ELEMENTS["cuda" if device.type == "cuda" else "cpu"]
    return max(1, budget // max(1, heads_k * d))


def _coef(activation, x, u, w):
    """One chunk's per-selection h = x . u, z = x . w (None without lin) and c = act(h) (* z)."""
    h = torch.einsum("td,thkd->thk", x, u)
    if w is None:
        return h, None, activation_fn(activation)(h)
    z = torch.einsum("td,thkd->thk", x, w)
    return h, z, activation_fn(activation)(h) * z


class _LeanMix(torch.autograd.Function):
    """y = sum g c v with c = act(x.u) (* x.w for lin), chunk by chunk; saves x, tables, indices, gates."""

    @staticmethod
    def forward(ctx, x, down, up, lin, indices, gates, activation, chunk):
        y = torch.empty_like(x)
        with torch.no_grad():
            for t0 in range(0, x.shape[0], chunk):
                sl = slice(t0, t0 + chunk)
                idx = indices[sl]
                w = lin[idx].to(x.dtype) if lin is not None else None
                _, _, c = _coef(activation, x[sl], down[idx].to(x.dtype), w)
                y[sl] = torch.einsum("thk,thkd->td", gates[sl].to(c.dtype) * c, up[idx].to(x.dtype))
        ctx.save_for_backward(x, down, up, lin, indices, gates)
        ctx.activation, ctx.chunk = activation, chunk
        return y

    @staticmethod
    def backward(ctx, dy):
        x, down, up, lin, indices, gates = ctx.saved_tensors
        acc = torch.promote_types(down.dtype, torch.float32)  # table gradients accumulate in >= fp32

        def zeros_if(i, t):
            wanted = t is not None and ctx.needs_input_grad[i]
            return torch.zeros(t.shape, device=t.device, dtype=acc) if wanted else None

        d_down, d_up, d_lin = zeros_if(1, down), zeros_if(2, up), zeros_if(3, lin)
        dx = torch.empty_like(x)
        d_gates = torch.empty(gates.shape, device=gates.device, dtype=gates.dtype)
        dy = dy.to(x.dtype)
        d = x.shape[1]
        for t0 in range(0, x.shape[0], ctx.chunk):
            sl = slice(t0, t0 + ctx.chunk)
            idx, g = indices[sl], gates[sl]
            u = down[idx].to(x.dtype)  # (c, H, K, d): one chunk at a time
            w = lin[idx].to(x.dtype) if lin is not None else None
            h, z, c = _coef(ctx.activation, x[sl], u, w)
            s = torch.einsum("td,thkd->thk", dy[sl], up[idx].to(x.dtype))  # dy . v
            d_gates[sl] = (c * s).to(gates.dtype)
            dc = g.to(c.dtype) * s  # dL/dc
            dh = dc * activation_grad(ctx.activation, h)
            dz = None
            if z is not None:
                dz = dc * activation_fn(ctx.activation)(h)
                dh = dh * z
            dxs = torch.einsum("thk,thkd->td", dh, u)
            if dz is not None:
                dxs = dxs + torch.einsum("thk,thkd->td", dz, w)
            dx[sl] = dxs
            flat = idx.reshape(-1)
            xs, dys = x[sl, None, None, :], dy[sl, None, None, :]
            for table_grad, coef, inp in ((d_down, dh, xs), (d_lin, dz, xs), (d_up, g.to(c.dtype) * c, dys)):
                if table_grad is not None:
                    table_grad.index_add_(0, flat, (coef.unsqueeze(-1) * inp).reshape(-1, d).to(acc))
        out = [t.to(ref.dtype) if t is not None else None for t, ref in ((d_down, down), (d_up, up), (d_lin, lin))]
        return dx, out[0], out[1], out[2], None, d_gates, None, None


def expert_mix_torch(
    x, down, up, indices, gates, activation: str = "gelu", lin=None, chunk: int | None = None
) -> torch.Tensor:
    """Memory-lean mixing (see module docstring). x: (T, d); down, up (and lin, the GLU read-out's
    third table): (N, d); indices, gates: (T, H, K) -> y: (T, d) in x's dtype, differentiable w.r.t.
    x, the tables and gates."""
    check_mix_inputs(x, down, up, indices, gates, activation, lin=lin)
    if chunk is None:
        rows = indices.shape[1] * indices.shape[2] * (3 if lin is not None else 2) // 2  # 1.5x rows for glu
        chunk = _chunk_tokens(rows, x.shape[1], x.device)
    return _LeanMix.apply(x, down, up, lin, indices, gates, activation, chunk)
