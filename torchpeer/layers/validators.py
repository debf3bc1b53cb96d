"""Argument checks and the activation table shared by the FFW layers (dense, MoE, PKM, PEER).

Each check raises one ValueError/TypeError that names the argument and what would be valid,
so a bad config fails at construction, not deep inside torch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Elementwise activations of the dense/MoE/PKM baselines (PEER's expert kernels have their own,
# smaller set: torchpeer.ops.ACTIVATIONS).
ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}


def get_activation(name: str):
    """The activation function called ``name`` (one of ``ACTIVATIONS``)."""
    if name not in ACTIVATIONS:
        check_choice("activation", name, sorted(ACTIVATIONS))
    return ACTIVATIONS[name]


def check_positive(**sizes: int) -> None:
    """Raise a ValueError naming the first size that is not a positive int."""
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_choice(name: str, value, choices) -> None:
    """Raise ``unknown <name> 'value'; use one of: a, b, c`` (with "did you mean 'x'?" for a near
    miss) unless value is in choices."""
    if value not in choices:
        import difflib

        names = {str(c).lower(): str(c) for c in choices}
        near = difflib.get_close_matches(str(value).lower(), list(names), n=1, cutoff=0.6)
        hint = f" (did you mean {names[near[0]]!r}?)" if near else ""
        raise ValueError(f"unknown {name} {value!r}{hint}; use one of: {', '.join(map(str, choices))}")


def check_input(x, d_model: int, layer: str = "FFW", weight_dtype: torch.dtype | None = None) -> None:
    """Raise the shared errors of every FFW module for a non-tensor, a wrong input width, or (given
    ``weight_dtype``, the dtype of the layer's first matmul weight) an input dtype that matmul would
    refuse deep inside torch: another dtype than the weight's with autocast off."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{layer} expects a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[-1] != d_model:
        got = x.shape[-1] if x.dim() else "a scalar"
        raise ValueError(f"expected input last dimension d_model={d_model}, got {got}")
    if weight_dtype is not None and x.dtype != weight_dtype:
        if not x.is_floating_point():
            raise TypeError(f"{layer} expects floating-point input (e.g. embeddings), got {x.dtype}")
        if not (x.device.type in ("cuda", "cpu") and torch.is_autocast_enabled(x.device.type)):
            raise TypeError(
                f"{layer}: the input is {x.dtype} but the layer's parameters are {weight_dtype}; cast one to "
                f"the other (layer.to({x.dtype}) or x.to({weight_dtype})) or run the layer under torch.autocast"
            )


def check_last_dim(x: torch.Tensor, d_model: int) -> None:
    """Raise the shared 'wrong input width' error of every FFW module."""
    check_input(x, d_model)


def check_number(name: str, value, *, minimum: float = 0.0, strict: bool = False, maximum: float | None = None) -> None:
    """Raise a ValueError naming ``name`` unless value is a finite real number >= minimum (> if strict)
    and, when given, <= maximum."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < minimum or (strict and value == minimum) or (maximum is not None and value > maximum):
        bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
        if maximum is not None:
            bound = f"in {'(' if strict else '['}{minimum:g}, {maximum:g}]"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
