"""PEER's read-out: how the retrieved experts turn x into the layer output (``PEERConfig.readout``).

With gates g (softmax/sigmoid of the retrieval scores), per token x (d_model,):

    "paper":  f(x) = sum g_i act(u_i . x) v_i                     (He 2024; the default)
    "linear": f(x) = sum g_i (u_i . x) v_i                        (UltraMemV2's values, no activation)
    "glu":    f(x) = sum g_i act(u_i . x) (w_i . x) v_i           (a GLU neuron per expert; w = ``lin``)
    "gated":  f(x) = W_o( [sum g_i act(u_i . x) v_i] * silu(W_g x) )   (Memory+'s gated read-out,
              Berges et al. 2024: the memory output times a SiLU gate of the input, then a d x d
              projection; W_g, W_o are dense (d_model, d_model) matrices of the layer)

Where they run: "paper" and "gated" mix through ``torchpeer.ops.expert_mix`` (the Triton kernels
on CUDA); "linear" and "glu" have no Triton kernel (the kernels compute act(u.x) v), so they mix
with the chunked PyTorch implementation (``expert_mix_readout_torch``) under backend "auto" and
refuse backend "triton" at construction. Retrieval keeps its own backend (Triton on CUDA).

Costs per token and head-selection (h*k of them), d = d_model: paper / linear 4d FLOPs and 2d
active parameters (u, v); glu 6d and 3d (u, w, v); gated adds 2 * 2d^2 FLOPs and 2d^2 parameters
once per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from torchpeer.layers.accounting import FFWCost, matmul_flops
from torchpeer.ops.expert_mixing.reference import expert_mix_readout_reference
from torchpeer.ops.expert_mixing.torch_impl import expert_mix_readout_torch

READOUTS = ("paper", "linear", "glu", "gated")
TORCH_ONLY_READOUTS = ("linear", "glu")  # no Triton kernel: mixed by the PyTorch implementation


def rows_per_selection(readout: str) -> int:
    """Table rows one selected expert reads: u and v, plus w for "glu"."""
    return 3 if readout == "glu" else 2


def readout_mix_backend(readout: str, backend: str) -> str:
    """The mixing backend of a torch-only read-out for the layer's ``backend``: "reference" stays,
    "auto"/"torch" are "torch"; "triton" is an error (no kernel)."""
    if backend == "triton":
        raise ValueError(
            f"readout={readout!r} has no Triton kernel (the kernels compute act(u.x) v); use backend='auto' "
            "(Triton retrieval on CUDA, PyTorch mixing) or 'torch'"
        )
    return "reference" if backend == "reference" else "torch"


def readout_mix(x, down, up, lin, indices, gates, readout: str, activation: str, backend: str) -> torch.Tensor:
    """Mixing for a read-out of TORCH_ONLY_READOUTS. x: (T, d); down, up (lin for "glu"): (N, d);
    indices, gates: (T, H, K) -> (T, d) in x's dtype. backend: "torch" or "reference"."""
    fn = expert_mix_readout_reference if backend == "reference" else expert_mix_readout_torch
    return fn(x, down, up, indices, gates, readout, activation, lin=lin)


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
