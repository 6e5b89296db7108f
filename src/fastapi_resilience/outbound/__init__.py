"""Guarded outbound calls for implementers: registries, stores, caches, transports, dead letters.

App authors find the everyday names at the top level (``CircuitBreaker``, ``Retry``,
``Bulkhead``, ``fallback``, ``cached``, ``timeout``, ``resilient_client``,
``ExternalService``); the names here build on them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi_resilience._exports import lazy_exports as _lazy_exports

if TYPE_CHECKING:
    from fastapi_resilience._policy_settings import PolicySettings
    from fastapi_resilience.outbound._adaptive_throttle import AdaptiveThrottle, is_overload
    from fastapi_resilience.outbound._breaker import (
        BreakerPermit,
        BreakerRegistry,
        BreakerState,
        BreakerStateStore,
        breaker_health_check,
        default_registry,
    )
    from fastapi_resilience.outbound._breaker_redis import RedisBreakerStore
    from fastapi_resilience.outbound._breaker_window import SlidingWindow
    from fastapi_resilience.outbound._bulkhead import (
        TIER_SCOPE_KEY,
        BulkheadRegistry,
        TieredBulkhead,
        default_bulkhead_registry,
    )
    from fastapi_resilience.outbound._dead_letter import (
        DeadLetter,
        DeadLetterQueue,
        MemoryDeadLetterQueue,
        RedisDeadLetterQueue,
        ReplayReport,
        dead_letter_on_failure,
    )
    from fastapi_resilience.outbound._deadline import with_timeout
    from fastapi_resilience.outbound._fallback import with_fallback
    from fastapi_resilience.outbound._headers import CorrelationIdTransport, correlation_id_hook
    from fastapi_resilience.outbound._hedging import Hedge
    from fastapi_resilience.outbound._policies import (
        Policy,
        PolicyGuards,
        PolicyTable,
        default_policies,
        policy,
    )
    from fastapi_resilience.outbound._provider_limits import (
        OutboundLimiter,
        QuotaGate,
        parse_duration,
        provider_wait,
        quota_reset,
    )
    from fastapi_resilience.outbound._response_cache import (
        CACHE_STATUS_HEADER,
        CacheEntry,
        CacheResult,
        CacheStatusMiddleware,
        JsonSerializer,
        ResponseCache,
        Serializer,
        cached_call,
        current_cache_status,
        record_cache_status,
    )
    from fastapi_resilience.outbound._service import ExternalService
    from fastapi_resilience.outbound._sse import ServerSentEvent, SSEParser, sse_events
    from fastapi_resilience.outbound._stream import STREAM_EXTENSION
    from fastapi_resilience.outbound._transport import HostPolicy, ResilientTransport

__all__ = [
    "CACHE_STATUS_HEADER",
    "STREAM_EXTENSION",
    "TIER_SCOPE_KEY",
    "AdaptiveThrottle",
    "BreakerPermit",
    "BreakerRegistry",
    "BreakerState",
    "BreakerStateStore",
    "BulkheadRegistry",
    "CacheEntry",
    "CacheResult",
    "CacheStatusMiddleware",
    "CorrelationIdTransport",
    "DeadLetter",
    "DeadLetterQueue",
    "ExternalService",
    "Hedge",
    "HostPolicy",
    "JsonSerializer",
    "MemoryDeadLetterQueue",
    "OutboundLimiter",
    "Policy",
    "PolicyGuards",
    "PolicySettings",
    "PolicyTable",
    "QuotaGate",
    "RedisBreakerStore",
    "RedisDeadLetterQueue",
    "ReplayReport",
    "ResilientTransport",
    "ResponseCache",
    "SSEParser",
    "Serializer",
    "ServerSentEvent",
    "SlidingWindow",
    "TieredBulkhead",
    "breaker_health_check",
    "cached_call",
    "correlation_id_hook",
    "current_cache_status",
    "dead_letter_on_failure",
    "default_bulkhead_registry",
    "default_policies",
    "default_registry",
    "is_overload",
    "parse_duration",
    "policy",
    "provider_wait",
    "quota_reset",
    "record_cache_status",
    "sse_events",
    "with_fallback",
    "with_timeout",
]

#: Each public name and the module it is imported from on first use.
_EXPORTS = {
    "AdaptiveThrottle": "fastapi_resilience.outbound._adaptive_throttle",
    "BreakerPermit": "fastapi_resilience.outbound._breaker",
    "BreakerRegistry": "fastapi_resilience.outbound._breaker",
    "BreakerState": "fastapi_resilience.outbound._breaker",
    "BreakerStateStore": "fastapi_resilience.outbound._breaker",
    "BulkheadRegistry": "fastapi_resilience.outbound._bulkhead",
    "CacheEntry": "fastapi_resilience.outbound._response_cache",
    "CacheResult": "fastapi_resilience.outbound._response_cache",
    "CacheStatusMiddleware": "fastapi_resilience.outbound._response_cache",
    "CorrelationIdTransport": "fastapi_resilience.outbound._headers",
    "DeadLetter": "fastapi_resilience.outbound._dead_letter",
    "DeadLetterQueue": "fastapi_resilience.outbound._dead_letter",
    "Hedge": "fastapi_resilience.outbound._hedging",
    "HostPolicy": "fastapi_resilience.outbound._transport",
    "MemoryDeadLetterQueue": "fastapi_resilience.outbound._dead_letter",
    "Policy": "fastapi_resilience.outbound._policies",
    "PolicyGuards": "fastapi_resilience.outbound._policies",
    "PolicySettings": "fastapi_resilience._policy_settings",
    "PolicyTable": "fastapi_resilience.outbound._policies",
    "default_policies": "fastapi_resilience.outbound._policies",
    "policy": "fastapi_resilience.outbound._policies",
    "OutboundLimiter": "fastapi_resilience.outbound._provider_limits",
    "QuotaGate": "fastapi_resilience.outbound._provider_limits",
    "parse_duration": "fastapi_resilience.outbound._provider_limits",
    "provider_wait": "fastapi_resilience.outbound._provider_limits",
    "quota_reset": "fastapi_resilience.outbound._provider_limits",
    "RedisBreakerStore": "fastapi_resilience.outbound._breaker_redis",
    "RedisDeadLetterQueue": "fastapi_resilience.outbound._dead_letter",
    "ReplayReport": "fastapi_resilience.outbound._dead_letter",
    "ResilientTransport": "fastapi_resilience.outbound._transport",
    "ResponseCache": "fastapi_resilience.outbound._response_cache",
    "SlidingWindow": "fastapi_resilience.outbound._breaker_window",
    "TieredBulkhead": "fastapi_resilience.outbound._bulkhead",
    "breaker_health_check": "fastapi_resilience.outbound._breaker",
    "cached_call": "fastapi_resilience.outbound._response_cache",
    "correlation_id_hook": "fastapi_resilience.outbound._headers",
    "current_cache_status": "fastapi_resilience.outbound._response_cache",
    "dead_letter_on_failure": "fastapi_resilience.outbound._dead_letter",
    "record_cache_status": "fastapi_resilience.outbound._response_cache",
    "with_fallback": "fastapi_resilience.outbound._fallback",
    "with_timeout": "fastapi_resilience.outbound._deadline",
    "default_registry": "fastapi_resilience.outbound._breaker",
    "default_bulkhead_registry": "fastapi_resilience.outbound._bulkhead",
    "TIER_SCOPE_KEY": "fastapi_resilience.outbound._bulkhead",
    "is_overload": "fastapi_resilience.outbound._adaptive_throttle",
    "Serializer": "fastapi_resilience.outbound._response_cache",
    "JsonSerializer": "fastapi_resilience.outbound._response_cache",
    "CACHE_STATUS_HEADER": "fastapi_resilience.outbound._response_cache",
    "SSEParser": "fastapi_resilience.outbound._sse",
    "ServerSentEvent": "fastapi_resilience.outbound._sse",
    "sse_events": "fastapi_resilience.outbound._sse",
    "STREAM_EXTENSION": "fastapi_resilience.outbound._stream",
    "ExternalService": "fastapi_resilience.outbound._service",
}
__getattr__, __dir__ = _lazy_exports(__name__, _EXPORTS)
