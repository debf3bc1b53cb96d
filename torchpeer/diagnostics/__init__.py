"""Routing diagnostics: expert usage and KL (the paper's), per-head usage and overlap, sub-key
usage, gate entropy and query effective rank. See ``routing.RoutingStats``."""

from .routing import RoutingStats
from .spectrum import RunningMoments, effective_rank, participation_ratio
from .tracking import UsageTrackingMixin, enable_usage_tracking, routing_report, usage_report
from .usage import ExpertUsage

__all__ = [
    "ExpertUsage",
    "RoutingStats",
    "RunningMoments",
    "UsageTrackingMixin",
    "effective_rank",
    "enable_usage_tracking",
    "participation_ratio",
    "routing_report",
    "usage_report",
]
