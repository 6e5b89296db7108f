"""Health checks: the registry behind ``/health/live`` and ``/health/ready``."""

from __future__ import annotations

from fastapi_resilience.health._checks import CheckResult, HealthChecks

__all__ = ["CheckResult", "HealthChecks"]
