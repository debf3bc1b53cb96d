"""Old import path of the PyTorch retrieval; the code lives in torchpeer.ops.retrieval."""

from .ops.retrieval import product_key_topk_reference as brute_force_topk
from .ops.retrieval import product_key_topk_torch as product_key_topk

__all__ = ["brute_force_topk", "product_key_topk"]
