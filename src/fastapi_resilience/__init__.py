"""fastapi-resilience: problem-details errors, correlation IDs, rate limiting and guarded calls.

The top level holds what an app author types. What only implementers need (storages, the
limiter, registries, caches, transports, clocks, events) lives in public submodules:
``fastapi_resilience.ratelimit``, ``.outbound``, ``.health``, ``.operations``, ``.problems``,
``.correlation``, ``.clock``, ``.events`` and ``.testing``. Every error class is also in
``fastapi_resilience.exceptions``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi_resilience._exports import lazy_exports as _lazy_exports
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
    QuotaExhaustedError,
    RateLimitedError,
    RetryExhaustedError,
    ServerError,
    ServiceUnavailableError,
    StorageUnavailableError,
    StreamCutError,
    ThrottledError,
    UpstreamError,
    UpstreamStatusError,
    UpstreamTimeoutError,
)

if TYPE_CHECKING:
    from fastapi_resilience._settings import ResilienceSettings
    from fastapi_resilience.correlation._ids import CorrelationIdFilter, get_correlation_id
    from fastapi_resilience.integration._dependencies import (
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
        RequestDeadlineMiddleware,
    )
    from fastapi_resilience.integration._openapi import problem_responses
    from fastapi_resilience.integration._resilience import Resilience
    from fastapi_resilience.operations._degraded import DegradedMode, requires_feature
    from fastapi_resilience.outbound._breaker import CircuitBreaker, get_breaker
    from fastapi_resilience.outbound._bulkhead import Bulkhead, get_bulkhead
    from fastapi_resilience.outbound._deadline import deadline, remaining, timeout
    from fastapi_resilience.outbound._fallback import fallback
    from fastapi_resilience.outbound._policies import policy
    from fastapi_resilience.outbound._response_cache import cached
    from fastapi_resilience.outbound._retry import Retry
    from fastapi_resilience.outbound._retry_budget import RetryBudget
    from fastapi_resilience.outbound._service import ExternalService
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
    # Documenting a route's own answers in the OpenAPI schema
    "problem_responses",
    # Guarding calls
    "Bulkhead",
    "CircuitBreaker",
    "DegradedMode",
    "ExternalService",
    "Retry",
    "RetryBudget",
    "cached",
    "deadline",
    "fallback",
    "get_breaker",
    "get_bulkhead",
    "policy",
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
    "QuotaExhaustedError",
    "RateLimitedError",
    "RetryExhaustedError",
    "ServerError",
    "ServiceUnavailableError",
    "StorageUnavailableError",
    "StreamCutError",
    "ThrottledError",
    "UpstreamError",
    "UpstreamStatusError",
    "UpstreamTimeoutError",
]

#: Each public name and the module it is imported from on first use.
_EXPORTS = {
    "Resilience": "fastapi_resilience.integration._resilience",
    "ResilienceSettings": "fastapi_resilience._settings",
    "install": "fastapi_resilience.integration._install",
    "install_exception_handlers": "fastapi_resilience.problems._handlers",
    "CorrelationIdMiddleware": "fastapi_resilience.integration._middleware",
    "DegradedModeMiddleware": "fastapi_resilience.integration._middleware",
    "RateLimitMiddleware": "fastapi_resilience.integration._middleware",
    "RequestDeadlineMiddleware": "fastapi_resilience.integration._middleware",
    "CorrelationIdFilter": "fastapi_resilience.correlation._ids",
    "get_correlation_id": "fastapi_resilience.correlation._ids",
    "breaker_dependency": "fastapi_resilience.integration._dependencies",
    "bulkhead_dependency": "fastapi_resilience.integration._dependencies",
    "deadline_dependency": "fastapi_resilience.integration._dependencies",
    "rate_limit": "fastapi_resilience.ratelimit._routes",
    "requires_feature": "fastapi_resilience.operations._degraded",
    "problem_responses": "fastapi_resilience.integration._openapi",
    "Bulkhead": "fastapi_resilience.outbound._bulkhead",
    "CircuitBreaker": "fastapi_resilience.outbound._breaker",
    "DegradedMode": "fastapi_resilience.operations._degraded",
    "Retry": "fastapi_resilience.outbound._retry",
    "RetryBudget": "fastapi_resilience.outbound._retry_budget",
    "cached": "fastapi_resilience.outbound._response_cache",
    "deadline": "fastapi_resilience.outbound._deadline",
    "fallback": "fastapi_resilience.outbound._fallback",
    "get_breaker": "fastapi_resilience.outbound._breaker",
    "get_bulkhead": "fastapi_resilience.outbound._bulkhead",
    "policy": "fastapi_resilience.outbound._policies",
    "remaining": "fastapi_resilience.outbound._deadline",
    "resilient_client": "fastapi_resilience.outbound._transport",
    "ExternalService": "fastapi_resilience.outbound._service",
    "timeout": "fastapi_resilience.outbound._deadline",
    "watch_outbound": "fastapi_resilience.integration._dependencies",
}
_getattr, __dir__ = _lazy_exports(__name__, _EXPORTS)


def __getattr__(name: str) -> Any:
    if name == "__version__":
        from importlib.metadata import version

        return version("fastapi-resilience")
    return _getattr(name)
