"""``ExternalService`` against the example's flaky inventory upstream on loopback: parsed
answers, errors mapped to problem details, the named policy's breaker, the health check and
closing."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from loopback import UvicornProcess

from fastapi_resilience import (
    CircuitOpenError,
    ConfigurationError,
    ExternalService,
    NotFoundError,
    ResilienceSettings,
    UpstreamError,
    install,
    policy,
)

pytestmark = pytest.mark.anyio

#: Every policy this module's services use, declared by each app (an app that declared only
#: its own would leave the others undeclared, and start-up refuses those).
POLICIES: dict[str, Any] = {
    "stock": {
        "breaker": {"failure_threshold": 2, "recovery_timeout": 60.0},
        "retry": {"attempts": 2, "base_delay": 0.01, "max_delay": 0.02},
        "timeout": 2.0,
    },
}


class Stock(ExternalService):
    """The upstream's stock levels, read as ``(sku, units)``."""

    policy = "stock"
    health_path = "/health"

    def parse(self, response: httpx.Response) -> tuple[str, int]:
        body = response.json()
        return body["sku"], body["stock"]

    async def level(self, sku: str) -> tuple[str, int]:
        level: tuple[str, int] = await self.get(f"/stock/{sku}")
        return level


class OptionalStock(Stock):
    """The same upstream, whose failure only degrades the app."""

    name = "optional_stock"
    health_critical = False


@pytest.fixture(name="upstream", scope="module")
def _upstream() -> Iterator[UvicornProcess]:
    """The example's flaky inventory service on a free loopback port."""
    server = UvicornProcess("example_app.upstream:app")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(name="control")
async def _control(upstream: UvicornProcess) -> AsyncIterator[httpx.AsyncClient]:
    """Drives the upstream (failure rate, ...), reset before and after each test."""
    async with httpx.AsyncClient(base_url=upstream.url) as control:
        await control.post("/_control", json={"reset": True})
        yield control
        await control.post("/_control", json={"reset": True})


@asynccontextmanager
async def app_with(service: ExternalService) -> AsyncIterator[httpx.AsyncClient]:
    """An app that declares the policies, registers ``service`` and serves ``GET /level/{sku}``
    through it; its health results are never cached, so each call sees the upstream now."""
    app = FastAPI()
    settings = ResilienceSettings(
        policies=POLICIES, rate_limit_enabled=False, health_cache_seconds=0
    )
    resilience = install(app, settings)
    service.register(resilience, app=app)

    @app.get("/level/{sku}")
    async def level(sku: str) -> dict[str, Any]:
        assert isinstance(service, Stock)
        name, units = await service.level(sku)
        return {"sku": name, "units": units}

    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://t") as client,
    ):
        yield client


async def upstream_requests(control: httpx.AsyncClient) -> int:
    return int((await control.get("/_control")).json()["requests"])


async def test_a_call_returns_the_parsed_answer(
    upstream: UvicornProcess, control: httpx.AsyncClient
) -> None:
    """A subclass's method returns what its ``parse`` made of the upstream's answer."""
    service = Stock(upstream.url)
    async with app_with(service) as client:
        assert await service.level("bolt") == ("bolt", sum(b"bolt") % 50)
        answer = await client.get("/level/nut")
    assert answer.json() == {"sku": "nut", "units": sum(b"nut") % 50}


async def test_a_404_is_a_not_found_problem_through_a_route(
    upstream: UvicornProcess, control: httpx.AsyncClient
) -> None:
    """The upstream's 404 is ``NotFoundError``: a 404 problem+json from the app's route,
    without the upstream's own text."""
    service = Stock(upstream.url)
    async with app_with(service) as client:
        with pytest.raises(NotFoundError):
            await service.level("missing-bolt")
        answer = await client.get("/level/missing-bolt")
    assert answer.status_code == 404
    assert answer.headers["content-type"] == "application/problem+json"
    assert answer.json()["code"] == "not_found"
    assert "bad day" not in answer.text
    assert "missing-bolt" not in answer.json()["detail"]


async def test_a_5xx_after_retries_is_an_upstream_error_and_trips_the_breaker(
    upstream: UvicornProcess, control: httpx.AsyncClient
) -> None:
    """Every attempt answered 503: the call raises the library's upstream error once the
    policy's retries are spent, its breaker opens, and the next call is refused unsent."""
    service = Stock(upstream.url)
    async with app_with(service) as client:
        await control.post("/_control", json={"failure_rate": 1.0})
        with pytest.raises(UpstreamError):
            await service.level("bolt")
        assert await upstream_requests(control) == 2  # the policy's two attempts
        assert policy("stock").breaker.state == "open"
        sent = await upstream_requests(control)
        with pytest.raises(CircuitOpenError):
            await service.level("bolt")
        refused = await client.get("/level/bolt")
    assert await upstream_requests(control) == sent
    assert refused.status_code == 503
    assert refused.json()["code"] == "circuit_open"


@pytest.mark.parametrize(("cls", "down"), [(Stock, "unhealthy"), (OptionalStock, "degraded")])
async def test_the_health_check_reports_the_upstream_down_and_up(
    upstream: UvicornProcess, control: httpx.AsyncClient, cls: type[Stock], down: str
) -> None:
    """``register`` adds the check under the service's name, critical or not as the class
    says: ``/health/ready`` reports the upstream down while its health route fails, up after."""
    service = cls(upstream.url)
    async with app_with(service) as client:
        up = (await client.get("/health/ready")).json()
        await control.post("/_control", json={"failure_rate": 1.0})
        failing = await client.get("/health/ready")
        await control.post("/_control", json={"failure_rate": 0.0})
        again = (await client.get("/health/ready")).json()
    assert up["status"] == "ok"
    assert up["checks"][service.name]["status"] == "ok"
    assert failing.status_code == (503 if down == "unhealthy" else 200)
    assert failing.json()["status"] == down
    assert failing.json()["checks"][service.name]["status"] == down
    assert again["status"] == "ok"


async def test_the_recovery_action_opens_new_pools_and_retires_the_old(
    upstream: UvicornProcess, control: httpx.AsyncClient
) -> None:
    """``reconnect`` (the check's recovery action) swaps in a new client that still works;
    ``aclose`` closes the old one too, without waiting for its grace period."""
    service = Stock(upstream.url)
    old = service.client
    async with app_with(service):
        await service.reconnect()
        assert service.client is not old
        assert not old.is_closed  # calls in flight may still use it
        assert await service.level("nut") == ("nut", sum(b"nut") % 50)
    assert old.is_closed
    assert service.client.is_closed


async def test_aclose_closes_the_client(upstream: UvicornProcess) -> None:
    """``aclose`` (or leaving ``async with``) closes the client; so does the app's shutdown
    when ``register`` was given the app."""
    async with Stock(upstream.url) as service:
        assert not service.client.is_closed
    assert service.client.is_closed

    registered = Stock(upstream.url)
    async with app_with(registered):
        assert not registered.client.is_closed
    assert registered.client.is_closed


def test_base_url_and_policy_are_required() -> None:
    """Without a base URL (class or constructor) or a policy, the class says what is missing;
    the constructor's URL wins over the class's."""

    class NoPolicy(ExternalService):
        base_url = "http://127.0.0.1:1"

    with pytest.raises(ConfigurationError, match="base_url"):
        Stock()
    with pytest.raises(ConfigurationError, match="policy"):
        NoPolicy()
    assert Stock("http://127.0.0.1:2").base_url == "http://127.0.0.1:2"


async def test_an_undeclared_policy_stops_the_start_up_once_registered(
    upstream: UvicornProcess,
) -> None:
    """Building a service asks nothing of the settings (a module may build one at import);
    registering it does, so the app's start-up refuses a policy the settings do not declare."""

    class Undeclared(Stock):
        policy = "undeclared"

    Undeclared(upstream.url)  # no client yet: nothing is refused
    with pytest.raises(ConfigurationError, match="'undeclared' is used at"):
        async with app_with(Undeclared(upstream.url)):
            pass
