"""Building a :class:`RateLimiter` from ``ResilienceSettings``: storage, guard, resolver, tiers."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from fastapi_resilience.clock import SYSTEM_CLOCK, Clock
from fastapi_resilience.events import EventBus
from fastapi_resilience.ratelimit._storage import RateLimitStorage
from fastapi_resilience.ratelimit._guard import guarded_storage_from_url
from fastapi_resilience.ratelimit._identity import DefaultIdentityResolver, IdentityResolver
from fastapi_resilience.ratelimit._limiter import RateLimiter

__all__ = ["limiter_from_settings", "standalone_limiter"]

_STANDALONE: RateLimiter | None = None


def limiter_from_settings(
    settings: Any = None,
    *,
    storage: RateLimitStorage | None = None,
    resolver: IdentityResolver | None = None,
    events: EventBus | None = None,
    clock: Clock = SYSTEM_CLOCK,
    exempt_paths: Iterable[str] = (),
) -> RateLimiter:
    """The limiter ``settings`` describe (``ResilienceSettings()`` when ``None``).

    ``exempt_paths``: exempt besides ``rate_limit_exempt_paths`` (``install`` adds the app's
    documentation routes).

    The storage comes from ``rate_limit_storage`` unless given; a Redis storage is wrapped in
    the guard, so that a dead or stalled Redis costs at most one timeout before the breaker opens.
    """
    from fastapi_resilience._settings import ResilienceSettings

    settings = settings if settings is not None else ResilienceSettings()
    events = events or EventBus()
    if storage is None:
        storage = guarded_storage_from_url(
            settings.rate_limit_storage,
            fail_open=settings.rate_limit_fail_open,
            fallback_limiter=settings.rate_limit_fallback,
            prefix=settings.rate_limit_key_prefix,
            timeout=settings.rate_limit_storage_timeout,
            events=events,
            clock=clock,
        )
    return RateLimiter(
        storage,
        tiers=settings.rate_limit_tiers,
        default_tier=settings.rate_limit_default_tier,
        resolver=resolver
        or DefaultIdentityResolver(
            api_keys=settings.rate_limit_api_keys,
            default_tier=settings.rate_limit_default_tier,
            api_key_header=settings.rate_limit_api_key_header,
            trusted_proxies=settings.trusted_proxies,
        ),
        exempt_paths=[*settings.rate_limit_exempt_paths, *exempt_paths],
        fail_open=settings.rate_limit_fail_open,
        shadow=settings.rate_limit_shadow,
        headers_enabled=settings.rate_limit_headers_enabled,
        events=events,
    )


def standalone_limiter() -> RateLimiter:
    """The process-wide memory limiter ``rate_limit(...)`` uses in an app without ``install``.

    It has one generous tier that is never checked (route limits only are checked there).
    """
    global _STANDALONE
    if _STANDALONE is None:
        from fastapi_resilience.ratelimit._memory import MemoryStorage

        _STANDALONE = RateLimiter(MemoryStorage(), tiers={"anonymous": "1000000/second"})
    return _STANDALONE
