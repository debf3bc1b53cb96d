"""Back-compat home of the usage statistics; they live in ``torchpeer.diagnostics`` now."""

from torchpeer.diagnostics import ExpertUsage, UsageTrackingMixin, enable_usage_tracking, routing_report, usage_report

__all__ = ["ExpertUsage", "UsageTrackingMixin", "enable_usage_tracking", "routing_report", "usage_report"]
