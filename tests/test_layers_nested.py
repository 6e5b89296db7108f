"""The library's layers stacked and nested the ways apps combine them: each request is counted,
logged and cleaned up once, whatever runs between the layers."""

from __future__ import annotations

import logging

import httpx
import pytest
from fastapi import Depends, FastAPI, Request, Response
from fastapi.testclient import TestClient

from fastapi_resilience import (
    RateLimitMiddleware,
    RequestDeadlineMiddleware,
    ResilienceSettings,
    get_correlation_id,
    install,
    rate_limit,
    remaining,
)
from fastapi_resilience.exceptions import StorageUnavailableError
from fastapi_resilience.ratelimit import LimitCheck, MemoryStorage, RateLimiter

pytestmark = pytest.mark.anyio


async def test_a_mounted_install_behind_an_http_middleware_answers_and_cleans_up() -> None:
    """``@app.middleware("http")`` runs the app inside it in another task: the mounted app's
    correlation ID is set and unset there, not by the outer layer."""
    sub = FastAPI()

    @sub.get("/x")
    async def x() -> dict[str, str | None]:
        return {"id": get_correlation_id()}

    install(sub, ResilienceSettings(rate_limit_enabled=False))

    @sub.middleware("http")
    async def passthrough(request: Request, call_next):  # type: ignore[no-untyped-def]
        return await call_next(request)

    outer = FastAPI()
    outer.mount("/sub", sub)
    outer.add_middleware(RequestDeadlineMiddleware, timeout=10)
    transport = httpx.ASGITransport(app=outer)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        answers = [await client.get("/sub/x") for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert all(a.json()["id"] == a.headers["x-request-id"] for a in answers)
    assert get_correlation_id() is None


async def test_two_deadline_middlewares_both_end_with_the_request() -> None:
    """A mounted app's deadline and the outer app's: after the request, neither is left in
    the task that sent it (an in-process client, a server that reuses its task)."""
    inner = FastAPI()

    @inner.get("/x")
    async def x() -> dict[str, float | None]:
        return {"remaining": remaining()}

    inner.add_middleware(RequestDeadlineMiddleware, timeout=5, header=None, header_floor=0.1)
    outer = FastAPI()
    outer.mount("/sub", inner)
    outer.add_middleware(RequestDeadlineMiddleware, timeout=30, header=None, header_floor=0.1)
    transport = httpx.ASGITransport(app=outer)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        answer = await client.get("/sub/x")
    assert answer.status_code == 200
    assert 0 < answer.json()["remaining"] <= 5
    assert remaining() is None


def test_an_unhandled_error_is_logged_once_with_its_id(caplog: pytest.LogCaptureFixture) -> None:
    """Under ``TestClient`` the exception is raised again to Starlette's error layer, which
    calls the handler a second time: one log record, carrying the request's ID."""
    app = FastAPI()

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("boom")

    install(app, ResilienceSettings(rate_limit_enabled=False))
    with (
        caplog.at_level(logging.ERROR, logger="fastapi_resilience"),
        TestClient(app, raise_server_exceptions=False) as client,
    ):
        answer = client.get("/boom")
    records = [r for r in caplog.records if r.getMessage().startswith("unhandled")]
    assert answer.status_code == 500
    assert [getattr(r, "correlation_id", None) for r in records] == [answer.headers["x-request-id"]]


def test_a_route_limit_awaited_by_another_dependency_adds_its_policy() -> None:
    """Two ``rate_limit`` dependencies on one route, the second awaited inside another
    dependency: both count, and both policies are named apart in the fields."""
    per_route = rate_limit("5/minute")
    expensive = rate_limit("2/minute")

    async def search_guard(request: Request, response: Response) -> None:
        if request.query_params.get("deep"):
            await expensive(request, response)

    app = FastAPI()

    @app.get("/search", dependencies=[Depends(per_route), Depends(search_guard)])
    async def search() -> dict[str, str]:
        return {}

    with TestClient(app) as client:
        answers = [client.get("/search?deep=1") for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 429]
    fields = answers[1].headers["ratelimit"]
    assert '"/search";r=3' in fields
    assert '"/search-2-60s";r=0' in fields


class _DownMemory(MemoryStorage):
    """An in-process storage that cannot answer: what a test double for an outage looks like."""

    def try_admit(self, check: LimitCheck) -> tuple[int, float] | None:
        raise StorageUnavailableError("down", retry_after=2)

    def check_many(self, checks: object) -> object:  # type: ignore[override]
        raise StorageUnavailableError("down", retry_after=2)


@pytest.mark.parametrize(("fail_open", "status"), [(False, 503), (True, 200)])
def test_an_in_process_storage_that_cannot_answer_follows_fail_open(
    fail_open: bool, status: int
) -> None:
    app = FastAPI()

    @app.get("/")
    async def root() -> dict[str, str]:
        return {}

    limiter = RateLimiter(_DownMemory(), tiers={"anonymous": "100/minute"}, fail_open=fail_open)
    app.add_middleware(RateLimitMiddleware, limiter=limiter)
    answer = TestClient(app).get("/")
    assert answer.status_code == status
    if status == 503:
        assert answer.headers["retry-after"] == "2"
