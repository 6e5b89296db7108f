from __future__ import annotations

import pytest

from fastapi_resilience import ResilienceSettings
from fastapi_resilience.exceptions import ConfigurationError, StorageUnavailableError
from fastapi_resilience.ratelimit import (
    Decision,
    Limit,
    LimitCheck,
    LimitState,
    MemoryStorage,
    RateLimitStorage,
    RedisStorage,
    storage_from_url,
)
from fastapi_resilience.testing import ManualClock

pytestmark = pytest.mark.anyio


def test_memory_url_gives_memory_storage() -> None:
    """``memory://`` builds the in-process storage with the requested cap."""
    storage = storage_from_url("memory://", max_keys=10)
    assert isinstance(storage, MemoryStorage)
    assert storage.max_keys == 10
    assert isinstance(storage, RateLimitStorage)


@pytest.mark.parametrize(
    "url", ["redis://127.0.0.1:1/0", "rediss://127.0.0.1:1/0", "unix:///tmp/no.sock?db=0"]
)
async def test_redis_urls_give_redis_storage_with_short_timeouts(url: str) -> None:
    """Redis URLs build a Redis storage whose connect and read timeouts are the given timeout."""
    storage = storage_from_url(url, prefix="app:", timeout=0.1)
    assert isinstance(storage, RedisStorage)
    assert storage.prefix == "app:"
    kwargs = storage.client.connection_pool.connection_kwargs
    assert kwargs["socket_timeout"] == 0.1
    assert kwargs["socket_connect_timeout"] == 0.1
    await storage.aclose()


async def test_default_redis_timeout_is_at_most_250_ms() -> None:
    """Without a timeout argument no Redis call may wait longer than 250 ms on a socket."""
    storage = storage_from_url("redis://127.0.0.1:1/0")
    assert isinstance(storage, RedisStorage)
    assert storage.client.connection_pool.connection_kwargs["socket_timeout"] <= 0.25
    await storage.aclose()


@pytest.mark.parametrize("url", ["memcached://x", "localhost:6379", "redis-cluster"])
def test_unknown_storage_url_fails_at_start_up(url: str) -> None:
    """An unknown storage URL raises ConfigurationError naming the setting and the URL."""
    with pytest.raises(ConfigurationError, match="rate_limit_storage") as info:
        storage_from_url(url)
    assert url in str(info.value)


def test_non_positive_timeout_is_rejected() -> None:
    """A zero timeout would refuse every call, so it is a configuration error."""
    with pytest.raises(ConfigurationError, match="timeout"):
        storage_from_url("memory://", timeout=0)


def test_cost_below_one_is_rejected() -> None:
    """A request cannot cost less than one unit."""
    with pytest.raises(ConfigurationError, match="cost"):
        LimitCheck("k", Limit(1, 1), cost=0)


async def test_bucket_width_is_a_sixtieth_of_the_period() -> None:
    """Units are held at most 1/60 of the period longer than a perfect sliding log would: one
    admitted at the start of a time bucket frees its room a period and a sixtieth later.
    (Redis keeps whole milliseconds: tests/test_rate_limit_redis.py checks a 1 s log's TTL.)"""
    storage = MemoryStorage(clock=ManualClock(start=6_000.0))  # a bucket boundary of both
    for limit in (Limit(100, 60), Limit(5, 1)):
        state = (await storage.check("id", [LimitCheck(f"k{limit.period}", limit)])).states[0]
        assert state.reset_after == pytest.approx(limit.period * 61 / 60)


def test_decision_retry_after_ignores_shadow_and_admitting_limits() -> None:
    """The request's wait is the longest wait among its refusing, enforced limits."""
    limit = Limit(1, 60)
    states = (
        LimitState(LimitCheck("a", limit), False, 0, 30.0, 30.0),
        LimitState(LimitCheck("b", limit, shadow=True), False, 0, 50.0, 50.0),
        LimitState(LimitCheck("c", limit), True, 0, 10.0, 0.0),
    )
    assert Decision(False, states).retry_after == 30.0
    assert Decision(True, states[2:]).retry_after == 0.0


def test_storage_unavailable_error_carries_retry_after() -> None:
    """The error says when the storage will be tried again, for a 503's Retry-After."""
    error = StorageUnavailableError("down", retry_after=1.5)
    assert error.retry_after == 1.5
    assert str(error) == "down"


@pytest.mark.parametrize(
    "url",
    [
        "mysql://app:hunter2pw@db:3306/0",  # unknown scheme
        "redis://app:hunter/2pw@cache:6379/0",  # a '/' in the password cuts the URL short
        "redis://:hunter2pw@cache:port/0",
        "app:hunter2pw@cache:6379/0",  # no scheme
        "redis:/app:hunter@2pw@cache:6379/0",  # a mistyped '://', an '@' in the password
        "mysql://cache:6379/0?db=0&password=hunter2pw",  # the password as redis-py reads it
    ],
)
def test_a_bad_storage_url_error_never_quotes_its_password(url: str) -> None:
    """Start-up errors name the setting but never repeat the URL's password, or a piece of it."""
    with pytest.raises(ConfigurationError, match="rate_limit_storage") as info:
        storage_from_url(url)
    assert "hunter" not in str(info.value)
    assert "2pw" not in str(info.value)


def test_a_settings_error_for_an_unknown_scheme_never_quotes_the_password() -> None:
    with pytest.raises(ConfigurationError, match="rate_limit_storage") as info:
        ResilienceSettings(rate_limit_storage="mysql://app:hunter2pw@db:3306/0")
    assert "hunter2pw" not in str(info.value)
    assert "mysql://app:***@db:3306/0" in str(info.value)


@pytest.mark.parametrize(
    "url", ["app:hunter2pw@cache:6379/0", "cache:6379/0?password=hunter2pw&db=0"]
)
def test_a_settings_error_for_a_url_without_scheme_never_quotes_the_password(url: str) -> None:
    with pytest.raises(ConfigurationError, match="rate_limit_storage") as info:
        ResilienceSettings(rate_limit_storage=url)
    assert "hunter2pw" not in str(info.value)
