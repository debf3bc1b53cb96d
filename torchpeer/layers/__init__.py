"""FFW layers and their building blocks.

    registry.py     FFW kinds: register_ffw / get_ffw / ffw_kinds / build
    validators.py   argument checks and activations shared by the layers
    accounting.py   FFWCost, parameter and FLOP counting conventions
    query_norm.py   query normalisations of the product-key router
    router.py       ProductKeyRouter: query net + norm + sub-keys + exact top-k (PEER, PKM)
    balance.py      the balance term on a router's sub-key marginals (PEER balance_weight)
    key_init.py     sub-keys initialised from the data's queries (PEER key_init)
    readout.py      PEER's read-outs beyond act(u.x) v: linear, glu, Memory+'s gated (PEER readout)
    expert_pool.py  PEER's expert tables; ExpertPool, one set shared by several layers (PEER shared_pool)
    dense.py        DenseFFW + DenseConfig        (kind "dense")
    peer.py         PEER + PEERConfig             (kind "peer")
    pkm.py          PKM + PKMConfig               (kind "pkm")
    moe.py          MoE + MoEConfig               (kind "moe")

Importing this package registers the built-in kinds (in the order above).
"""

# ruff: noqa: I001  (the kind modules are imported in registration order, not alphabetically)

from torchpeer.layers.accounting import TRAIN_FLOPS_MULTIPLIER, FFWCost, count_params, matmul_flops
from torchpeer.layers.registry import (
    FFWKind,
    backend_report,
    build,
    build_shared,
    ffw_kinds,
    get_ffw,
    register_ffw,
)
from torchpeer.layers.router import ProductKeyRouter

# Built-in kinds, registered on import (this order is ffw_kinds()'s order).
from torchpeer.layers.dense import DenseConfig, DenseFFW
from torchpeer.layers.peer import PEER, PEERConfig
from torchpeer.layers.expert_pool import ExpertPool
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
    "build_shared",
    "backend_report",
    "ProductKeyRouter",
    "DenseConfig",
    "DenseFFW",
    "PEER",
    "PEERConfig",
    "ExpertPool",
    "PKM",
    "PKMConfig",
    "MoE",
    "MoEConfig",
]
