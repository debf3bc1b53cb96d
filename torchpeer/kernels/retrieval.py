"""Old import path of the Triton retrieval; the code lives in torchpeer.ops.retrieval (triton_*.py)."""

from torchpeer.ops.retrieval import product_key_topk_reference as product_key_topk_bruteforce
from torchpeer.ops.retrieval.triton_op import product_key_topk_triton

__all__ = ["product_key_topk_triton", "product_key_topk_bruteforce"]
