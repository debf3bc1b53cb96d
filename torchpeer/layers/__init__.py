"""FFW layers and their building blocks.

    registry.py     FFW kinds: register_ffw / get_ffw / ffw_kinds / build
    validators.py   argument checks and activations shared by the layers
    accounting.py   FFWCost, parameter and FLOP counting conventions
    query_norm.py   query normalisations of the product-key router
    router.py       ProductKeyRouter: query net + norm + sub-keys + exact top-k (PEER, PKM)
    dense.py        DenseFFW + DenseConfig        (kind "dense")
    peer.py         PEER + PEERConfig             (kind "peer")
    pkm.py          PKM + PKMConfig               (kind "pkm")
    moe.py          MoE + MoEConfig               (kind "moe")

Importing this package registers the built-in kinds (in the order above).
"""

# ruff: noqa: I001  (the kind modules are imported in registration order, not alphabetically)

from torchpeer.layers.accounting import TRAIN_FLOPS_MULTIPLIER, FFWCost, count_params, matmul_flops
from torchpeer.layers.registry import FFWKind, backend_report, build, ffw_kinds, get_ffw, register_ffw
from torchpeer.layers.router import ProductKeyRouter

# Built-in kinds, registered on import (this order is ffw_kinds()'s order).
from torchpeer.layers.dense import DenseConfig, DenseFFW
from torchpeer.layers.peer import PEER, PEERConfig
from torchpeer.layers.pkm import PKM, PKMConfig
from torchpeer.layers.moe import MoE, MoEConfig

__all__ = [
    "TRAIN_FLOPS_MULTIPLIER",
    "FFWCost",
    "FFWKind",
    "count_params",
    "matmul_flops",
    "register_ffw",
    "get_ffw",
    "ffw_kinds",
    "build",
    "backend_report",
    "ProductKeyRouter",
    "DenseConfig",
    "DenseFFW",
    "PEER",
    "PEERConfig",
    "PKM",
    "PKMConfig",
    "MoE",
    "MoEConfig",
]
