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

    def enable_usage_tracking(self, enabled: bool = True, full: bool = True) -> None:
        """full: every routing statistic (RoutingStats, for evaluations); False: usage and KL only
        (ExpertUsage: one index_add a forward, what the training-window curves use)."""
        self.usage_tracker = (RoutingStats if full else ExpertUsage)(self.n_experts) if enabled else None

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


def _tracked(model: nn.Module):
    """(module name, its module, its tracker) for every router of ``model`` that tracks now."""
    for name, mod in model.named_modules():
        tracker = getattr(mod, "usage_tracker", None)
        if isinstance(tracker, ExpertUsage):
            yield name or ".", mod, tracker


def usage_report(model: nn.Module) -> dict[str, dict[str, float]]:
    """Usage % and KL of every tracked router in ``model``: {module name: {"usage_pct", "kl"}}."""
    return {name: ExpertUsage.summary(tracker) for name, _, tracker in _tracked(model)}


def routing_report(model: nn.Module) -> dict[str, dict[str, float]]:
    """All routing statistics (``RoutingStats.summary``) of every tracked router, plus the median
    sub-key norm of layers with ``sub_keys``: {module name: {metric: value}}."""
    out = {}
    for name, mod, tracker in _tracked(model):
        rep = tracker.summary()
        keys = getattr(mod, "sub_keys", None)
        if isinstance(keys, torch.Tensor):
            rep["subkey_norm_median"] = keys.detach().float().norm(dim=-1).median().item()
        out[name] = rep
    return out


def enable_usage_tracking(model: nn.Module, enabled: bool = True, full: bool = True) -> int:
    """Enable (or disable) tracking on every routed module of ``model``; returns how many.
    full=False: usage and KL only (see ``UsageTrackingMixin.enable_usage_tracking``)."""
    n = 0
    for mod in model.modules():
        if isinstance(mod, UsageTrackingMixin):
            mod.enable_usage_tracking(enabled, full)
            n += 1
    return n


def save_trackers(model: nn.Module) -> dict[nn.Module, ExpertUsage | None]:
    """The routed modules' trackers as they are now, for ``restore_trackers`` (an evaluation in the
    middle of training tracks with its own and must not end the training window's)."""
    return {mod: mod.usage_tracker for mod in model.modules() if isinstance(mod, UsageTrackingMixin)}


def restore_trackers(saved: dict[nn.Module, ExpertUsage | None]) -> None:
    for mod, tracker in saved.items():
        mod.usage_tracker = tracker


def window_usage(model: nn.Module, plan=None) -> dict[str, dict[str, float]]:
    """Usage % and KL of each tracked router over what it saw since the last call (a training log
    window, ``train.track_usage``), summed over ranks by ``plan.reduce_usage_`` when given; then every
    tracker starts a new window. Routers that saw no token in the window are left out."""
    if plan is not None:
        plan.reduce_usage_(model)
    out = {}
    for name, _, tracker in _tracked(model):
        if tracker.scores is not None:
            out[name] = ExpertUsage.summary(tracker)
        tracker.reset()
    return out
