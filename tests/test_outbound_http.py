"""Must-show behaviour of breakers, deadlines and bulkheads against a real upstream on loopback.

The upstream (``tests/_outbound_upstream.py``) runs under uvicorn in its own process and
counts the requests that reach it; the app under test is a FastAPI app driven in-process.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import Depends, FastAPI
from loopback import UvicornProcess
from starlette.types import ASGIApp, Receive, Scope, Send

from fastapi_resilience import (
    Bulkhead,
    CircuitBreaker,
    CorrelationIdMiddleware,
    RequestDeadlineMiddleware,
    breaker_dependency,
    bulkhead_dependency,
    get_breaker,
    get_bulkhead,
    install_exception_handlers,
    remaining,
    resilient_client,
    timeout,
)
from fastapi_resilience.exceptions import UpstreamError, UpstreamTimeoutError
from fastapi_resilience.outbound import BreakerRegistry, BulkheadRegistry, TieredBulkhead
from fastapi_resilience.testing import ManualClock

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent

#: RFC 9457's media type, the Content-Type of every problem answer.
PROBLEM_CONTENT_TYPE = "application/problem+json"
#: Where the rate limiter (or a middleware of the app's own) records the request's tier, as
#: docs/bulkhead.md names it.
TIER_SCOPE_KEY = "fastapi_resilience.rate_limit_tier"


@pytest.fixture(name="upstream_url", scope="module")
def _upstream_url() -> Iterator[str]:
    """The flaky upstream, one uvicorn process for the module."""
    server = UvicornProcess("tests._outbound_upstream:app", cwd=ROOT)
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(name="upstream")
async def _upstream(upstream_url: str) -> AsyncIterator[httpx.AsyncClient]:
    """A client to the upstream, reset to healthy with zero hits before and after each test."""
    async with httpx.AsyncClient(base_url=upstream_url, timeout=10) as client:
        await client.post("/reset")
        yield client
        await client.post("/reset")


async def hits(upstream: httpx.AsyncClient) -> int:
    return int((await upstream.get("/hits")).json()["hits"])


def fetcher(upstream: httpx.AsyncClient) -> Any:
    """The app's own upstream call: a 5xx or a transport error becomes an UpstreamError."""

    async def fetch(delay: float = 0.0, hold: bool = False) -> dict[str, Any]:
        params: dict[str, Any] = {"delay": delay}
        if hold:
            params["hold"] = 1
        try:
            response = await upstream.get("/item", params=params)
        except httpx.TransportError as exc:
            raise UpstreamError("inventory unreachable") from exc
        if response.status_code >= 500:
            raise UpstreamError(f"inventory answered {response.status_code}")
        return dict(response.json())

    return fetch


def client_for(app: ASGIApp) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


@pytest.mark.parametrize("half_open_max_calls", [1, 3])
async def test_breaker_against_real_upstream(
    upstream: httpx.AsyncClient, half_open_max_calls: int, default_breakers: BreakerRegistry
) -> None:
    """Opens after the threshold, spares the upstream while open (503 circuit_open with
    Retry-After), lets at most half_open_max_calls of 100 concurrent callers through after
    recovery, and closes on their success."""
    clock = ManualClock()
    breaker = CircuitBreaker(
        "inventory-http",
        failure_threshold=5,
        recovery_timeout=30,
        half_open_max_calls=half_open_max_calls,
        clock=clock,
    )
    fetch = fetcher(upstream)
    app = FastAPI()
    install_exception_handlers(app)

    @app.get("/stock")
    async def stock(
        hold: bool = False,
        b: CircuitBreaker = Depends(breaker_dependency("inventory-http")),  # noqa: B008
    ) -> dict[str, Any]:
        return await b.call(fetch, 0.0, hold)

    try:
        async with client_for(app) as client:
            await upstream.post("/mode/fail")
            for _ in range(5):
                assert (await client.get("/stock")).status_code == 502
            assert breaker.state == "open"
            assert await hits(upstream) == 5

            for _ in range(20):
                answer = await client.get("/stock")
                assert answer.status_code == 503
                assert answer.headers["content-type"] == PROBLEM_CONTENT_TYPE
                assert answer.json()["code"] == "circuit_open"
                assert answer.headers["retry-after"] == "30"
            assert await hits(upstream) == 5, "no upstream call while open"

            clock.advance(30)
            await upstream.post("/mode/ok")
            # The upstream holds the trial calls until every other caller has been answered,
            # so all 100 arrive while the trials are in flight, however slow the machine.
            calls = [
                asyncio.create_task(client.get("/stock", params={"hold": 1})) for _ in range(100)
            ]
            for _ in range(1000):  # bounded: at most ~10 s
                if sum(c.done() for c in calls) == 100 - half_open_max_calls:
                    break
                await asyncio.sleep(0.01)
            assert await hits(upstream) - 5 == half_open_max_calls
            await upstream.post("/release")
            answers = await asyncio.gather(*calls)
            statuses = [a.status_code for a in answers]
            assert await hits(upstream) - 5 == half_open_max_calls
            assert statuses.count(200) == half_open_max_calls
            assert statuses.count(503) == 100 - half_open_max_calls
            assert {a.json()["code"] for a in answers if a.status_code == 503} == {"circuit_open"}

            assert breaker.state == "closed"
            assert (await client.get("/stock")).status_code == 200
            assert await hits(upstream) == 6 + half_open_max_calls
    finally:
        default_breakers.unregister("inventory-http")


@pytest.mark.parametrize("route_uses_timeout", [True, False], ids=["timeout()", "middleware"])
async def test_request_deadline_answers_504_in_time(
    upstream: httpx.AsyncClient, route_uses_timeout: bool
) -> None:
    """An upstream that hangs makes the route answer 504 upstream_timeout within the
    request's 0.3 s deadline plus 100 ms, whether the route uses timeout() or not."""
    app = FastAPI()
    install_exception_handlers(app)
    app.add_middleware(RequestDeadlineMiddleware, timeout=0.3)
    app.add_middleware(CorrelationIdMiddleware)
    fetch = fetcher(upstream)

    @app.get("/stock")
    async def stock() -> dict[str, Any]:
        if route_uses_timeout:
            # Asks for 5 s, gets what is left of the request's 0.3 s.
            async with timeout(5.0):
                return await fetch()
        return await fetch()

    await upstream.post("/mode/hang")
    async with client_for(app) as client:
        started = time.perf_counter()
        answer = await client.get("/stock")
        elapsed = time.perf_counter() - started
    assert answer.status_code == 504
    assert answer.headers["content-type"] == PROBLEM_CONTENT_TYPE
    assert answer.json()["code"] == "upstream_timeout"
    assert answer.headers["x-request-id"] == answer.json()["correlation_id"]
    print(f"504 after {elapsed * 1000:.0f} ms with a 300 ms deadline")
    assert elapsed < 0.3 + 0.1, f"answered after {elapsed:.3f}s"
    assert await hits(upstream) == 1


class TierFromHeader:
    """Stands in for the rate limiter: puts the X-Tier header's tier into the scope."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for key, value in scope["headers"]:
                if key == b"x-tier":
                    scope[TIER_SCOPE_KEY] = value.decode()
        await self.app(scope, receive, send)


def search_app(upstream: httpx.AsyncClient) -> FastAPI:
    app = FastAPI()
    install_exception_handlers(app)
    app.add_middleware(TierFromHeader)
    fetch = fetcher(upstream)

    @app.get("/search")
    async def search(
        delay: float = 0.0,
        bulkhead: Bulkhead = Depends(bulkhead_dependency("search-http")),  # noqa: B008
    ) -> dict[str, Any]:
        async with bulkhead:
            return await fetch(delay)

    return app


async def saturate_free(client: httpx.AsyncClient, compartment: Bulkhead) -> list[Any]:
    """Start enough slow free-tier calls to fill the free compartment; wait until they hold it."""
    tasks = [
        asyncio.create_task(
            client.get("/search", params={"delay": 1.2}, headers={"x-tier": "free"})
        )
        for _ in range(compartment.max_concurrent)
    ]
    for _ in range(500):  # bounded: at most ~5 s
        if compartment.active == compartment.max_concurrent:
            break
        await asyncio.sleep(0.01)
    assert compartment.active == compartment.max_concurrent
    return tasks


async def premium_latencies(client: httpx.AsyncClient, n: int = 5) -> list[tuple[int, float]]:
    out = []
    for _ in range(n):
        started = time.perf_counter()
        answer = await client.get("/search", headers={"x-tier": "premium"})
        out.append((answer.status_code, time.perf_counter() - started))
    return out


async def test_free_tier_saturation_does_not_delay_premium(
    upstream: httpx.AsyncClient, default_bulkheads: BulkheadRegistry
) -> None:
    """With per-tier compartments, premium calls answer at once while free-tier calls fill
    their compartment (and more free calls get 503 bulkhead_full); with one shared bulkhead,
    the same free load shuts premium out."""
    tiered = TieredBulkhead("search-http", {"free": (2, 0), "premium": (4, 0)}, default_tier="free")
    app = search_app(upstream)
    try:
        async with client_for(app) as client:
            baseline = await premium_latencies(client)
            free_calls = await saturate_free(client, tiered.for_tier("free"))
            extra_free = await client.get("/search", headers={"x-tier": "free"})
            assert extra_free.status_code == 503
            assert extra_free.json()["code"] == "bulkhead_full"
            during = await premium_latencies(client)
            assert tiered.for_tier("free").active == 2, "free calls were still running"
            assert [status for status, _ in during] == [200] * 5
            worst = max(seconds for _, seconds in during)
            usual = max(seconds for _, seconds in baseline)
            print(
                f"premium worst latency: {worst * 1000:.1f} ms while free is saturated, "
                f"{usual * 1000:.1f} ms before"
            )
            # The free calls hold their slots for 1.2 s; premium never waits for them (the
            # bound is half of that, loose for loaded CI machines; the figure is printed above).
            assert worst < 0.6, f"premium took {worst:.3f}s (baseline {usual:.3f}s)"
            assert all(a.status_code == 200 for a in await asyncio.gather(*free_calls))

            # Compartments off: one shared bulkhead of the same total size.
            Bulkhead("search-http", max_concurrent=2)
            free_calls = await saturate_free(client, get_bulkhead("search-http"))  # type: ignore[arg-type]
            shared = await premium_latencies(client, 1)
            assert shared[0][0] == 503
            await asyncio.gather(*free_calls)
    finally:
        default_bulkheads.unregister("search-http")


# --- a deadline is the caller's, not the upstream's ----------------------------------------

GUARD_STYLES = ["transport", "call", "async with", "decorator"]


class Guarded:
    """The upstream called through a breaker in one of the ways an app does it.

    ``transport``: ``resilient_client`` with its own per-host breaker; the others: a plain
    httpx client inside ``timeout()`` (so the request deadline applies) behind a
    ``CircuitBreaker`` used through ``call``, ``async with`` or as a decorator.
    """

    def __init__(
        self, style: str, upstream_url: str, clock: ManualClock, registry: BreakerRegistry
    ) -> None:
        self.style = style
        #: Where the transport registers its per-host breaker (the default registry).
        self.registry = registry
        self.host = upstream_url.removeprefix("http://")
        self.http = (
            resilient_client(upstream_url, attempts=1, failure_threshold=2, clock=clock)
            if style == "transport"
            else httpx.AsyncClient(base_url=upstream_url, timeout=None)
        )
        self._breaker = CircuitBreaker(
            "inventory-deadline", failure_threshold=2, clock=clock, registry=None
        )
        self._decorated = self._breaker(self._plain)

    @property
    def breaker(self) -> CircuitBreaker:
        if self.style == "transport":
            return get_breaker(f"upstream:{self.host}")
        return self._breaker

    async def _plain(self, delay: float) -> dict[str, Any]:
        async with timeout(10.0):
            response = await self.http.get("/item", params={"delay": delay})
        if response.status_code >= 500:
            raise UpstreamError(f"inventory answered {response.status_code}")
        return dict(response.json())

    async def fetch(self, delay: float) -> dict[str, Any]:
        if self.style == "transport":
            return dict((await self.http.get("/item", params={"delay": delay})).json())
        if self.style == "call":
            return await self._breaker.call(self._plain, delay)
        if self.style == "async with":
            async with self._breaker:
                return await self._plain(delay)
        return await self._decorated(delay)

    async def aclose(self) -> None:
        await self.http.aclose()
        if self.style == "transport":
            self.registry.unregister(f"upstream:{self.host}")


def guarded_app(guarded: Guarded, **deadline_options: Any) -> FastAPI:
    """An app whose /stock calls the upstream through ``guarded``; ``?spend=S`` first moves
    the deadline's clock on by S seconds (the route's own work, spending the budget)."""
    app = FastAPI()
    install_exception_handlers(app)
    app.add_middleware(RequestDeadlineMiddleware, **deadline_options)
    app.add_middleware(CorrelationIdMiddleware)
    clock = deadline_options.get("clock")

    @app.get("/stock")
    async def stock(delay: float = 0.0, spend: float = 0.0) -> dict[str, Any]:
        if spend and isinstance(clock, ManualClock):
            clock.advance(spend)
        return await guarded.fetch(delay)

    return app


async def test_requests_asking_for_a_microsecond_do_not_open_the_upstreams_breaker(
    upstream: httpx.AsyncClient, default_breakers: BreakerRegistry
) -> None:
    """Five anonymous requests with X-Request-Timeout: 0.000001 leave the shared breaker of a
    healthy upstream closed: the header is raised to the floor, so the calls are made and
    answered; the next caller, without the header, is served."""
    host = upstream.base_url.netloc.decode()
    http = resilient_client(str(upstream.base_url))
    app = FastAPI()
    install_exception_handlers(app)
    app.add_middleware(RequestDeadlineMiddleware, timeout=5.0)
    app.add_middleware(CorrelationIdMiddleware)

    @app.get("/stock")
    async def stock() -> dict[str, Any]:
        return dict((await http.get("/item")).json())

    try:
        async with client_for(app) as client:
            asked = [
                await client.get("/stock", headers={"X-Request-Timeout": "0.000001"})
                for _ in range(5)
            ]
            after = await client.get("/stock")
        assert [a.status_code for a in asked] == [200] * 5
        assert after.status_code == 200
        assert get_breaker(f"upstream:{host}").state == "closed"
        assert await hits(upstream) == 6
    finally:
        await http.aclose()
        default_breakers.unregister(f"upstream:{host}")


async def test_a_microsecond_below_a_lowered_floor_still_leaves_the_breaker_closed(
    upstream: httpx.AsyncClient, default_breakers: BreakerRegistry
) -> None:
    """With the floor lowered to a microsecond, X-Request-Timeout: 0.000001 is taken as asked:
    each call is stopped before it is sent (504 upstream_timeout), and the upstream's shared
    breaker (threshold 2) counts none of the five; the next caller, without the header, is
    served. (At the default floor of 0.1 s the calls are made and answered instead.)"""
    host = upstream.base_url.netloc.decode()
    http = resilient_client(str(upstream.base_url), failure_threshold=2)
    app = FastAPI()
    install_exception_handlers(app)
    app.add_middleware(RequestDeadlineMiddleware, timeout=5.0, header_floor=1e-6, grace=1.0)
    app.add_middleware(CorrelationIdMiddleware)

    @app.get("/stock")
    async def stock() -> dict[str, Any]:
        return dict((await http.get("/item")).json())

    try:
        async with client_for(app) as client:
            asked = [
                await client.get("/stock", headers={"X-Request-Timeout": "0.000001"})
                for _ in range(5)
            ]
            assert get_breaker(f"upstream:{host}").state == "closed"
            after = await client.get("/stock")
        assert [(a.status_code, a.json()["code"]) for a in asked] == [(504, "upstream_timeout")] * 5
        assert after.status_code == 200
        assert await hits(upstream) == 1
    finally:
        await http.aclose()
        default_breakers.unregister(f"upstream:{host}")


@pytest.mark.parametrize("style", GUARD_STYLES)
async def test_calls_cut_by_the_servers_own_budget_still_open_the_breaker(
    upstream: httpx.AsyncClient, style: str, default_breakers: BreakerRegistry
) -> None:
    """The operator's budget (the middleware's 0.15 s, no header) cuts calls to an upstream
    that takes 1 s: those are the upstream's failures, so the breaker (threshold 2) opens and
    the next caller is refused at once (503 circuit_open) without reaching the upstream."""
    guarded = Guarded(style, str(upstream.base_url), ManualClock(), default_breakers)
    app = guarded_app(guarded, timeout=0.15, grace=0.5)
    try:
        async with client_for(app) as client:
            cut = [
                (await client.get("/stock", params={"delay": 1.0})).status_code for _ in range(2)
            ]
            reached = await hits(upstream)
            refused = await client.get("/stock", params={"delay": 1.0})
        assert cut == [504, 504]
        assert guarded.breaker.state == "open"
        assert (refused.status_code, refused.json()["code"]) == (503, "circuit_open")
        assert await hits(upstream) == reached == 2
    finally:
        await guarded.aclose()


@pytest.mark.parametrize("style", GUARD_STYLES)
async def test_calls_cut_by_the_clients_own_deadline_never_open_the_breaker(
    upstream: httpx.AsyncClient, style: str, default_breakers: BreakerRegistry
) -> None:
    """A slow but healthy upstream, and clients that ask for 0.15 s: their calls are cut and
    answered 504, and the breaker (threshold 2) stays closed for the next caller. With a
    grace period the route's own timeout, not the middleware, cuts the call."""
    guarded = Guarded(style, str(upstream.base_url), ManualClock(), default_breakers)
    app = guarded_app(guarded, timeout=5.0, grace=0.5)
    try:
        async with client_for(app) as client:
            cut = [
                await client.get(
                    "/stock", params={"delay": 1.0}, headers={"X-Request-Timeout": "0.15"}
                )
                for _ in range(3)
            ]
            after = await client.get("/stock")
        assert [c.status_code for c in cut] == [504] * 3
        assert {c.json()["code"] for c in cut} == {"upstream_timeout"}
        assert after.status_code == 200
        assert guarded.breaker.state == "closed"
    finally:
        await guarded.aclose()


@pytest.mark.parametrize("wrapper", ["call", "async with", "decorator"])
@pytest.mark.parametrize(("asked", "counted"), [("0.2", False), (None, True)])
async def test_a_driver_timeout_with_a_margin_counts_only_under_the_servers_budget(
    upstream: httpx.AsyncClient, wrapper: str, asked: str | None, counted: bool
) -> None:
    """The route's own httpx client times out at the deadline less a 50 ms margin (time to
    answer), against a slow but healthy upstream. Under a deadline the client chose
    (X-Request-Timeout: 0.2) that timeout is the client's choice and the breaker (threshold 2)
    stays closed; under the server's own 0.2 s budget the same timeouts open it."""
    breaker = CircuitBreaker("inventory-margin", failure_threshold=2, registry=None)

    async def fetch() -> dict[str, Any]:
        left = remaining()
        assert left is not None
        answer = await upstream.get("/item", params={"delay": 1.0}, timeout=left - 0.05)
        return dict(answer.json())

    decorated = breaker(fetch)

    async def guarded() -> dict[str, Any]:
        if wrapper == "call":
            return await breaker.call(fetch)
        if wrapper == "async with":
            async with breaker:
                return await fetch()
        return await decorated()

    app = FastAPI()
    install_exception_handlers(app)
    budget = 5.0 if asked else 0.2
    app.add_middleware(RequestDeadlineMiddleware, timeout=budget, grace=1.0)

    @app.get("/stock")
    async def stock() -> dict[str, Any]:
        try:
            return await guarded()
        except httpx.TimeoutException as exc:
            raise UpstreamTimeoutError("inventory timed out") from exc

    headers = {"X-Request-Timeout": asked} if asked else {}
    async with client_for(app) as client:
        answers = [(await client.get("/stock", headers=headers)).status_code for _ in range(2)]
    assert answers == [504, 504]
    assert breaker.state == ("open" if counted else "closed")


@pytest.mark.parametrize(
    ("middleware", "library_timeout", "state"),
    [
        ({}, False, "closed"),
        ({"header": ""}, False, "open"),
        ({"header_floor": 5.0}, False, "open"),
        ({}, True, "open"),
    ],
    ids=["header-on", "header-off", "floor-at-the-budget", "library-timeout"],
)
async def test_a_header_on_every_request_hides_fixed_driver_timeouts(
    upstream: httpx.AsyncClient,
    middleware: dict[str, Any],
    library_timeout: bool,
    state: str,
) -> None:
    """A gateway forwards X-Request-Timeout: 1 (under the server's 5 s) on every request, and
    the route's call has a fixed 0.2 s timeout against an upstream that takes 1.5 s. With the
    header on, every deadline is the client's, so the breaker (threshold 2) never counts the
    driver's timeouts and stays closed. Switching the header off, a floor at the server's
    budget, or the library's own ``timeout(0.2)`` in place of the driver's makes them count."""
    breaker = CircuitBreaker("inventory-gateway", failure_threshold=2, registry=None)

    async def fetch() -> dict[str, Any]:
        if library_timeout:
            async with timeout(0.2):
                answer = await upstream.get("/item", params={"delay": 1.5})
        else:
            answer = await upstream.get("/item", params={"delay": 1.5}, timeout=0.2)
        return dict(answer.json())

    app = FastAPI()
    install_exception_handlers(app)
    app.add_middleware(RequestDeadlineMiddleware, timeout=5.0, **middleware)

    @app.get("/stock")
    async def stock() -> dict[str, Any]:
        try:
            return await breaker.call(fetch)
        except httpx.TimeoutException as exc:
            raise UpstreamTimeoutError("inventory timed out") from exc

    gateway = {"X-Request-Timeout": "1"}
    async with client_for(app) as client:
        answers = [(await client.get("/stock", headers=gateway)).status_code for _ in range(2)]
    assert answers == [504, 504]
    assert breaker.state == state


@pytest.mark.parametrize("style", GUARD_STYLES)
async def test_calls_the_deadline_stopped_before_they_started_are_not_counted(
    upstream: httpx.AsyncClient, style: str, default_breakers: BreakerRegistry
) -> None:
    """The server's own deadline spent before the call: no request leaves, the route answers
    504, and the breaker (threshold 2) does not count it."""
    guarded = Guarded(style, str(upstream.base_url), ManualClock(), default_breakers)
    app = guarded_app(guarded, timeout=1.0, clock=ManualClock())
    try:
        async with client_for(app) as client:
            stopped = [await client.get("/stock", params={"spend": 2.0}) for _ in range(3)]
            assert await hits(upstream) == 0
            after = await client.get("/stock")
        assert [s.status_code for s in stopped] == [504] * 3
        assert after.status_code == 200
        assert guarded.breaker.state == "closed"
        assert await hits(upstream) == 1
    finally:
        await guarded.aclose()


@pytest.mark.parametrize("style", GUARD_STYLES)
async def test_a_half_open_trial_cut_by_the_clients_deadline_hands_back_its_slot(
    upstream: httpx.AsyncClient, style: str, default_breakers: BreakerRegistry
) -> None:
    """Half-open with one trial slot: a trial the client's own deadline cuts is neither a
    failure (the breaker does not open again) nor a success (it does not close); the slot is
    free for the next caller, whose success closes the breaker."""
    clock = ManualClock()
    guarded = Guarded(style, str(upstream.base_url), clock, default_breakers)
    app = guarded_app(guarded, timeout=5.0, grace=0.5)
    try:
        async with client_for(app) as client:
            await upstream.post("/mode/fail")
            assert [(await client.get("/stock")).status_code for _ in range(2)] == [502] * 2
            assert guarded.breaker.state == "open"
            clock.advance(30)
            await upstream.post("/mode/ok")
            cut = await client.get(
                "/stock", params={"delay": 1.0}, headers={"X-Request-Timeout": "0.15"}
            )
            assert cut.status_code == 504
            assert guarded.breaker.state == "half_open"
            trial = await client.get("/stock")
        assert trial.status_code == 200
        assert guarded.breaker.state == "closed"
    finally:
        await guarded.aclose()


# --- a refusal made in this process is final -------------------------------------------------


async def test_a_full_bulkhead_answers_503_at_once_and_leaves_the_apps_breaker_closed(
    upstream: httpx.AsyncClient,
    default_breakers: BreakerRegistry,
    default_bulkheads: BulkheadRegistry,
) -> None:
    """The contract's pattern, ``breaker.call(fetch)`` with a ``resilient_client`` on its
    default retries (3 attempts) and a bulkhead of one: while one call holds the slot, six more
    callers get 503 bulkhead_full at once (no backoff slept, so no retry spent), the app's
    breaker (threshold 3) stays closed, and the next caller is served."""
    clock = ManualClock()
    host = upstream.base_url.netloc.decode()
    http = resilient_client(str(upstream.base_url), max_concurrent=1, clock=clock)
    breaker = CircuitBreaker("inventory-bulkhead", failure_threshold=3, clock=clock, registry=None)
    app = FastAPI()
    install_exception_handlers(app)

    @app.get("/stock")
    async def stock(hold: bool = False) -> dict[str, Any]:
        params = {"hold": 1} if hold else {}
        return dict((await breaker.call(http.get, "/item", params=params)).json())

    try:
        async with client_for(app) as client:
            held = asyncio.create_task(client.get("/stock", params={"hold": True}))
            for _ in range(500):  # bounded: at most ~5 s
                if await hits(upstream) == 1:
                    break
                await asyncio.sleep(0.01)
            refused = [await client.get("/stock") for _ in range(6)]
            await upstream.post("/release")
            assert (await held).status_code == 200
            after = await client.get("/stock")
        assert [(r.status_code, r.json()["code"]) for r in refused] == [(503, "bulkhead_full")] * 6
        assert refused[0].headers["content-type"] == PROBLEM_CONTENT_TYPE
        assert clock.slept == []
        assert breaker.state == "closed"
        assert after.status_code == 200
        assert await hits(upstream) == 2
    finally:
        await http.aclose()
        default_breakers.unregister(f"upstream:{host}")
        default_bulkheads.unregister(f"upstream:{host}")
