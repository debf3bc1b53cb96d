"""torchpeer: PEER (Mixture of A Million Experts) layers, baselines, kernels and experiments."""

from .accounting import TRAIN_FLOPS_MULTIPLIER, FFWCost
from .dense import DenseFFW
from .mixing import peer_mix_reference, peer_mix_torch
from .moe import MoE
from .peer import PEER
from .pkm import PKM
from .product_keys import brute_force_topk, product_key_topk
from .sparse_adam import SparseRowAdamW
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
]
