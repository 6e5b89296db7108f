"""Route limits (``Depends(rate_limit(...))``) in the shapes apps take: no ``install()``, a
mounted sub-app, an exempt path, the same limit on a router and its route."""

from __future__ import annotations

import logging

import pytest
from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.testclient import TestClient

from fastapi_resilience import (
    ResilienceSettings,
    install,
    install_exception_handlers,
    rate_limit,
)

ROOMY = {"anonymous": "1000/minute"}


def _limited_app(limit: str = "2/minute") -> FastAPI:
    app = FastAPI()

    @app.get("/hello", dependencies=[Depends(rate_limit(limit))])
    async def hello() -> dict[str, str]:
        return {"app": "main"}

    return app


def test_route_limit_without_install_answers_429_in_the_apps_own_format() -> None:
    """Only ``Depends(rate_limit(...))``: the refusal is a 429 with Retry-After, rendered by the
    app's HTTPException handler (FastAPI's ``{"detail": ...}``), never a 500."""
    app = _limited_app("1/minute")
    client = TestClient(app)
    assert client.get("/hello").status_code == 200
    refused = client.get("/hello")
    assert refused.status_code == 429
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.headers["content-type"] == "application/json"
    assert "1/minute" in refused.json()["detail"]


def test_route_limit_with_the_handlers_alone_answers_problem_json() -> None:
    app = _limited_app("1/minute")
    install_exception_handlers(app)
    client = TestClient(app)
    client.get("/hello")
    refused = client.get("/hello")
    assert refused.status_code == 429
    assert refused.headers["content-type"] == "application/problem+json"
    assert refused.json()["code"] == "rate_limited"
    assert int(refused.headers["retry-after"]) >= 1
    assert "x-request-id" in refused.headers


def _app_with_sub_app() -> FastAPI:
    app = _limited_app("2/minute")
    install(app, ResilienceSettings(rate_limit_tiers=ROOMY))
    sub = FastAPI()

    @sub.get("/hello", dependencies=[Depends(rate_limit("2/minute"))])
    async def sub_hello() -> dict[str, str]:
        return {"app": "sub"}

    app.mount("/v2", sub)
    return app


def test_sub_app_route_limit_answers_429_problem_json_and_logs_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A route limit in a mounted sub-app under install(): 429 problem+json with the ID and
    Retry-After, and no traceback in the log (it was a 500 and a traceback per request)."""
    with TestClient(_app_with_sub_app()) as client, caplog.at_level(logging.DEBUG):
        assert [client.get("/v2/hello").status_code for _ in range(2)] == [200, 200]
        refused = client.get("/v2/hello", headers={"X-Request-ID": "sub-1"})
    assert refused.status_code == 429
    assert refused.headers["content-type"] == "application/problem+json"
    assert refused.headers["x-request-id"] == "sub-1"
    assert refused.json()["correlation_id"] == "sub-1"
    assert int(refused.headers["retry-after"]) >= 1
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_sub_app_route_limits_do_not_share_the_parents_budget() -> None:
    """``/hello`` and ``/v2/hello`` (a sub-app's ``/hello``) are two routes, two budgets."""
    with TestClient(_app_with_sub_app()) as client:
        assert [client.get("/hello").status_code for _ in range(2)] == [200, 200]
        assert [client.get("/v2/hello").status_code for _ in range(3)] == [200, 200, 429]
        assert client.get("/hello").status_code == 429
        assert client.get("/v2/hello").json()["detail"].endswith("for tier 'anonymous'")


def test_exempt_path_does_not_count_its_route_limit() -> None:
    app = _limited_app("1/minute")
    install(app, ResilienceSettings(rate_limit_exempt_paths=["/hello"]))
    client = TestClient(app)
    answers = [client.get("/hello") for _ in range(3)]
    assert [r.status_code for r in answers] == [200, 200, 200]
    assert "ratelimit" not in answers[-1].headers


@pytest.mark.parametrize("installed", [True, False], ids=["install", "dependency-only"])
def test_the_same_limit_on_a_router_and_its_route_counts_once(installed: bool) -> None:
    """``rate_limit("4/minute")`` on the router and again on the route (two objects): four
    requests pass, the fifth is refused, and the policy is listed once."""
    app = FastAPI()
    router = APIRouter(prefix="/api", dependencies=[Depends(rate_limit("4/minute"))])

    @router.get("/x", dependencies=[Depends(rate_limit("4/minute"))])
    async def x() -> dict[str, str]:
        return {}

    app.include_router(router)
    if installed:
        install(app, ResilienceSettings(rate_limit_tiers=ROOMY))
    client = TestClient(app)
    answers = [client.get("/api/x") for _ in range(5)]
    assert [r.status_code for r in answers] == [200, 200, 200, 200, 429]
    if installed:
        policy = answers[0].headers["ratelimit-policy"]
        assert policy == '"anonymous";q=1000;w=60, "/api/x";q=4;w=60'
        assert '"/api/x";r=0;' in answers[3].headers["ratelimit"]
        assert answers[4].json()["violated-policies"] == ["/api/x"]
    else:
        assert answers[3].headers["x-ratelimit-remaining"] == "0"


def test_a_shadow_copy_of_an_enforced_limit_keeps_it_enforced() -> None:
    app = FastAPI()
    router = APIRouter(dependencies=[Depends(rate_limit("2/minute", shadow=True))])

    @router.get("/x", dependencies=[Depends(rate_limit("2/minute"))])
    async def x() -> dict[str, str]:
        return {}

    app.include_router(router)
    install(app, ResilienceSettings(rate_limit_tiers=ROOMY))
    client = TestClient(app)
    assert [client.get("/x").status_code for _ in range(3)] == [200, 200, 429]


def test_a_mount_with_parameters_keys_its_routes_by_template() -> None:
    """``/tenants/{tenant}/login``: one budget whatever the tenant, so changing a path segment
    gives no fresh budget, and the policy is named by the template, not the client's text."""
    app = FastAPI()
    install(app, ResilienceSettings(rate_limit_tiers=ROOMY))
    tenants = FastAPI()

    @tenants.get("/login", dependencies=[Depends(rate_limit("2/minute"))])
    async def login() -> dict[str, str]:
        return {}

    app.mount("/tenants/{tenant}", tenants)
    with TestClient(app) as client:
        answers = [client.get(f"/tenants/{name}/login") for name in ("a", "a", "b", "c")]
    assert [a.status_code for a in answers] == [200, 200, 429, 429]
    assert answers[-1].json()["violated-policies"] == ["/tenants/{tenant}/login"]


def test_a_rate_limit_awaited_by_another_dependency_is_named_by_the_template() -> None:
    per_order = rate_limit("2/minute")

    async def unless_internal(request: Request, response: Response) -> None:
        if request.headers.get("x-internal") != "1":
            await per_order(request, response)

    app = FastAPI()
    install(app, ResilienceSettings(rate_limit_tiers=ROOMY))

    @app.get("/orders/{order_id}", dependencies=[Depends(unless_internal)])
    async def order(order_id: int) -> int:
        return order_id

    client = TestClient(app)
    answers = [client.get(f"/orders/{n}") for n in (1, 2, 3)]
    assert [a.status_code for a in answers] == [200, 200, 429]
    assert '"/orders/{order_id}";q=2;w=60' in answers[0].headers["ratelimit-policy"]
    assert client.get("/orders/4", headers={"X-Internal": "1"}).status_code == 200


@pytest.mark.parametrize("mount_at", ["/", "/v2"])
def test_an_installed_sub_app_leaves_one_limiter_counting(mount_at: str) -> None:
    """A sub-app with its own install() under an app with one: the app's limiter counts every
    request, the app's own routes and the sub-app's alike, with one set of headers; mounted at
    ``/`` it does not take the app's routes out of their limits."""
    app = FastAPI()
    install(app, ResilienceSettings(rate_limit_tiers={"anonymous": "3/minute"}))

    @app.get("/own", dependencies=[Depends(rate_limit("2/minute"))])
    async def own() -> dict[str, str]:
        return {}

    sub = FastAPI()
    install(sub, ResilienceSettings(rate_limit_tiers={"anonymous": "100/minute"}))

    @sub.get("/x")
    async def x() -> dict[str, str]:
        return {}

    app.mount(mount_at, sub)
    sub_path = "/x" if mount_at == "/" else f"{mount_at}/x"
    with TestClient(app) as client:
        assert [client.get("/own").status_code for _ in range(3)] == [200, 200, 429]
        answer = client.get(sub_path)
        assert answer.status_code == 200
        assert answer.headers.get_list("ratelimit-policy") == ['"anonymous";q=3;w=60']
        assert client.get(sub_path).status_code == 429


def test_a_sub_app_shared_by_app_factories_is_served_by_the_app_started_last() -> None:
    """An app factory mounting a module-level sub-app, called once per test: each app, once
    started, serves the sub-app with its own settings (it was refused as already mounted)."""
    from fastapi_resilience import requires_feature

    shared = FastAPI()

    @shared.get("/reports", dependencies=[Depends(requires_feature("reports"))])
    async def reports() -> list[str]:
        return []

    def create_app(reports_on: bool) -> FastAPI:
        app = FastAPI()
        resilience = install(app, ResilienceSettings(expose_error_details=reports_on))
        resilience.degraded.feature("reports")
        if not reports_on:
            resilience.degraded.disable("reports", reason="test")
        app.mount("/v2", shared)
        return app

    first, second = create_app(reports_on=True), create_app(reports_on=False)
    with TestClient(first) as client:
        assert client.get("/v2/reports").status_code == 200
    with TestClient(second) as client:
        assert client.get("/v2/reports").status_code == 503


def test_an_installed_sub_app_is_started_with_the_app() -> None:
    """Starlette runs no lifespan of a mounted app: the app's start-up runs the sub-app's
    install() checks (an undeclared feature stops it, as it would the sub-app alone)."""
    from fastapi_resilience import ConfigurationError, requires_feature

    app = FastAPI()
    install(app)
    sub = FastAPI()
    install(sub)

    @sub.get("/reports", dependencies=[Depends(requires_feature("reportz"))])
    async def reports() -> list[str]:
        return []

    app.mount("/v2", sub)
    with pytest.raises(ConfigurationError, match="reportz"), TestClient(app):
        pass


def test_rate_limit_on_a_websocket_route_is_refused_at_start_up() -> None:
    from fastapi import WebSocket

    from fastapi_resilience import ConfigurationError

    app = FastAPI()
    install(app)

    @app.websocket("/ws", dependencies=[Depends(rate_limit("5/minute"))])
    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()

    with pytest.raises(ConfigurationError, match="WebSocket route /ws"), TestClient(app):
        pass


def test_an_options_request_with_preflight_headers_is_counted_without_cors() -> None:
    """With no CORS layer nothing answers a preflight before the route: an OPTIONS request
    carrying Origin and Access-Control-Request-Method is counted like any other."""
    app = FastAPI()
    install(app, ResilienceSettings(rate_limit_tiers={"anonymous": "2/minute"}))

    @app.api_route("/x", methods=["GET", "OPTIONS"])
    async def x() -> dict[str, str]:
        return {}

    client = TestClient(app)
    looks_like_preflight = {"Origin": "https://a.example", "Access-Control-Request-Method": "GET"}
    answers = [client.options("/x", headers=looks_like_preflight) for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 429]


def test_an_installed_sub_apps_exempt_paths_stay_exempt() -> None:
    """The app's limiter counts a mounted app that has its own install(), and takes over its
    exempt paths: the sub-app's health routes are never counted."""
    app = FastAPI()
    install(app, ResilienceSettings(rate_limit_tiers={"anonymous": "2/minute"}))
    sub = FastAPI()
    install(sub)
    app.mount("/sub", sub)
    with TestClient(app) as client:
        answers = [client.get("/sub/health/ready") for _ in range(4)]
    assert [a.status_code for a in answers] == [200] * 4
    assert "x-ratelimit-remaining" not in answers[-1].headers


@pytest.mark.parametrize("shape", ["middleware", "host", "routes"])
def test_every_way_of_mounting_is_served(shape: str) -> None:
    """A sub-app behind its own middleware, behind a ``Host``, and routes mounted without an
    app at a path with parameters: problem answers, the app's features, template keys."""
    from starlette.middleware import Middleware
    from starlette.middleware.gzip import GZipMiddleware
    from starlette.routing import Host, Mount

    from fastapi_resilience import requires_feature

    app = FastAPI()
    resilience = install(app, ResilienceSettings(rate_limit_tiers=ROOMY))
    resilience.degraded.feature("reports")
    resilience.degraded.disable("reports", reason="test")
    sub = FastAPI()

    @sub.get("/login", dependencies=[Depends(rate_limit("1/minute"))])
    async def login() -> dict[str, str]:
        return {}

    @sub.get("/reports", dependencies=[Depends(requires_feature("reports"))])
    async def reports() -> list[str]:
        return []

    if shape == "middleware":
        app.router.routes.append(
            Mount("/t/{tenant}", app=sub, middleware=[Middleware(GZipMiddleware)])
        )
    elif shape == "host":
        app.router.routes.append(Host("api.example", app=sub))
    else:
        app.router.routes.append(Mount("/t/{tenant}", routes=sub.router.routes))
    base = "" if shape == "host" else "/t/a"
    headers = {"Host": "api.example"} if shape == "host" else {}
    with TestClient(app) as client:
        assert client.get(f"{base}/login", headers=headers).status_code == 200
        other = "" if shape == "host" else "/t/b"
        refused = client.get(f"{other}/login", headers=headers)
        assert refused.status_code == 429
        assert refused.headers["content-type"] == "application/problem+json"
        assert refused.json()["violated-policies"] == [
            ("" if shape == "host" else "/t/{tenant}") + "/login"
        ]
        off = client.get(f"{base}/reports", headers=headers)
        assert off.status_code == 503
        assert off.json()["code"] == "feature_unavailable"
        missing = client.get(f"{base}/nope", headers=headers)
        assert missing.headers["content-type"] == "application/problem+json"


def test_a_sub_app_route_limit_shows_the_tier_too() -> None:
    """A route limit the middleware could not see (in a mounted sub-app) is answered with one
    set of fields for the tier and the route: the tighter tier still shows in
    ``X-RateLimit-*``, both policies in the IETF fields."""
    app = FastAPI()
    install(app, ResilienceSettings(rate_limit_tiers={"anonymous": "3/minute"}))
    sub = FastAPI()

    @sub.get("/search", dependencies=[Depends(rate_limit("10/minute"))])
    async def search() -> list[str]:
        return []

    app.mount("/v2", sub)
    with TestClient(app) as client:
        answers = [client.get("/v2/search") for _ in range(4)]
    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    assert [a.headers["x-ratelimit-remaining"] for a in answers[:3]] == ["2", "1", "0"]
    assert answers[0].headers.get_list("x-ratelimit-limit") == ["3"]
    assert answers[0].headers["ratelimit-policy"] == (
        '"anonymous";q=3;w=60, "/v2/search";q=10;w=60'
    )


def test_a_plain_rate_limit_middleware_outside_leaves_one_limiter() -> None:
    from fastapi_resilience import RateLimitMiddleware

    sub = FastAPI()

    @sub.get("/hello")
    async def hello() -> dict[str, str]:
        return {}

    install(sub, ResilienceSettings(rate_limit_tiers={"anonymous": "5/minute"}))
    app = FastAPI()
    app.add_middleware(
        RateLimitMiddleware,
        settings=ResilienceSettings(rate_limit_tiers={"anonymous": "100/minute"}),
    )
    app.mount("/sub", sub)
    with TestClient(app) as client:
        answer = client.get("/sub/hello")
    assert answer.headers.get_list("x-ratelimit-limit") == ["100"]
