"""fastapi-resilience: problem-details errors, correlation IDs, rate limiting and guarded calls.

The top level holds what an app author types. What only implementers need (storages, the
limiter, registries, caches, transports, clocks, events) lives in public submodules:
``fastapi_resilience.ratelimit``, ``.outbound``, ``.health``, ``.operations``, ``.problems``,
``.correlation``, ``.clock``, ``.events`` and ``.testing``. Every error class is also in
``fastapi_resilience.exceptions``.
"""

from __future__ import annotations

from typing import Any

from fastapi_resilience._settings import ResilienceSettings
from fastapi_resilience.correlation._ids import CorrelationIdFilter, get_correlation_id
from fastapi_resilience.exceptions import (
    AppError,
    AuthenticationError,
    BadRequestError,
    BulkheadFullError,
    CircuitOpenError,
    ClientError,
    ConfigurationError,
    ConflictError,
    DeadlineCutError,
    FeatureUnavailableError,
    InternalError,
    InvalidInputError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitedError,
    RetryExhaustedError,
    ServerError,
    ServiceUnavailableError,
    StorageUnavailableError,
    ThrottledError,
    UpstreamError,
    UpstreamStatusError,
    UpstreamTimeoutError,
)
from fastapi_resilience.integration._dependencies import (
    RequestDeadlineMiddleware,
    breaker_dependency,
    bulkhead_dependency,
    deadline_dependency,
    watch_outbound,
)
from fastapi_resilience.integration._install import install
from fastapi_resilience.integration._middleware import (
    CorrelationIdMiddleware,
    DegradedModeMiddleware,
    RateLimitMiddleware,
)
from fastapi_resilience.integration._resilience import Resilience
from fastapi_resilience.operations._degraded import DegradedMode, requires_feature
from fastapi_resilience.outbound._breaker import CircuitBreaker, get_breaker
from fastapi_resilience.outbound._bulkhead import Bulkhead, get_bulkhead
from fastapi_resilience.outbound._deadline import deadline, remaining, timeout
from fastapi_resilience.outbound._fallback import fallback
from fastapi_resilience.outbound._response_cache import cached
from fastapi_resilience.outbound._retry import Retry
from fastapi_resilience.outbound._retry_budget import RetryBudget
from fastapi_resilience.outbound._transport import resilient_client
from fastapi_resilience.problems._handlers import install_exception_handlers
from fastapi_resilience.ratelimit._routes import rate_limit

__all__ = [  # noqa: RUF022 - grouped by what an app author does
    # Setting up an app
    "Resilience",
    "ResilienceSettings",
    "install",
    "install_exception_handlers",
    # Middleware, for apps that do not use install()
    "CorrelationIdMiddleware",
    "DegradedModeMiddleware",
    "RateLimitMiddleware",
    "RequestDeadlineMiddleware",
    # Correlation IDs
    "CorrelationIdFilter",
    "get_correlation_id",
    # Route dependencies
    "breaker_dependency",
    "bulkhead_dependency",
    "deadline_dependency",
    "rate_limit",
    "requires_feature",
    # Guarding calls
    "Bulkhead",
    "CircuitBreaker",
    "DegradedMode",
    "Retry",
    "RetryBudget",
    "cached",
    "deadline",
    "fallback",
    "get_breaker",
    "get_bulkhead",
    "remaining",
    "resilient_client",
    "timeout",
    "watch_outbound",
    # Errors (also in fastapi_resilience.exceptions)
    "AppError",
    "AuthenticationError",
    "BadRequestError",
    "BulkheadFullError",
    "CircuitOpenError",
    "ClientError",
    "ConfigurationError",
    "ConflictError",
    "DeadlineCutError",
    "FeatureUnavailableError",
    "InternalError",
    "InvalidInputError",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitedError",
    "RetryExhaustedError",
    "ServerError",
    "ServiceUnavailableError",
    "StorageUnavailableError",
    "ThrottledError",
    "UpstreamError",
    "UpstreamStatusError",
    "UpstreamTimeoutError",
]


def __getattr__(name: str) -> Any:
    if name == "__version__":
        from importlib.metadata import version

        return version("fastapi-resilience")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
