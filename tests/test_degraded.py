"""Degraded mode: features switched off by hand or by an open breaker, over real ASGI requests."""

from __future__ import annotations

import gc
import logging
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import Depends, FastAPI, Request
from prometheus_client import CollectorRegistry
from starlette.responses import StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from fastapi_resilience import (
    CircuitBreaker,
    ConfigurationError,
    CorrelationIdMiddleware,
    DegradedMode,
    DegradedModeMiddleware,
    Resilience,
    ResilienceSettings,
    install,
    install_exception_handlers,
    rate_limit,
    requires_feature,
)
from fastapi_resilience.events import Event, EventBus
from fastapi_resilience.outbound import BreakerRegistry
from fastapi_resilience.testing import ManualClock
from tests._asgi import websocket_connect
from tests._metrics import value

pytestmark = pytest.mark.anyio

PROBLEM = "application/problem+json"


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def breaker(clock: ManualClock, default_breakers: BreakerRegistry) -> Iterator[CircuitBreaker]:
    """A breaker in the default registry (where install's degraded mode looks), removed after."""
    made = CircuitBreaker(
        "degraded-test-recs", failure_threshold=2, recovery_timeout=30.0, clock=clock
    )
    yield made
    default_breakers.unregister(made.name)


def recorded(bus: EventBus) -> list[Event]:
    seen: list[Event] = []
    bus.subscribe(seen.append)
    return seen


def kinds(events: list[Event]) -> list[tuple[str, str]]:
    return [(e.kind, e.name) for e in events if e.kind.split(".")[0] in {"feature", "degraded"}]


def build(
    clock: ManualClock, settings: ResilienceSettings | None = None
) -> tuple[FastAPI, Resilience]:
    app = FastAPI()
    resilience = install(app, settings or ResilienceSettings(), clock=clock)

    @app.get("/recommendations", dependencies=[Depends(requires_feature("recs"))])
    async def recommendations() -> dict[str, str]:
        return {"recs": "tea"}

    @app.get("/orders/{order_id}")
    async def order(order_id: int, request: Request) -> dict[str, object]:
        # A route that leaves a part out instead of failing.
        degraded = request.app.state.resilience.degraded
        return {"id": order_id, "with_recs": degraded.available("recs")}

    return app, resilience


@asynccontextmanager
async def client_for(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        yield client


async def test_switched_off_by_hand_refuses_its_routes_and_marks_every_answer(
    clock: ManualClock,
) -> None:
    """disable(): the feature's route gets 503 feature_unavailable problem+json (no Retry-After:
    nobody knows when), other routes still answer but say they are degraded, and enable()
    brings everything back."""
    app, resilience = build(clock)
    resilience.degraded.feature("recs")
    events = recorded(resilience.events)
    async with client_for(app) as client:
        before = await client.get("/recommendations")
        assert before.status_code == 200
        assert "x-degraded" not in before.headers

        resilience.degraded.disable("recs", reason="recommender migration")
        refused = await client.get("/recommendations", headers={"X-Request-ID": "req-1"})
        other = await client.get("/orders/7")
        ready = await client.get("/health/ready")

        resilience.degraded.enable("recs")
        after = await client.get("/recommendations")
        other_after = await client.get("/orders/7")

    assert refused.status_code == 503
    assert refused.headers["content-type"] == PROBLEM
    body = refused.json()
    assert body["code"] == "feature_unavailable"
    assert body["feature"] == "recs"
    assert body["correlation_id"] == "req-1"
    assert body["instance"] == "/recommendations"
    assert "migration" not in body["detail"]  # the reason is for operators
    assert "retry-after" not in refused.headers
    assert refused.headers["x-degraded"] == "recs"
    assert refused.headers["x-request-id"] == "req-1"

    assert other.status_code == 200
    assert other.json() == {"id": 7, "with_recs": False}
    assert other.headers["x-degraded"] == "recs"

    assert ready.status_code == 200
    assert ready.json()["status"] == "degraded"
    assert "recs (recommender migration)" in ready.json()["checks"]["features"]["detail"]

    assert after.status_code == 200
    assert "x-degraded" not in after.headers
    assert other_after.json()["with_recs"] is True
    assert kinds(events) == [
        ("feature.disabled", "recs"),
        ("degraded.entered", "app"),
        ("feature.enabled", "recs"),
        ("degraded.left", "app"),
    ]


async def test_a_request_while_degraded_looks_at_the_features_once(clock: ManualClock) -> None:
    """While degraded, the middleware looks at every feature again for each request; a
    ``requires_feature`` of that request decides on that look instead of taking another. Off
    stays off and on stays on: only the second look is saved."""
    app, resilience = build(clock)
    mode = resilience.degraded
    mode.feature("recs")
    mode.feature("search")

    @app.get("/search", dependencies=[Depends(requires_feature("search"))])
    async def search() -> dict[str, str]:
        return {"found": "tea"}

    looks: list[None] = []
    refresh = mode.refresh

    def counted_refresh() -> None:
        looks.append(None)
        refresh()

    mode.refresh = counted_refresh  # type: ignore[method-assign]
    mode.disable("recs", reason="migration", duration=60)
    async with client_for(app) as client:
        looks.clear()
        refused = await client.get("/recommendations")
        assert (refused.status_code, len(looks)) == (503, 1)
        looks.clear()
        found = await client.get("/search")
        assert (found.status_code, len(looks)) == (200, 1)
        assert found.headers["x-degraded"] == "recs"
        clock.advance(61)  # the switch-off ends: the middleware's look notices it
        looks.clear()
        back = await client.get("/recommendations")
        assert (back.status_code, len(looks)) == (200, 1)
        assert "x-degraded" not in back.headers
    # Outside a request (a route's own code, a background job) the mode still looks first.
    mode.disable("search", reason="reindexing")
    looks.clear()
    assert mode.available("search") is False
    assert len(looks) == 1


async def test_timed_switch_off_gives_retry_after_and_ends_by_itself(clock: ManualClock) -> None:
    """disable(duration=...): Retry-After counts down, and the feature comes back when it ends."""
    app, resilience = build(clock)
    resilience.degraded.feature("recs")
    resilience.degraded.disable("recs", reason="reindexing", duration=600)
    async with client_for(app) as client:
        first = await client.get("/recommendations")
        clock.advance(599.5)
        last = await client.get("/recommendations")
        clock.advance(0.5)
        back = await client.get("/recommendations")
    assert first.headers["retry-after"] == "600"
    assert last.status_code == 503
    assert last.headers["retry-after"] == "1"
    assert back.status_code == 200
    assert "x-degraded" not in back.headers
    assert resilience.degraded.active is False


async def test_open_breaker_sheds_the_feature_paths_until_it_turns_half_open(
    clock: ManualClock, breaker: CircuitBreaker
) -> None:
    """A feature depending on a breaker is off while the breaker is open: its paths are shed
    before the route runs, with Retry-After = time left open; when the open time is over the
    next request finds it half-open and gets through, so the trial call can close it."""
    app, resilience = build(clock)
    resilience.degraded.feature("recs", depends_on=[breaker.name], paths=["/recommendations"])
    events = recorded(resilience.events)
    reached: list[str] = []

    @app.get("/recommendations/{user}")
    async def for_user(user: str) -> dict[str, str]:
        reached.append(user)
        return await breaker.call(_answer, user)

    breaker.force_open()
    async with client_for(app) as client:
        shed = [await client.get("/recommendations/ann") for _ in range(3)]
        clock.advance(10)
        later = await client.get("/recommendations")
        other = await client.get("/orders/1")
        clock.advance(20)
        trial = await client.get("/recommendations/bob")
        closed = await client.get("/recommendations/cy")

    assert [r.status_code for r in shed] == [503, 503, 503]
    assert shed[0].json()["code"] == "feature_unavailable"
    assert shed[0].headers["retry-after"] == "30"
    assert later.headers["retry-after"] == "20"
    assert other.status_code == 200
    assert other.headers["x-degraded"] == "recs"
    assert reached == ["bob", "cy"]  # nothing shed ever reached the route
    assert trial.status_code == 200
    assert trial.json() == {"user": "bob"}
    assert "x-degraded" not in trial.headers
    assert closed.status_code == 200
    assert breaker.state == "closed"
    # Once each, however many requests saw the state.
    assert kinds(events) == [
        ("feature.disabled", "recs"),
        ("degraded.entered", "app"),
        ("feature.enabled", "recs"),
        ("degraded.left", "app"),
    ]


async def _answer(user: str) -> dict[str, str]:
    return {"user": user}


async def _fail() -> None:
    raise RuntimeError("recommender down")


async def test_breaker_opening_inside_a_request_is_logged_once_with_its_id(
    clock: ManualClock, breaker: CircuitBreaker, caplog: pytest.LogCaptureFixture
) -> None:
    """The request whose failure opens the breaker switches the feature off; the log record of
    that change carries the request's correlation ID; readiness names the breaker."""
    app, resilience = build(clock)
    resilience.degraded.feature("recs", depends_on=[breaker.name])

    @app.get("/flaky")
    async def flaky() -> None:
        await breaker.call(_fail)

    caplog.set_level(logging.INFO, logger="fastapi_resilience.events")
    async with client_for(app) as client:
        await client.get("/flaky", headers={"X-Request-ID": "first"})
        opening = await client.get("/flaky", headers={"X-Request-ID": "second"})
        refused = await client.get("/recommendations")
        ready = await client.get("/health/ready")

    assert opening.status_code == 500
    assert breaker.state == "open"
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "30"
    disabled = [r for r in caplog.records if r.getMessage().startswith("feature.disabled recs")]
    assert len(disabled) == 1
    assert disabled[0].correlation_id == "second"  # type: ignore[attr-defined]
    assert (
        "circuit breaker 'degraded-test-recs' open" in ready.json()["checks"]["features"]["detail"]
    )


async def test_metrics_show_the_state_and_the_changes(clock: ManualClock) -> None:
    """/metrics: fastapi_resilience_degraded is 1 while degraded and 0 after, the feature's
    availability follows; each change is counted once."""
    # Its own registry: the gauges then speak of this app alone, not of every app the
    # tests left alive in the process.
    app = FastAPI()
    resilience = install(
        app, ResilienceSettings(), clock=clock, metrics_registry=CollectorRegistry()
    )
    resilience.degraded.feature("recs")
    entered = {"kind": "degraded.entered", "name": "app"}
    enabled = {"kind": "feature.enabled", "name": "recs"}
    async with client_for(app) as client:
        before = (await client.get("/metrics")).text
        resilience.degraded.disable("recs")
        during = (await client.get("/metrics")).text
        resilience.degraded.enable("recs")
        after = (await client.get("/metrics")).text
    events = "fastapi_resilience_events_total"
    assert value(before, "fastapi_resilience_feature_available", feature="recs") == 1
    assert value(during, "fastapi_resilience_degraded") == 1
    assert value(during, "fastapi_resilience_feature_available", feature="recs") == 0
    assert value(during, events, **entered) - value(before, events, **entered) == 1
    assert value(after, "fastapi_resilience_degraded") == 0
    assert value(after, "fastapi_resilience_feature_available", feature="recs") == 1
    assert value(after, events, **enabled) - value(during, events, **enabled) == 1


async def test_disabled_features_setting_starts_them_off(clock: ManualClock) -> None:
    """RESILIENCE_DISABLED_FEATURES is a kill switch that survives a restart."""
    app, resilience = build(clock, ResilienceSettings(disabled_features=["recs"]))
    resilience.degraded.feature("recs")
    async with client_for(app) as client:
        refused = await client.get("/recommendations")
    assert refused.status_code == 503
    assert (
        resilience.degraded.status("recs").reason == "switched off by the disabled_features setting"
    )


async def test_notice_header_setting(clock: ManualClock) -> None:
    """degraded_header names the header; "" sends none (the refusal itself still says why)."""
    app, resilience = build(clock, ResilienceSettings(degraded_header="Service-Degraded"))
    resilience.degraded.feature("recs")
    resilience.degraded.disable("recs")
    quiet_app, quiet = build(clock, ResilienceSettings(degraded_header=""))
    quiet.degraded.feature("recs")
    quiet.degraded.disable("recs")
    async with client_for(app) as client:
        named = await client.get("/orders/1")
    async with client_for(quiet_app) as client:
        none = await client.get("/orders/1")
        refused = await client.get("/recommendations")
    assert named.headers["service-degraded"] == "recs"
    assert "x-degraded" not in named.headers
    assert not any("degraded" in name.lower() for name in none.headers)
    assert refused.json()["code"] == "feature_unavailable"
    with pytest.raises(ConfigurationError, match="degraded_header"):
        ResilienceSettings(degraded_header="bad header")


async def _start(app: FastAPI) -> None:
    async with app.router.lifespan_context(app):
        pass


async def test_start_up_names_what_is_misconfigured(clock: ManualClock) -> None:
    """Each mistake stops start-up with a message naming it: a route requiring an undeclared
    feature, a depends_on naming no breaker, a disabled_features entry naming no feature."""
    app, _ = build(clock)  # /recommendations requires "recs", never declared
    with pytest.raises(
        ConfigurationError, match=r"route /recommendations: requires_feature\('recs'\)"
    ):
        await _start(app)

    app, resilience = build(clock)
    resilience.degraded.feature("recs", depends_on=["no-such-breaker"])
    with pytest.raises(ConfigurationError, match="depends_on names 'no-such-breaker'"):
        await _start(app)

    app, resilience = build(clock, ResilienceSettings(disabled_features=["recs", "serach"]))
    resilience.degraded.feature("recs")
    with pytest.raises(ConfigurationError, match=r"disabled_features .*'serach'"):
        await _start(app)

    app, resilience = build(clock)
    resilience.degraded.feature("recs")
    await _start(app)  # all declared: starts


async def test_start_up_checks_routes_of_included_routers(clock: ManualClock) -> None:
    """A ``requires_feature`` on a route of an included router is checked too (FastAPI keeps
    those routes inside one entry of the app's route list)."""
    from fastapi import APIRouter

    app, resilience = build(clock)
    resilience.degraded.feature("recs")
    router = APIRouter(prefix="/api")

    @router.get("/export", dependencies=[Depends(requires_feature("exprots"))])
    async def export() -> None: ...

    app.include_router(router)
    with pytest.raises(
        ConfigurationError, match=r"route /api/export: requires_feature\('exprots'\)"
    ):
        await _start(app)


def test_declaring_and_switching_reject_mistakes() -> None:
    """Bad names and paths fail at declaration; switching an unknown feature raises."""
    mode = DegradedMode(events=EventBus(log=False))
    mode.feature("search", paths=["/search"])
    with pytest.raises(ValueError, match="already declared"):
        mode.feature("search")
    with pytest.raises(ValueError, match="feature name"):
        mode.feature("with space")
    with pytest.raises(ValueError, match="must start with '/'"):
        mode.feature("export", paths=["export"])
    with pytest.raises(TypeError, match="lists of strings"):
        mode.feature("export", paths="/export")
    with pytest.raises(LookupError, match=r"'serch'.*declared: search"):
        mode.disable("serch")
    with pytest.raises(LookupError, match="'serch'"):
        mode.available("serch")
    with pytest.raises(ValueError, match="duration"):
        mode.disable("search", duration=0)
    with pytest.raises(ValueError, match="notice_header"):
        DegradedMode(notice_header="a b")


def test_a_new_reason_is_not_a_new_change() -> None:
    """Switching off a feature that is off already changes its reason, not the state: no event."""
    bus = EventBus(log=False)
    events = recorded(bus)
    mode = DegradedMode(events=bus)
    mode.feature("search")
    mode.disable("search", reason="one")
    mode.disable("search", reason="two")
    assert mode.status("search").reason == "two"
    assert kinds(events) == [("feature.disabled", "search"), ("degraded.entered", "app")]


def test_paths_are_owned_by_segment() -> None:
    mode = DegradedMode(events=EventBus(log=False))
    mode.feature("search", paths=["/search", "/api/find/"])
    mode.disable("search")
    assert mode.shed("/search") is not None
    assert mode.shed("/search/books") is not None
    assert mode.shed("/api/find/x") is not None
    assert mode.shed("/searches") is None
    assert mode.shed("/") is None


async def test_the_middleware_on_its_own(clock: ManualClock) -> None:
    """DegradedModeMiddleware and requires_feature(mode=...) without install: the notice header
    through its own send wrapper, streaming bodies untouched, websockets shed by path."""
    mode = DegradedMode(events=EventBus(log=False), clock=clock)
    mode.feature("export", paths=["/export"])
    app = FastAPI()

    @app.get("/report", dependencies=[Depends(requires_feature("export", mode=mode))])
    async def report() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            for part in (b"a", b"b", b"c"):
                yield part

        return StreamingResponse(chunks())

    install_exception_handlers(app)
    app.add_middleware(DegradedModeMiddleware, mode=mode)
    app.add_middleware(CorrelationIdMiddleware)
    mode.disable("export", duration=5)
    async with client_for(app) as client:
        shed = await client.get("/export/all.csv")
        report = await client.get("/report")
        streamed = await client.get("/stream")
    assert shed.status_code == 503
    assert shed.headers["retry-after"] == "5"
    assert shed.headers["x-degraded"] == "export"
    assert "x-request-id" in shed.headers
    assert report.status_code == 503
    assert streamed.text == "abc"
    assert streamed.headers["x-degraded"] == "export"

    reached: list[str] = []

    async def websocket_app(scope: Scope, receive: Receive, send: Send) -> None:
        reached.append(scope["path"])

    async def nothing() -> Message:
        raise AssertionError("not read")

    async def no_send(message: Message) -> None:
        raise AssertionError("not sent")

    # A WebSocket to a path the feature owns is refused before it is accepted (1013: try
    # again later); one to another path passes.
    closed = await websocket_connect(
        DegradedModeMiddleware(websocket_app, mode=mode), "/export/live"
    )
    assert reached == []
    assert closed == [{"type": "websocket.close", "code": 1013, "reason": "feature unavailable"}]
    other_scope = {"type": "websocket", "path": "/chat", "headers": []}
    await DegradedModeMiddleware(websocket_app, mode=mode)(other_scope, nothing, no_send)
    assert reached == ["/chat"]

    bare = FastAPI()
    bare.add_middleware(DegradedModeMiddleware, mode=mode)

    @bare.get("/plain")
    async def plain() -> dict[str, bool]:
        return {"ok": True}

    async with client_for(bare) as client:
        plain_answer = await client.get("/plain")
    assert plain_answer.headers["x-degraded"] == "export"


async def test_requires_feature_needs_a_mode() -> None:
    """Without install() and without mode=, the dependency says what is missing (a 500 with
    the reason in the log, not a silent pass)."""
    app = FastAPI()

    @app.get("/x", dependencies=[Depends(requires_feature("x"))])
    async def x() -> None: ...

    transport = httpx.ASGITransport(app=app, raise_app_exceptions=True)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        with pytest.raises(LookupError, match="no degraded mode"):
            await client.get("/x")


def test_requires_feature_returns_one_callable_per_name() -> None:
    """The same callable each time, so dependency_overrides can replace it."""
    assert requires_feature("recs") is requires_feature("recs")
    assert requires_feature("recs") is not requires_feature("search")
    mode = DegradedMode()
    assert requires_feature("recs", mode=mode) is requires_feature("recs", mode=mode)
    assert requires_feature("recs", mode=mode) is not requires_feature("recs")
    # The mode's dependencies do not keep it alive (apps built per test, say).
    gone = weakref.ref(mode)
    del mode
    gc.collect()
    assert gone() is None


async def test_install_without_rate_limiting_still_runs_degraded_mode(clock: ManualClock) -> None:
    """rate_limit_enabled=False: the degraded mode still sheds and marks answers."""
    app, resilience = build(clock, ResilienceSettings(rate_limit_enabled=False))
    resilience.degraded.feature("recs", paths=["/recommendations"])
    async with client_for(app) as client:
        assert (await client.get("/recommendations")).status_code == 200
        resilience.degraded.disable("recs")
        refused = await client.get("/recommendations")
        other = await client.get("/orders/3")
    assert refused.status_code == 503
    assert other.headers["x-degraded"] == "recs"


async def test_refused_by_the_rate_limiter_before_degraded_mode(clock: ManualClock) -> None:
    """Contract order: rate limiting runs outside degraded mode, so a shed request is counted
    and an over-limit request gets 429, not 503."""
    settings = ResilienceSettings(rate_limit_tiers={"anonymous": "3/minute"})
    app, resilience = build(clock, settings)
    resilience.degraded.feature("recs", paths=["/recommendations"])

    @app.get("/recommendations/top", dependencies=[Depends(rate_limit("1/minute"))])
    async def top() -> None: ...

    resilience.degraded.disable("recs")
    async with client_for(app) as client:
        # A route limit: the rate limiter's general path, then degraded mode.
        limited = [await client.get("/recommendations/top") for _ in range(2)]
        # The tier limit alone: its lean path, then degraded mode.
        answers = [await client.get("/recommendations") for _ in range(3)]
    assert [a.status_code for a in answers] == [503, 503, 429]
    assert answers[0].headers["x-ratelimit-remaining"] == "1"
    assert answers[0].headers["x-degraded"] == "recs"
    assert [a.status_code for a in limited] == [503, 429]
    assert limited[0].headers["x-degraded"] == "recs"
    assert limited[0].json()["code"] == "feature_unavailable"


async def test_example_app_exports_feature() -> None:
    """The example app starts (its features pass the start-up checks), serves its export, and
    answers 503 for it when started with the feature switched off."""
    import logging as logging_module

    from example_app.main import create_app

    root = logging_module.getLogger()
    saved = root.handlers[:], root.level
    try:
        served = create_app(ResilienceSettings())
        off = create_app(ResilienceSettings(disabled_features=["exports"]))
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    for app in (served, off):
        await _start(app)
    async with client_for(served) as client:
        csv = await client.get("/exports/orders.csv")
    async with client_for(off) as client:
        refused = await client.get("/exports/orders.csv")
    assert csv.status_code == 200
    assert csv.text.startswith("id,sku,quantity,status\n1,tea-earl-grey,2,placed")
    assert refused.status_code == 503
    assert refused.json()["feature"] == "exports"
    assert refused.headers["x-degraded"] == "exports"


class ListenerCountingBreaker(CircuitBreaker):
    """Counts the listeners held: added by ``add_listener``, let go by the function it returns."""

    held = 0

    def add_listener(self, listener: Any) -> Callable[[], None]:
        remove = super().add_listener(listener)
        self.held += 1

        def counted_remove() -> None:
            self.held -= 1
            remove()

        return counted_remove


def test_a_mode_that_is_gone_stops_listening(clock: ManualClock) -> None:
    """Breakers outlive the apps (and modes) that watch them: a collected mode's listener
    removes itself at the breaker's next change instead of piling up."""
    registry = BreakerRegistry()
    breaker = ListenerCountingBreaker("recs", failure_threshold=2, clock=clock, registry=registry)
    before = breaker.held
    mode = DegradedMode(breakers=registry, events=EventBus(log=False))
    mode.feature("recs", depends_on=[breaker.name])
    assert breaker.held == before + 1
    breaker.force_open()
    assert mode.active
    del mode
    gc.collect()
    breaker.force_closed()
    assert breaker.held == before


async def test_websocket_shed_under_install(clock: ManualClock) -> None:
    """Under install() a WebSocket connection reaches degraded mode through the correlation
    and rate-limit layers, and is refused with 1013 while its feature is off."""
    app, resilience = build(clock)
    resilience.degraded.feature("recs", paths=["/recommendations"])
    resilience.degraded.disable("recs")
    sent = await websocket_connect(app, "/recommendations/live")
    assert [(m["type"], m.get("code")) for m in sent] == [("websocket.close", 1013)]


@pytest.mark.parametrize("root_path", ["", "/api"])
def test_shedding_sees_the_path_without_the_servers_root_path(root_path: str) -> None:
    """Behind ``--root-path /api`` a feature that is off still sheds its paths (it served them)."""
    from fastapi.testclient import TestClient

    app = FastAPI()
    resilience = install(app)
    resilience.degraded.feature("exports", paths=["/exports"])

    @app.get("/exports/orders.csv")
    async def export() -> str:
        return "ok"

    resilience.degraded.disable("exports", reason="test")
    client = TestClient(app, root_path=root_path)
    shed = client.get(f"{root_path}/exports/orders.csv")
    assert shed.status_code == 503
    assert shed.json()["code"] == "feature_unavailable"
    assert shed.headers["x-degraded"] == "exports"


@pytest.mark.parametrize("root_path", ["", "/api"])
def test_a_method_the_route_does_not_serve_is_405_while_its_feature_is_off(
    root_path: str,
) -> None:
    """A method no route of the path serves is answered 405 with ``Allow``, as the routes
    answer it whether the feature is on or off; the methods they serve, and paths no route
    matches, are shed (503) while the feature that owns them is off."""
    from fastapi.testclient import TestClient

    app = FastAPI()
    resilience = install(app)
    resilience.degraded.feature("exports", paths=["/exports"])

    @app.get("/exports/orders.csv")
    async def export() -> str:
        return "ok"

    resilience.degraded.disable("exports", reason="test")
    client = TestClient(app, root_path=root_path)
    for method in ("TRACE", "DELETE", "POST"):
        answer = client.request(method, f"{root_path}/exports/orders.csv")
        assert answer.status_code == 405, method
        assert answer.headers["content-type"] == PROBLEM
        assert answer.headers["allow"] == "GET"
        assert answer.headers["x-degraded"] == "exports"
    for path in ("/exports/orders.csv", "/exports/nothing-here"):
        shed = client.get(f"{root_path}{path}")
        assert shed.status_code == 503, path
        assert shed.json()["code"] == "feature_unavailable"


def test_a_method_a_mounted_apps_route_does_not_serve_is_405_while_its_feature_is_off() -> None:
    """Under a mounted app the mounted router's answer counts: 405 with ``Allow`` for a method
    its route does not serve; static files (a mount without routes) and served methods are
    shed."""
    from fastapi.testclient import TestClient
    from starlette.staticfiles import StaticFiles

    app = FastAPI()
    resilience = install(app)
    resilience.degraded.feature("exports", paths=["/exports"])
    sub = FastAPI()

    @sub.get("/orders.csv")
    async def export() -> str:
        return "ok"

    app.mount("/exports/v2", sub)
    app.mount("/exports/files", StaticFiles(directory=Path(__file__).parent))
    resilience.degraded.disable("exports", reason="test")
    client = TestClient(app)
    answer = client.post("/exports/v2/orders.csv")
    assert answer.status_code == 405
    assert answer.headers["allow"] == "GET"
    for method, path in (("GET", "/exports/v2/orders.csv"), ("POST", "/exports/files/x")):
        shed = client.request(method, path)
        assert shed.status_code == 503, path
        assert shed.json()["code"] == "feature_unavailable"
