"""torchpeer: PEER (Mixture of A Million Experts) layers, baselines, kernels and experiments."""

from .layers import (
    PEER,
    PKM,
    TRAIN_FLOPS_MULTIPLIER,
    DenseFFW,
    FFWCost,
    MoE,
    build,
    ffw_kinds,
    get_ffw,
    register_ffw,
)
from .mixing import peer_mix_reference, peer_mix_torch
from .optim import SparseRowAdamW
from .product_keys import brute_force_topk, product_key_topk
from .usage import ExpertUsage, enable_usage_tracking, usage_report

__version__ = "0.1.0"

__all__ = [
    "PEER",
    "PKM",
    "MoE",
    "DenseFFW",
    "FFWCost",
    "TRAIN_FLOPS_MULTIPLIER",
    "ExpertUsage",
    "enable_usage_tracking",
    "usage_report",
    "product_key_topk",
    "brute_force_topk",
    "peer_mix_torch",
    "peer_mix_reference",
    "SparseRowAdamW",
    "register_ffw",
    "get_ffw",
    "ffw_kinds",
    "build",
]
