"""Streamed answers through the resilient client, against a real streaming upstream on
loopback (``tests/_stream_upstream.py`` under uvicorn): unbuffered, counted once by how they
ended, never retried once bytes reached the caller, and resumed with ``Last-Event-ID``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from loopback import UvicornProcess

from fastapi_resilience import (
    CircuitBreaker,
    CircuitOpenError,
    ResilienceSettings,
    Retry,
    RetryExhaustedError,
    StreamCutError,
    UpstreamTimeoutError,
    deadline,
    install,
    resilient_client,
)
from fastapi_resilience.outbound import HostPolicy, ServerSentEvent, sse_events
from fastapi_resilience.testing import ManualClock
from tests._metrics import value

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(name="upstream_url", scope="module")
def _upstream_url() -> Iterator[str]:
    server = UvicornProcess("tests._stream_upstream:app", cwd=ROOT)
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(name="control")
async def _control(upstream_url: str) -> AsyncIterator[httpx.AsyncClient]:
    """A plain client that reads and resets the upstream's state around each test."""
    async with httpx.AsyncClient(base_url=upstream_url, timeout=10) as client:
        await client.post("/reset")
        yield client
        await client.post("/reset")


async def state(control: httpx.AsyncClient) -> dict[str, Any]:
    return dict((await control.get("/state")).json())


def client_with_breaker(
    url: str,
    breaker: CircuitBreaker,
    *,
    attempts: int = 3,
    stream_idle_timeout: float | None = 60.0,
) -> httpx.AsyncClient:
    """A resilient client whose policy for the upstream holds ``breaker`` (retries without
    delay)."""
    retry = Retry(attempts, base_delay=0.0, jitter=False) if attempts > 1 else None
    policy = HostPolicy(
        retry=retry, breaker=breaker, timeout=10.0, stream_idle_timeout=stream_idle_timeout
    )
    return resilient_client(url, hosts={httpx.URL(url).netloc.decode(): policy})


def new_breaker(name: str, **kwargs: Any) -> CircuitBreaker:
    return CircuitBreaker(name, registry=None, **kwargs)


async def collect_events(
    client: httpx.AsyncClient, into: list[ServerSentEvent], **kwargs: Any
) -> None:
    """Append the events of ``GET /events`` to ``into`` as they come (kept on an error)."""
    async for event in sse_events(client, "GET", "/events", **kwargs):
        into.append(event)


async def stream_into(client: httpx.AsyncClient, into: list[bytes], params: dict[str, Any]) -> None:
    """Append the chunks of ``client.stream("GET", "/events")`` to ``into`` as they come."""
    async with client.stream("GET", "/events", params=params) as response:
        async for chunk in response.aiter_bytes():
            into.append(chunk)


async def test_the_first_event_arrives_before_the_upstream_sends_the_last(
    upstream_url: str, control: httpx.AsyncClient
) -> None:
    """Of 1,000 events, the first reaches the caller while the upstream holds the other 999
    back until the caller, having it, opens the gate: a buffered client would wait for ever."""
    async with resilient_client(upstream_url) as client:
        events = sse_events(client, "GET", "/events", params={"n": 1000, "gate": 1})
        async with aclosing(events):
            first = await anext(events)
            assert first == ServerSentEvent("message", "event 1", "1")
            assert (await state(control))["sent"] == 1
            await control.post("/gate")
            rest = [event async for event in events]
    assert [e.data for e in rest] == [f"event {i}" for i in range(2, 1001)]
    assert (await state(control))["sent"] == 1000


async def test_client_stream_passes_chunks_unbuffered(
    upstream_url: str, control: httpx.AsyncClient
) -> None:
    """``client.stream(...)`` on the resilient client gets the first chunk before the rest
    is sent, whatever the body's type."""
    client = resilient_client(upstream_url)
    async with client, client.stream("GET", "/events", params={"n": 1000, "gate": 1}) as response:
        chunks = response.aiter_bytes()
        assert await anext(chunks) == b"id: 1\ndata: event 1\n\n"
        assert (await state(control))["sent"] == 1
        await control.post("/gate")
        body = b"".join([chunk async for chunk in chunks])
    assert body.count(b"data: ") == 999


async def test_a_complete_stream_counts_one_success(
    upstream_url: str, control: httpx.AsyncClient
) -> None:
    breaker = new_breaker("stream-complete")
    client = client_with_breaker(upstream_url, breaker)
    async with client, client.stream("GET", "/events", params={"n": 20}) as response:
        assert (breaker.calls_succeeded, breaker.calls_failed) == (0, 0)  # not yet judged
        body = await response.aread()
    assert body.count(b"data: ") == 20
    assert (breaker.calls_succeeded, breaker.calls_failed) == (1, 0)


async def test_a_stream_cut_midway_counts_one_failure_and_is_not_retried(
    upstream_url: str, control: httpx.AsyncClient
) -> None:
    """The upstream breaks the connection after 5 events: the caller has the 5, then a
    StreamCutError from the iterator; the breaker counts one failure, the upstream saw one
    request."""
    breaker = new_breaker("stream-cut")
    received: list[ServerSentEvent] = []
    async with client_with_breaker(upstream_url, breaker, attempts=3) as client:
        with pytest.raises(StreamCutError) as raised:
            await collect_events(client, received, params={"cut_after": 5})
    assert [e.id for e in received] == ["1", "2", "3", "4", "5"]
    assert raised.value.status_code == 502
    assert (breaker.calls_succeeded, breaker.calls_failed) == (0, 1)
    assert (await state(control))["hits"] == 1


async def test_a_caller_that_stops_early_counts_neither(
    upstream_url: str, control: httpx.AsyncClient
) -> None:
    breaker = new_breaker("stream-early")
    client = client_with_breaker(upstream_url, breaker)
    async with client, client.stream("GET", "/events", params={"n": 1000, "gate": 1}) as response:
        await anext(response.aiter_bytes())
    assert (breaker.calls_succeeded, breaker.calls_failed) == (0, 0)


async def test_a_half_open_trial_is_held_until_the_stream_ends(
    upstream_url: str, control: httpx.AsyncClient
) -> None:
    """A stream admitted as the half-open trial keeps the permit while it streams (a second
    call is refused), and its end closes the breaker."""
    clock = ManualClock()
    breaker = new_breaker("stream-trial", failure_threshold=1, recovery_timeout=30, clock=clock)
    breaker.force_open()
    clock.advance(31)
    async with client_with_breaker(upstream_url, breaker, attempts=1) as client:
        async with client.stream("GET", "/events", params={"n": 1000, "gate": 1}) as response:
            chunks = response.aiter_bytes()
            await anext(chunks)
            with pytest.raises(CircuitOpenError):
                await client.get("/events", params={"n": 1})
            during = breaker.state
            await control.post("/gate")
            async for _ in chunks:
                pass
        assert (during, breaker.state) == ("half_open", "closed")


async def test_an_idle_gap_longer_than_stream_idle_timeout_fails_once(
    upstream_url: str, control: httpx.AsyncClient
) -> None:
    """The upstream goes silent after 2 events: the stream ends with UpstreamTimeoutError
    after stream_idle_timeout, counted as one failure and not retried."""
    breaker = new_breaker("stream-idle")
    received: list[bytes] = []
    async with client_with_breaker(upstream_url, breaker, stream_idle_timeout=0.3) as client:
        with pytest.raises(UpstreamTimeoutError) as raised:
            await stream_into(client, received, {"stall_after": 2})
    assert len(received) == 2
    assert raised.value.extensions["stream_idle_timeout"] == 0.3
    assert (breaker.calls_succeeded, breaker.calls_failed) == (0, 1)
    assert (await state(control))["hits"] == 1


async def test_the_request_deadline_bounds_a_stream(
    upstream_url: str, control: httpx.AsyncClient
) -> None:
    """A stream cannot outlive the request's deadline, however long the idle timeout."""
    breaker = new_breaker("stream-deadline")
    received: list[bytes] = []
    async with client_with_breaker(upstream_url, breaker, stream_idle_timeout=60) as client:
        with deadline(0.5), pytest.raises(UpstreamTimeoutError) as raised:
            await stream_into(client, received, {"stall_after": 1})
    assert len(received) == 1
    assert raised.value.detail == "The request's deadline ran out before the upstream answered."
    assert (breaker.calls_succeeded, breaker.calls_failed) == (0, 1)


async def test_a_5xx_before_the_first_byte_is_retried(
    upstream_url: str, control: httpx.AsyncClient
) -> None:
    breaker = new_breaker("stream-5xx")
    async with client_with_breaker(upstream_url, breaker, attempts=2) as client:
        events = [e async for e in sse_events(client, "GET", "/events", params={"fail_first": 1})]
    assert len(events) == 10
    assert (await state(control))["hits"] == 2
    assert (breaker.calls_succeeded, breaker.calls_failed) == (1, 1)


async def test_resume_reconnects_with_last_event_id(
    upstream_url: str, control: httpx.AsyncClient
) -> None:
    """Cut after 5 events, the helper waits the server's retry (50 ms) and reconnects with
    Last-Event-ID: 5; the upstream goes on from 6, and the caller sees 1..10 once each."""
    breaker = new_breaker("stream-resume")
    async with client_with_breaker(upstream_url, breaker) as client:
        events = [
            event
            async for event in sse_events(
                client,
                "GET",
                "/events",
                params={"cut_after": 5, "retry": 50},
                resume=True,
            )
        ]
    assert [e.id for e in events] == [str(i) for i in range(1, 11)]
    seen = await state(control)
    assert seen["last_event_ids"] == [None, "5"]
    assert (breaker.calls_succeeded, breaker.calls_failed) == (1, 1)


async def test_resume_gives_up_after_max_reconnects(
    upstream_url: str, control: httpx.AsyncClient
) -> None:
    """A stream that keeps stalling is opened 1 + max_reconnects times, then fails."""
    async with resilient_client(upstream_url, stream_idle_timeout=0.2) as client:
        with pytest.raises(UpstreamTimeoutError):
            async for _ in sse_events(
                client,
                "GET",
                "/events",
                params={"stall_after": 1, "retry": 10},
                resume=True,
                max_reconnects=2,
                headers={"X-Test": "1"},
            ):
                pass
    assert (await state(control))["last_event_ids"] == [None, "1", "2"]


async def test_outbound_durations_count_a_stream_when_it_ends(
    upstream_url: str, control: httpx.AsyncClient
) -> None:
    """/metrics times a streamed call once, by how it ended: a cut stream is a failure."""
    app = FastAPI()
    install(app, ResilienceSettings(rate_limit_enabled=False))
    host = httpx.URL(upstream_url).netloc.decode()
    metric = "fastapi_resilience_outbound_duration_seconds_count"
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://t"
    ) as scraper:
        before = (await scraper.get("/metrics")).text
        async with resilient_client(upstream_url) as client:
            async with client.stream("GET", "/events", params={"cut_after": 3}) as r:
                during = (await scraper.get("/metrics")).text
                with pytest.raises(StreamCutError):
                    await r.aread()
            async with client.stream("GET", "/events", params={"n": 3}) as r:
                await r.aread()
        after = (await scraper.get("/metrics")).text

    def moved(text: str, outcome: str) -> float:
        return value(text, metric, upstream=host, outcome=outcome) - value(
            before, metric, upstream=host, outcome=outcome
        )

    assert moved(during, "failure") == 0  # not timed at the headers
    assert moved(after, "failure") == 1
    assert moved(after, "success") == 1


async def test_a_plain_get_is_still_read_whole_inside_the_timeout(
    upstream_url: str, control: httpx.AsyncClient
) -> None:
    """Without streaming, the body is read inside the attempt as before: a stall is the
    attempt's timeout, retried, not the idle timeout."""
    async with resilient_client(upstream_url, timeout=0.3, attempts=2, base_delay=0.0) as client:
        with pytest.raises(RetryExhaustedError) as raised:
            await client.get("/events", params={"stall_after": 1})
    assert isinstance(raised.value.__cause__, UpstreamTimeoutError)
    assert (await state(control))["hits"] == 2


async def test_a_breaker_permit_counts_once_and_abandon_gives_the_trial_back() -> None:
    """``admit()`` holds a half-open trial until settled; ``abandon()`` counts nothing and
    frees the trial; a permit settles only once."""
    clock = ManualClock()
    breaker = new_breaker("permit", failure_threshold=1, recovery_timeout=10, clock=clock)
    breaker.force_open()
    clock.advance(11)
    permit = await breaker.admit()
    with pytest.raises(CircuitOpenError):
        await breaker.admit()
    await permit.abandon()
    await permit.settle(RuntimeError("too late"))
    assert (breaker.calls_succeeded, breaker.calls_failed) == (0, 0)
    trial = await breaker.admit()
    await trial.settle()
    assert (breaker.calls_succeeded, breaker.state) == (1, "closed")
