"""Operating an app under failure: degraded mode (named features), its metrics and error
analytics."""

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

__all__ = ["DegradedMode", "ErrorAnalytics", "Feature", "FeatureStatus", "requires_feature"]

#: Each public name and the module it is imported from on first use.
_EXPORTS = {
    "DegradedMode": "fastapi_resilience.operations._degraded",
    "ErrorAnalytics": "fastapi_resilience.operations._errors",
    "Feature": "fastapi_resilience.operations._degraded",
    "FeatureStatus": "fastapi_resilience.operations._degraded",
    "requires_feature": "fastapi_resilience.operations._degraded",
}
__getattr__, __dir__ = _lazy_exports(__name__, _EXPORTS)
