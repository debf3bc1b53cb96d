"""Process-wide runtime setup: device, seeds, matmul precision and the autocast choice.

The only module of torchpeer that sets global state (RNG seeds, TF32 flags); the trainer calls
``setup_runtime`` once at build time, commands call ``resolve_device``.
"""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch


def resolve_device(spec: str, option: str = "train.device") -> torch.device:
    """ "auto" -> cuda if available else cpu; anything else is passed to torch.device. ``option``
    names the setting in the error (``--device`` for eval and generate)."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    flag = option if option.startswith("--") else f"--{option}"
    try:
        dev = torch.device(spec)
    except RuntimeError:
        given = f"{option} {spec!r}" if option.startswith("--") else f"{option}={spec!r}"
        raise ValueError(f"{given} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{option} asks for cuda but no CUDA device is available; use {flag} cpu")
    return dev


def check_expert_optimizer(expert_optimizer: str, device: torch.device) -> None:
    """A fused train.expert_optimizer (every choice but "adamw") updates the tables inside the Triton
    mixing kernels: on a device where they cannot run, say so before the tokenizer and the model are
    built (not as a backend error from the first backward)."""
    from torchpeer.ops.dispatch import triton_unavailable_reason

    if expert_optimizer != "adamw" and triton_unavailable_reason(device) is not None:
        raise ValueError(
            f"train.expert_optimizer={expert_optimizer} updates the expert tables inside the Triton mixing "
            f"kernels, which need a CUDA GPU (this run is on {device}): use train.expert_optimizer=adamw "
            "(the default) here; `python benchmarks/rowwise_quality.py` trains the same rules (rowwise, "
            "elementwise) in plain PyTorch on the CPU"
        )


def seed_everything(seed: int) -> None:
    """Seed torch (all devices), numpy and Python's random."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def set_matmul_precision(device: torch.device) -> None:
    """TF32 matmuls and convolutions on CUDA (the fp32 parts of a bf16 run); nothing on the CPU."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def setup_runtime(seed: int, device: torch.device) -> None:
    """Everything global a training run sets, in one call."""
    seed_everything(seed)
    set_matmul_precision(device)


def autocast_dtype(device: torch.device, dtype: str) -> torch.dtype | None:
    """The autocast dtype of a run: bfloat16 for train.dtype "bf16" on CUDA, else None (float32)."""
    return torch.bfloat16 if device.type == "cuda" and dtype == "bf16" else None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """torch.autocast for ``dtype`` on ``device``, or a no-op context for None."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
