"""RateLimitMiddleware and rate_limit(): tiers, route limits, cost, shadow mode, headers, 429s."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import Depends, FastAPI, WebSocket
from starlette.responses import StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fastapi_resilience import RateLimitMiddleware, ResilienceSettings, install, rate_limit
from fastapi_resilience.events import Event
from fastapi_resilience.exceptions import ConfigurationError
from fastapi_resilience.ratelimit import GuardedStorage, Identity, MemoryStorage, RateLimiter
from fastapi_resilience.testing import ManualClock
from tests._asgi import websocket_connect
from tests._metrics import value as metric_value

pytestmark = pytest.mark.anyio

QUOTA_EXCEEDED = "https://iana.org/assignments/http-problem-types#quota-exceeded"


def make_app(clock: ManualClock, events: list[Event] | None = None, **settings: Any) -> FastAPI:
    settings.setdefault("rate_limit_tiers", {"anonymous": "3/minute", "premium": "100/minute"})
    settings.setdefault("rate_limit_api_keys", {"pk-1": "premium"})
    app = FastAPI()
    resilience = install(app, ResilienceSettings(**settings), clock=clock)
    if events is not None:
        resilience.events.subscribe(events.append)

    @app.get("/items/{item_id}")
    async def item(item_id: int) -> dict[str, int]:
        return {"item": item_id}

    @app.get("/plain")
    async def plain() -> dict[str, str]:
        return {"ok": "yes"}

    @app.post("/login", dependencies=[Depends(rate_limit("2/minute"))])
    async def login() -> dict[str, str]:
        return {"ok": "yes"}

    @app.get("/report", dependencies=[Depends(rate_limit("50/minute", cost=2))])
    async def report() -> dict[str, str]:
        return {"ok": "yes"}

    @app.get("/heavy/{n}", dependencies=[Depends(rate_limit(cost=2))])
    async def heavy(n: int) -> dict[str, int]:
        return {"n": n}

    @app.get("/beta", dependencies=[Depends(rate_limit("1/minute", shadow=True))])
    async def beta() -> dict[str, str]:
        return {"ok": "yes"}

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            for i in range(3):
                yield f"chunk{i};".encode()

        return StreamingResponse(chunks(), media_type="text/plain")

    return app


def client(app: Any, address: str = "203.0.113.7") -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, client=(address, 4321)), base_url="http://t"
    )


@pytest.fixture(name="clock")
def _clock() -> ManualClock:
    return ManualClock()


async def test_tier_limit_admits_then_refuses_with_problem_json(clock: ManualClock) -> None:
    """The tier's limit admits exactly its amount; the next request gets the 429 problem+json."""
    async with client(make_app(clock)) as c:
        statuses = [(await c.get("/plain")).status_code for _ in range(3)]
        refused = await c.get("/plain")
    assert statuses == [200, 200, 200]
    assert refused.status_code == 429
    assert refused.headers["content-type"] == "application/problem+json"
    assert int(refused.headers["retry-after"]) >= 1
    body = refused.json()
    assert body["type"] == QUOTA_EXCEEDED
    assert body["code"] == "rate_limited"
    assert body["status"] == 429
    assert body["tier"] == "anonymous"
    assert body["limit"] == "3/minute"
    assert body["violated-policies"] == ["anonymous"]
    assert body["instance"] == "/plain"
    assert body["correlation_id"] == refused.headers["x-request-id"]
    assert "anonymous" in body["detail"]
    assert "3/minute" in body["detail"]


async def test_headers_on_every_limited_response(clock: ManualClock) -> None:
    """Admitted and refused answers carry X-RateLimit-* and the IETF RateLimit fields."""
    async with client(make_app(clock)) as c:
        answers = [await c.get("/plain") for _ in range(4)]
    for n, answer in enumerate(answers):
        assert answer.headers["x-ratelimit-limit"] == "3"
        assert answer.headers["x-ratelimit-remaining"] == str(max(0, 2 - n))
        assert 60 <= int(answer.headers["x-ratelimit-reset"]) <= 61
        assert answer.headers["ratelimit-policy"] == '"anonymous";q=3;w=60'
        assert answer.headers["ratelimit"].startswith(f'"anonymous";r={max(0, 2 - n)};t=')
    assert "retry-after" not in answers[0].headers


async def test_window_frees_slots_as_time_passes(clock: ManualClock) -> None:
    """After the window has passed, a refused identity is admitted again (injected clock)."""
    async with client(make_app(clock)) as c:
        for _ in range(3):
            await c.get("/plain")
        assert (await c.get("/plain")).status_code == 429
        clock.advance(62)
        assert (await c.get("/plain")).status_code == 200


async def test_route_refusal_consumes_nothing_from_the_tier(clock: ManualClock) -> None:
    """A request refused by the route limit uses none of the tier budget (one atomic check)."""
    async with client(
        make_app(clock, rate_limit_tiers={"anonymous": "5/minute", "premium": "9/minute"})
    ) as c:
        logins = [await c.post("/login") for _ in range(4)]
        after = await c.get("/plain")
    assert [r.status_code for r in logins] == [200, 200, 429, 429]
    assert logins[2].json()["violated-policies"] == ["/login"]
    assert logins[2].json()["tier"] == "anonymous"
    # 2 admitted logins used 2 of 5; the refused ones used nothing.
    assert after.headers["x-ratelimit-remaining"] == "2"


async def test_tightest_limit_decides_legacy_headers(clock: ManualClock) -> None:
    """With tier and route limits, X-RateLimit-* describe the one with the least left."""
    async with client(
        make_app(clock, rate_limit_tiers={"anonymous": "5/minute", "premium": "9/minute"})
    ) as c:
        answer = await c.post("/login")
    assert answer.headers["x-ratelimit-limit"] == "2"
    assert answer.headers["x-ratelimit-remaining"] == "1"
    assert answer.headers["ratelimit-policy"] == '"anonymous";q=5;w=60, "/login";q=2;w=60'
    assert answer.headers["ratelimit"].startswith('"anonymous";r=4;t=')
    assert '"/login";r=1;t=' in answer.headers["ratelimit"]


async def test_route_limit_is_keyed_by_path_template(clock: ManualClock) -> None:
    """Different URLs of one route template share that route's budget."""
    app = FastAPI()
    install(app, ResilienceSettings(rate_limit_tiers={"anonymous": "100/minute"}), clock=clock)

    @app.get("/orders/{order_id}", dependencies=[Depends(rate_limit("2/minute"))])
    async def order(order_id: int) -> dict[str, int]:
        return {"order": order_id}

    async with client(app) as c:
        codes = [(await c.get(f"/orders/{n}")).status_code for n in (1, 2, 3)]
    assert codes == [200, 200, 429]


async def test_cost_is_charged_to_route_and_tier(clock: ManualClock) -> None:
    """rate_limit(cost=2) charges 2 units of the route limit and of the tier."""
    async with client(
        make_app(clock, rate_limit_tiers={"anonymous": "5/minute", "premium": "9/minute"})
    ) as c:
        first = await c.get("/report")
        second = await c.get("/heavy/1")
        third = await c.get("/heavy/2")
    assert first.status_code == 200
    assert '"anonymous";r=3;' in first.headers["ratelimit"]
    assert '"/report";r=48;' in first.headers["ratelimit"]
    assert second.headers["x-ratelimit-remaining"] == "1"
    assert third.status_code == 429  # 2 units wanted, 1 left


async def test_known_api_key_counts_against_the_key_not_the_address(clock: ManualClock) -> None:
    """A known key uses its tier's budget and leaves the address's anonymous budget untouched."""
    async with client(make_app(clock)) as c:
        keyed = [await c.get("/plain", headers={"X-API-Key": "pk-1"}) for _ in range(5)]
        anonymous = await c.get("/plain")
        unknown = await c.get("/plain", headers={"X-API-Key": "nope"})
    assert all(r.status_code == 200 for r in keyed)
    assert keyed[-1].headers["ratelimit-policy"] == '"premium";q=100;w=60'
    assert keyed[-1].headers["x-ratelimit-remaining"] == "95"
    assert anonymous.headers["x-ratelimit-remaining"] == "2"
    # An unknown key is no key: the address's anonymous budget.
    assert unknown.headers["x-ratelimit-remaining"] == "1"


async def test_api_key_is_shared_across_addresses(clock: ManualClock) -> None:
    """The same key from two addresses draws on one budget."""
    app = make_app(clock, rate_limit_tiers={"anonymous": "3/minute", "premium": "2/minute"})
    async with client(app, "198.51.100.1") as one, client(app, "198.51.100.2") as two:
        a = await one.get("/plain", headers={"X-API-Key": "pk-1"})
        b = await two.get("/plain", headers={"X-API-Key": "pk-1"})
        c = await two.get("/plain", headers={"X-API-Key": "pk-1"})
    assert [a.status_code, b.status_code, c.status_code] == [200, 200, 429]
    assert c.json()["tier"] == "premium"


async def test_exempt_paths_are_not_counted(clock: ManualClock) -> None:
    """Exempt paths carry no rate-limit headers and never use the budget."""
    async with client(make_app(clock)) as c:
        for _ in range(5):
            ready = await c.get("/health/ready")
            assert ready.status_code == 200
            assert "x-ratelimit-limit" not in ready.headers
        assert (await c.get("/plain")).headers["x-ratelimit-remaining"] == "2"


async def test_route_shadow_limit_reports_but_never_refuses(clock: ManualClock) -> None:
    """A shadow route limit counts and emits an event for what it would refuse, refusing nothing."""
    events: list[Event] = []
    app = make_app(
        clock, events, rate_limit_tiers={"anonymous": "10/minute", "premium": "9/minute"}
    )
    async with client(app) as c:
        answers = [await c.get("/beta") for _ in range(3)]
    assert [r.status_code for r in answers] == [200, 200, 200]
    assert '"/beta";r=0;' in answers[-1].headers["ratelimit"]
    shadow = [e for e in events if e.kind == "rate_limit.shadow_refused"]
    assert len(shadow) == 2
    assert shadow[0].name == "/beta"
    assert shadow[0].attributes["limit"] == "1/minute"
    assert shadow[0].level == logging.INFO


async def test_whole_middleware_shadow_mode(clock: ManualClock) -> None:
    """rate_limit_shadow=True: every limit is report-only, with headers and events."""
    events: list[Event] = []
    app = make_app(clock, events, rate_limit_shadow=True)
    async with client(app) as c:
        answers = [await c.get("/plain") for _ in range(5)]
        logins = [await c.post("/login") for _ in range(3)]
    assert all(r.status_code == 200 for r in answers + logins)
    assert answers[-1].headers["x-ratelimit-remaining"] == "0"
    kinds = [e.kind for e in events]
    assert kinds.count("rate_limit.shadow_refused") >= 2


async def test_headers_can_be_turned_off(clock: ManualClock) -> None:
    """rate_limit_headers_enabled=False limits without advertising the limits."""
    async with client(make_app(clock, rate_limit_headers_enabled=False)) as c:
        ok = await c.get("/plain")
        for _ in range(3):
            last = await c.get("/plain")
    assert "x-ratelimit-limit" not in ok.headers
    assert "ratelimit" not in ok.headers
    assert last.status_code == 429
    assert "retry-after" in last.headers


async def test_streaming_response_passes_untouched(clock: ManualClock) -> None:
    """A streaming body arrives whole, with the rate-limit headers on its start message."""
    async with client(make_app(clock)) as c:
        answer = await c.get("/stream")
    assert answer.text == "chunk0;chunk1;chunk2;"
    assert answer.headers["x-ratelimit-remaining"] == "2"


async def test_earlier_unlimited_route_wins_over_limited_template(clock: ManualClock) -> None:
    """An unlimited route matched first wins: the later limited template's limit does not apply."""
    app = FastAPI()
    install(app, ResilienceSettings(rate_limit_tiers={"anonymous": "100/minute"}), clock=clock)

    @app.get("/users/me")
    async def me() -> dict[str, str]:
        return {"me": "yes"}

    @app.get("/users/{user_id}", dependencies=[Depends(rate_limit("1/minute"))])
    async def user(user_id: str) -> dict[str, str]:
        return {"user": user_id}

    async with client(app) as c:
        mes = [(await c.get("/users/me")).status_code for _ in range(3)]
        users = [(await c.get("/users/7")).status_code for _ in range(2)]
    assert mes == [200, 200, 200]
    assert users == [200, 429]


async def test_route_limit_inside_included_router(clock: ManualClock) -> None:
    """Route limits declared on an included router's routes are found by the middleware."""
    from fastapi import APIRouter

    app = FastAPI()
    install(app, ResilienceSettings(rate_limit_tiers={"anonymous": "100/minute"}), clock=clock)
    router = APIRouter(dependencies=[Depends(rate_limit("1/minute"))])

    @router.get("/things/{thing}")
    async def thing(thing: str) -> dict[str, str]:
        return {"thing": thing}

    app.include_router(router, prefix="/v1")
    async with client(app) as c:
        first = await c.get("/v1/things/a")
        second = await c.get("/v1/things/b")
    assert (
        first.headers["ratelimit-policy"] == '"anonymous";q=100;w=60, "/v1/things/{thing}";q=1;w=60'
    )
    assert second.status_code == 429
    # Checked once, by the middleware: the tier counted the refused request as nothing.
    assert second.headers["ratelimit"].startswith('"anonymous";r=99;')


async def test_rate_limit_dependency_works_without_the_middleware() -> None:
    """Without install or the middleware, rate_limit() enforces its own limit, with headers."""
    app = FastAPI()
    from fastapi_resilience import install_exception_handlers

    install_exception_handlers(app)

    @app.get("/alone", dependencies=[Depends(rate_limit("2/minute"))])
    async def alone() -> dict[str, str]:
        return {"ok": "yes"}

    async with client(app, "192.0.2.99") as c:
        answers = [await c.get("/alone") for _ in range(3)]
    assert [r.status_code for r in answers] == [200, 200, 429]
    assert answers[0].headers["x-ratelimit-remaining"] == "1"
    assert answers[2].json()["type"] == QUOTA_EXCEEDED
    assert int(answers[2].headers["retry-after"]) >= 1


async def test_custom_async_resolver(clock: ManualClock) -> None:
    """A custom resolver decides identity and tier; returning None leaves a request unlimited."""

    async def by_user_header(scope: Scope) -> Identity | None:
        for name, value in scope["headers"]:
            if name == b"x-user":
                return Identity(f"user:{value.decode()}", "premium")
        return None

    async def ok(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    limiter = RateLimiter(
        MemoryStorage(clock=clock),
        tiers={"anonymous": "1/minute", "premium": "2/minute"},
        resolver=by_user_header,
    )
    app = RateLimitMiddleware(ok, limiter=limiter)
    async with client(app) as c:
        users = [await c.get("/", headers={"x-user": "ann"}) for _ in range(3)]
        unlimited = [await c.get("/") for _ in range(3)]
    assert [r.status_code for r in users] == [200, 200, 429]
    assert users[0].headers["ratelimit-policy"] == '"premium";q=2;w=60'
    assert all(r.status_code == 200 and "ratelimit" not in r.headers for r in unlimited)


async def test_non_http_scopes_pass_through(clock: ManualClock) -> None:
    """Lifespan and websocket scopes reach the app untouched and never touch the storage."""
    seen: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["type"])

    storage = MemoryStorage(clock=clock)
    middleware = RateLimitMiddleware(
        app, limiter=RateLimiter(storage, tiers={"anonymous": "1/minute"})
    )

    async def receive() -> Message:
        return {"type": "websocket.connect"}

    async def send(message: Message) -> None:
        pass

    for kind in ("websocket", "lifespan"):
        await middleware({"type": kind, "path": "/", "headers": []}, receive, send)
    assert seen == ["websocket", "lifespan"]
    assert len(storage) == 0


async def test_the_outcome_leaves_the_scope_with_the_request(clock: ManualClock) -> None:
    """Once the request is done nothing of its outcome is left in its scope, allowed or
    refused, since an idle keep-alive connection keeps its last scope."""
    during: list[bool] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        during.append(True)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    middleware = RateLimitMiddleware(
        app, limiter=RateLimiter(MemoryStorage(clock=clock), tiers={"anonymous": "1/minute"})
    )

    async def receive() -> Message:  # pragma: no cover - the app never reads the body
        return {"type": "http.request", "body": b"", "more_body": False}

    statuses: list[int] = []

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    scopes = [
        {"type": "http", "method": "GET", "path": "/", "headers": [], "client": ("10.0.0.1", 1)}
        for _ in range(2)
    ]
    for scope in scopes:
        await middleware(scope, receive, send)
    assert statuses == [200, 429]
    assert during == [True]
    for scope in scopes:
        assert not [key for key in scope if key.startswith("fastapi_resilience.")]


def test_bad_limit_string_fails_at_declaration() -> None:
    """A bad route limit string raises ConfigurationError naming it, at import time."""
    with pytest.raises(ConfigurationError, match="'5 per fortnight'"):
        rate_limit("5 per fortnight")
    with pytest.raises(ConfigurationError, match="cost"):
        rate_limit("5/minute", cost=0)


def test_unknown_default_tier_fails_at_start_up(clock: ManualClock) -> None:
    """A limiter whose default tier is not among its tiers is refused at construction."""
    with pytest.raises(ConfigurationError, match="rate_limit_default_tier"):
        RateLimiter(MemoryStorage(clock=clock), tiers={"free": "1/minute"}, default_tier="gold")


async def test_disabled_rate_limiting_adds_nothing(clock: ManualClock) -> None:
    """rate_limit_enabled=False: no limits, no headers, and route limits are inert."""
    app = make_app(clock, rate_limit_enabled=False)
    async with client(app) as c:
        answers = [await c.post("/login") for _ in range(5)]
    assert all(r.status_code == 200 and "ratelimit" not in r.headers for r in answers)


async def run_lifespan(app: Any) -> None:
    messages = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
    sent: list[Message] = []

    async def receive() -> Message:
        return next(messages)

    async def send(message: Message) -> None:
        sent.append(message)

    await app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, receive, send)
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]


async def test_install_closes_the_storage_on_shutdown(clock: ManualClock) -> None:
    """The storage install built is closed when the app shuts down, after the user's lifespan."""
    from contextlib import asynccontextmanager

    order: list[str] = []

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        order.append("user startup")
        yield
        order.append("user shutdown")

    app = FastAPI(lifespan=lifespan)
    resilience = install(app, ResilienceSettings(), clock=clock)
    limiter = resilience.rate_limiter
    assert limiter is not None
    storage = limiter.storage
    original = storage.aclose

    async def recording_aclose() -> None:
        order.append("storage closed")
        await original()

    storage.aclose = recording_aclose  # type: ignore[method-assign]
    await run_lifespan(app)
    assert order == ["user startup", "user shutdown", "storage closed"]


async def test_standalone_middleware_closes_its_own_storage(clock: ManualClock) -> None:
    """RateLimitMiddleware added on its own closes the storage it built at shutdown."""
    app = FastAPI()
    app.add_middleware(RateLimitMiddleware, settings=ResilienceSettings(), clock=clock)
    closed: list[bool] = []
    app.middleware_stack = app.build_middleware_stack()
    middleware = app.middleware_stack
    while not isinstance(middleware, RateLimitMiddleware):
        middleware = middleware.app
    storage = middleware.limiter.storage
    original = storage.aclose

    async def recording_aclose() -> None:
        closed.append(True)
        await original()

    storage.aclose = recording_aclose  # type: ignore[method-assign]
    await run_lifespan(app)
    assert closed == [True]


async def test_exempt_path_prefixes(clock: ManualClock) -> None:
    """An exempt entry ending in * exempts every path under it."""
    app = make_app(clock, rate_limit_exempt_paths=["/items/*"])
    async with client(app) as c:
        items = [await c.get(f"/items/{n}") for n in range(5)]
        plain = await c.get("/plain")
    assert all(r.status_code == 200 and "ratelimit" not in r.headers for r in items)
    assert plain.headers["x-ratelimit-remaining"] == "2"


def dead_redis_url() -> str:
    from loopback import free_port

    return f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there: connection refused


async def test_fail_closed_answers_503_reduced_capacity() -> None:
    """Storage unreachable and fail-closed: 503 problem+json, temporary-reduced-capacity."""
    app = make_app(ManualClock(), rate_limit_storage=dead_redis_url(), rate_limit_fail_open=False)
    async with client(app) as c:
        answers = [await c.get("/plain") for _ in range(4)]
        login = await c.post("/login")
        exempt = await c.get("/health/live")
    for answer in answers:
        assert answer.status_code == 503
        assert answer.headers["content-type"] == "application/problem+json"
        assert int(answer.headers["retry-after"]) >= 1
        body = answer.json()
        assert body["type"] == (
            "https://iana.org/assignments/http-problem-types#temporary-reduced-capacity"
        )
        assert body["code"] == "service_unavailable"
        assert body["violated-policies"] == ["anonymous"]
    assert login.json()["violated-policies"] == ["anonymous", "/login"]
    assert exempt.status_code == 200
    await app.state.resilience.rate_limiter.aclose()


async def test_fail_open_without_fallback_lets_requests_through_unlimited() -> None:
    """Fail-open with no fallback limiter: requests pass, with no rate-limit headers, and
    readiness says the storage degrades the service (200), not that it stops it."""
    app = make_app(ManualClock(), rate_limit_storage=dead_redis_url(), rate_limit_fallback=False)
    async with client(app) as c:
        answers = [await c.get("/plain") for _ in range(6)]
        logins = [await c.post("/login") for _ in range(4)]
        ready = await c.get("/health/ready")
    assert all(r.status_code == 200 for r in answers + logins)
    assert all("ratelimit" not in r.headers for r in answers)
    assert (ready.status_code, ready.json()["status"]) == (200, "degraded")
    assert ready.json()["checks"]["rate_limit_storage"]["status"] == "degraded"
    await app.state.resilience.rate_limiter.aclose()


async def test_fail_open_with_fallback_limits_per_process() -> None:
    """Fail-open with the fallback limiter: the same limits, counted in this process."""
    app = make_app(ManualClock(), rate_limit_storage=dead_redis_url())
    async with client(app) as c:
        codes = [(await c.get("/plain")).status_code for _ in range(5)]
    assert codes == [200, 200, 200, 429, 429]
    await app.state.resilience.rate_limiter.aclose()


async def test_unknown_tier_from_resolver_falls_back_to_default(clock: ManualClock) -> None:
    """A tier a custom resolver names but settings lack is counted in the default tier."""

    async def resolver(scope: Scope) -> Identity:
        return Identity("user:1", "platinum")

    async def ok(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    limiter = RateLimiter(
        MemoryStorage(clock=clock), tiers={"anonymous": "1/minute"}, resolver=resolver
    )
    async with client(RateLimitMiddleware(ok, limiter=limiter)) as c:
        first = await c.get("/")
        second = await c.get("/")
    assert first.headers["ratelimit-policy"] == '"anonymous";q=1;w=60'
    assert second.status_code == 429


async def test_route_in_mounted_sub_app_is_limited_by_its_dependency(clock: ManualClock) -> None:
    """A limited route the middleware cannot see (mounted sub-app) is enforced by the dependency."""
    app = FastAPI()
    install(app, ResilienceSettings(rate_limit_tiers={"anonymous": "100/minute"}), clock=clock)
    sub = FastAPI()
    from fastapi_resilience import install_exception_handlers

    install_exception_handlers(sub)  # a sub-app renders its own errors

    @sub.get("/thing", dependencies=[Depends(rate_limit("1/minute"))])
    async def thing() -> dict[str, str]:
        return {"ok": "yes"}

    app.mount("/sub", sub)
    async with client(app) as c:
        first = await c.get("/sub/thing")
        second = await c.get("/sub/thing")
    assert first.status_code == 200
    assert first.headers.get_list("x-ratelimit-limit") == ["1"]  # one set of headers
    assert second.status_code == 429
    assert second.headers.get_list("x-ratelimit-limit") == ["1"]
    assert second.json()["type"] == QUOTA_EXCEEDED
    assert int(second.headers["retry-after"]) >= 1


async def test_refusals_and_shadow_refusals_reach_the_metrics(clock: ManualClock) -> None:
    """429s and shadow refusals are counted on /metrics: as events and as decisions."""
    app = make_app(clock, rate_limit_tiers={"anonymous": "4/minute", "premium": "9/minute"})
    refused = {"kind": "rate_limit.refused", "name": "anonymous"}
    shadow = {"kind": "rate_limit.shadow_refused", "name": "/beta"}
    decisions = "fastapi_resilience_rate_limit_decisions_total"
    async with client(app) as c:
        before = (await c.get("/metrics")).text
        for _ in range(3):
            await c.get("/beta")  # shadow 1/minute: two would-be refusals
        for _ in range(3):
            await c.get("/plain")  # one unit left of 4: two refusals
        after = (await c.get("/metrics")).text

    def delta(metric: str, **labels: str) -> float:
        return metric_value(after, metric, **labels) - metric_value(before, metric, **labels)

    assert delta("fastapi_resilience_events_total", **refused) == 2
    assert delta("fastapi_resilience_events_total", **shadow) == 2
    assert delta(decisions, tier="anonymous", decision="refused") == 2
    assert delta(decisions, tier="anonymous", decision="shadow_refused") == 2
    # /beta three times (a shadow refusal is admitted), /plain once; /metrics is exempt.
    assert delta(decisions, tier="anonymous", decision="admitted") == 3 + 1


async def test_exempt_paths_hold_behind_a_root_path(clock: ManualClock) -> None:
    """Behind a root path (a proxy prefix), exempt paths are matched without the prefix."""
    app = make_app(clock)
    transport = httpx.ASGITransport(app=app, client=("203.0.113.9", 1), root_path="/api")
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        answers = [await c.get("/api/health/live") for _ in range(5)]
    assert all(r.status_code == 200 and "ratelimit" not in r.headers for r in answers)


async def test_route_table_tries_only_the_limited_routes_a_path_can_reach(
    clock: ManualClock,
) -> None:
    """Per request the limiter runs a limited route's regex only when the path starts with the
    route's literal text, root path taken off: an app's other requests skip them all. The
    routes see it: what they are asked before the app's own routing starts is the limiter's."""
    from fastapi.routing import APIRoute

    routing = {"started": False}
    tried: list[str] = []

    class SpyRoute(APIRoute):
        def matches(self, scope: Scope) -> Any:
            if not routing["started"]:
                tried.append(scope["path"])
            return super().matches(scope)

    class RoutingStarts:
        """Innermost middleware: what runs inside it is the app's own routing."""

        def __init__(self, app: ASGIApp) -> None:
            self.app = app

        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            routing["started"] = True
            try:
                await self.app(scope, receive, send)
            finally:
                routing["started"] = False

    app = FastAPI()
    app.router.route_class = SpyRoute

    @app.post("/login", dependencies=[Depends(rate_limit("2/minute"))])
    async def login() -> None:
        return None

    @app.get("/items/{item_id}", dependencies=[Depends(rate_limit("9/minute"))])
    async def item(item_id: int) -> None:
        return None

    app.add_middleware(RoutingStarts)
    limiter = RateLimiter(MemoryStorage(clock=clock), tiers={"anonymous": "100/minute"})
    app.add_middleware(RateLimitMiddleware, limiter=limiter)
    tier = '"anonymous";q=100;w=60'
    under_api = httpx.ASGITransport(app=app, root_path="/api")
    async with (
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c,
        httpx.AsyncClient(transport=under_api, base_url="http://t") as api,
    ):
        plain = await c.get("/plain")
        assert (plain.status_code, plain.headers["ratelimit-policy"]) == (404, tier)
        assert tried == []
        wrong_method = await api.get("/api/login")  # a GET: the limited route is a POST
        assert wrong_method.headers["ratelimit-policy"] == tier
        assert tried == ["/api/login"]
        login_answer = await api.post("/api/login")
        assert login_answer.headers["ratelimit-policy"] == f'{tier}, "/login";q=2;w=60'
        item_answer = await c.get("/items/7")
        assert item_answer.headers["ratelimit-policy"] == f'{tier}, "/items/{{item_id}}";q=9;w=60'
    # A limited route that matched is then checked against the routes before it (an earlier
    # route wins): only requests for limited routes pay for that.
    assert tried == ["/api/login", "/api/login", "/items/7", "/items/7"]


async def test_stacked_middlewares_add_one_set_of_fields_and_leave_nothing(
    clock: ManualClock,
) -> None:
    """``CorrelationIdMiddleware`` around ``RateLimitMiddleware``: one ID and one set of
    rate-limit fields on an admitted, a failing and a refused request's answer; the scope keeps
    nothing of ours after."""
    from fastapi_resilience import CorrelationIdMiddleware

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] == "/fail":
            raise RuntimeError("boom")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    limiter = RateLimiter(MemoryStorage(clock=clock), tiers={"anonymous": "2/minute"})
    middleware = CorrelationIdMiddleware(RateLimitMiddleware(app, limiter=limiter))
    starts: list[Message] = []

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            starts.append(message)

    scopes = [_scope(path) for path in ("/", "/fail", "/")]
    for scope in scopes:
        await middleware(scope, _receive, send)
    assert [start["status"] for start in starts] == [200, 500, 429]
    for start in starts:
        names = [name for name, _ in start["headers"]]
        assert names.count(b"x-request-id") == 1
        assert names.count(b"x-ratelimit-remaining") == 1
        assert names.count(b"ratelimit") == 1
    for scope in scopes:
        assert not [key for key in scope if key.startswith("fastapi_resilience.")]


@pytest.mark.parametrize("case", ["custom_resolver", "two_limits", "guarded"])
async def test_each_request_is_counted_once(case: str, clock: ManualClock) -> None:
    """Whichever way the limiter decides (a resolver that awaits, several limits, a storage it
    must await), a request uses one unit of every limit."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def resolver(scope: Scope) -> Identity:
        return Identity("ip:10.0.0.1", "anonymous")

    memory = MemoryStorage(clock=clock)
    tiers = {"anonymous": "3/minute; 5/hour" if case == "two_limits" else "3/minute"}
    limiter = RateLimiter(
        GuardedStorage(memory, clock=clock) if case == "guarded" else memory,
        tiers=tiers,
        resolver=resolver if case == "custom_resolver" else None,
    )
    middleware = RateLimitMiddleware(app, limiter=limiter)
    left: list[bytes] = []

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            left.append(dict(message["headers"])[b"x-ratelimit-remaining"])

    for _ in range(3):
        await middleware(_scope("/"), _receive, send)
    assert left == [b"2", b"1", b"0"]


def _scope(path: str) -> dict[str, Any]:
    return {"type": "http", "method": "GET", "path": path, "headers": [], "client": ("10.0.0.1", 1)}


async def _receive() -> Message:  # pragma: no cover - the apps never read the body
    return {"type": "http.request", "body": b"", "more_body": False}


async def _ignore(message: Message) -> None:
    pass


async def test_websocket_connections_counted_with_the_app_limiter() -> None:
    """The documented pattern for what the middleware does not see: a WebSocket route counts
    each connection with ``identify`` and ``check``; over the tier's limit it is closed with
    1008, and an API key counts against its own tier."""
    settings = ResilienceSettings(
        rate_limit_tiers={"anonymous": "2/minute", "premium": "100/minute"},
        rate_limit_api_keys={"key-1": "premium"},
    )
    app = FastAPI()
    install(app, settings)

    @app.websocket("/live")
    async def live(websocket: WebSocket) -> None:
        limiter = websocket.app.state.resilience.rate_limiter
        identity = await limiter.identify(websocket.scope)
        if identity is not None:
            outcome = await limiter.check(websocket.scope, identity)
            if outcome.refused:
                await websocket.close(code=1008, reason="rate limited")
                return
        await websocket.accept()
        await websocket.close()

    first = [(await websocket_connect(app, "/live"))[0] for _ in range(3)]
    keyed = (await websocket_connect(app, "/live", headers=[(b"x-api-key", b"key-1")]))[0]
    assert [m["type"] for m in first] == ["websocket.accept", "websocket.accept", "websocket.close"]
    assert first[2]["code"] == 1008
    assert keyed["type"] == "websocket.accept"
