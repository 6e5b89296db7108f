"""Two uvicorn processes sharing one Redis admit exactly the limit between them."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from loopback import RedisServer, UvicornProcess

pytestmark = [pytest.mark.anyio, pytest.mark.redis, pytest.mark.slow]

APP = "tests._rate_limit_app:app"


def app_env(redis_url: str, **extra: str) -> dict[str, str]:
    env = {
        "RESILIENCE_RATE_LIMIT_STORAGE": redis_url,
        "RESILIENCE_RATE_LIMIT_TIERS": json.dumps(
            {"anonymous": "100/minute", "premium": "100000/minute"}
        ),
        "RESILIENCE_RATE_LIMIT_API_KEYS": json.dumps({"warm-up-key": "premium"}),
        "RESILIENCE_RATE_LIMIT_EXEMPT_PATHS": json.dumps(["/exempt", "/health/live"]),
    }
    env.update(extra)
    return env


@pytest.fixture(name="two_apps")
def _two_apps(redis_server: RedisServer) -> Iterator[list[UvicornProcess]]:
    apps = [UvicornProcess(APP, env=app_env(redis_server.url)) for _ in range(2)]
    try:
        yield apps
    finally:
        for app in apps:
            app.stop()


async def command_calls(client: aioredis.Redis) -> dict[str, int]:
    stats: dict[str, Any] = await client.info("commandstats")
    return {name: int(value["calls"]) for name, value in stats.items()}


async def test_two_processes_admit_exactly_the_limit(
    two_apps: list[UvicornProcess], redis_server: RedisServer
) -> None:
    """400 concurrent requests from one identity over two processes: 100 admitted, 300 get 429."""
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    clients = [httpx.AsyncClient(base_url=app.url, limits=limits, timeout=30) for app in two_apps]
    observer = aioredis.Redis.from_url(redis_server.url)
    try:
        # Warm up each process (connection pool, script cache) under another identity.
        for c in clients:
            assert (
                await c.get("/limited", headers={"X-API-Key": "warm-up-key"})
            ).status_code == 200
        before = await command_calls(observer)
        answers = await asyncio.gather(*(clients[i % 2].get("/limited") for i in range(400)))
        after = await command_calls(observer)
    finally:
        for c in clients:
            await c.aclose()
        await observer.aclose()

    statuses = [a.status_code for a in answers]
    assert statuses.count(200) == 100
    assert statuses.count(429) == 300
    for answer in answers:
        assert "x-ratelimit-remaining" in answer.headers
        assert "ratelimit" in answer.headers
        if answer.status_code == 429:
            assert int(answer.headers["retry-after"]) >= 1
            assert answer.headers["content-type"] == "application/problem+json"
    # One round trip per request, headers included: EVALSHA once each. (INFO commandstats also
    # counts the commands the script runs inside Redis, and HELLO once per new pooled
    # connection, so those are not compared.)
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    assert delta["cmdstat_evalsha"] == 400
    assert delta.get("cmdstat_eval", 0) == 0
    assert delta.get("cmdstat_ping", 0) == 0
    assert delta.get("cmdstat_hello", 0) <= 400 // 10


async def test_route_and_tier_limits_are_shared_across_processes(
    two_apps: list[UvicornProcess],
) -> None:
    """A route limit of 5/minute admits 5 logins in total across both processes."""
    async with (
        httpx.AsyncClient(base_url=two_apps[0].url) as one,
        httpx.AsyncClient(base_url=two_apps[1].url) as two,
    ):
        answers = await asyncio.gather(*((one if i % 2 else two).post("/login") for i in range(12)))
        tier = await one.get("/limited")
    assert sorted(a.status_code for a in answers) == [200] * 5 + [429] * 7
    # Only the 5 admitted logins were counted against the tier.
    assert tier.headers["x-ratelimit-remaining"] == "94"
