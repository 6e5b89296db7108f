"""Correlation IDs: one per request, in a context variable, echoed on the response."""

from __future__ import annotations

from fastapi_resilience.correlation._ids import (
    CorrelationIdFilter,
    CorrelationStep,
    generate_correlation_id,
    get_correlation_id,
)

__all__ = [
    "CorrelationIdFilter",
    "CorrelationStep",
    "generate_correlation_id",
    "get_correlation_id",
]
