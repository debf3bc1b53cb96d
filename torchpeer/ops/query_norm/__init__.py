"""The causal-safe ``ema`` query norm as an op: the spec and CPU path (reference.py), its input
checker (checks.py) and the fused Triton kernels (triton_kernels.py, triton_op.py; imported only
when the "triton" backend runs). The module that owns the parameters and running statistics is
torchpeer.layers.query_norm.EMAQueryNorm."""

from .checks import check_ema_norm_inputs, kernel_supports
from .reference import ema_norm_reference, stats_dtype, update_rate

__all__ = ["check_ema_norm_inputs", "kernel_supports", "ema_norm_reference", "stats_dtype", "update_rate"]
