from __future__ import annotations

import asyncio
import gc
import logging
import tracemalloc
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from loopback import RedisServer

from fastapi_resilience import cached
from fastapi_resilience.events import Event, EventBus
from fastapi_resilience.exceptions import (
    CircuitOpenError,
    ConfigurationError,
    NotFoundError,
    RetryExhaustedError,
    UpstreamError,
)
from fastapi_resilience.outbound import (
    CacheResult,
    CacheStatusMiddleware,
    HostPolicy,
    ResilientTransport,
    ResponseCache,
    cached_call,
    current_cache_status,
    record_cache_status,
)
from fastapi_resilience.testing import ManualClock

pytestmark = pytest.mark.anyio


class Upstream:
    """A counting async function that can be told to fail."""

    def __init__(self) -> None:
        self.calls = 0
        self.error: BaseException | None = None
        self.value: Any = {"stock": 7}

    async def __call__(self, *args: Any) -> Any:
        self.calls += 1
        await asyncio.sleep(0)
        if self.error is not None:
            raise self.error
        return self.value


def collect(bus: EventBus) -> list[Event]:
    seen: list[Event] = []
    bus.subscribe(seen.append)
    return seen


async def test_fresh_entry_answers_without_calling() -> None:
    """Within ttl, a second call is a hit and the upstream is not called again."""
    clock = ManualClock()
    cache = ResponseCache(ttl=10, clock=clock)
    upstream = Upstream()
    first = await cache.call("sku:1", upstream)
    clock.advance(9.5)
    second = await cache.call("sku:1", upstream)
    assert (first.status, second.status) == ("miss", "hit")
    assert second.value == {"stock": 7}
    assert upstream.calls == 1
    assert second.cache_status() == "fastapi-resilience; hit; ttl=0"


async def test_expired_entry_is_refreshed_by_a_successful_call() -> None:
    """After ttl the next call goes upstream and stores the new value."""
    clock = ManualClock()
    cache = ResponseCache(ttl=10, stale_ttl=60, clock=clock)
    upstream = Upstream()
    await cache.call("k", upstream)
    clock.advance(11)
    upstream.value = {"stock": 3}
    result = await cache.call("k", upstream)
    assert result.status == "refresh"
    assert result.cache_status() == "fastapi-resilience; fwd=stale; stored"
    assert result.value == {"stock": 3}
    assert upstream.calls == 2
    entry = await cache.get("k")
    assert entry is not None
    assert entry.fresh
    assert entry.value == {"stock": 3}


@pytest.mark.parametrize(
    ("error", "header"),
    [
        (
            CircuitOpenError(retry_after=5),
            "fastapi-resilience; hit; ttl=-5; detail=circuit_open",
        ),
        (
            RetryExhaustedError("gave up"),
            "fastapi-resilience; fwd=stale; ttl=-5; detail=retries_exhausted",
        ),
        (
            httpx.ConnectError("refused"),
            "fastapi-resilience; fwd=stale; ttl=-5; detail=ConnectError",
        ),
    ],
)
async def test_failure_serves_stale_marked_with_negative_ttl(
    error: BaseException, header: str
) -> None:
    """An open breaker or spent retries serve the stale entry; Cache-Status shows it is stale."""
    clock = ManualClock()
    cache = ResponseCache(ttl=10, stale_ttl=60, clock=clock)
    upstream = Upstream()
    await cache.call("k", upstream)
    clock.advance(15)
    upstream.error = error
    result = await cache.call("k", upstream)
    assert result.stale
    assert result.value == {"stock": 7}
    assert result.error is error
    assert result.age == pytest.approx(15)
    assert result.headers == {"Cache-Status": header}


async def test_upstream_status_is_reported_as_fwd_status() -> None:
    """When the failure carries the upstream's status code, Cache-Status names it."""
    clock = ManualClock()
    cache = ResponseCache(ttl=1, stale_ttl=60, clock=clock)
    await cache.set("k", "v")
    clock.advance(2)
    request = httpx.Request("GET", "http://upstream/x")
    error = httpx.HTTPStatusError(
        "boom", request=request, response=httpx.Response(503, request=request)
    )

    async def failing() -> str:
        raise error

    result = await cache.call("k", failing)
    assert "fwd=stale; fwd-status=503; ttl=-1" in result.cache_status()


async def test_no_stale_after_stale_ttl_the_error_propagates() -> None:
    """Past ttl + stale_ttl the entry is gone and the failure reaches the caller."""
    clock = ManualClock()
    cache = ResponseCache(ttl=10, stale_ttl=60, clock=clock)
    upstream = Upstream()
    await cache.call("k", upstream)
    clock.advance(70)
    upstream.error = UpstreamError("down")
    with pytest.raises(UpstreamError):
        await cache.call("k", upstream)
    assert await cache.get("k") is None


async def test_client_errors_are_not_masked_by_stale_data() -> None:
    """A ClientError (the resource is gone, the request is wrong) is raised, not papered over."""
    clock = ManualClock()
    cache = ResponseCache(ttl=1, stale_ttl=60, clock=clock)
    upstream = Upstream()
    await cache.call("k", upstream)
    clock.advance(5)
    upstream.error = NotFoundError("gone")
    with pytest.raises(NotFoundError):
        await cache.call("k", upstream)


async def test_stale_if_error_can_be_switched_off_per_call() -> None:
    """stale_if_error=False raises the failure even with a stale entry at hand."""
    clock = ManualClock()
    cache = ResponseCache(ttl=1, stale_ttl=60, clock=clock)
    upstream = Upstream()
    await cached_call(cache, "k", upstream)
    clock.advance(5)
    upstream.error = UpstreamError("down")
    with pytest.raises(UpstreamError):
        await cached_call(cache, "k", upstream, stale_if_error=False)


async def test_concurrent_misses_share_one_upstream_call() -> None:
    """100 concurrent misses for one key make a single upstream call and all get its value."""
    cache = ResponseCache(ttl=10, clock=ManualClock())
    upstream = Upstream()
    results = await asyncio.gather(*(cache.call("k", upstream) for _ in range(100)))
    assert upstream.calls == 1
    assert {r.value["stock"] for r in results} == {7}


async def test_a_cancelled_leader_does_not_cancel_the_followers() -> None:
    """When the caller making the shared call is cancelled, waiting callers call for themselves."""
    cache = ResponseCache(ttl=10, clock=ManualClock())
    gate = asyncio.Event()
    calls = 0

    async def slow() -> str:
        nonlocal calls
        calls += 1
        await gate.wait()
        return "v"

    leader = asyncio.ensure_future(cache.call("k", slow))
    await asyncio.sleep(0)
    follower = asyncio.ensure_future(cache.call("k", slow))
    await asyncio.sleep(0)
    leader.cancel()
    await asyncio.sleep(0)
    gate.set()
    result = await follower
    assert result.value == "v"
    assert calls == 2
    with pytest.raises(asyncio.CancelledError):
        await leader


async def test_l1_is_bounded_least_recently_used_goes_first() -> None:
    """Beyond max_entries the least recently used key is dropped."""
    cache = ResponseCache(ttl=10, max_entries=2, clock=ManualClock())
    await cache.set("a", 1)
    await cache.set("b", 2)
    assert await cache.get("a") is not None  # a is now the most recently used
    await cache.set("c", 3)
    assert len(cache) == 2
    assert await cache.get("b") is None
    assert (await cache.get("a"), await cache.get("c")) != (None, None)


async def test_a_full_l1_drops_expired_entries_before_a_live_one() -> None:
    """Room for a new entry is made from entries past their stale window first: a live entry
    used less recently than an expired one stays."""
    clock = ManualClock()
    cache = ResponseCache(ttl=100, max_entries=2, clock=clock)
    await cache.set("live", 1)
    await cache.set("short", 2, ttl=1)
    assert await cache.get("short") is not None  # the most recently used now
    clock.advance(2)  # "short" is past its ttl, and has no stale window
    await cache.set("new", 3)
    live, new = await cache.get("live"), await cache.get("new")
    assert live is not None
    assert live.value == 1
    assert new is not None
    assert new.value == 3


async def test_len_counts_the_entries_still_held() -> None:
    """An entry counts while it is fresh or stale, and no longer once its stale window is over,
    whether or not anything has read it since."""
    clock = ManualClock()
    cache = ResponseCache(ttl=1, stale_ttl=1, clock=clock)
    await cache.set("a", 1)
    await cache.set("b", 2, stale_ttl=5)
    clock.advance(1.5)
    assert len(cache) == 2  # both stale, both still served on a failure
    clock.advance(1)
    assert len(cache) == 1


async def test_keys_are_hashed_and_bounded() -> None:
    """Any key string, however long, maps to a fixed-size storage key under the prefix."""
    cache = ResponseCache(ttl=1, prefix="inv:")
    long_key = "GET https://inventory/" + "x" * 10_000 + " \n\x00"
    storage_key = cache.key_for(long_key)
    assert storage_key.startswith("inv:")
    assert len(storage_key) == len("inv:") + 32
    assert storage_key != cache.key_for("other")


async def test_long_keys_are_stored_hashed_in_l1() -> None:
    """A 10 kB key costs a fixed-size slot in memory and still finds its value."""
    cache = ResponseCache(ttl=10, clock=ManualClock())
    await cache.set("warm-up", "v")  # the first entry's structures are not the key's cost
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        await cache.set("k" * 10_000, "v")
        gc.collect()  # the caller's 10 kB key is gone: only what the cache kept is traced
        kept, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert kept - before < 2_000, f"one entry with a 10 kB key kept {kept - before} bytes"
    long_key = "k" * 10_000
    entry = await cache.get(long_key)
    assert entry is not None
    assert entry.value == "v"
    assert (await cache.call(long_key, _value)).status == "hit"


async def test_per_entry_ttl_overrides_the_default() -> None:
    """set(..., ttl=) gives one entry its own lifetime."""
    clock = ManualClock()
    cache = ResponseCache(ttl=100, clock=clock)
    await cache.set("short", 1, ttl=timedelta(seconds=1))
    clock.advance(2)
    assert await cache.get("short") is None


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"ttl": 0}, "ttl"),
        ({"ttl": 1, "stale_ttl": -1}, "stale_ttl"),
        ({"ttl": 1, "max_entries": 0}, "max_entries"),
        ({"ttl": 1, "redis_url": "nonsense://x"}, "redis_url"),
        ({"ttl": 1, "name": "my cache"}, "name"),
    ],
)
def test_bad_arguments_fail_at_construction_naming_the_argument(
    kwargs: dict[str, Any], name: str
) -> None:
    """A bad argument raises ConfigurationError naming it, before any call."""
    with pytest.raises(ConfigurationError, match=name):
        ResponseCache(**kwargs)


@pytest.mark.redis
async def test_json_serializer_round_trips_bytes(redis_server: RedisServer) -> None:
    """Snapshotted HTTP bodies (bytes) survive the trip through Redis: another instance, its
    own L1 empty, reads back what was stored."""
    value = {"status": 200, "content": b"\x00\xffbody", "headers": [["a", "b"]]}
    writer = ResponseCache(ttl=60, redis_url=redis_server.url)
    reader = ResponseCache(ttl=60, redis_url=redis_server.url)
    try:
        await writer.set("k", value)
        entry = await reader.get("k")
    finally:
        await writer.aclose()
        await reader.aclose()
    assert entry is not None
    assert entry.value == value


async def test_cached_decorator_returns_plain_values_and_records_status() -> None:
    """@cached returns the value itself; the stale marker is readable for the request."""
    clock = ManualClock()
    cache = ResponseCache(ttl=1, stale_ttl=30, clock=clock)
    upstream = Upstream()

    @cached(cache, key=lambda sku: f"stock:{sku}")
    async def stock(sku: str) -> Any:
        return await upstream(sku)

    app = FastAPI()

    @app.get("/stock/{sku}")
    async def route(sku: str) -> dict[str, Any]:
        value = await stock(sku)
        status = current_cache_status()
        return {"value": value, "stale": bool(status and status.stale)}

    app.add_middleware(CacheStatusMiddleware)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        fresh = await c.get("/stock/a")
        clock.advance(3)
        upstream.error = CircuitOpenError(retry_after=10)
        stale = await c.get("/stock/a")
    assert fresh.json() == {"value": {"stock": 7}, "stale": False}
    assert fresh.headers["Cache-Status"] == "fastapi-resilience; fwd=miss; stored"
    assert stale.status_code == 200
    assert stale.json() == {"value": {"stock": 7}, "stale": True}
    assert stale.headers["Cache-Status"] == "fastapi-resilience; hit; ttl=-2; detail=circuit_open"


async def test_middleware_leaves_routes_without_cached_data_alone() -> None:
    """No Cache-Status is added to an answer that used no cache, nor over a route's own header."""
    app = FastAPI()
    cache = ResponseCache(ttl=5)

    @app.get("/plain")
    async def plain() -> dict[str, str]:
        return {"ok": "yes"}

    @app.get("/own")
    async def own() -> JSONResponse:
        result: CacheResult[str] = await cache.call("k", _value)
        return JSONResponse({"v": result.value}, headers={"Cache-Status": "mine"})

    app.add_middleware(CacheStatusMiddleware)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        plain_response = await c.get("/plain")
        own_response = await c.get("/own")
    assert "cache-status" not in plain_response.headers
    assert own_response.headers["Cache-Status"] == "mine"


async def _value() -> str:
    return "v"


# --- Redis L2 -------------------------------------------------------------------------------


@pytest.fixture(name="events")
def _events() -> EventBus:
    return EventBus(log=False)


@pytest.fixture(name="l2_caches")
async def _l2_caches(
    redis_server: RedisServer, events: EventBus
) -> AsyncIterator[tuple[ResponseCache, ResponseCache, ManualClock]]:
    clock = ManualClock()
    a = ResponseCache(
        ttl=10, stale_ttl=60, redis_url=redis_server.url, clock=clock, events=events, name="inv"
    )
    b = ResponseCache(ttl=10, stale_ttl=60, redis_url=redis_server.url, clock=clock, events=events)
    yield a, b, clock
    await a.aclose()
    await b.aclose()


@pytest.mark.redis
async def test_l2_shares_entries_between_instances(
    l2_caches: tuple[ResponseCache, ResponseCache, ManualClock],
) -> None:
    """A value stored by one instance answers another instance's call without an upstream call."""
    a, b, _clock = l2_caches
    upstream = Upstream()
    upstream.value = {"body": b"\x01\x02", "status": 200}
    await a.call("GET /stock/1", upstream)
    result = await b.call("GET /stock/1", upstream)
    assert result.status == "hit"
    assert result.value == {"body": b"\x01\x02", "status": 200}
    assert upstream.calls == 1


@pytest.mark.redis
async def test_l2_gives_stale_data_to_a_fresh_instance(
    l2_caches: tuple[ResponseCache, ResponseCache, ManualClock],
) -> None:
    """An instance with an empty L1 can still serve stale-if-error from Redis."""
    a, b, clock = l2_caches
    upstream = Upstream()
    await a.call("k", upstream)
    clock.advance(30)
    upstream.error = RetryExhaustedError()
    result = await b.call("k", upstream)
    assert result.stale
    assert result.age == pytest.approx(30)


@pytest.mark.redis
async def test_redis_killed_still_served_from_l1_with_one_event(
    l2_caches: tuple[ResponseCache, ResponseCache, ManualClock],
    redis_server: RedisServer,
    events: EventBus,
) -> None:
    """With Redis killed, calls answer from L1 without an exception; storage_down is sent once."""
    a, _b, clock = l2_caches
    seen = collect(events)
    upstream = Upstream()
    await a.call("k", upstream)
    redis_server.kill()
    for _ in range(5):
        result = await a.call("k", upstream)
        assert result.status == "hit"
    await a.set("other", 1)
    clock.advance(30)
    upstream.error = UpstreamError("down too")
    assert (await a.call("k", upstream)).stale
    clock.advance(6)  # past l2_retry_interval: tries Redis again, fails again, stays quiet
    assert (await a.call("k", upstream)).stale
    kinds = [e.kind for e in seen]
    # The storage's state changes once; each stale answer is an event of its own.
    assert kinds == ["cache.storage_down", "cache.stale_served", "cache.stale_served"]
    assert seen[0].name == "inv"
    assert not a.l2_available


@pytest.mark.redis
async def test_redis_stalled_holds_a_call_no_longer_than_l2_timeout(
    redis_server: RedisServer, events: EventBus
) -> None:
    """A Redis that accepts but never answers costs at most l2_timeout, then L1 alone answers."""
    cache = ResponseCache(ttl=10, redis_url=redis_server.url, events=events, l2_timeout=0.1)
    try:
        await cache.set("k", "v")
        cache.clear_local()
        redis_server.stall()
        loop = asyncio.get_running_loop()
        started = loop.time()
        result = await cache.call("k", _value)
        elapsed = loop.time() - started
        assert result.value == "v"
        assert elapsed < 0.5
        assert not cache.l2_available
    finally:
        redis_server.resume()
        await cache.aclose()


@pytest.mark.redis
async def test_redis_back_after_outage_is_used_again_with_recovered_event(
    redis_server: RedisServer, events: EventBus
) -> None:
    """After the retry interval a restarted Redis is used again, and recovery is published once."""
    clock = ManualClock()
    seen = collect(events)
    cache = ResponseCache(ttl=10, redis_url=redis_server.url, events=events, clock=clock)
    try:
        redis_server.kill()
        await cache.set("k", "v1")
        redis_server.start()
        clock.advance(6)
        await cache.set("k", "v2")
        cache.clear_local()
        entry = await cache.get("k")
        assert entry is not None
        assert entry.value == "v2"
        assert [(e.kind, e.level) for e in seen] == [
            ("cache.storage_down", logging.WARNING),
            ("cache.storage_recovered", logging.INFO),
        ]
    finally:
        await cache.aclose()


@pytest.mark.redis
async def test_httpx_response_snapshot_round_trips_through_redis_serializer(
    redis_server: RedisServer,
) -> None:
    """A read httpx response that one instance's transport cached in Redis is served by
    another's from Redis (snapshot -> JSON -> restore) with status, headers and body, as the
    answer to that instance's own request."""
    asked: list[httpx.Request] = []

    def upstream(request: httpx.Request) -> httpx.Response:
        asked.append(request)
        return httpx.Response(
            200, headers={"content-type": "application/json", "x-a": "1"}, content=b'{"n":1}'
        )

    async def get_once(cache: ResponseCache) -> httpx.Response:
        policy = HostPolicy(cache=cache, cache_ttl=60)
        transport = ResilientTransport(httpx.MockTransport(upstream), hosts={"upstream": policy})
        async with httpx.AsyncClient(transport=transport) as client:
            return await client.get("http://upstream/stock/1")

    first = ResponseCache(ttl=60, redis_url=redis_server.url)
    second = ResponseCache(ttl=60, redis_url=redis_server.url)
    try:
        original = await get_once(first)
        restored = await get_once(second)
    finally:
        await first.aclose()
        await second.aclose()
    assert len(asked) == 1
    assert original.json() == {"n": 1}
    assert restored.status_code == 200
    assert "hit" in restored.headers["cache-status"]
    assert restored.headers["x-a"] == "1"
    assert restored.json() == {"n": 1}
    assert restored.request.url == "http://upstream/stock/1"
    assert restored.request is not asked[0]


@pytest.mark.redis
async def test_health_check_is_degraded_while_redis_is_down(
    redis_server: RedisServer, events: EventBus
) -> None:
    """The readiness check says degraded, naming the cache, while Redis is treated as down."""
    cache = ResponseCache(ttl=10, redis_url=redis_server.url, events=events, name="inv")
    try:
        assert (await cache.health_check()).status == "ok"
        redis_server.kill()
        await cache.set("k", "v")
        result = await cache.health_check()
        assert result.status == "degraded"
        assert "inv" in (result.detail or "")
    finally:
        await cache.aclose()


async def test_coalescing_can_be_switched_off() -> None:
    """With coalesce=False every concurrent miss makes its own call."""
    cache = ResponseCache(ttl=10, clock=ManualClock(), coalesce=False)
    upstream = Upstream()
    await asyncio.gather(*(cache.call("k", upstream) for _ in range(5)))
    assert upstream.calls == 5


async def test_a_cancelled_follower_leaves_the_shared_call_running() -> None:
    """Cancelling one waiting caller cancels only that caller; the shared call completes."""
    cache = ResponseCache(ttl=10, clock=ManualClock())
    gate = asyncio.Event()

    async def slow() -> str:
        await gate.wait()
        return "v"

    leader = asyncio.ensure_future(cache.call("k", slow))
    await asyncio.sleep(0)
    follower = asyncio.ensure_future(cache.call("k", slow))
    await asyncio.sleep(0)
    follower.cancel()
    await asyncio.sleep(0)
    gate.set()
    assert (await leader).value == "v"
    with pytest.raises(asyncio.CancelledError):
        await follower


@pytest.mark.redis
async def test_delete_forgets_both_levels(
    l2_caches: tuple[ResponseCache, ResponseCache, ManualClock],
) -> None:
    """delete() removes the key from L1 and from Redis, so no instance finds it."""
    a, b, _clock = l2_caches
    await a.set("k", "v")
    await a.delete("k")
    assert await a.get("k") is None
    assert await b.get("k") is None


@pytest.mark.redis
async def test_values_redis_cannot_hold_stay_in_l1_without_error(
    l2_caches: tuple[ResponseCache, ResponseCache, ManualClock],
) -> None:
    """A value the serializer refuses is cached in L1 only; other instances miss it."""
    a, b, _clock = l2_caches
    await a.set("k", object())
    assert await a.get("k") is not None
    assert await b.get("k") is None
    assert a.l2_available


@pytest.mark.redis
async def test_a_corrupt_redis_entry_is_a_miss(
    l2_caches: tuple[ResponseCache, ResponseCache, ManualClock], redis_server: RedisServer
) -> None:
    """Garbage under a cache key (another writer, a format change) reads as a miss, not an error."""
    from redis.asyncio import Redis

    a, _b, _clock = l2_caches
    client = Redis.from_url(redis_server.url)
    try:
        await client.set(a.key_for("k"), b"not-a-cache-entry")
    finally:
        await client.aclose()
    assert await a.get("k") is None
    assert (await a.call("k", _value)).status == "miss"


async def test_middleware_sees_status_recorded_by_a_sync_route_in_the_thread_pool() -> None:
    """A sync route (run in a worker thread with a copied context) can still mark its answer."""
    app = FastAPI()

    @app.get("/sync")
    def sync_route() -> dict[str, bool]:
        record_cache_status(
            CacheResult("v", "stale", 12.0, -2.0, CircuitOpenError(), cache_name="inv")
        )
        return {"ok": True}

    app.add_middleware(CacheStatusMiddleware)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        response = await c.get("/sync")
    assert response.headers["Cache-Status"] == "inv; hit; ttl=-2; detail=circuit_open"
