"""One place that picks the backend of an op, says which it picked, and refuses what cannot run.

Backends: "torch" (chunked, memory-lean PyTorch; runs everywhere), "triton" (the GPU kernels; on
the CPU only under Triton's interpreter, TRITON_INTERPRET=1, for tests), "reference" (the plain
PyTorch spec: materialises everything, tests and small sizes only) and "auto" (triton on CUDA
when it can run there, else torch). A backend that was asked for and cannot run is a ValueError
naming the fix, never a silent fallback.
"""

from __future__ import annotations

import importlib.util
import logging
import os

import torch

# ema_query_norm: the fused kernels of the "ema" query norm (torchpeer/ops/query_norm); its "torch"
# and "reference" backends are the same plain-PyTorch spec.
OPS = ("product_key_topk", "expert_mix", "ema_query_norm")
BACKENDS = ("auto", "torch", "triton", "reference")

logger = logging.getLogger("torchpeer.ops")
_logged: set[tuple[str, str, str]] = set()


# Decided once, at import: resolve_backend runs inside compiled regions (the layers call it in
# forward), and some torch.compile versions (2.11) refuse to trace importlib.util.find_spec, which
# broke fullgraph compilation when the first backend decision happened under compile. find_spec
# only looks the package up (it does not import Triton).
_TRITON_INSTALLED: bool = importlib.util.find_spec("triton") is not None


def call_implementation_directly(t: torch.Tensor) -> bool:
    """Should a Triton op's autograd Function call its implementation instead of its torch.library
    custom op? Yes in plain eager mode on a plain tensor: there the op's dispatch (autograd
    fallback, version bumps, the wrapper that hides it from dynamo, argument normalisation) costs
    about as much host time as the rest of the call (issue 19). No under torch.compile, on fake
    tensors or subclasses, or under a TorchDispatchMode: the ops (with their fake impls) run."""
    return type(t) is torch.Tensor and not torch.compiler.is_compiling() and not torch._C._len_torch_dispatch_stack()


def triton_installed() -> bool:
    """Is the triton package importable? (Looked up once, when torchpeer.ops is imported.)"""
    return _TRITON_INSTALLED


def triton_interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1; tests only).

    Read on every call (tests switch it); resolve_backend reaches it only for non-CUDA devices."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_unavailable_reason(device: torch.device | str) -> str | None:
    """None if the Triton kernels can run on `device`, else why not and how to fix it."""
    device = torch.device(device)
    if not triton_installed():
        return "the triton package is not installed (pip install triton), or use backend='torch'"
    if device.type == "cuda":
        return None
    if triton_interpreting():
        return None
    return (
        f"the Triton kernels need CUDA tensors (got device {device}); use backend='torch' (or 'auto') on the CPU, "
        "or set TRITON_INTERPRET=1 before importing torchpeer to run them in Triton's interpreter (tests)"
    )


def resolve_backend(op: str, requested: str, device: torch.device | str) -> str:
    """-> the backend that `op` runs with on `device`: "torch", "triton" or "reference".

    "auto" is "triton" on CUDA when Triton can run there, else "torch". A requested backend that
    cannot run raises ValueError with the fix. The choice is logged (logger "torchpeer.ops", INFO)
    once per (op, backend, device).
    """
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; use one of {OPS}")
    if requested not in BACKENDS:
        raise ValueError(f"unknown backend {requested!r} for {op}; use one of {BACKENDS}")
    device = torch.device(device)
    if requested == "auto":
        backend = "triton" if device.type == "cuda" and triton_unavailable_reason(device) is None else "torch"
    elif requested == "triton":
        reason = triton_unavailable_reason(device)
        if reason is not None:
            raise ValueError(f"{op}: backend='triton' cannot run here: {reason}")
        backend = "triton"
    else:
        backend = requested
    if torch.compiler.is_compiling():
        # no logging while tracing (and no read of _logged: a guard on it would recompile the
        # graph each time an eager call logs a new choice)
        return backend
    key = (op, backend, str(device))
    if key not in _logged:
        _logged.add(key)
        logger.info("%s on %s: backend %r (requested %r)", op, device, backend, requested)
    return backend
