"""Routing diagnostics: expert usage and KL (the paper's), per-head usage and overlap, sub-key
usage, gate entropy and query effective rank. See ``routing.RoutingStats``."""

from .routing import RoutingStats
from .spectrum import RunningMoments, effective_rank, participation_ratio
from .tracking import (
    UsageTrackingMixin,
    enable_usage_tracking,
    restore_trackers,
    routing_report,
    save_trackers,
    usage_report,
    window_usage,
)
from .usage import ExpertUsage

__all__ = [
    "ExpertUsage",
    "RoutingStats",
    "RunningMoments",
    "UsageTrackingMixin",
    "effective_rank",
    "enable_usage_tracking",
    "participation_ratio",
    "restore_trackers",
    "routing_report",
    "save_trackers",
    "usage_report",
    "window_usage",
]
