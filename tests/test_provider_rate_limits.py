"""Must-show behaviour of provider rate-limit headers, the quota gate, the outbound rate limit and
the retry hooks, against a real upstream on loopback (ADR 0069).

The upstream (``tests/_provider_upstream.py``) runs under uvicorn in its own process, answers
what each test scripts and records when every request arrived, so "nothing reached it in
between" is counted where it happens.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from loopback import RedisServer, UvicornProcess

from fastapi_resilience import QuotaExhaustedError, RetryExhaustedError, resilient_client
from fastapi_resilience.correlation import set_correlation_id
from fastapi_resilience.events import Event, EventBus
from fastapi_resilience.exceptions import UpstreamStatusError
from fastapi_resilience.ratelimit import storage_from_url

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(name="provider_url", scope="module")
def _provider_url() -> Iterator[str]:
    server = UvicornProcess("tests._provider_upstream:app", cwd=ROOT)
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(name="provider")
async def _provider(provider_url: str) -> AsyncIterator[httpx.AsyncClient]:
    """A plain client to the upstream's control routes, reset before and after each test."""
    async with httpx.AsyncClient(base_url=provider_url, timeout=10) as client:
        await client.post("/reset")
        yield client
        await client.post("/reset")


async def arrivals(provider: httpx.AsyncClient) -> list[float]:
    return [float(t) for t in (await provider.get("/arrivals")).json()["arrivals"]]


async def until_arrived(provider: httpx.AsyncClient, count: int) -> None:
    """Poll the upstream (bounded: 5 s) until ``count`` requests have reached it."""
    for _ in range(500):
        if len(await arrivals(provider)) >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"fewer than {count} requests reached the upstream in 5 s")


async def warm_up(provider: httpx.AsyncClient, *clients: httpx.AsyncClient) -> None:
    """Open each client's connections (4 each, as the test's calls will use), let the limit's
    window empty, and forget those requests on the upstream: the first calls measured then do
    not pay a TCP connect that the later ones, on pooled connections, would not."""
    await asyncio.gather(*(client.get("/v1/thing") for client in clients for _ in range(4)))
    await asyncio.sleep(1.1)
    await provider.post("/reset")


async def script(provider: httpx.AsyncClient, *answers: dict[str, Any], **ok: str) -> None:
    await provider.post("/script", json={"answers": list(answers), "ok_headers": ok})


def recorder(bus: EventBus, prefix: str) -> list[Event]:
    seen: list[Event] = []
    bus.subscribe(lambda event: seen.append(event) if event.kind.startswith(prefix) else None)
    return seen


QUOTA_GONE = {
    "status": 429,
    "headers": {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "2s"},
}


async def test_a_429_with_a_reset_holds_every_call_until_the_reset(
    provider: httpx.AsyncClient, provider_url: str
) -> None:
    """429 + ``x-ratelimit-reset-requests: 2s``, then 200: the call waits about 2 s and its retry
    succeeds; a second call made meanwhile waits for the reset too; the upstream sees nothing in
    between."""
    await script(provider, QUOTA_GONE)
    bus = EventBus(log=False)
    events = recorder(bus, "outbound.quota")
    async with resilient_client(provider_url, events=bus) as client:
        started = time.monotonic()
        first = asyncio.create_task(client.get("/v1/thing"))
        await until_arrived(provider, 1)
        await asyncio.sleep(0.2)  # the 429 is back at the client: its gate is closed
        second_started = time.monotonic()
        second = asyncio.create_task(client.get("/v1/thing"))
        await asyncio.sleep(1.2)
        assert len(await arrivals(provider)) == 1  # nothing reached it while it was closed
        answers = await asyncio.gather(first, second)
        first_took = time.monotonic() - started
    assert [a.status_code for a in answers] == [200, 200]
    assert 1.9 <= first_took < 3.0
    assert time.monotonic() - second_started >= 1.5
    seen = await arrivals(provider)
    assert len(seen) == 3  # the 429, then the retry and the second call, after the reset
    assert min(t - seen[0] for t in seen[1:]) >= 1.9
    assert [e.kind for e in events] == ["outbound.quota_exhausted", "outbound.quota_restored"]
    assert events[0].attributes["reason"] == "x-ratelimit-remaining-requests"
    assert events[0].attributes["wait"] == pytest.approx(2.0)


async def test_a_wait_longer_than_max_delay_returns_the_429_and_later_calls_fail_fast(
    provider: httpx.AsyncClient, provider_url: str
) -> None:
    """``retry-after-ms`` beyond ``max_delay``: no retry, the 429 is the answer (as before); and
    the gate keeps the next calls from burning the upstream's quota: 503 ``quota_exhausted``,
    with the time left as Retry-After, and no request sent."""
    await script(
        provider,
        {"status": 429, "headers": {"retry-after-ms": "30000", "retry-after": "1"}},
    )
    async with resilient_client(provider_url, max_delay=10.0) as client:
        answer = await client.get("/v1/thing")
        assert answer.status_code == 429
        with pytest.raises(QuotaExhaustedError) as refused:
            await client.get("/v1/thing")
    assert refused.value.status_code == 503
    assert refused.value.code == "quota_exhausted"
    assert 25 < (refused.value.retry_after or 0) <= 30  # retry-after-ms won over Retry-After
    assert len(await arrivals(provider)) == 1


async def test_remaining_zero_on_a_success_closes_the_gate_for_its_reset(
    provider: httpx.AsyncClient, provider_url: str
) -> None:
    """A 200 that says ``x-ratelimit-remaining-tokens: 0`` with ``reset-tokens: 1s`` sends the
    next call after the reset, not into a 429."""
    tokens_gone = {"x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "1s"}
    await script(provider, {"status": 200, "headers": tokens_gone})
    async with resilient_client(provider_url) as client:
        assert (await client.get("/v1/thing")).status_code == 200
        assert (await client.get("/v1/thing")).status_code == 200
    first, second = await arrivals(provider)
    assert second - first >= 0.95


async def test_the_outbound_limit_lets_five_a_second_through_and_the_rest_wait(
    provider: httpx.AsyncClient, provider_url: str
) -> None:
    async with resilient_client(provider_url, rate_limit="5/second") as client:
        await warm_up(provider, client)
        started = time.monotonic()
        answers = await asyncio.gather(*(client.get("/v1/thing") for _ in range(8)))
        took = time.monotonic() - started
    assert [a.status_code for a in answers] == [200] * 8
    seen = sorted(await arrivals(provider))
    assert len(seen) == 8
    assert sum(t - seen[0] < 0.95 for t in seen) == 5  # at most 5 within the first second
    assert 0.95 <= took < 3.0


async def test_the_outbound_limit_fails_fast_without_a_wait(
    provider: httpx.AsyncClient, provider_url: str
) -> None:
    async with resilient_client(provider_url, rate_limit="5/second", rate_limit_wait=0) as client:
        outcomes = await asyncio.gather(
            *(client.get("/v1/thing") for _ in range(8)), return_exceptions=True
        )
    served = [o for o in outcomes if isinstance(o, httpx.Response)]
    refused = [o for o in outcomes if isinstance(o, QuotaExhaustedError)]
    assert len(served) == 5
    assert len(refused) == 3
    assert all(e.extensions["reason"] == "rate_limit" for e in refused)
    assert all(0 < (e.retry_after or 0) <= 1.1 for e in refused)
    assert len(await arrivals(provider)) == 5


@pytest.mark.redis
async def test_two_clients_share_one_outbound_limit_through_redis(
    provider: httpx.AsyncClient, provider_url: str, redis_server: RedisServer
) -> None:
    """Two clients (two storages, as two processes would have) keep one limit of 5/second for
    the host: at most 5 of their 8 calls reach it within the first second; without a wait,
    exactly 5 go and 3 fail fast."""
    storages = [storage_from_url(redis_server.url) for _ in range(2)]
    try:
        clients = [
            resilient_client(provider_url, rate_limit="5/second", rate_limit_storage=storage)
            for storage in storages
        ]
        await warm_up(provider, *clients)
        answers = await asyncio.gather(*(clients[i % 2].get("/v1/thing") for i in range(8)))
        assert [a.status_code for a in answers] == [200] * 8
        seen = sorted(await arrivals(provider))
        assert sum(t - seen[0] < 0.95 for t in seen) == 5
        for client in clients:
            await client.aclose()

        await provider.post("/reset")
        await asyncio.sleep(1.1)  # the window above has emptied
        clients = [
            resilient_client(
                provider_url, rate_limit="5/second", rate_limit_storage=storage, rate_limit_wait=0
            )
            for storage in storages
        ]
        outcomes = await asyncio.gather(
            *(clients[i % 2].get("/v1/thing") for i in range(8)), return_exceptions=True
        )
        for client in clients:
            await client.aclose()
    finally:
        for storage in storages:
            await storage.aclose()
    assert sum(isinstance(o, httpx.Response) for o in outcomes) == 5
    assert sum(isinstance(o, QuotaExhaustedError) for o in outcomes) == 3
    assert len(await arrivals(provider)) == 5


async def test_retry_hooks_and_the_retry_log_line_through_the_client(
    provider: httpx.AsyncClient, provider_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Three 503s: ``on_retry`` is told of attempts 2 and 3 with their waits, ``on_giveup`` of
    the 3 attempts and the last error; a hook that raises changes nothing; each retry is one
    INFO line with the correlation ID, the attempt, the wait and the (escaped) cause."""
    await script(
        provider,
        {"status": 503, "headers": {"retry-after-ms": "50"}},
        {"status": 503, "headers": {"retry-after-ms": "50"}},
        {"status": 503},
    )
    retried: list[tuple[int, float, BaseException]] = []
    gave_up: list[tuple[int, BaseException]] = []

    async def on_retry(attempt: int, delay: float, error: BaseException) -> None:
        retried.append((attempt, delay, error))
        raise RuntimeError("a broken hook")

    def on_giveup(attempts: int, error: BaseException) -> None:
        gave_up.append((attempts, error))
        raise RuntimeError("another broken hook")

    set_correlation_id("req-4242")
    caplog.set_level(logging.INFO, logger="fastapi_resilience.retry")
    async with resilient_client(
        provider_url, on_retry=on_retry, on_giveup=on_giveup, jitter=False
    ) as client:
        with pytest.raises(RetryExhaustedError) as failed:
            await client.get("/v1/thing")
    set_correlation_id(None)
    assert isinstance(failed.value.__cause__, UpstreamStatusError)
    assert [(a, round(d, 3)) for a, d, _ in retried] == [(2, 0.1), (3, 0.2)]
    assert all(isinstance(e, UpstreamStatusError) for _, _, e in retried)
    assert gave_up == [(3, failed.value.__cause__)]
    lines = [r for r in caplog.records if r.name == "fastapi_resilience.retry"]
    info = [r for r in lines if r.levelno == logging.INFO]
    assert len(info) == 2
    for record, attempt in zip(info, (2, 3), strict=True):
        message = record.getMessage()
        assert f"attempt={attempt}/3" in message
        assert "cause=UpstreamStatusError: Upstream 127.0.0.1:" in message
        assert "answered 503" in message
        assert "correlation_id=req-4242" in message
        assert record.correlation_id == "req-4242"  # type: ignore[attr-defined]
    assert "wait=0.100s" in info[0].getMessage()
    assert len([r for r in lines if r.levelno == logging.ERROR]) == 3  # each hook failure
    sent = (await provider.get("/arrivals")).json()["request_ids"]
    assert sent == ["req-4242"] * 3
