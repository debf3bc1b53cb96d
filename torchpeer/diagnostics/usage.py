"""Expert usage (the paper's Table 2): usage % and KL to uniform of the accumulated gate mass.

A router that has tracking enabled adds the gate value it assigns to each expert into an
``ExpertUsage`` accumulator. From the accumulated mass ``s`` (one entry per expert):

* usage = percentage of experts with ``s_i > 0`` (selected at least once),
* unevenness = KL(z || uniform) = log N + sum_i z_i log z_i with z = s / sum(s)
  (0 for perfectly even routing, log N when all mass is on one expert).

Gate values (softmax/sigmoid outputs) are non-negative, so z is a distribution.
"""

from __future__ import annotations

import math

import torch


class ExpertUsage:
    """Accumulates router gate mass per expert.

    Args:
        n_experts: number of experts N.
    """

    def __init__(self, n_experts: int):
        if not isinstance(n_experts, int) or n_experts < 1:
            raise ValueError(f"n_experts must be an int >= 1, got {n_experts!r}")
        self.n_experts = n_experts
        self.scores: torch.Tensor | None = None  # (n_experts,) float64, allocated lazily on first update

    def reset(self) -> None:
        self.scores = None

    @torch.no_grad()
    def update(self, indices: torch.Tensor, scores: torch.Tensor) -> None:
        """Add ``scores`` to the experts in ``indices``.

        indices: (...,) integer expert ids in [0, n_experts).
        scores: same shape as indices, non-negative router weights.
        """
        if indices.shape != scores.shape:
            raise ValueError(f"indices {tuple(indices.shape)} and scores {tuple(scores.shape)} must match")
        if self.scores is None or self.scores.device != indices.device:
            prev = self.scores
            self.scores = torch.zeros(self.n_experts, dtype=torch.float64, device=indices.device)
            if prev is not None:
                self.scores += prev.to(indices.device)
        self.scores.index_add_(0, indices.reshape(-1).long(), scores.detach().reshape(-1).to(torch.float64))

    def usage(self) -> float:
        """Percentage of experts that received a non-zero score."""
        if self.scores is None:
            return 0.0
        return 100.0 * (self.scores > 0).sum().item() / self.n_experts

    def kl(self) -> float:
        """KL(z || uniform) = log N + sum z log z, z the normalised accumulated scores (nats)."""
        if self.scores is None or self.scores.sum() <= 0:
            return float("nan")
        z = self.scores / self.scores.sum()
        nz = z[z > 0]
        return math.log(self.n_experts) + (nz * nz.log()).sum().item()

    def summary(self) -> dict[str, float]:
        return {"usage_pct": self.usage(), "kl": self.kl()}
