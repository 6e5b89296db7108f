from __future__ import annotations

import contextvars
import logging
import sys

import httpx
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.middleware.errors import ServerErrorMiddleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Match, NoMatchFound
from starlette.types import ASGIApp, Receive, Scope, Send

from fastapi_resilience import (
    ConfigurationError,
    CorrelationIdMiddleware,
    Resilience,
    ResilienceSettings,
    install,
)
from fastapi_resilience.outbound import BreakerRegistry

pytestmark = pytest.mark.anyio


async def test_install_returns_resilience_and_wires_everything() -> None:
    """install() returns a Resilience object, echoes IDs, renders errors and serves health."""
    app = FastAPI()
    resilience = install(app, ResilienceSettings(correlation_header="X-Correlation-ID"))
    assert isinstance(resilience, Resilience)
    assert app.state.resilience is resilience
    assert len(app.user_middleware) == 1  # one layer for IDs, limits and degraded mode
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        missing = await client.get("/missing", headers={"X-Correlation-ID": "c-1"})
        live = await client.get("/health/live")
    assert missing.headers["x-correlation-id"] == "c-1"
    assert missing.json()["code"] == "not_found"
    assert "x-request-id" not in missing.headers
    assert live.status_code == 200


async def test_install_reads_the_environment_when_no_settings_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With no settings, install() uses ResilienceSettings() and so the environment."""
    monkeypatch.setenv("RESILIENCE_HEALTH_PATH", "/_health")
    app = FastAPI()
    resilience = install(app)
    assert resilience.settings.health_path == "/_health"
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        assert (await client.get("/_health/ready")).json()["status"] == "ok"


def test_install_fails_at_start_up_on_bad_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bad environment value stops install() with a message naming the variable."""
    monkeypatch.setenv("RESILIENCE_RATE_LIMIT_DEFAULT_TIER", "nobody")
    with pytest.raises(ConfigurationError, match="rate_limit_default_tier"):
        install(FastAPI())


async def test_middleware_works_with_no_arguments() -> None:
    """CorrelationIdMiddleware added the FastAPI way, with no arguments, uses X-Request-ID."""
    app = FastAPI()
    app.add_middleware(CorrelationIdMiddleware)

    @app.get("/")
    async def root() -> dict[str, str]:
        return {}

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        response = await client.get("/", headers={"X-Request-ID": "plain"})
    assert response.headers["x-request-id"] == "plain"


async def test_events_are_counted_on_the_metrics_route() -> None:
    """An event published on the bus shows up once in /metrics with its kind and name."""
    app = FastAPI()
    resilience = install(app, ResilienceSettings())
    resilience.events.emit("breaker.opened", "counted-once", failures=5)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        text = (await client.get("/metrics")).text
    assert 'fastapi_resilience_events_total{kind="breaker.opened",name="counted-once"} 1.0' in text


async def test_metrics_can_be_switched_off() -> None:
    """metrics_enabled=False mounts no /metrics route."""
    app = FastAPI()
    install(app, ResilienceSettings(metrics_enabled=False))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        assert (await client.get("/metrics")).status_code == 404


async def test_missing_prometheus_extra_is_named_once_at_install(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Without prometheus-client, metrics on (the default) logs one warning naming the extra,
    instead of a silent 404 at /metrics; with metrics off, nothing is said."""
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # unimportable
    caplog.set_level(logging.WARNING, logger="fastapi_resilience")
    app = FastAPI()
    resilience = install(app, ResilienceSettings(rate_limit_enabled=False))
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "pip install 'fastapi-resilience[prometheus]'" in message
    assert "metrics_enabled" in message
    assert "/metrics" in message
    assert resilience.metrics is None
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        assert (await client.get("/metrics")).status_code == 404
        assert (await client.get("/health/live")).status_code == 200

    caplog.clear()
    install(FastAPI(), ResilienceSettings(rate_limit_enabled=False, metrics_enabled=False))
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_ready_is_degraded_while_a_breaker_is_open(
    default_breakers: BreakerRegistry,
) -> None:
    """/health/ready never says ok while a registered breaker is open, and names it."""
    from fastapi_resilience import CircuitBreaker

    app = FastAPI()
    install(app, ResilienceSettings())
    breaker = CircuitBreaker("install-test-inventory")
    transport = httpx.ASGITransport(app=app)
    try:
        breaker.force_open()
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            body = (await client.get("/health/ready")).json()
            breaker.reset()
            after = (await client.get("/health/ready")).json()
    finally:
        default_breakers.unregister("install-test-inventory")
    assert body["status"] == "degraded"
    assert "install-test-inventory" in body["checks"]["breakers"]["detail"]
    assert after["status"] == "ok"


async def test_routes_defined_after_install_keep_its_paths_and_their_own() -> None:
    """install() before the app's routes, as the README does: the health and metrics paths
    stay install()'s (a catch-all defined later does not swallow them), every other path
    reaches the app's routes; the health routes are out of the OpenAPI schema (ADR 0046)."""
    app = FastAPI()
    install(app, ResilienceSettings(rate_limit_enabled=False))

    @app.get("/health/live")
    async def shadowed() -> dict[str, str]:  # pragma: no cover - never reached
        return {"status": "mine"}

    @app.get("/{rest:path}")
    async def catch_all(rest: str) -> dict[str, str]:
        return {"rest": rest}

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        live = await client.get("/health/live")
        ready = await client.get("/health/ready")
        metrics = await client.get("/metrics")
        other = await client.get("/orders/7")
        post_live = await client.post("/health/live")
    assert live.json() == {"status": "ok"}
    assert ready.json()["status"] == "ok"
    assert metrics.text.startswith("# HELP")
    assert other.json() == {"rest": "orders/7"}
    # A path install() owns, with the wrong method: 405 from its route, not the catch-all.
    assert post_live.status_code == 405
    # The app's own ``/health/live`` is listed (shadowed, as it always was); install()'s are not.
    assert set(app.openapi()["paths"]) == {"/health/live", "/{rest}"}
    assert app.openapi()["paths"]["/health/live"]["get"]["operationId"].startswith("shadowed")


async def test_health_routes_behind_a_root_path() -> None:
    """Under ``--root-path /api`` the request path carries the prefix; the routes still match."""
    app = FastAPI()
    install(app, ResilienceSettings(rate_limit_enabled=False))
    transport = httpx.ASGITransport(app=app, root_path="/api")
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        live = await client.get("/api/health/live")
    assert live.json() == {"status": "ok"}


def test_install_puts_its_fixed_paths_behind_one_route_entry() -> None:
    """Health and metrics are one entry of the app's routes (ADR 0046), and still reachable
    by name."""
    app = FastAPI()
    before = len(app.routes)
    install(app, ResilienceSettings(rate_limit_enabled=False))
    added = app.routes[before:]
    assert len(added) == 1
    scope = {"type": "http", "method": "GET", "root_path": ""}
    for path in ("/health/live", "/health/ready", "/metrics"):
        assert added[0].matches({**scope, "path": path})[0] is Match.FULL
    assert added[0].matches({**scope, "path": "/orders"})[0] is Match.NONE
    assert app.url_path_for("ready") == "/health/ready"
    assert app.url_path_for("metrics") == "/metrics"
    with pytest.raises(NoMatchFound):
        app.url_path_for("no-such-route")


async def test_health_in_schema_lists_the_health_routes() -> None:
    app = FastAPI()
    install(app, ResilienceSettings(rate_limit_enabled=False, health_in_schema=True))

    @app.get("/orders")
    async def orders() -> list[int]:
        return [1]

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        live = await client.get("/health/live")
        other = await client.get("/orders")
    assert live.json() == {"status": "ok"}
    assert other.json() == [1]
    paths = set(app.openapi()["paths"])
    assert {"/health/live", "/health/ready", "/orders"} == paths


async def test_fixed_path_group_under_opentelemetry_instrumentation() -> None:
    """An instrumented app serves the group's paths, 405 included, and its spans carry the
    matched route's template as ``http.route``, as for any route; the group itself has no
    template outside a request that it matched."""
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    app = FastAPI()
    before = len(app.routes)
    install(app, ResilienceSettings(rate_limit_enabled=False))
    (group,) = app.routes[before:]  # the one entry install adds (ADR 0046)

    @app.get("/orders/{order_id}")
    async def order(order_id: int) -> int:
        return order_id

    assert group.path is None
    assert group.path_format is None
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    FastAPIInstrumentor.instrument_app(app, tracer_provider=provider)
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            live = await client.get("/health/live")
            ready = await client.get("/health/ready")
            wrong_method = await client.post("/health/live")
            other = await client.get("/orders/7")
    finally:
        FastAPIInstrumentor.uninstrument_app(app)
    assert live.json() == {"status": "ok"}
    assert ready.status_code == 200
    assert wrong_method.status_code == 405
    assert other.json() == 7
    servers = [span for span in exporter.get_finished_spans() if span.kind.name == "SERVER"]
    routes = [(span.attributes or {}).get("http.route") for span in servers]
    assert routes == ["/health/live", "/health/ready", "/health/live", "/orders/{order_id}"]
    # In a context of its own (a server runs each request in a task with a fresh copy of its
    # context), nothing of those requests' matches is seen.
    assert contextvars.Context().run(lambda: group.path) is None


async def _started(app: FastAPI) -> list[str]:
    """Run the app's lifespan start-up and shutdown, as a server does; the route order at
    start-up, by class name (``FixedPathRoutes`` is the group)."""
    order: list[str] = []
    async with app.router.lifespan_context(app):
        order = [type(route).__name__ for route in app.router.routes]
    return order


async def test_group_moves_behind_the_app_routes_at_start_up() -> None:
    """Routes defined after install() no longer meet the group first (ADR 0047); health and
    the app's routes answer as before, and the group's names still resolve."""
    app = FastAPI(openapi_url=None)
    install(app, ResilienceSettings(rate_limit_enabled=False))

    @app.get("/orders")
    async def orders() -> list[int]:
        return [1]

    @app.post("/health/other")
    async def other() -> str:
        return "other"

    app.mount("/static", FastAPI())

    assert [type(r).__name__ for r in app.router.routes][-4:] == [
        "FixedPathRoutes",
        "APIRoute",
        "APIRoute",
        "Mount",
    ]
    assert (await _started(app))[-1] == "FixedPathRoutes"
    assert app.url_path_for("live") == "/health/live"
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        assert (await client.get("/orders")).json() == [1]
        assert (await client.get("/health/live")).json() == {"status": "ok"}
        assert (await client.post("/health/live")).status_code == 405
        assert (await client.post("/health/other")).json() == "other"


@pytest.mark.parametrize(
    "blocker", ["catch_all", "same_path", "same_name", "root_mount", "named_in_mount", "own_match"]
)
async def test_group_stops_before_a_route_that_might_serve_its_paths(blocker: str) -> None:
    """The group never moves past a route that could answer one of its paths or names, nor
    past one whose matching it cannot judge: what answers /health/live is unchanged."""
    app = FastAPI()
    install(app, ResilienceSettings(rate_limit_enabled=False))

    @app.get("/orders")
    async def orders() -> list[int]:
        return [1]

    async def shadowing() -> str:
        return "app's"

    if blocker == "catch_all":
        app.add_api_route("/{rest:path}", shadowing)
    elif blocker == "same_path":
        app.add_api_route("/health/live", shadowing, methods=["POST"])
    elif blocker == "same_name":
        app.add_api_route("/elsewhere", shadowing, name="ready")
    elif blocker == "root_mount":
        app.mount("/", FastAPI())
    elif blocker == "named_in_mount":
        sub = FastAPI()
        sub.add_api_route("/r", shadowing, name="ready")
        app.mount("/sub", sub)
    else:

        class OwnMatch(APIRoute):
            def matches(self, scope):  # type: ignore[no-untyped-def]
                return super().matches(scope)

        app.router.routes.append(OwnMatch("/elsewhere", shadowing))

    @app.get("/after")
    async def after() -> str:
        return "after"

    order = await _started(app)
    assert order[-3:] == ["FixedPathRoutes", order[-2], "APIRoute"]
    assert order[-4] == "APIRoute"  # moved past /orders
    assert app.url_path_for("ready") == "/health/ready"
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        assert (await client.get("/health/live")).json() == {"status": "ok"}


async def _mine() -> str:  # pragma: no cover - the app refuses to start, nothing is served
    return "mine"


@pytest.mark.parametrize("in_schema", [False, True], ids=["grouped", "in_schema"])
@pytest.mark.parametrize("when", ["before_install", "after_install"])
@pytest.mark.parametrize(
    ("path", "setting"),
    [
        ("/metrics", "metrics_path"),
        ("/health/live", "health_path"),
        ("/health/ready", "health_path"),
    ],
)
async def test_app_route_at_a_fixed_path_is_refused_at_start_up(
    when: str, path: str, setting: str, in_schema: bool
) -> None:
    """An app's own GET route at a path install() serves would be shadowed (or shadow ours):
    refused, naming the setting and how to move install()'s route: at install() for a route
    defined before it, at start-up for one defined after."""
    app = FastAPI()
    settings = ResilienceSettings(rate_limit_enabled=False, health_in_schema=in_schema)
    if when == "before_install":
        app.add_api_route(path, _mine)
        with pytest.raises(ConfigurationError) as info:
            install(app, settings)
    else:
        install(app, settings)
        app.add_api_route(path, _mine)
        with pytest.raises(ConfigurationError) as info:
            await _started(app)
    message = str(info.value)
    for name in (setting, f"RESILIENCE_{setting.upper()}=", repr(path), "_mine"):
        assert name in message


async def test_app_mount_at_the_metrics_path_is_refused_at_start_up() -> None:
    """prometheus_client's own ``app.mount("/metrics", make_asgi_app())`` is an app route there."""
    from prometheus_client import make_asgi_app

    app = FastAPI()
    install(app, ResilienceSettings(rate_limit_enabled=False))
    app.mount("/metrics", make_asgi_app())
    with pytest.raises(ConfigurationError, match="RESILIENCE_METRICS_PATH="):
        await _started(app)


async def test_app_keeps_its_own_metrics_route_when_install_moves_away() -> None:
    """With metrics_path moved (or metrics off), the app's /metrics and install()'s both serve;
    a route at the path for another method only (POST /health/live) is no conflict."""
    app = FastAPI()

    @app.get("/metrics")
    async def mine() -> str:
        return "mine"

    install(app, ResilienceSettings(rate_limit_enabled=False, metrics_path="/internal/metrics"))

    @app.post("/health/live")
    async def post_live() -> str:
        return "posted"

    await _started(app)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        assert (await client.get("/metrics")).json() == "mine"
        assert (await client.get("/internal/metrics")).text.startswith("# HELP")
        assert (await client.get("/health/live")).json() == {"status": "ok"}
        assert (await client.post("/health/live")).json() == "posted"
    off = FastAPI()
    off.add_api_route("/metrics", mine)
    install(off, ResilienceSettings(rate_limit_enabled=False, metrics_enabled=False))
    await _started(off)


async def test_app_with_install_mounted_inside_another() -> None:
    """A sub-app with its own install(), mounted in an app with one: one ID for both (the
    outer's), one limiter (the outer's: one set of headers), and nothing fails when the request
    ends."""
    outer = FastAPI()
    install(outer, ResilienceSettings(rate_limit_tiers={"anonymous": "1/minute"}))
    inner = FastAPI()
    install(inner, ResilienceSettings(rate_limit_tiers={"anonymous": "100/minute"}))

    @inner.get("/x")
    async def x() -> dict[str, str | None]:
        from fastapi_resilience import get_correlation_id

        return {"id": get_correlation_id()}

    outer.mount("/sub", inner)
    transport = httpx.ASGITransport(app=outer)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        first = await client.get("/sub/x", headers={"X-Request-ID": "outer-1"})
        second = await client.get("/sub/x", headers={"X-Request-ID": "outer-2"})
    assert first.status_code == 200
    assert first.json() == {"id": "outer-1"}
    assert first.headers.get_list("x-request-id") == ["outer-1"]
    assert first.headers.get_list("x-ratelimit-limit") == ["1"]
    assert second.status_code == 429  # the outer app's limit
    assert second.headers.get_list("x-request-id") == ["outer-2"]
    assert second.json()["correlation_id"] == "outer-2"


def _raising_middleware(app: ASGIApp) -> ASGIApp:
    """Pure ASGI middleware that fails before the app answers."""

    async def fail(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            raise RuntimeError("outer middleware failed")
        await app(scope, receive, send)

    return fail


async def _answered_once_with_id(
    app: FastAPI, path: str, request_id: str, caplog: pytest.LogCaptureFixture
) -> None:
    """``path`` fails: one 500 problem+json carrying ``request_id``, and one log record of it."""
    caplog.set_level(logging.INFO)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        response = await client.get(path, headers={"X-Request-ID": request_id})
    assert response.status_code == 500
    assert response.json()["correlation_id"] == request_id
    assert response.headers.get_list("x-request-id") == [request_id]
    assert [r.correlation_id for r in caplog.records if r.exc_info] == [request_id]


async def test_errors_are_answered_once_with_the_id_and_starlettes_layer_kept(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """install()'s layer answers every error itself, once, with the ID; Starlette's own layer
    outside it stays as Starlette built it (tools look for it; nothing of it is replaced)."""
    app = FastAPI()
    install(app, ResilienceSettings())

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("secret")

    await _answered_once_with_id(app, "/boom", "idle-1", caplog)
    assert type(app.middleware_stack) is ServerErrorMiddleware


async def test_mounted_app_error_is_answered_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A sub-app with install() mounted in an app with one: its route's error is answered by
    the outer layer, once, with the outer ID (the sub-app's Starlette layer used to answer and
    log it too, then re-raise it to the outer one)."""
    outer = FastAPI()
    install(outer, ResilienceSettings())
    inner = FastAPI()
    install(inner, ResilienceSettings())

    @inner.get("/boom")
    async def boom() -> None:
        raise RuntimeError("secret")

    outer.mount("/sub", inner)
    await _answered_once_with_id(outer, "/sub/boom", "outer-500", caplog)


@pytest.mark.parametrize("setup", ["middleware_after_install", "debug", "own_500_handler"])
async def test_starlette_error_layer_stays_when_it_has_work(setup: str) -> None:
    """Starlette's layer keeps catching where install()'s does not reach or the app asks for
    its own answers: middleware added after install(), debug tracebacks, a 500 handler of the
    user's. An error in middleware outside install()'s layer still gets an answer."""
    app = FastAPI()
    install(app, ResilienceSettings())

    @app.get("/ok")
    async def ok() -> dict[str, str]:
        return {"status": "ok"}

    if setup == "middleware_after_install":
        app.add_middleware(_raising_middleware)
    elif setup == "debug":
        app.debug = True
    else:

        @app.exception_handler(Exception)
        async def own(request: Request, exc: Exception) -> Response:
            return PlainTextResponse("ours", status_code=500)

    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        response = await client.get("/ok")
    assert type(app.middleware_stack) is ServerErrorMiddleware
    if setup == "middleware_after_install":
        assert response.status_code == 500
        assert response.json()["code"] == "internal_error"
    else:
        assert response.status_code == 200


def _cors_app(cors: str) -> FastAPI:
    from starlette.middleware.cors import CORSMiddleware

    app = FastAPI()
    if cors == "before":
        app.add_middleware(
            CORSMiddleware, allow_origins=["https://ui.example"], allow_methods=["*"]
        )
    install(app, ResilienceSettings(rate_limit_tiers={"anonymous": "2/minute"}))
    if cors == "after":
        app.add_middleware(
            CORSMiddleware, allow_origins=["https://ui.example"], allow_methods=["*"]
        )

    @app.get("/orders")
    async def orders() -> list[int]:
        return []

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("boom")

    return app


@pytest.mark.parametrize("cors", ["before", "after"])
def test_cors_headers_on_429_and_500_and_preflights_never_counted(cors: str) -> None:
    """CORSMiddleware added before or after install(): a browser can read the 429 and the
    500 (both carry Access-Control-Allow-Origin), and preflights use none of the budget."""
    from fastapi.testclient import TestClient

    client = TestClient(_cors_app(cors), raise_server_exceptions=False)
    origin = {"Origin": "https://ui.example"}
    preflight = {**origin, "Access-Control-Request-Method": "GET"}
    assert [client.options("/orders", headers=preflight).status_code for _ in range(3)] == [
        200,
        200,
        200,
    ]
    failed = client.get("/boom", headers=origin)
    assert failed.status_code == 500
    assert failed.headers["access-control-allow-origin"] == "https://ui.example"
    assert failed.headers["content-type"] == "application/problem+json"
    assert client.get("/orders", headers=origin).status_code == 200
    refused = client.get("/orders", headers=origin)
    assert refused.status_code == 429
    assert refused.headers["access-control-allow-origin"] == "https://ui.example"
    assert "x-request-id" in refused.headers


def test_install_twice_is_refused() -> None:
    app = FastAPI()
    install(app)
    with pytest.raises(ConfigurationError, match=r"install\(\) was already called"):
        install(app)
    assert len(app.user_middleware) == 1


def test_documentation_routes_are_not_counted_by_default() -> None:
    from fastapi.testclient import TestClient

    app = FastAPI(docs_url="/api-docs")
    install(app, ResilienceSettings(rate_limit_tiers={"anonymous": "1/minute"}))
    client = TestClient(app)
    for path in ["/openapi.json", "/api-docs", "/redoc", "/docs/oauth2-redirect"] * 2:
        answer = client.get(path)
        assert answer.status_code == 200, path
        assert "x-ratelimit-remaining" not in answer.headers
    counted = FastAPI()
    install(
        counted,
        ResilienceSettings(
            rate_limit_tiers={"anonymous": "1/minute"}, rate_limit_exempt_docs=False
        ),
    )
    answers = [TestClient(counted).get("/openapi.json").status_code for _ in range(2)]
    assert answers == [200, 429]


def test_test_client_raises_the_routes_exception_after_the_500() -> None:
    """Under install() TestClient raises a route's exception, as Starlette's own error layer
    makes it do; ``raise_server_exceptions=False`` gets the 500 problem+json instead."""
    from fastapi.testclient import TestClient

    app = FastAPI()
    install(app)

    @app.get("/boom")
    async def boom() -> None:
        raise LookupError("the route's own error")

    with pytest.raises(LookupError, match="the route's own error"):
        TestClient(app).get("/boom")
    answer = TestClient(app, raise_server_exceptions=False).get("/boom")
    assert answer.status_code == 500
    assert answer.json()["code"] == "internal_error"


async def test_a_real_server_is_not_handed_the_exception_unless_asked() -> None:
    """Outside TestClient the 500 is the end of it; ``raise_server_exceptions=True`` hands the
    exception on after answering, for servers or tools that want it."""
    for setting, raised in [(None, False), (True, True)]:
        app = FastAPI()
        install(app, ResilienceSettings(raise_server_exceptions=setting))

        @app.get("/boom")
        async def boom() -> None:
            raise LookupError("boom")

        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            if raised:
                with pytest.raises(LookupError):
                    await client.get("/boom")
            else:
                assert (await client.get("/boom")).status_code == 500


@pytest.mark.parametrize("path", ["/metrics", "/health/ready"])
def test_an_included_routers_route_at_a_fixed_path_is_refused(path: str) -> None:
    """A route of an included ``APIRouter`` at install()'s paths hides them just as an app
    route does (readiness would never report an open breaker): refused the same way."""
    from fastapi import APIRouter

    app = FastAPI()
    router = APIRouter()

    @router.get(path)
    async def mine() -> dict[str, bool]:
        return {"mine": True}

    app.include_router(router)
    with pytest.raises(ConfigurationError, match=r"metrics_path|health_path"):
        install(app)
