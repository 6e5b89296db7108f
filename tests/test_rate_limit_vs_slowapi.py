"""Redis round trips per limited request, headers on: this library against slowapi."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from fastapi import FastAPI, Request, Response
from loopback import RedisServer

from fastapi_resilience import ResilienceSettings, install

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

REQUESTS = 20


async def commands_during(app: Any, redis_url: str) -> dict[str, int]:
    """Commands clients sent (MONITOR, script-internal ones left out) over REQUESTS requests."""
    observer = aioredis.Redis.from_url(redis_url)
    transport = httpx.ASGITransport(app=app)
    marker = aioredis.Redis.from_url(redis_url)
    seen: dict[str, int] = {}
    caught_up = asyncio.Event()

    async def watch(ready: asyncio.Event) -> None:
        async with observer.monitor() as monitor:
            ready.set()
            async for info in monitor.listen():
                if info["client_type"] != "lua":
                    name = info["command"].split(" ", 1)[0].lower()
                    seen[name] = seen.get(name, 0) + 1
                    if name == "echo":
                        caught_up.set()

    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            assert (await client.get("/x")).status_code == 200
            await marker.ping()  # its connection's handshake happens before the count starts
            ready = asyncio.Event()
            watcher = asyncio.create_task(watch(ready))
            await ready.wait()
            for _ in range(REQUESTS):
                answer = await client.get("/x")
                assert answer.status_code == 200
                assert "x-ratelimit-remaining" in answer.headers
            # MONITOR streams behind the commands: a marker command tells us it caught up.
            await marker.echo("done")
            await asyncio.wait_for(caught_up.wait(), 5)
            watcher.cancel()
    finally:
        await observer.aclose()
        await marker.aclose()
    seen.pop("echo", None)
    return seen


async def test_one_evalsha_per_request_where_slowapi_sends_three(redis_server: RedisServer) -> None:
    """Ours: one EVALSHA per request. slowapi: EVALSHA, then GET and TTL for its headers."""
    from slowapi import Limiter
    from slowapi.util import get_remote_address

    ours = FastAPI()
    settings = ResilienceSettings(
        rate_limit_storage=redis_server.url, rate_limit_tiers={"anonymous": "1000/minute"}
    )
    install(ours, settings)

    @ours.get("/x")
    async def x() -> dict[str, str]:
        return {"ok": "yes"}

    limiter = Limiter(
        key_func=get_remote_address, storage_uri=redis_server.url, headers_enabled=True
    )
    theirs = FastAPI()
    theirs.state.limiter = limiter

    @theirs.get("/x")
    @limiter.limit("1000/minute")
    async def slow_x(request: Request, response: Response) -> dict[str, str]:
        return {"ok": "yes"}

    mine = await commands_during(ours, redis_server.url)
    slowapi = await commands_during(theirs, redis_server.url)
    await ours.state.resilience.rate_limiter.aclose()
    print(f"per {REQUESTS} requests: fastapi-resilience {mine}, slowapi {slowapi}")
    assert mine == {"evalsha": REQUESTS}
    assert sum(slowapi.values()) >= 3 * REQUESTS
