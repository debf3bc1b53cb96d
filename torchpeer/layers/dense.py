"""Dense feed-forward baseline: y = W2 act(W1 x), or the gated (SwiGLU) variant.

The PEER paper's isoFLOP comparison uses a dense transformer FFW as the reference; this is that
block, with the same interface as the routed layers (PEER, MoE, PKM):

* forward: x (..., d_model) -> y (..., d_model)
* ``cost()``: parameters, active parameters and forward FLOPs per token (see ``accounting.py``).

Registered as FFW kind "dense" (config ``DenseConfig``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from torchpeer.layers.accounting import FFWCost, count_params, matmul_flops
from torchpeer.layers.registry import register_ffw
from torchpeer.layers.validators import check_last_dim, check_positive, get_activation


@dataclass
class DenseConfig:
    """Options of ``DenseFFW`` (the ``[model.dense]`` config section; d_hidden None = 4 * d_model)."""

    d_hidden: int | None = None
    activation: str | None = None
    swiglu: bool = False


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

    @classmethod
    def from_config(cls, d_model: int, cfg: DenseConfig) -> DenseFFW:
        return cls(d_model, **dataclasses.asdict(cfg))

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

    def optim_groups(self) -> dict[str, list[nn.Parameter]]:
        """No expert tables; biases (if any) are 1-D and go to no-decay by shape."""
        return {"expert": [], "no_decay": []}


register_ffw("dense", DenseConfig, DenseFFW.from_config)
