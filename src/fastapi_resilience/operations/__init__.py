"""Operating an app under failure: degraded mode (named features) and its metrics."""

from __future__ import annotations

from fastapi_resilience.operations._degraded import (
    DegradedMode,
    Feature,
    FeatureStatus,
    requires_feature,
)

__all__ = ["DegradedMode", "Feature", "FeatureStatus", "requires_feature"]
