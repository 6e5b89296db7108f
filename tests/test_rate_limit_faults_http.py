"""Redis faults seen over HTTP: killed (fail-open, fail-closed), stalled, and back again."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import httpx
import pytest
import redis.asyncio as aioredis
from loopback import RedisServer, UvicornProcess

pytestmark = [pytest.mark.anyio, pytest.mark.redis, pytest.mark.slow]

APP = "tests._rate_limit_app:app"
REDUCED_CAPACITY = "https://iana.org/assignments/http-problem-types#temporary-reduced-capacity"
#: The default storage timeout the contract promises (at most 250 ms).
STORAGE_TIMEOUT = 0.25
#: Slack for scheduling on a loaded 2-core machine; a waiting request would show 250 ms.
SLACK = 0.15
#: "Did not wait": far below the 250 ms a request waiting on the stalled storage would show,
#: with room for a busy CI machine (typical: 3-10 ms).
NO_WAIT = 0.200


def start_app(redis_server: RedisServer, **extra: str) -> UvicornProcess:
    env = {
        "RESILIENCE_RATE_LIMIT_STORAGE": redis_server.url,
        "RESILIENCE_RATE_LIMIT_TIERS": json.dumps({"anonymous": "100000/minute"}),
        "RESILIENCE_RATE_LIMIT_EXEMPT_PATHS": json.dumps(["/exempt", "/health/live"]),
        **extra,
    }
    return UvicornProcess(APP, env=env)


@pytest.fixture(name="fail_open_app")
def _fail_open_app(redis_server: RedisServer) -> Iterator[UvicornProcess]:
    app = start_app(redis_server)
    yield app
    app.stop()


@pytest.fixture(name="fail_closed_app")
def _fail_closed_app(redis_server: RedisServer) -> Iterator[UvicornProcess]:
    app = start_app(redis_server, RESILIENCE_RATE_LIMIT_FAIL_OPEN="false")
    yield app
    app.stop()


async def timed_get(client: httpx.AsyncClient, path: str) -> tuple[httpx.Response, float]:
    start = time.perf_counter()
    answer = await client.get(path)
    return answer, time.perf_counter() - start


def p99(latencies: list[float]) -> float:
    ordered = sorted(latencies)
    return ordered[max(0, int(len(ordered) * 0.99) - 1)]


async def seconds_until_redis_counts(client: httpx.AsyncClient, redis_url: str) -> float:
    """Send requests until the (empty, restarted) Redis holds counts again; return the time."""
    observer = aioredis.Redis.from_url(redis_url)
    start = time.perf_counter()
    try:
        while time.perf_counter() - start < 10:
            answer = await client.get("/limited")
            if answer.status_code == 200 and await observer.dbsize() > 0:
                return time.perf_counter() - start
            await asyncio.sleep(0.05)  # pacing the probe traffic, not waiting for a result
    finally:
        await observer.aclose()
    return float("inf")


async def test_redis_killed_fail_open(
    fail_open_app: UvicornProcess, redis_server: RedisServer
) -> None:
    """Redis killed mid-traffic: every request is 2xx and fast; counting resumes within 5 s."""
    async with httpx.AsyncClient(base_url=fail_open_app.url, timeout=10) as client:
        baseline = []
        for _ in range(300):
            answer, seconds = await timed_get(client, "/limited")
            assert answer.status_code == 200
            baseline.append(seconds)
        redis_server.kill()
        latencies = []
        for _ in range(300):
            answer, seconds = await timed_get(client, "/limited")
            assert answer.status_code == 200
            latencies.append(seconds)
        ready = await client.get("/health/ready")
        assert ready.json()["status"] == "degraded"
        assert ready.json()["checks"]["rate_limit_storage"]["status"] == "degraded"

        redis_server.start()
        resumed_after = await seconds_until_redis_counts(client, redis_server.url)
        assert (await client.get("/health/ready")).json()["status"] == "ok"
    print(
        f"fail-open: p99 {p99(latencies) * 1000:.1f} ms with Redis down, "
        f"{p99(baseline) * 1000:.1f} ms with it up, over {len(latencies)} requests each"
    )
    # The goal is 50 ms; on a machine so loaded that even a healthy Redis gives a p99 above
    # 25 ms, "down costs no more than twice what up costs" is the meaningful bound.
    assert p99(latencies) < max(0.050, 2 * p99(baseline))
    assert resumed_after < 5.0
    print(f"fail-open: counting in Redis again {resumed_after:.2f} s after it came back")


async def test_redis_killed_fail_closed(
    fail_closed_app: UvicornProcess, redis_server: RedisServer
) -> None:
    """Fail-closed: while Redis is dead requests get 503 problem+json with Retry-After, then 200."""
    async with httpx.AsyncClient(base_url=fail_closed_app.url, timeout=10) as client:
        assert (await client.get("/limited")).status_code == 200
        redis_server.kill()
        answers = [await client.get("/limited") for _ in range(20)]
        exempt = await client.get("/exempt")
        redis_server.start()
        resumed_after = await seconds_until_redis_counts(client, redis_server.url)
    for answer in answers:
        assert answer.status_code == 503
        assert answer.headers["content-type"] == "application/problem+json"
        assert int(answer.headers["retry-after"]) >= 1
        body = answer.json()
        assert body["type"] == REDUCED_CAPACITY
        assert body["code"] == "service_unavailable"
        assert body["violated-policies"] == ["anonymous"]
    assert exempt.status_code == 200
    assert resumed_after < 5.0


@pytest.fixture(name="fail_closed_ready_app")
def _fail_closed_ready_app(redis_server: RedisServer) -> Iterator[UvicornProcess]:
    # The health paths exempt, as by default (this module's apps limit /health/ready).
    exempt = json.dumps(["/exempt", "/health/live", "/health/ready"])
    app = start_app(
        redis_server,
        RESILIENCE_RATE_LIMIT_FAIL_OPEN="false",
        RESILIENCE_RATE_LIMIT_EXEMPT_PATHS=exempt,
    )
    yield app
    app.stop()


async def test_fail_closed_readiness_is_unhealthy_while_redis_is_down(
    fail_closed_ready_app: UvicornProcess, redis_server: RedisServer
) -> None:
    """Failing closed, a dead Redis stops the service: while requests get 503, readiness is 503
    ``unhealthy`` and names the storage, before and after its breaker opened; then ok again.
    (No readiness call before the kill: its "ok" would be served again for
    ``health_cache_seconds``, until the storage is declared down.)"""
    async with httpx.AsyncClient(base_url=fail_closed_ready_app.url, timeout=10) as client:
        assert (await client.get("/limited")).status_code == 200
        redis_server.kill()
        first = await client.get("/health/ready")  # the storage's breaker is still closed
        answers = [await client.get("/limited") for _ in range(5)]
        later = await client.get("/health/ready")  # now it is open
        redis_server.start()
        resumed_after = await seconds_until_redis_counts(client, redis_server.url)
        back = await client.get("/health/ready")
    assert [answer.status_code for answer in answers] == [503] * 5
    for ready in (first, later):
        assert ready.status_code == 503
        assert ready.json()["status"] == "unhealthy"
        assert ready.json()["checks"]["rate_limit_storage"]["status"] == "unhealthy"
    assert resumed_after < 5.0
    assert (back.status_code, back.json()["status"]) == (200, "ok")


async def test_redis_stalled_no_request_waits_past_the_timeout(
    fail_open_app: UvicornProcess, redis_server: RedisServer
) -> None:
    """A stalled Redis holds a request at most the storage timeout; then no request waits."""
    async with httpx.AsyncClient(base_url=fail_open_app.url, timeout=10) as client:
        for _ in range(5):
            assert (await client.get("/limited")).status_code == 200
        redis_server.stall()
        try:
            # The first requests meet the stall while exempt requests run alongside them.
            first = [timed_get(client, "/limited") for _ in range(3)]
            exempt = [timed_get(client, "/exempt") for _ in range(3)]
            stalled = await asyncio.gather(*first, *exempt)
            after_open = [await timed_get(client, "/limited") for _ in range(50)]
            exempt_later = [await timed_get(client, "/exempt") for _ in range(40)]
        finally:
            redis_server.resume()
    for answer, seconds in stalled[:3]:
        assert answer.status_code == 200
        assert seconds < STORAGE_TIMEOUT + SLACK
    # Every answer is 200. A request waiting on the stalled storage would take >= 250 ms; on
    # a shared 2-core machine an occasional request is delayed by the scheduler instead, so
    # the claim is checked on the median and the 95th percentile rather than the maximum.
    for group in (stalled[3:] + exempt_later, after_open):
        assert all(answer.status_code == 200 for answer, _ in group)
        seconds = sorted(s for _, s in group)
        assert seconds[len(seconds) // 2] < 0.030
        assert seconds[int(len(seconds) * 0.95) - 1] < NO_WAIT
    waits = sorted(seconds for _, seconds in after_open)
    print(
        f"stalled Redis: first requests {[round(s * 1000) for _, s in stalled[:3]]} ms, "
        f"then median {waits[len(waits) // 2] * 1000:.1f} ms, max {waits[-1] * 1000:.1f} ms"
    )
