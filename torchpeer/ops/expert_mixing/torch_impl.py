"""Expert mixing in chunked PyTorch (the "torch" backend; runs on any device).

A custom autograd function that processes tokens in chunks, saves only x, the indices and the
gates for backward, and re-gathers the rows chunk by chunk in backward. Peak extra memory: one
chunk of gathered rows (about ``_CHUNK_ELEMENTS`` elements) plus (T, H, K)-sized tensors, plus the
fp32 gradient tables.

The tables may be in a wider dtype than x (fp32 master weights under bf16 autocast): rows are
gathered and then cast to x's dtype, so the tables themselves are never copied.
"""

from __future__ import annotations

import math

import torch

from .checks import check_mix_inputs
from .reference import activation_fn, check_readout_inputs

# Gathered-row elements per chunk: 32 MiB of fp32 on the CPU; on GPUs larger chunks (256 MiB of
# bf16) keep the number of kernel launches per step small.
_CHUNK_ELEMENTS = {"cpu": 1 << 23, "cuda": 1 << 27}


def activation_grad(name: str, h: torch.Tensor) -> torch.Tensor:
    """d act(h) / dh, elementwise (exact-erf GELU, as F.gelu's default)."""
    if name == "relu":
        return (h > 0).to(h.dtype)
    cdf = 0.5 * (1.0 + torch.erf(h * (1.0 / math.sqrt(2.0))))
    pdf = torch.exp(-0.5 * h * h) * (1.0 / math.sqrt(2.0 * math.pi))
    return cdf + h * pdf


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


def expert_mix_torch(x, down, up, indices, gates, activation: str = "gelu", chunk: int | None = None) -> torch.Tensor:
    """Memory-lean mixing (see module docstring). x: (T, d); down, up: (N, d); indices, gates:
    (T, H, K) -> y: (T, d) in x's dtype."""
    check_mix_inputs(x, down, up, indices, gates, activation)
    if chunk is None:
        chunk = _chunk_tokens(indices.shape[1] * indices.shape[2], x.shape[1], x.device)
    return _LeanMix.apply(x, down, up, indices, gates, activation, chunk)


# ----------------------------------------------------------------------------- read-outs beyond the paper


class _LeanReadoutMix(torch.autograd.Function):
    """The read-outs of reference.READOUTS, chunked like _LeanMix: per selection h = x . u, z = x . w
    (glu only), c = h ("linear") or act(h) z ("glu"); y = sum g c v. Saves x, tables, indices, gates."""

    @staticmethod
    def _coef(readout, activation, x, u, w):
        """-> h, z (None for linear), c for one chunk of gathered rows u, w (c, H, K, d)."""
        h = torch.einsum("td,thkd->thk", x, u)
        if readout == "linear":
            return h, None, h
        z = torch.einsum("td,thkd->thk", x, w)
        return h, z, activation_fn(activation)(h) * z

    @staticmethod
    def forward(ctx, x, down, up, lin, indices, gates, readout, activation, chunk):
        y = torch.empty_like(x)
        with torch.no_grad():
            for t0 in range(0, x.shape[0], chunk):
                sl = slice(t0, t0 + chunk)
                idx = indices[sl]
                w = lin[idx].to(x.dtype) if lin is not None else None
                _, _, c = _LeanReadoutMix._coef(readout, activation, x[sl], down[idx].to(x.dtype), w)
                y[sl] = torch.einsum("thk,thkd->td", gates[sl].to(c.dtype) * c, up[idx].to(x.dtype))
        ctx.save_for_backward(x, down, up, lin, indices, gates)
        ctx.readout, ctx.activation, ctx.chunk = readout, activation, chunk
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
            h, z, c = _LeanReadoutMix._coef(ctx.readout, ctx.activation, x[sl], u, w)
            s = torch.einsum("td,thkd->thk", dy[sl], up[idx].to(x.dtype))  # dy . v
            d_gates[sl] = (c * s).to(gates.dtype)
            dc = g.to(c.dtype) * s  # dL/dc
            if ctx.readout == "linear":
                dh, dz = dc, None
            else:
                dh = dc * activation_grad(ctx.activation, h) * z
                dz = dc * activation_fn(ctx.activation)(h)
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
        return dx, out[0], out[1], out[2], None, d_gates, None, None, None


def expert_mix_readout_torch(
    x, down, up, indices, gates, readout: str, activation: str = "gelu", lin=None, chunk: int | None = None
) -> torch.Tensor:
    """Memory-lean mixing with a read-out of reference.READOUTS ("linear": g (x.u) v; "glu":
    g act(x.u) (x.w) v, w = ``lin``). x: (T, d); down, up, lin: (N, d); indices, gates: (T, H, K)
    -> y: (T, d) in x's dtype, differentiable w.r.t. x, the tables and gates. Same chunking and
    memory as ``expert_mix_torch`` (one more gathered table for "glu")."""
    check_readout_inputs(x, down, up, indices, gates, readout, activation, lin)
    if chunk is None:
        rows = indices.shape[1] * indices.shape[2] * (3 if lin is not None else 2) // 2  # 1.5x rows for glu
        chunk = _chunk_tokens(rows, x.shape[1], x.device)
    return _LeanReadoutMix.apply(x, down, up, lin, indices, gates, readout, activation, chunk)
