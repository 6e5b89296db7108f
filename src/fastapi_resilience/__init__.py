"""fastapi-resilience: problem-details errors, correlation IDs, rate limiting and guarded calls."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi_resilience._limits import Limit, parse_limits
from fastapi_resilience._settings import ResilienceSettings
from fastapi_resilience.clock import Clock, SystemClock
from fastapi_resilience.correlation._ids import (
    CorrelationIdFilter,
    get_correlation_id,
)
from fastapi_resilience.events import Event, EventBus
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
from fastapi_resilience.health._checks import CheckResult, HealthChecks
from fastapi_resilience.integration._dependencies import (
    RequestDeadlineMiddleware,
    breaker_dependency,
    bulkhead_dependency,
    deadline_dependency,
    watch_outbound,
)
from fastapi_resilience.integration._install import Resilience, install
from fastapi_resilience.integration._middleware import (
    CorrelationIdMiddleware,
    DegradedModeMiddleware,
    RateLimitMiddleware,
)
from fastapi_resilience.operations._degraded import (
    DegradedMode,
    Feature,
    FeatureStatus,
    requires_feature,
)
from fastapi_resilience.outbound._adaptive_throttle import AdaptiveThrottle, ThrottledError
from fastapi_resilience.outbound._breaker import (
    BreakerRegistry,
    BreakerState,
    BreakerStateStore,
    CircuitBreaker,
    breaker_health_check,
    get_breaker,
)
from fastapi_resilience.outbound._breaker_redis import RedisBreakerStore
from fastapi_resilience.outbound._breaker_window import SlidingWindow
from fastapi_resilience.outbound._bulkhead import (
    Bulkhead,
    BulkheadRegistry,
    TieredBulkhead,
    get_bulkhead,
)
from fastapi_resilience.outbound._dead_letter import (
    DeadLetter,
    DeadLetterQueue,
    MemoryDeadLetterQueue,
    RedisDeadLetterQueue,
    ReplayReport,
    dead_letter_on_failure,
)
from fastapi_resilience.outbound._deadline import (
    DeadlineCutError,
    deadline,
    remaining,
    timeout,
    with_timeout,
)
from fastapi_resilience.outbound._fallback import fallback, with_fallback
from fastapi_resilience.outbound._headers import CorrelationIdTransport, correlation_id_hook
from fastapi_resilience.outbound._hedging import Hedge
from fastapi_resilience.outbound._response_cache import (
    CacheEntry,
    CacheResult,
    CacheStatusMiddleware,
    ResponseCache,
    cached,
    cached_call,
    current_cache_status,
    record_cache_status,
)
from fastapi_resilience.outbound._retry import Retry
from fastapi_resilience.outbound._retry_budget import RetryBudget
from fastapi_resilience.outbound._transport import (
    HostPolicy,
    ResilientTransport,
    UpstreamStatusError,
    resilient_client,
)
from fastapi_resilience.problems._handlers import install_exception_handlers
from fastapi_resilience.problems._render import ProblemResponse
from fastapi_resilience.ratelimit._guard import GuardedStorage
from fastapi_resilience.ratelimit._identity import (
    DefaultIdentityResolver,
    Identity,
    IdentityResolver,
)
from fastapi_resilience.ratelimit._limiter import RateLimiter
from fastapi_resilience.ratelimit._memory import MemoryStorage
from fastapi_resilience.ratelimit._routes import RateLimit, rate_limit
from fastapi_resilience.ratelimit._setup import guarded_storage_from_url, storage_from_url
from fastapi_resilience.ratelimit._storage import (
    Decision,
    LimitCheck,
    LimitState,
    RateLimitStorage,
    StorageUnavailableError,
)

__all__ = [
    "AdaptiveThrottle",
    "AppError",
    "AuthenticationError",
    "BadRequestError",
    "BreakerRegistry",
    "BreakerState",
    "BreakerStateStore",
    "Bulkhead",
    "BulkheadFullError",
    "BulkheadRegistry",
    "CacheEntry",
    "CacheResult",
    "CacheStatusMiddleware",
    "CheckResult",
    "CircuitBreaker",
    "CircuitOpenError",
    "ClientError",
    "Clock",
    "ConfigurationError",
    "ConflictError",
    "CorrelationIdFilter",
    "CorrelationIdMiddleware",
    "CorrelationIdTransport",
    "DeadLetter",
    "DeadLetterQueue",
    "DeadlineCutError",
    "Decision",
    "DefaultIdentityResolver",
    "DegradedMode",
    "DegradedModeMiddleware",
    "Event",
    "EventBus",
    "Feature",
    "FeatureStatus",
    "FeatureUnavailableError",
    "GuardedStorage",
    "HealthChecks",
    "Hedge",
    "HostPolicy",
    "Identity",
    "IdentityResolver",
    "InternalError",
    "InvalidInputError",
    "Limit",
    "LimitCheck",
    "LimitState",
    "MemoryDeadLetterQueue",
    "MemoryStorage",
    "NotFoundError",
    "PermissionDeniedError",
    "ProblemResponse",
    "RateLimit",
    "RateLimitMiddleware",
    "RateLimitStorage",
    "RateLimitedError",
    "RateLimiter",
    "RedisBreakerStore",
    "RedisDeadLetterQueue",
    "RedisStorage",
    "ReplayReport",
    "RequestDeadlineMiddleware",
    "Resilience",
    "ResilienceSettings",
    "ResilientTransport",
    "ResponseCache",
    "Retry",
    "RetryBudget",
    "RetryExhaustedError",
    "ServerError",
    "ServiceUnavailableError",
    "SlidingWindow",
    "StorageUnavailableError",
    "SystemClock",
    "ThrottledError",
    "TieredBulkhead",
    "UpstreamError",
    "UpstreamStatusError",
    "UpstreamTimeoutError",
    "breaker_dependency",
    "breaker_health_check",
    "bulkhead_dependency",
    "cached",
    "cached_call",
    "correlation_id_hook",
    "current_cache_status",
    "dead_letter_on_failure",
    "deadline",
    "deadline_dependency",
    "fallback",
    "get_breaker",
    "get_bulkhead",
    "get_correlation_id",
    "guarded_storage_from_url",
    "install",
    "install_exception_handlers",
    "parse_limits",
    "rate_limit",
    "record_cache_status",
    "remaining",
    "requires_feature",
    "resilient_client",
    "storage_from_url",
    "timeout",
    "watch_outbound",
    "with_fallback",
    "with_timeout",
]


if TYPE_CHECKING:
    from fastapi_resilience.ratelimit._redis import RedisStorage


def __getattr__(name: str) -> Any:
    if name == "__version__":
        from importlib.metadata import version

        return version("fastapi-resilience")
    if name == "RedisStorage":
        # Imported on first use: redis is the optional ``redis`` extra.
        from fastapi_resilience.ratelimit._redis import RedisStorage

        return RedisStorage
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
