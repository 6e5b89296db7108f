"""Route limits (``Depends(rate_limit(...))``) in the shapes apps take: no ``install()``, a
mounted sub-app, an exempt path, the same limit on a router and its route."""

from __future__ import annotations

import logging

import pytest
from fastapi import APIRouter, Depends, FastAPI
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
