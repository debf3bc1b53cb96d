"""Dense feed-forward baseline: y = W2 act(W1 x), or the gated (SwiGLU) variant.

The PEER paper's isoFLOP comparison uses a dense transformer FFW as the reference; this is that
block, with the same interface as the routed layers (PEER, MoE, PKM):

* forward: x (..., d_model) -> y (..., d_model)
* ``cost()``: parameters, active parameters and forward FLOPs per token (see ``accounting.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from torchpeer.accounting import FFWCost, count_params, matmul_flops

# Elementwise activations shared by the baselines (the MoE experts use the same table).
ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}


def get_activation(name: str):
    """The activation function called ``name`` (one of ``ACTIVATIONS``)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; use one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def check_positive(**sizes: int) -> None:
    """Raise a ValueError naming the first size that is not a positive int."""
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_last_dim(x: torch.Tensor, d_model: int) -> None:
    """Raise the shared 'wrong input width' error of every FFW module."""
    if x.shape[-1] != d_model:
        raise ValueError(f"expected input last dimension d_model={d_model}, got {x.shape[-1]}")


class DenseFFW(nn.Module):
    """Position-wise feed-forward block.

    Plain (``swiglu=False``): y = W2 act(W1 x), W1: (d_hidden, d_model), W2: (d_model, d_hidden).
    Gated (``swiglu=True``): y = W2 (act(Wg x) * (Wu x)), three matrices of width d_hidden; with the
    default activation this is SwiGLU (act = SiLU, Shazeer 2020), with ``activation="gelu"`` GeGLU.

    Args:
        d_model: input and output width.
        d_hidden: hidden width (default 4 * d_model). With swiglu it is the gated width, so the
            block has 3 * d_model * d_hidden weights instead of 2 * d_model * d_hidden; pass
            e.g. ``8 * d_model // 3`` to match the parameters of a plain 4x block.
        activation: "gelu" | "relu" | "silu"; default None means "gelu" for the plain block and
            "silu" for the gated one.
        swiglu: use the gated variant.
        bias: add biases to the linear layers (not counted as FLOPs: elementwise).
    """

    def __init__(
        self,
        d_model: int,
        d_hidden: int | None = None,
        activation: str | None = None,
        swiglu: bool = False,
        bias: bool = False,
    ):
        super().__init__()
        d_hidden = 4 * d_model if d_hidden is None and isinstance(d_model, int) else d_hidden
        check_positive(d_model=d_model, d_hidden=d_hidden)
        if activation is None:
            activation = "silu" if swiglu else "gelu"
        self.act = get_activation(activation)
        self.d_model, self.d_hidden = d_model, d_hidden
        self.activation, self.swiglu = activation, bool(swiglu)
        self.fc_in = nn.Linear(d_model, d_hidden, bias=bias)
        # The gated variant's second input projection ("up"); fc_in is then the gate projection.
        self.fc_up = nn.Linear(d_model, d_hidden, bias=bias) if swiglu else None
        self.fc_out = nn.Linear(d_hidden, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., d_model) -> (..., d_model)."""
        check_last_dim(x, self.d_model)
        h = self.act(self.fc_in(x))  # (..., d_hidden)
        if self.fc_up is not None:
            h = h * self.fc_up(x)
        return self.fc_out(h)

    def cost(self) -> FFWCost:
        n_mats = 3 if self.swiglu else 2
        params = count_params(self)
        return FFWCost(
            total_params=params,
            active_params=params,  # dense: every weight touches every token
            forward_flops=n_mats * matmul_flops(1, self.d_model, self.d_hidden),
        )

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, d_hidden={self.d_hidden}, activation={self.activation}, swiglu={self.swiglu}"
