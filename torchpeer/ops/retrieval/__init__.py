"""Product-key top-k retrieval: the spec (reference.py), its input checker (checks.py), the chunked
PyTorch implementation (torch_impl.py) and the Triton kernels (triton_*.py, imported only when the
"triton" backend runs: kernel_config.py says which algorithm each is)."""

from .checks import check_topk_inputs
from .kernel_config import BACKWARD_IMPLS, DEFAULT_CONFIG, FORWARD_IMPLS, RetrievalKernelConfig
from .reference import product_key_topk_reference
from .torch_impl import product_key_topk_torch

__all__ = [
    "check_topk_inputs",
    "product_key_topk_reference",
    "product_key_topk_torch",
    "RetrievalKernelConfig",
    "DEFAULT_CONFIG",
    "FORWARD_IMPLS",
    "BACKWARD_IMPLS",
]
