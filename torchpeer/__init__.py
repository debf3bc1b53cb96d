"""torchpeer: PEER (Mixture of A Million Experts) layers, baselines, kernels and experiments.

The names below are loaded on first use (torchpeer/lazy.py), so that ``import torchpeer.cli`` does not import
torch: the command line starts in a few milliseconds and a Ctrl-C during its imports lands inside
``torchpeer.cli.main`` (one "interrupted" line, exit 130) instead of printing a traceback.
``from torchpeer import PEER`` and ``torchpeer.PEER`` work as before.
"""

from __future__ import annotations

from torchpeer.lazy import lazy_exports

__version__ = "0.1.0"

# public name -> (module, name in that module)
_EXPORTS = {
    "PEER": ("torchpeer.layers", "PEER"),
    "PKM": ("torchpeer.layers", "PKM"),
    "MoE": ("torchpeer.layers", "MoE"),
    "DenseFFW": ("torchpeer.layers", "DenseFFW"),
    "FFWCost": ("torchpeer.layers", "FFWCost"),
    "TRAIN_FLOPS_MULTIPLIER": ("torchpeer.layers", "TRAIN_FLOPS_MULTIPLIER"),
    "ProductKeyRouter": ("torchpeer.layers", "ProductKeyRouter"),
    "backend_report": ("torchpeer.layers", "backend_report"),
    "build": ("torchpeer.layers", "build"),
    "ffw_kinds": ("torchpeer.layers", "ffw_kinds"),
    "get_ffw": ("torchpeer.layers", "get_ffw"),
    "register_ffw": ("torchpeer.layers", "register_ffw"),
    "expert_mix": ("torchpeer.ops", "expert_mix"),
    "expert_mix_reference": ("torchpeer.ops", "expert_mix_reference"),
    "product_key_topk_reference": ("torchpeer.ops", "product_key_topk_reference"),
    # pre-ops names, kept importable
    "peer_mix_reference": ("torchpeer.ops", "expert_mix_reference"),
    "peer_mix_torch": ("torchpeer.ops", "expert_mix_torch"),
    "brute_force_topk": ("torchpeer.ops", "product_key_topk_reference"),
    "product_key_topk": ("torchpeer.ops", "product_key_topk_torch"),
    "SparseRowAdamW": ("torchpeer.optim", "SparseRowAdamW"),
    "ExpertUsage": ("torchpeer.usage", "ExpertUsage"),
    "enable_usage_tracking": ("torchpeer.usage", "enable_usage_tracking"),
    "usage_report": ("torchpeer.usage", "usage_report"),
}


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

lazy_exports(__name__)
