"""Triton GPU kernels for PEER (expert mixing, product-key retrieval)."""
