"""The spec of expert mixing, in plain PyTorch:

    y[t] = sum_{h,k} g[t,h,k] * act(x[t] . u[i]) * v[i],   i = indices[t,h,k],

with u = ``down[i]``, v = ``up[i]`` (single-neuron experts, no biases). It gathers the (T, H, K, d)
expert rows and lets autograd keep them: obviously right, memory T*H*K*d. Tests and small sizes only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .checks import check_mix_inputs


def activation_fn(name: str):
    """ "gelu" (exact erf, F.gelu's default) or "relu"."""
    if name == "gelu":
        return F.gelu
    if name == "relu":
        return F.relu
    raise ValueError(f"unknown activation {name!r}; use 'gelu' or 'relu'")


def expert_mix_reference(x, down, up, indices, gates, activation: str = "gelu") -> torch.Tensor:
    """x: (T, d); down, up: (N, d); indices, gates: (T, H, K) -> y: (T, d) in x's dtype.

    Computes in float32 (float64 if any input is float64), also inside an enclosing autocast,
    differentiable w.r.t. x, down, up and gates through plain autograd.
    """
    check_mix_inputs(x, down, up, indices, gates, activation)
    cdt = torch.float64 if torch.float64 in (x.dtype, down.dtype, up.dtype, gates.dtype) else torch.float32
    with torch.autocast(device_type=x.device.type, enabled=False):
        u = down[indices].to(cdt)  # (T, H, K, d)
        v = up[indices].to(cdt)
        h = torch.einsum("td,thkd->thk", x.to(cdt), u)
        y = torch.einsum("thk,thkd->td", gates.to(cdt) * activation_fn(activation)(h), v)
    return y.to(x.dtype)
