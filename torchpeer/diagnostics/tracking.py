"""Turning routing statistics on and off, and reading them out of a model.

Routed layers (PEER, PKM, MoE) inherit ``UsageTrackingMixin`` and call, in forward,
``self._track_routing(q, indices, gates)`` (q: (T, H, d_key) normalised queries or None) or the
older ``self._track_usage(indices, gates)``; both are no-ops while tracking is off. The layer must
define ``self.n_experts``.
"""

from __future__ import annotations

import torch
from torch import nn

from .routing import RoutingStats
from .usage import ExpertUsage


class UsageTrackingMixin:
    """Mixin for routed modules: ``enable_usage_tracking()`` turns the accumulator on."""

    usage_tracker: ExpertUsage | None = None

    def enable_usage_tracking(self, enabled: bool = True) -> None:
        self.usage_tracker = RoutingStats(self.n_experts) if enabled else None

    def _track_routing(self, q: torch.Tensor | None, indices: torch.Tensor, gates: torch.Tensor) -> None:
        tracker = self.usage_tracker
        if tracker is None:
            return
        if isinstance(tracker, RoutingStats):
            tracker.update_routing(q, indices, gates)
        else:
            tracker.update(indices, gates)

    def _track_usage(self, indices: torch.Tensor, scores: torch.Tensor) -> None:
        self._track_routing(None, indices, scores)


def usage_report(model: nn.Module) -> dict[str, dict[str, float]]:
    """Usage % and KL of every tracked router in ``model``: {module name: {"usage_pct", "kl"}}."""
    out = {}
    for name, mod in model.named_modules():
        tracker = getattr(mod, "usage_tracker", None)
        if isinstance(tracker, ExpertUsage):
            out[name or "."] = ExpertUsage.summary(tracker)
    return out


def routing_report(model: nn.Module) -> dict[str, dict[str, float]]:
    """All routing statistics (``RoutingStats.summary``) of every tracked router, plus the median
    sub-key norm of layers with ``sub_keys``: {module name: {metric: value}}."""
    out = {}
    for name, mod in model.named_modules():
        tracker = getattr(mod, "usage_tracker", None)
        if isinstance(tracker, ExpertUsage):
            rep = tracker.summary()
            keys = getattr(mod, "sub_keys", None)
            if isinstance(keys, torch.Tensor):
                rep["subkey_norm_median"] = keys.detach().float().norm(dim=-1).median().item()
            out[name or "."] = rep
    return out


def enable_usage_tracking(model: nn.Module, enabled: bool = True) -> int:
    """Enable (or disable) tracking on every routed module of ``model``; returns how many."""
    n = 0
    for mod in model.modules():
        if isinstance(mod, UsageTrackingMixin):
            mod.enable_usage_tracking(enabled)
            n += 1
    return n
