"""Building a :class:`RateLimiter` from ``ResilienceSettings``: storage, guard, resolver, tiers."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from fastapi_resilience._optional import CLUSTER_SCHEMES
from fastapi_resilience._text import without_password
from fastapi_resilience.clock import SYSTEM_CLOCK, Clock
from fastapi_resilience.events import EventBus
from fastapi_resilience.exceptions import ConfigurationError
from fastapi_resilience.ratelimit._guard import GuardedStorage
from fastapi_resilience.ratelimit._identity import DefaultIdentityResolver, IdentityResolver
from fastapi_resilience.ratelimit._limiter import RateLimiter
from fastapi_resilience.ratelimit._memory import DEFAULT_MAX_KEYS, MemoryStorage
from fastapi_resilience.ratelimit._storage import (
    DEFAULT_STORAGE_TIMEOUT,
    RateLimitStorage,
    positive_seconds,
)

if TYPE_CHECKING:
    from fastapi_resilience.ratelimit._redis import RedisStorage

__all__ = [
    "guarded_storage_from_url",
    "limiter_from_settings",
    "standalone_limiter",
    "storage_from_url",
]

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


def storage_from_url(
    url: str,
    *,
    prefix: str = "rl:",
    timeout: float | timedelta = DEFAULT_STORAGE_TIMEOUT,
    clock: Clock = SYSTEM_CLOCK,
    max_keys: int | None = None,
) -> MemoryStorage | RedisStorage:
    """Build a storage from a URL.

    ``"memory://"`` is the in-process default (``clock`` and ``max_keys`` apply);
    ``"redis://host:port/db"``, ``"rediss://..."`` and ``"unix:///path?db=0"`` give a shared
    Redis storage whose keys start with ``prefix`` and whose connect and read timeouts are
    ``timeout`` seconds (default 0.25); ``"redis+cluster://host:port[,host:port...]"`` (and
    ``"rediss+cluster://..."``) the same storage on a Redis Cluster seeded with those nodes.

    Raises:
        ConfigurationError: the URL's scheme is unknown, or the ``redis`` extra is missing.

    .. versionadded:: 0.1.0
    """
    shown = without_password(url)  # errors never quote a password
    scheme, sep, _ = url.partition("://")
    scheme = scheme.lower()
    if not sep:
        raise ConfigurationError(
            f"rate_limit_storage {shown!r}: expected 'memory://' or 'redis://host:port/db'"
        )
    timeout = positive_seconds(timeout, "storage timeout")
    if scheme == "memory":
        return MemoryStorage(clock=clock, max_keys=max_keys or DEFAULT_MAX_KEYS)
    if scheme in ("redis", "rediss", "unix", *CLUSTER_SCHEMES):
        try:
            from fastapi_resilience.ratelimit._redis import RedisStorage
        except ImportError as exc:  # pragma: no cover - the extra is installed in tests
            raise ConfigurationError(
                f"rate_limit_storage {shown!r} needs the redis extra: "
                "pip install 'fastapi-resilience[redis]'"
            ) from exc
        return RedisStorage.from_url(url, prefix=prefix, timeout=timeout)
    raise ConfigurationError(
        f"rate_limit_storage {shown!r}: unknown scheme {scheme!r} "
        "(expected memory, redis, rediss, unix, redis+cluster or rediss+cluster)"
    )


def guarded_storage_from_url(
    url: str,
    *,
    fail_open: bool = True,
    fallback_limiter: bool = True,
    prefix: str = "rl:",
    timeout: float | timedelta = DEFAULT_STORAGE_TIMEOUT,
    events: EventBus | None = None,
    clock: Clock = SYSTEM_CLOCK,
    max_keys: int | None = None,
) -> MemoryStorage | GuardedStorage:
    """The storage an app should use for ``url``.

    ``"memory://"`` gives a ``MemoryStorage`` as is (it cannot be down). A Redis URL gives a
    ``GuardedStorage``; with ``fail_open`` and ``fallback_limiter`` it limits each instance in
    memory while Redis is down, with ``fail_open`` alone it raises ``StorageUnavailableError``
    (the caller lets the request through), and with neither the caller answers 503.

    .. versionadded:: 0.1.0
    """
    storage = storage_from_url(url, prefix=prefix, timeout=timeout, clock=clock, max_keys=max_keys)
    if isinstance(storage, MemoryStorage):
        return storage
    fallback = MemoryStorage(clock=clock) if fail_open and fallback_limiter else None
    return GuardedStorage(storage, timeout=timeout, fallback=fallback, events=events, clock=clock)
