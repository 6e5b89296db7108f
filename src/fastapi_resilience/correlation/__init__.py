"""Correlation IDs: one per request, in a context variable, echoed on the response."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi_resilience._exports import lazy_exports as _lazy_exports

if TYPE_CHECKING:
    from fastapi_resilience.correlation._ids import (
        CorrelationIdFilter,
        CorrelationStep,
        generate_correlation_id,
        get_correlation_id,
        set_correlation_id,
    )

__all__ = [
    "CorrelationIdFilter",
    "CorrelationStep",
    "generate_correlation_id",
    "get_correlation_id",
    "set_correlation_id",
]

#: Each public name and the module it is imported from on first use.
_EXPORTS = {
    "CorrelationIdFilter": "fastapi_resilience.correlation._ids",
    "CorrelationStep": "fastapi_resilience.correlation._ids",
    "generate_correlation_id": "fastapi_resilience.correlation._ids",
    "get_correlation_id": "fastapi_resilience.correlation._ids",
    "set_correlation_id": "fastapi_resilience.correlation._ids",
}
__getattr__, __dir__ = _lazy_exports(__name__, _EXPORTS)
