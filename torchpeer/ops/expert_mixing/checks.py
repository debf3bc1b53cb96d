"""The one input checker of expert mixing (every backend and the reference call it)."""

from __future__ import annotations

import torch

# "identity" is the linear read-out's (UltraMemV2's values: (u.x) v); PEER layers choose it through
# readout="linear", not through their activation field.
ACTIVATIONS = ("gelu", "relu", "identity")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_KERNEL_D = 16384  # the Triton kernels keep whole rows in registers; beyond this they would spill


def check_mix_inputs(x, down, up, indices, gates, activation: str = "gelu", *, kernel: bool = False, lin=None) -> None:
    """x: (T, d) float; down, up: (N, d) float; indices: (T, H, K) int32/int64 in [0, N); gates: (T, H, K) float;
    lin: None, or (N, d) float like down (the GLU read-out's third table).

    kernel=True adds what the Triton kernels need: fp16/bf16/fp32 x and tables, d <= MAX_KERNEL_D.
    The index range is only checked for CPU tensors (on a GPU it would cost a host sync per call).
    Raises TypeError / ValueError with what to change.
    """
    if not all(isinstance(a, torch.Tensor) for a in (x, down, up, indices, gates)):
        raise TypeError("expert_mix: x, down, up, indices and gates must all be torch.Tensors")
    if activation not in ACTIVATIONS:
        raise ValueError(f"expert_mix: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if x.dim() != 2:
        raise ValueError(f"expert_mix: x must be (tokens, d_model); got shape {tuple(x.shape)}")
    if down.dim() != 2 or down.shape != up.shape or down.shape[1] != x.shape[1]:
        raise ValueError(
            "expert_mix: down and up must both be (n_experts, d_model) with d_model = "
            f"x.shape[1] = {x.shape[1]}; got down {tuple(down.shape)}, up {tuple(up.shape)}"
        )
    if lin is not None:
        if not isinstance(lin, torch.Tensor) or lin.shape != down.shape or not lin.is_floating_point():
            got = f"shape {tuple(lin.shape)}, {lin.dtype}" if isinstance(lin, torch.Tensor) else type(lin).__name__
            raise ValueError(f"expert_mix: lin (the GLU read-out's table) must be a float (n_experts, d_model) = "
                             f"{tuple(down.shape)} tensor like down; got {got}")  # fmt: skip
    if indices.dim() != 3 or indices.shape[0] != x.shape[0]:
        raise ValueError(
            f"expert_mix: indices must be (tokens, heads, top_k) with tokens = {x.shape[0]}; "
            f"got shape {tuple(indices.shape)}"
        )
    if gates.shape != indices.shape:
        raise ValueError(
            f"expert_mix: gates must have the shape of indices {tuple(indices.shape)}; got {tuple(gates.shape)}"
        )
    if indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"expert_mix: indices must be int32 or int64; got {indices.dtype}")
    for name, t in (("x", x), ("down", down), ("up", up), ("gates", gates)):
        if not t.is_floating_point():
            raise TypeError(f"expert_mix: {name} must be a floating-point tensor; got {t.dtype}")
    if kernel:
        for name, t in (("x", x), ("down", down), ("up", up)) + ((("lin", lin),) if lin is not None else ()):
            if t.dtype not in KERNEL_DTYPES:
                raise TypeError(f"expert_mix: {name} must be float16, bfloat16 or float32 for the Triton kernels; "
                                f"got {t.dtype} (backend='torch' takes any float dtype)")  # fmt: skip
        if x.shape[1] > MAX_KERNEL_D:
            raise ValueError(
                f"expert_mix: d_model = {x.shape[1]} > {MAX_KERNEL_D} is not supported by the Triton kernels"
            )
    devices = {t.device for t in (x, down, up, indices, gates) + ((lin,) if lin is not None else ())}
    if len(devices) != 1:
        raise ValueError(f"expert_mix: all inputs must be on one device; got {sorted(map(str, devices))}")
    if x.device.type == "cpu" and indices.numel() and not torch.compiler.is_compiling():
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= down.shape[0]:
            raise ValueError(f"expert_mix: indices must lie in [0, {down.shape[0]}); got [{lo}, {hi}]")
