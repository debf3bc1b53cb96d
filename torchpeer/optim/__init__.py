"""Optimizers for the expert tables."""

from torchpeer.optim.sparse_adam import SparseRowAdamW

__all__ = ["SparseRowAdamW"]
