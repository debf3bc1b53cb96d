"""The one input checker of the causal-safe (``ema``) query norm (the reference and the kernels call it)."""

from __future__ import annotations

import torch

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _valid(x, params, num_updates, eps, momentum) -> bool:
    """The accepted case in one expression: the check runs on every step, and the detailed checks
    below (which build the error messages) cost several microseconds of host time."""
    try:
        F, dev = x.shape[-1], x.device
        return (
            x.dim() == 2 and x.is_floating_point() and num_updates.dim() == 0 and not num_updates.is_floating_point()
            and num_updates.device == dev and eps > 0 and 0.0 < momentum <= 1.0
            and all(p.is_floating_point() and p.shape == (F,) and p.device == dev for p in params)
        )  # fmt: skip
    except (AttributeError, IndexError, TypeError):
        return False


def check_ema_norm_inputs(x, weight, bias, running_mean, running_var, num_updates, eps, momentum) -> None:
    """x: (T, F) float; weight, bias, running_mean, running_var: (F,) float; num_updates: a 0-dim
    integer tensor; eps > 0; momentum in (0, 1]; all on one device. Raises TypeError / ValueError."""
    if _valid(x, (weight, bias, running_mean, running_var), num_updates, eps, momentum):
        return
    tensors = {"x": x, "weight": weight, "bias": bias, "running_mean": running_mean, "running_var": running_var}
    for name, t in (*tensors.items(), ("num_updates", num_updates)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"ema_norm: {name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise TypeError(f"ema_norm: {name} must be floating point, got {t.dtype}")
    if x.dim() != 2:
        raise ValueError(f"ema_norm: x must be (tokens, features), got shape {tuple(x.shape)}")
    F = x.shape[1]
    for name in ("weight", "bias", "running_mean", "running_var"):
        if tuple(tensors[name].shape) != (F,):
            raise ValueError(f"ema_norm: {name} must be ({F},) (one per feature), got {tuple(tensors[name].shape)}")
    if num_updates.dim() != 0 or num_updates.is_floating_point():
        raise ValueError(f"ema_norm: num_updates must be a 0-dim integer tensor, got {num_updates.dtype} "
                         f"{tuple(num_updates.shape)}")  # fmt: skip
    if not eps > 0:
        raise ValueError(f"ema_norm: eps must be > 0, got {eps}")
    if not 0.0 < momentum <= 1.0:
        raise ValueError(f"ema_norm: momentum must be in (0, 1], got {momentum}")
    devices = {t.device for t in (*tensors.values(), num_updates)}
    if len(devices) != 1:
        raise ValueError(f"ema_norm: all inputs must be on one device, got {sorted(map(str, devices))}")


def kernel_supports(x: torch.Tensor, *params: torch.Tensor) -> bool:
    """Can the Triton kernels (fp32 statistics) compute this? float64 modules (the float64 reference
    tests) and empty inputs take the reference path."""
    return x.shape[0] > 0 and all(t.dtype in KERNEL_DTYPES for t in (x, *params))
