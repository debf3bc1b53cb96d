"""The spec of expert mixing, in plain PyTorch:

    y[t] = sum_{h,k} g[t,h,k] * act(x[t] . u[i]) * v[i],                 i = indices[t,h,k]
    y[t] = sum_{h,k} g[t,h,k] * act(x[t] . u[i]) * (x[t] . w[i]) * v[i]  with lin = w (GLU read-out)

with u = ``down[i]``, v = ``up[i]`` (single-neuron experts, no biases); act "gelu" (exact erf),
"relu" or "identity" (the linear read-out, UltraMemV2's values: (u.x) v). It gathers the
(T, H, K, d) expert rows and lets autograd keep them: obviously right, memory T*H*K*d. Tests and
small sizes only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .checks import check_mix_inputs


def activation_fn(name: str):
    """ "gelu" (exact erf, F.gelu's default), "relu" or "identity"."""
    if name == "gelu":
        return F.gelu
    if name == "relu":
        return F.relu
    if name == "identity":
        return lambda h: h
    raise ValueError(f"unknown activation {name!r}; use 'gelu', 'relu' or 'identity'")


def expert_mix_reference(x, down, up, indices, gates, activation: str = "gelu", lin=None) -> torch.Tensor:
    """x: (T, d); down, up (and lin): (N, d); indices, gates: (T, H, K) -> y: (T, d) in x's dtype.

    Computes in float32 (float64 if any input is float64), also inside an enclosing autocast,
    differentiable w.r.t. x, the tables and gates through plain autograd.
    """
    check_mix_inputs(x, down, up, indices, gates, activation, lin=lin)
    tables = (x, down, up, gates) + ((lin,) if lin is not None else ())
    cdt = torch.float64 if any(t.dtype == torch.float64 for t in tables) else torch.float32
    with torch.autocast(device_type=x.device.type, enabled=False):
        xc = x.to(cdt)
        c = activation_fn(activation)(torch.einsum("td,thkd->thk", xc, down[indices].to(cdt)))
        if lin is not None:
            c = c * torch.einsum("td,thkd->thk", xc, lin[indices].to(cdt))
        y = torch.einsum("thk,thkd->td", gates.to(cdt) * c, up[indices].to(cdt))
    return y.to(x.dtype)
