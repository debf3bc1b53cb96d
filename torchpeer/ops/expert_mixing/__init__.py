"""Expert mixing y[t] = sum_{h,k} g[t,h,k] * act(x[t] . u[i]) * v[i] (and the GLU read-out's
act(x . u) (x . w) v with a third table): the spec (reference.py), its input checker (checks.py),
the chunked PyTorch implementation (torch_impl.py) and the Triton kernels (triton_kernels.py +
triton_op.py; the GLU read-out's triton_glu_kernels.py + triton_glu_op.py; imported only when the
"triton" backend runs); two opt-in
forward prototypes being measured (benchmarks/NOTES_mixing.md §5-6): tile-sorted (triton_tiled.py)
and split-S for decoding (triton_decode.py), selected through triton_op.TUNING["fwd"]; the fused
row-wise Adam backward (triton_fused_*.py) and its deferred form for tables several layers read
(triton_deferred_op.py: one update after the backward); one rank's column slice of the mixing for the
column-sharded layer of torchpeer.parallel (triton_cols_*.py, specs in columns_reference.py)."""

from .checks import ACTIVATIONS, check_mix_inputs
from .reference import activation_fn, expert_mix_reference
from .torch_impl import activation_grad, expert_mix_torch

__all__ = [
    "ACTIVATIONS",
    "check_mix_inputs",
    "activation_fn",
    "activation_grad",
    "expert_mix_reference",
    "expert_mix_torch",
]
