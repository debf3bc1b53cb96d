"""PEER's read-out: how the retrieved experts turn x into the layer output (``PEERConfig.readout``).

With gates g (softmax/sigmoid of the retrieval scores), per token x (d_model,):

    "paper":  f(x) = sum g_i act(u_i . x) v_i                     (He 2024; the default)
    "linear": f(x) = sum g_i (u_i . x) v_i                        (UltraMemV2's values, no activation)
    "glu":    f(x) = sum g_i act(u_i . x) (w_i . x) v_i           (a GLU neuron per expert; w = ``lin``)
    "gated":  f(x) = W_o( [sum g_i act(u_i . x) v_i] * silu(W_g x) )   (Memory+'s gated read-out,
              Berges et al. 2024: the memory output times a SiLU gate of the input, then a d x d
              projection; W_g, W_o are dense (d_model, d_model) matrices of the layer)

Where they run: all four mix through ``torchpeer.ops.expert_mix`` with every backend (the Triton
kernels on CUDA): "linear" as activation "identity", "glu" with the third table (``lin=``).
Not with the fused row-wise Adam (``train.expert_optimizer = "rowwise_adam"``): "glu" (its kernels
update two tables) and a shared pool are refused there; "linear" and "gated" are accepted.

Costs per token and head-selection (h*k of them), d = d_model: paper / linear 4d FLOPs and 2d
active parameters (u, v); glu 6d and 3d (u, w, v); gated adds 2 * 2d^2 FLOPs and 2d^2 parameters
once per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from torchpeer.layers.accounting import FFWCost, matmul_flops
from torchpeer.ops.expert_mixing.checks import ACTIVATIONS

READOUTS = ("paper", "linear", "glu", "gated")
# a PEER layer's ``activation``: the mixing's, but "identity", which the layer spells readout="linear"
LAYER_ACTIVATIONS = tuple(a for a in ACTIVATIONS if a != "identity")


def rows_per_selection(readout: str) -> int:
    """Table rows one selected expert reads: u and v, plus w for "glu"."""
    return 3 if readout == "glu" else 2


def mix_activation(readout: str, activation: str) -> str:
    """The activation ``expert_mix`` computes for a read-out: "identity" for "linear" ((u.x) v),
    the layer's own for the others ("glu" passes its third table as ``lin`` besides)."""
    return "identity" if readout == "linear" else activation


class OutputGate(nn.Module):
    """Memory+'s gated read-out: (x, y) -> W_o(y * silu(W_g x)). x, y: (T, d_model) -> (T, d_model).

    ``gate`` (W_g) and ``proj`` (W_o) are bias-free ``nn.Linear(d_model, d_model)`` with their
    default init: at init the output is about 0.3x the mixed value's scale, a small residual branch.
    """

    def __init__(self, d_model: int):
        super().__init__()
        self.d_model = d_model
        self.gate = nn.Linear(d_model, d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.proj(y * F.silu(self.gate(x)))

    def cost(self) -> FFWCost:
        """Two dense (d, d) matmuls per token; both matrices are active."""
        params = 2 * self.d_model * self.d_model
        return FFWCost(params, params, 2 * matmul_flops(1, self.d_model, self.d_model))
