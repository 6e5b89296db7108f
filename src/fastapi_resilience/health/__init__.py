"""Health checks: the registry behind ``/health/live`` and ``/health/ready``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi_resilience._exports import lazy_exports as _lazy_exports

if TYPE_CHECKING:
    from fastapi_resilience.health._checks import CheckResult, HealthChecks

__all__ = ["CheckResult", "HealthChecks"]

#: Each public name and the module it is imported from on first use.
_EXPORTS = {
    "CheckResult": "fastapi_resilience.health._checks",
    "HealthChecks": "fastapi_resilience.health._checks",
}
__getattr__, __dir__ = _lazy_exports(__name__, _EXPORTS)
