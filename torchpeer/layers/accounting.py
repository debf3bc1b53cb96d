"""Parameter and FLOP accounting shared by every FFW module and the LM.

Conventions (the one place they are stated):

* A multiply-add counts as 2 FLOPs. A matmul of (m, k) by (k, n) is 2*m*k*n FLOPs.
* ``forward_flops`` is the forward cost *per token* of the matrix work of a module,
  including routing/retrieval (query projections, sub-key scores, router logits).
  Elementwise work (activations, softmax, norms, top-k selection) is not counted: it is
  O(active width) and negligible next to the matmuls at the sizes studied.
* Training FLOPs = ``TRAIN_FLOPS_MULTIPLIER`` (3) x forward FLOPs: the backward pass does
  two matmuls (input gradient and weight gradient) for every forward one. For a dense
  transformer this gives the familiar 6 x active matmul parameters per token.
* ``active_params`` counts the parameters that touch one token in the forward pass
  (for PEER: the query network, both sub-key tables, and heads*top_k experts' u and v rows).
* ``aux_train_flops`` is matmul work done at training time only, per token, forward and backward
  together (e.g. PEER's sub-key balance term re-scores all sub-keys for a share of the tokens);
  it is added to the training FLOPs, not to the forward (inference) FLOPs.
* Parameters shared by several modules (one expert pool read by several PEER layers) are counted
  once: by the module that owns them (``count_params`` deduplicates, and a layer that borrows a
  pool does not count it; ``torchpeer info`` lists the pool as a part of its own).
"""

from __future__ import annotations

from dataclasses import dataclass

TRAIN_FLOPS_MULTIPLIER = 3


@dataclass(frozen=True)
class FFWCost:
    """What one FFW-like module costs, per token.

    total_params: all parameters of the module (buffers excluded).
    active_params: parameters used by one token's forward pass.
    forward_flops: forward FLOPs per token (matmul work, retrieval included).
    aux_train_flops: training-only FLOPs per token (forward + backward of auxiliary terms).
    """

    total_params: int
    active_params: int
    forward_flops: int
    aux_train_flops: int = 0

    @property
    def train_flops(self) -> int:
        """Training FLOPs per token (forward + backward, plus training-only terms), see module docstring."""
        return TRAIN_FLOPS_MULTIPLIER * self.forward_flops + self.aux_train_flops

    def __add__(self, other: FFWCost) -> FFWCost:
        return FFWCost(
            self.total_params + other.total_params,
            self.active_params + other.active_params,
            self.forward_flops + other.forward_flops,
            self.aux_train_flops + other.aux_train_flops,
        )


def matmul_flops(m: int, k: int, n: int) -> int:
    """FLOPs of an (m, k) @ (k, n) product: 2*m*k*n."""
    return 2 * m * k * n


def count_params(module) -> int:
    """Number of parameters of a torch module (shared parameters counted once)."""
    return sum(p.numel() for p in module.parameters())
