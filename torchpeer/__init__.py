"""torchpeer: PEER (Mixture of A Million Experts) layers, baselines, kernels and experiments."""

from .layers import (
    PEER,
    PKM,
    TRAIN_FLOPS_MULTIPLIER,
    DenseFFW,
    FFWCost,
    MoE,
    ProductKeyRouter,
    backend_report,
    build,
    ffw_kinds,
    get_ffw,
    register_ffw,
)
from .ops import expert_mix, expert_mix_reference, product_key_topk_reference
from .ops import expert_mix_reference as peer_mix_reference  # pre-ops names, kept importable
from .ops import expert_mix_torch as peer_mix_torch
from .ops import product_key_topk_reference as brute_force_topk
from .ops import product_key_topk_torch as product_key_topk
from .optim import SparseRowAdamW
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
    "backend_report",
    "ProductKeyRouter",
    "expert_mix",
    "expert_mix_reference",
    "product_key_topk_reference",
]
