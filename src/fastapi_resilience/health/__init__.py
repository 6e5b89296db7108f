"""Health checks: the registry behind ``/health/live`` and ``/health/ready``, and a monitor
that runs them in the background and heals what fails."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi_resilience._exports import lazy_exports as _lazy_exports

if TYPE_CHECKING:
    from fastapi_resilience.health._checks import CheckResult, HealthChecks
    from fastapi_resilience.health._monitor import HealthMonitor

__all__ = ["CheckResult", "HealthChecks", "HealthMonitor"]

#: Each public name and the module it is imported from on first use.
_EXPORTS = {
    "CheckResult": "fastapi_resilience.health._checks",
    "HealthChecks": "fastapi_resilience.health._checks",
    "HealthMonitor": "fastapi_resilience.health._monitor",
}
__getattr__, __dir__ = _lazy_exports(__name__, _EXPORTS)
