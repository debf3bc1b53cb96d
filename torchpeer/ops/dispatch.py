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


_triton_installed: bool | None = None


def triton_installed() -> bool:
    global _triton_installed
    if _triton_installed is None:
        _triton_installed = importlib.util.find_spec("triton") is not None
    return _triton_installed


def triton_interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1; tests only)."""
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
    key = (op, backend, str(device))
    if key not in _logged and not torch.compiler.is_compiling():
        _logged.add(key)
        logger.info("%s on %s: backend %r (requested %r)", op, device, backend, requested)
    return backend
