from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from fastapi_resilience import (
    Bulkhead,
    CircuitBreaker,
    RequestDeadlineMiddleware,
    ResilienceSettings,
    deadline,
    deadline_dependency,
    install,
    install_exception_handlers,
    remaining,
    timeout,
)
from fastapi_resilience.exceptions import (
    ConfigurationError,
    DeadlineCutError,
    RetryExhaustedError,
    UpstreamError,
    UpstreamTimeoutError,
)
from fastapi_resilience.outbound import with_timeout
from fastapi_resilience.testing import ManualClock

pytestmark = pytest.mark.anyio

#: The detail of the 504 a client gets when the request's deadline cut an upstream call.
DEADLINE_EXCEEDED_DETAIL = "The request's deadline ran out before the upstream answered."


def current_deadline() -> Any:
    """The deadline in force: ``deadline(None)`` keeps it and hands it to its block."""
    with deadline(None) as kept:
        return kept


async def breaker_ignores(error: Exception) -> bool:
    """Whether a breaker takes ``error`` as the caller's, not the upstream's: neither a
    failure (one more would not open it) nor a success (which would clear the failure
    before)."""
    breaker = CircuitBreaker("judge", failure_threshold=2, registry=None)
    breaker.record_failure()

    async def fail() -> None:
        raise error

    with contextlib.suppress(type(error)):
        await breaker.call(fail)
    if breaker.state == "open":
        return False  # a failure
    breaker.record_failure()
    return breaker.state == "open"


def test_no_deadline_outside_a_request() -> None:
    """remaining() is None when no deadline is set."""
    assert remaining() is None
    assert current_deadline() is None


def test_deadline_counts_down_on_the_clock() -> None:
    """remaining() is the deadline minus the time passed, never below zero."""
    clock = ManualClock()
    with deadline(2.0, clock=clock):
        assert remaining() == 2.0
        clock.advance(0.5)
        assert remaining() == 1.5
        clock.advance(5)
        assert remaining() == 0.0
    assert remaining() is None


def test_nested_deadlines_only_shrink() -> None:
    """An inner deadline can shorten the budget but never lengthen it; None keeps the outer."""
    clock = ManualClock()
    with deadline(1.0, clock=clock):
        with deadline(10.0, clock=clock):
            assert remaining() == 1.0
        with deadline(0.25, clock=clock):
            assert remaining() == 0.25
        with deadline(None, clock=clock) as kept:
            assert kept is current_deadline()
            assert remaining() == 1.0
        assert remaining() == 1.0


async def test_deadline_works_with_async_with_as_with_with() -> None:
    """deadline() serves ``async with`` as well as ``with``: the same deadline, nested either
    way, and the outer one back after the block, also when the block raises."""
    clock = ManualClock()
    async with deadline(2.0, clock=clock) as outer:
        assert outer is current_deadline()
        assert remaining() == 2.0
        with deadline(5.0, clock=clock):
            assert remaining() == 2.0
        async with deadline(0.5, clock=clock):
            assert remaining() == 0.5
            clock.advance(1.0)
            with pytest.raises(UpstreamTimeoutError):  # spent: the call does not start
                async with timeout(10.0):
                    pytest.fail("started after the deadline")
        with pytest.raises(RuntimeError):
            async with deadline(0.25, clock=clock):
                raise RuntimeError("boom")
        assert current_deadline() is outer
    assert remaining() is None


async def test_one_deadline_scope_serves_many_tasks_and_nests_in_itself() -> None:
    """A scope built once (``FIVE = deadline(5)`` at module level) and entered by two tasks at
    once gives each its own five seconds from its own entry and puts back, in each task, what
    that task had; entered inside itself, the inner exit puts the outer entry's deadline back."""
    clock = ManualClock()
    five = deadline(5.0, clock=clock)
    entered = asyncio.Event()

    async def first() -> tuple[float | None, float | None]:
        async with five:
            await entered.wait()  # the other task enters, one second later, meanwhile
            inside = remaining()
        return inside, remaining()

    async def second() -> tuple[float | None, float | None]:
        clock.advance(1.0)
        async with five:
            entered.set()
            await asyncio.sleep(0)  # the first task leaves while this one is inside
            inside = remaining()
        return inside, remaining()

    assert await asyncio.gather(first(), second()) == [(4.0, None), (5.0, None)]
    with five as outer:
        clock.advance(1.0)
        with five:
            assert remaining() == 4.0  # nested deadlines only shrink
        assert current_deadline() is outer
    assert current_deadline() is None


async def test_an_exit_out_of_order_puts_back_what_its_own_entry_replaced() -> None:
    """An async generator with a deadline of its own, left suspended by a caller that stopped
    reading (it runs in the caller's task), exits after the caller's deadline has: once the
    caller's ``with`` ends no deadline is left set, nor after the generator is closed. Closed
    while the caller's deadline still runs, it puts the caller's deadline back."""
    clock = ManualClock()

    async def rows() -> AsyncIterator[int]:
        async with deadline(1.0, clock=clock):
            for row in range(3):
                yield row

    with deadline(10.0, clock=clock):
        left_open = rows()
        async for _ in left_open:
            break
    assert remaining() is None
    await left_open.aclose()
    assert remaining() is None

    with deadline(10.0, clock=clock) as outer:
        closed_inside = rows()
        async for _ in closed_inside:
            break
        await closed_inside.aclose()
        assert current_deadline() is outer
    assert remaining() is None


def test_a_nested_deadline_keeps_the_flag_of_whichever_cuts_first() -> None:
    """from_client belongs to the deadline that will cut: an inner deadline of the server's
    inside a client's longer one is the server's; inside a client's shorter one (or an equal
    one: the outer cuts first) it stays the client's."""
    clock = ManualClock()
    with deadline(1.0, clock=clock, from_client=True):
        with deadline(0.5, clock=clock) as tighter:
            assert tighter is not None
            assert not tighter.from_client
        for seconds in (2.0, 1.0):
            with deadline(seconds, clock=clock) as looser:
                assert looser is not None
                assert looser.from_client
                assert remaining() == 1.0


@pytest.mark.parametrize("from_client", [True, False], ids=["client", "server"])
async def test_a_call_the_deadline_cuts_is_the_callers_only_under_the_clients(
    from_client: bool,
) -> None:
    """timeout() cut by the request's deadline raises DeadlineCutError when the client chose
    that deadline, and a plain UpstreamTimeoutError (which breakers count) when the server
    did; both are 504 upstream_timeout. A call the spent deadline never started is the
    caller's either way."""
    never = asyncio.Event()
    with deadline(0.05, from_client=from_client):
        with pytest.raises(UpstreamTimeoutError) as cut:
            async with timeout(10.0):
                await never.wait()
        assert await breaker_ignores(cut.value) is from_client
    assert isinstance(cut.value, DeadlineCutError) is from_client
    assert (cut.value.status_code, cut.value.code) == (504, "upstream_timeout")

    clock = ManualClock()
    with deadline(1.0, clock=clock, from_client=from_client):
        clock.advance(1.0)
        with pytest.raises(DeadlineCutError) as stopped:
            await with_timeout(never.wait(), 10.0)
    assert await breaker_ignores(stopped.value)


async def test_what_is_not_the_upstreams_failure() -> None:
    """A DeadlineCutError and a RetryExhaustedError chaining one are the caller's anywhere;
    any error once a deadline the client chose has run out is too, and none is under the
    server's; outside a deadline only the first two. Breakers ignore the caller's."""
    cut = DeadlineCutError("cut")
    exhausted = RetryExhaustedError("gave up")
    exhausted.__cause__ = cut
    failure = UpstreamError("503")
    assert await breaker_ignores(cut)
    assert await breaker_ignores(exhausted)
    assert not await breaker_ignores(failure)
    clock = ManualClock()
    for from_client in (True, False):
        with deadline(1.0, clock=clock, from_client=from_client):
            assert not await breaker_ignores(failure)
            clock.advance(1.0)
            assert await breaker_ignores(failure) is from_client


def test_negative_deadline_is_a_configuration_error() -> None:
    """A negative or NaN budget fails loudly, naming the argument."""
    with pytest.raises(ConfigurationError, match="deadline seconds"), deadline(-1):
        pass
    with pytest.raises(ConfigurationError, match="timeout seconds"):
        asyncio.run(_enter_timeout(float("nan")))


async def _enter_timeout(seconds: float) -> None:
    async with timeout(seconds):
        pass


async def test_timeout_raises_upstream_timeout_which_is_a_timeout_error() -> None:
    """An expired timeout() raises UpstreamTimeoutError, also caught as TimeoutError."""
    with pytest.raises(TimeoutError) as info:
        async with timeout(0.01):
            await asyncio.sleep(5)
    assert isinstance(info.value, UpstreamTimeoutError)
    assert info.value.code == "upstream_timeout"
    assert "0.01" in info.value.detail


async def test_timeout_takes_what_is_left_of_the_deadline() -> None:
    """timeout(5) inside a request with 0.02 s left expires after 0.02 s, saying why."""
    loop = asyncio.get_running_loop()
    with deadline(0.02):
        started = loop.time()
        with pytest.raises(UpstreamTimeoutError) as info:
            async with timeout(5):
                await asyncio.sleep(5)
    assert loop.time() - started < 1
    assert info.value.detail == DEADLINE_EXCEEDED_DETAIL


async def test_spent_deadline_does_not_start_the_call() -> None:
    """With no time left the block never runs and the coroutine is closed, not leaked."""
    clock = ManualClock()
    ran = False

    async def call() -> str:
        nonlocal ran
        ran = True
        return "ok"

    with deadline(1, clock=clock):
        clock.advance(1)
        with pytest.raises(UpstreamTimeoutError, match="deadline"):
            await with_timeout(call(), 5)
    assert not ran


async def test_inner_timeout_error_passes_through() -> None:
    """A TimeoutError raised by the block itself is not mistaken for ours."""
    with pytest.raises(TimeoutError) as info:
        async with timeout(5):
            raise TimeoutError("the driver's own")
    assert not isinstance(info.value, UpstreamTimeoutError)


async def test_with_timeout_returns_the_result_and_none_means_no_limit() -> None:
    """with_timeout returns the awaitable's value; None sets no limit of its own."""
    assert await with_timeout(asyncio.sleep(0, "v"), 1) == "v"
    assert await with_timeout(asyncio.sleep(0, "w"), None) == "w"


def deadline_app(**options: Any) -> FastAPI:
    app = FastAPI()
    install_exception_handlers(app)
    app.add_middleware(RequestDeadlineMiddleware, **options)

    @app.get("/left")
    async def left() -> dict[str, Any]:
        return {"remaining": remaining()}

    @app.get("/hang")
    async def hang() -> dict[str, str]:
        await asyncio.sleep(30)
        return {"never": "reached"}

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            yield b"first "
            await asyncio.sleep(0.05)
            yield b"second"

        return StreamingResponse(body())

    return app


def client_for(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


async def test_middleware_sets_the_request_deadline() -> None:
    """Inside a request, remaining() is the middleware's budget, shortened by the header."""
    clock = ManualClock()
    async with client_for(deadline_app(timeout=2.0, clock=clock)) as client:
        assert (await client.get("/left")).json() == {"remaining": 2.0}
        shorter = await client.get("/left", headers={"X-Request-Timeout": "0.5"})
        assert shorter.json() == {"remaining": 0.5}
        longer = await client.get("/left", headers={"X-Request-Timeout": "60"})
        assert longer.json() == {"remaining": 2.0}
        junk = await client.get("/left", headers={"X-Request-Timeout": "soon"})
        assert junk.json() == {"remaining": 2.0}


async def test_a_client_asking_for_less_than_the_floor_gets_the_floor() -> None:
    """X-Request-Timeout below the floor (0.1 s by default, or header_floor) is raised to it,
    never above the server's budget; 0 is the floor too."""
    clock = ManualClock()
    async with client_for(deadline_app(timeout=2.0, clock=clock)) as client:
        for asked in ("0.000001", "1e-300", "0", "0.1"):
            answer = await client.get("/left", headers={"X-Request-Timeout": asked})
            assert answer.json()["remaining"] == pytest.approx(0.1), asked
    async with client_for(deadline_app(timeout=2.0, clock=clock, header_floor=0.5)) as client:
        answer = await client.get("/left", headers={"X-Request-Timeout": "0.2"})
        assert answer.json()["remaining"] == pytest.approx(0.5)
    async with client_for(deadline_app(timeout=0.3, clock=clock, header_floor=0.5)) as client:
        answer = await client.get("/left", headers={"X-Request-Timeout": "0.2"})
        assert answer.json()["remaining"] == pytest.approx(0.3)


@pytest.mark.parametrize(
    "junk",
    [
        "soon",
        "",
        " ",
        "-1",
        "nan",
        "inf",
        "-inf",
        "1e999",
        "0x10",
        "1,5",
        "½".encode(),
        b"\xff\xfe",
        "9" * 5000,
    ],
)
async def test_a_malformed_timeout_header_never_fails_the_request(junk: str | bytes) -> None:
    """Anything that is not a number of seconds >= 0 is ignored: the server's budget applies."""
    async with client_for(deadline_app(timeout=2.0, clock=ManualClock())) as client:
        answer = await client.get("/left", headers={"X-Request-Timeout": junk})
    assert answer.status_code == 200
    assert answer.json()["remaining"] == pytest.approx(2.0)


async def test_the_client_header_can_be_switched_off() -> None:
    """header=None or "" (or the setting request_deadline_header="") ignores the header."""
    settings = ResilienceSettings(request_deadline_header="")
    for options in ({"header": None}, {"header": ""}, {"settings": settings}):
        app = deadline_app(timeout=2.0, clock=ManualClock(), **options)
        async with client_for(app) as client:
            answer = await client.get("/left", headers={"X-Request-Timeout": "0.5"})
        assert answer.json()["remaining"] == pytest.approx(2.0), options


async def test_header_and_floor_come_from_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unless given as arguments, the header and its floor are the settings': from
    ``settings=`` or, without it, from the RESILIENCE_* environment."""
    settings = ResilienceSettings(
        request_deadline_header="X-Budget", request_deadline_header_floor=0.25
    )
    app = deadline_app(timeout=2.0, clock=ManualClock(), settings=settings)
    async with client_for(app) as client:
        named = await client.get("/left", headers={"X-Budget": "0.01"})
        other = await client.get("/left", headers={"X-Request-Timeout": "0.5"})
    assert named.json()["remaining"] == pytest.approx(0.25)
    assert other.json() == {"remaining": 2.0}

    monkeypatch.setenv("RESILIENCE_REQUEST_DEADLINE_HEADER_FLOOR", "0.75")
    async with client_for(deadline_app(timeout=2.0, clock=ManualClock())) as client:
        answer = await client.get("/left", headers={"X-Request-Timeout": "0.01"})
    assert answer.json()["remaining"] == pytest.approx(0.75)
    app = deadline_app(timeout=2.0, clock=ManualClock(), header_floor=0.2)
    async with client_for(app) as client:
        answer = await client.get("/left", headers={"X-Request-Timeout": "0.01"})
    assert answer.json()["remaining"] == pytest.approx(0.2)


@pytest.mark.parametrize("start_up", [True, False], ids=["lifespan", "first-request"])
def test_the_header_settings_given_to_install_apply(
    monkeypatch: pytest.MonkeyPatch, start_up: bool
) -> None:
    """An app configured in code: the middleware takes the header's name, its floor and its
    switch from the settings given to ``install()``, not from the environment; read at
    start-up, or on the first request when the server sends no lifespan."""
    monkeypatch.setenv("RESILIENCE_REQUEST_DEADLINE_HEADER_FLOOR", "0.2")

    def remaining_with(settings: ResilienceSettings) -> float:
        app = deadline_app(timeout=30.0, clock=ManualClock())
        install(app, settings)
        asked = {"X-Budget": "0.5", "X-Request-Timeout": "0.5"}
        with contextlib.ExitStack() as stack:
            client = TestClient(app)
            if start_up:
                stack.enter_context(client)  # runs the lifespan
            return float(client.get("/left", headers=asked).json()["remaining"])

    named = ResilienceSettings(request_deadline_header="X-Budget", request_deadline_header_floor=5)
    assert remaining_with(named) == 5.0
    assert remaining_with(ResilienceSettings(request_deadline_header="")) == 30.0


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf")])
def test_a_bad_floor_fails_at_start_up_naming_it(bad: float) -> None:
    """The floor must be a finite number of seconds > 0, as argument and as setting."""
    with pytest.raises(ConfigurationError, match="header_floor"):
        RequestDeadlineMiddleware(_no_app, header_floor=bad)
    with pytest.raises(ConfigurationError, match="request_deadline_header_floor"):
        ResilienceSettings(request_deadline_header_floor=bad)


def test_a_bad_header_name_fails_at_start_up_naming_it() -> None:
    """The header must be a valid HTTP header name, as argument and as setting."""
    with pytest.raises(ConfigurationError, match="header"):
        RequestDeadlineMiddleware(_no_app, header="X Timeout")
    with pytest.raises(ConfigurationError, match="request_deadline_header"):
        ResilienceSettings(request_deadline_header="X Timeout")


async def test_middleware_without_budget_sets_nothing() -> None:
    """timeout=None and no header: no deadline at all."""
    async with client_for(deadline_app(timeout=None)) as client:
        assert (await client.get("/left")).json() == {"remaining": None}
        asked = await client.get("/left", headers={"X-Request-Timeout": "3"})
        assert 2.9 < asked.json()["remaining"] <= 3


async def test_middleware_cuts_off_an_overrunning_route_with_504() -> None:
    """A route still running at the deadline is cancelled and answered 504 upstream_timeout."""
    async with client_for(deadline_app(timeout=0.05)) as client:
        answer = await client.get("/hang")
    assert answer.status_code == 504
    assert answer.headers["content-type"] == "application/problem+json"
    body = answer.json()
    assert body["code"] == "upstream_timeout"
    assert body["detail"] == DEADLINE_EXCEEDED_DETAIL
    assert body["deadline"] == 0.05


@pytest.mark.parametrize("header", ["X-Request-ID", "X-Trace"])
async def test_the_504_of_a_middleware_added_after_install_carries_the_id(header: str) -> None:
    """Added after install(), the deadline middleware sits outside the correlation layer, which
    has finished by the time the 504 is sent: the answer still carries the request's ID (the
    configured header) in header and body, once."""
    app = deadline_app(timeout=None)
    install(app, ResilienceSettings(rate_limit_enabled=False, correlation_header=header))
    app.add_middleware(RequestDeadlineMiddleware, timeout=0.05)
    async with client_for(app) as client:
        given = await client.get("/hang", headers={header: "abc-123"})
        made = await client.get("/hang")
    assert (given.status_code, made.status_code) == (504, 504)
    assert given.headers.get_list(header) == ["abc-123"]
    assert given.json()["correlation_id"] == "abc-123"
    assert made.headers.get_list(header) == [made.json()["correlation_id"]]


async def test_middleware_does_not_cut_a_started_answer() -> None:
    """Once the answer has started it is left to finish, even past the deadline."""
    async with client_for(deadline_app(timeout=0.02)) as client:
        answer = await client.get("/stream")
    assert answer.text == "first second"


async def test_enforce_off_leaves_the_route_alone() -> None:
    """enforce=False only sets the deadline; a route that ignores it runs on."""
    app = FastAPI()
    app.add_middleware(RequestDeadlineMiddleware, timeout=0.01, enforce=False)

    @app.get("/slow")
    async def slow() -> dict[str, float | None]:
        await asyncio.sleep(0.05)
        return {"remaining": remaining()}

    async with client_for(app) as client:
        assert (await client.get("/slow")).json() == {"remaining": 0.0}


async def test_non_http_scopes_pass_through() -> None:
    """Lifespan and websocket scopes reach the app untouched, with no deadline."""
    seen: list[tuple[str, float | None]] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append((scope["type"], remaining()))

    middleware = RequestDeadlineMiddleware(app, timeout=1)
    await middleware({"type": "lifespan"}, _no_receive, _no_send)
    assert seen == [("lifespan", None)]


async def _no_receive() -> Any:  # pragma: no cover - never called
    return {}


async def _no_send(message: Any) -> None:  # pragma: no cover - never called
    return None


async def test_the_app_sees_the_budget() -> None:
    """Code inside the request reads its budget with ``remaining()``; outside it, ``None``."""
    budgets: list[float | None] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        budgets.append(remaining())
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async with client_for(RequestDeadlineMiddleware(app, timeout=1.5)) as client:
        assert (await client.get("/")).status_code == 204
    assert budgets[0] is not None
    assert 1.0 < budgets[0] <= 1.5
    assert remaining() is None


async def test_deadline_dependency_sets_the_route_deadline() -> None:
    """deadline_dependency(seconds) gives one route a deadline its calls inherit."""
    app = FastAPI()
    clock = ManualClock()

    @app.get("/left", dependencies=[Depends(deadline_dependency(0.75, clock=clock))])
    async def left() -> dict[str, float | None]:
        return {"remaining": remaining()}

    async with client_for(app) as client:
        assert (await client.get("/left")).json() == {"remaining": 0.75}


@pytest.mark.parametrize("bad", [0, -1.0, float("nan")])
def test_bad_budget_fails_at_start_up(bad: float) -> None:
    """A budget that is not a positive number is a configuration error."""
    with pytest.raises(ConfigurationError, match="timeout"):
        RequestDeadlineMiddleware(_no_app, timeout=bad)
    with pytest.raises(ConfigurationError, match="deadline_dependency"):
        deadline_dependency(bad)


async def _no_app(scope: Scope, receive: Receive, send: Send) -> None:  # pragma: no cover
    return None


async def test_durations_accept_timedelta() -> None:
    """Every duration argument takes a timedelta as well as seconds."""
    from datetime import timedelta

    clock = ManualClock()
    with deadline(timedelta(milliseconds=1500), clock=clock):
        assert remaining() == 1.5
    breaker = CircuitBreaker(
        "td",
        recovery_timeout=timedelta(seconds=2),
        max_recovery_timeout=timedelta(minutes=1),
        registry=None,
    )
    assert (breaker.recovery_timeout, breaker.max_recovery_timeout) == (2.0, 60.0)
    breaker.force_open(timedelta(seconds=5))
    assert 4 < breaker.time_left_open() <= 5
    assert Bulkhead("td", wait_timeout=timedelta(seconds=3), registry=None).wait_timeout == 3.0
    assert RequestDeadlineMiddleware(_no_app, timeout=timedelta(seconds=4)).timeout == 4.0
    assert await with_timeout(asyncio.sleep(0, "v"), timedelta(seconds=1)) == "v"
