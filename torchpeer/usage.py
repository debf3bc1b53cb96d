"""Expert-usage statistics: the paper's Table 2 (usage % and KL to uniform).

A router (PEER, PKM, MoE) that has tracking enabled adds the router scores it assigns to each
expert into an ``ExpertUsage`` accumulator. From the accumulated scores ``s`` (one per expert):

* usage = percentage of experts with ``s_i > 0`` (selected at least once),
* unevenness = KL(z || uniform) = log N + sum_i z_i log z_i with z = s / sum(s)
  (0 for perfectly even routing, log N when all mass is on one expert).

The scores accumulated are the *gate values* (softmax/sigmoid outputs), which are non-negative,
so that z is a distribution.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class ExpertUsage:
    """Accumulates router scores per expert.

    Args:
        n_experts: number of experts N.
    """

    def __init__(self, n_experts: int):
        if n_experts < 1:
            raise ValueError(f"n_experts must be >= 1, got {n_experts}")
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


class UsageTrackingMixin:
    """Mixin for routed modules: ``enable_usage_tracking()`` turns the accumulator on.

    The module calls ``self._track_usage(indices, scores)`` in forward; it is a no-op while disabled.
    Subclasses must define ``self.n_experts``.
    """

    usage_tracker: ExpertUsage | None = None

    def enable_usage_tracking(self, enabled: bool = True) -> None:
        self.usage_tracker = ExpertUsage(self.n_experts) if enabled else None

    def _track_usage(self, indices: torch.Tensor, scores: torch.Tensor) -> None:
        if self.usage_tracker is not None:
            self.usage_tracker.update(indices, scores)


def usage_report(model: nn.Module) -> dict[str, dict[str, float]]:
    """Usage and KL of every tracked router in ``model``, keyed by module name."""
    out = {}
    for name, mod in model.named_modules():
        tracker = getattr(mod, "usage_tracker", None)
        if isinstance(tracker, ExpertUsage):
            out[name or "."] = tracker.summary()
    return out


def enable_usage_tracking(model: nn.Module, enabled: bool = True) -> int:
    """Enable (or disable) tracking on every routed module of ``model``; returns how many."""
    n = 0
    for mod in model.modules():
        if isinstance(mod, UsageTrackingMixin):
            mod.enable_usage_tracking(enabled)
            n += 1
    return n
