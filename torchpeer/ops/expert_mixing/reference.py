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


# ----------------------------------------------------------------------------- read-outs beyond the paper

# The per-expert read-outs other than the paper's act(u.x) v (which ``expert_mix`` computes):
#   "linear": g * (x . u_i) * v_i                   UltraMemV2's values without the activation
#   "glu":    g * act(x . u_i) * (x . w_i) * v_i    a GLU neuron per expert (w = ``lin``, a third table)
# The Triton kernels implement the paper's form only; these run in PyTorch (torch_impl.py).
READOUTS = ("linear", "glu")


def check_readout_inputs(x, down, up, indices, gates, readout: str, activation: str = "gelu", lin=None) -> None:
    """``check_mix_inputs`` plus: readout in READOUTS; ``lin`` (N, d) like ``down`` for "glu", None for "linear"."""
    check_mix_inputs(x, down, up, indices, gates, activation)
    if readout not in READOUTS:
        raise ValueError(f"expert_mix_readout: readout must be one of {READOUTS}, got {readout!r}")
    if readout == "glu":
        if not isinstance(lin, torch.Tensor) or lin.shape != down.shape or not lin.is_floating_point():
            got = tuple(lin.shape) if isinstance(lin, torch.Tensor) else type(lin).__name__
            raise ValueError(f"expert_mix_readout: readout 'glu' needs lin, a float (n_experts, d_model) = "
                             f"{tuple(down.shape)} table like down; got {got}")  # fmt: skip
        if lin.device != x.device:
            raise ValueError(f"expert_mix_readout: lin is on {lin.device}, x on {x.device}")
    elif lin is not None:
        raise ValueError("expert_mix_readout: readout 'linear' takes no lin table (it has no activation to gate)")


def expert_mix_readout_reference(x, down, up, indices, gates, readout: str, activation: str = "gelu", lin=None):
    """The spec of the read-outs in READOUTS. x: (T, d); down, up (and lin for "glu"): (N, d);
    indices, gates: (T, H, K) -> y: (T, d) in x's dtype. Gathers (T, H, K, d) rows (tests, small
    sizes); computes in float32 (float64 if any input is float64); differentiable by autograd."""
    check_readout_inputs(x, down, up, indices, gates, readout, activation, lin)
    tables = (x, down, up, gates) + ((lin,) if lin is not None else ())
    cdt = torch.float64 if any(t.dtype == torch.float64 for t in tables) else torch.float32
    with torch.autocast(device_type=x.device.type, enabled=False):
        xc = x.to(cdt)
        h = torch.einsum("td,thkd->thk", xc, down[indices].to(cdt))
        if readout == "linear":
            c = h
        else:
            c = activation_fn(activation)(h) * torch.einsum("td,thkd->thk", xc, lin[indices].to(cdt))
        y = torch.einsum("thk,thkd->td", gates.to(cdt) * c, up[indices].to(cdt))
    return y.to(x.dtype)
