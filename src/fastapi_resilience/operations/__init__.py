"""Operating an app under failure: degraded mode (named features), error analytics, and the
tracing of events."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi_resilience._exports import lazy_exports as _lazy_exports

if TYPE_CHECKING:
    from fastapi_resilience.operations._degraded import (
        DegradedMode,
        Feature,
        FeatureStatus,
        requires_feature,
    )
    from fastapi_resilience.operations._errors import ErrorAnalytics
    from fastapi_resilience.operations._tracing import span_events

__all__ = [
    "DegradedMode",
    "ErrorAnalytics",
    "Feature",
    "FeatureStatus",
    "requires_feature",
    "span_events",
]

#: Each public name and the module it is imported from on first use.
_EXPORTS = {
    "DegradedMode": "fastapi_resilience.operations._degraded",
    "ErrorAnalytics": "fastapi_resilience.operations._errors",
    "Feature": "fastapi_resilience.operations._degraded",
    "FeatureStatus": "fastapi_resilience.operations._degraded",
    "requires_feature": "fastapi_resilience.operations._degraded",
    "span_events": "fastapi_resilience.operations._tracing",
}
__getattr__, __dir__ = _lazy_exports(__name__, _EXPORTS)
