"""fastapi-resilience: problem-details errors, correlation IDs, rate limiting and guarded calls."""

from __future__ import annotations

from fastapi_resilience._clock import Clock, SystemClock
from fastapi_resilience._correlation import (
    CorrelationIdFilter,
    CorrelationIdMiddleware,
    get_correlation_id,
)
from fastapi_resilience._events import Event, EventBus
from fastapi_resilience._handlers import install_exception_handlers
from fastapi_resilience._health import CheckResult, HealthChecks
from fastapi_resilience._install import Resilience, install
from fastapi_resilience._limit_string import Limit, parse_limits
from fastapi_resilience._outbound_headers import CorrelationIdTransport, correlation_id_hook
from fastapi_resilience._problem import ProblemResponse
from fastapi_resilience._rate_limit_identity import (
    DefaultIdentityResolver,
    Identity,
    IdentityResolver,
)
from fastapi_resilience._rate_limit_middleware import RateLimitMiddleware
from fastapi_resilience._rate_limit_routes import RateLimit, rate_limit
from fastapi_resilience._rate_limiter import RateLimiter
from fastapi_resilience._settings import ResilienceSettings
from fastapi_resilience.exceptions import (
    AppError,
    AuthenticationError,
    BadRequestError,
    BulkheadFullError,
    CircuitOpenError,
    ClientError,
    ConfigurationError,
    ConflictError,
    FeatureUnavailableError,
    InternalError,
    InvalidInputError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitedError,
    RetryExhaustedError,
    ServerError,
    ServiceUnavailableError,
    UpstreamError,
    UpstreamTimeoutError,
)

__all__ = [
    "AppError",
    "AuthenticationError",
    "BadRequestError",
    "BulkheadFullError",
    "CheckResult",
    "CircuitOpenError",
    "ClientError",
    "Clock",
    "ConfigurationError",
    "ConflictError",
    "CorrelationIdFilter",
    "CorrelationIdMiddleware",
    "CorrelationIdTransport",
    "DefaultIdentityResolver",
    "Event",
    "EventBus",
    "FeatureUnavailableError",
    "HealthChecks",
    "Identity",
    "IdentityResolver",
    "InternalError",
    "InvalidInputError",
    "Limit",
    "NotFoundError",
    "PermissionDeniedError",
    "ProblemResponse",
    "RateLimit",
    "RateLimitMiddleware",
    "RateLimitedError",
    "RateLimiter",
    "Resilience",
    "ResilienceSettings",
    "RetryExhaustedError",
    "ServerError",
    "ServiceUnavailableError",
    "SystemClock",
    "UpstreamError",
    "UpstreamTimeoutError",
    "correlation_id_hook",
    "get_correlation_id",
    "install",
    "install_exception_handlers",
    "parse_limits",
    "rate_limit",
]


def __getattr__(name: str) -> str:
    if name == "__version__":
        from importlib.metadata import version

        return version("fastapi-resilience")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
