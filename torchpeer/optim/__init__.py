"""Optimizers for the expert tables."""

from torchpeer.optim.fused_tables import RowwiseTableAdam, attach_rowwise_adam
from torchpeer.optim.rowwise_adam import RowwiseAdamState, RowwiseAdamW, rowwise_adam_update_
from torchpeer.optim.sparse_adam import SparseRowAdamW

__all__ = [
    "RowwiseAdamState",
    "RowwiseAdamW",
    "RowwiseTableAdam",
    "SparseRowAdamW",
    "attach_rowwise_adam",
    "rowwise_adam_update_",
]
