from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from loopback import UvicornProcess

from example_app.outbound import Inventory, build_router
from example_app.rate_limits import POLICIES
from fastapi_resilience import ResilienceSettings, install
from fastapi_resilience.testing import ManualClock

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

ADMIN = "/resilience/api"
ADMIN_TOKEN = "test-admin-token-0123456789"
TOKEN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture(name="upstream", scope="module")
def _upstream() -> Iterator[UvicornProcess]:
    """The flaky inventory service on a free loopback port, one per module."""
    server = UvicornProcess("example_app.upstream:app")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(name="setup")
async def _setup(
    upstream: UvicornProcess,
) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient, ManualClock]]:
    """(client of the example app, control client of the upstream, the app's clock)."""
    clock = ManualClock()
    inventory = Inventory(upstream.url, clock=clock)
    app = FastAPI()
    settings = ResilienceSettings(
        admin_token=ADMIN_TOKEN, rate_limit_enabled=False, policies=POLICIES
    )
    resilience = install(app, settings, clock=clock)
    resilience.use_dead_letters(inventory.dead_letters, replay=inventory.replay)
    app.include_router(build_router(inventory))
    control = httpx.AsyncClient(base_url=upstream.url)
    await control.post("/_control", json={"reset": True})
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        yield c, control, clock
    await control.aclose()
    await inventory.aclose()


async def upstream_requests(control: httpx.AsyncClient) -> int:
    data: dict[str, Any] = (await control.get("/_control")).json()
    return int(data["requests"])


async def test_route_degrades_to_the_stale_answer_when_upstream_fails_every_call(
    setup: tuple[httpx.AsyncClient, httpx.AsyncClient, ManualClock],
) -> None:
    """With the upstream failing 100%, the route serves the cached copy marked stale, then the
    breaker opens and the upstream is no longer called while stale answers continue."""
    client, control, clock = setup
    fresh = await client.get("/inventory/widget")
    assert fresh.status_code == 200
    assert fresh.json()["stale"] is False
    assert fresh.headers["Cache-Status"] == "inventory; fwd=miss; stored"

    await control.post("/_control", json={"failure_rate": 1.0})
    clock.advance(6)  # past the 5 s ttl: the next read must go upstream
    stale = await client.get("/inventory/widget")
    assert stale.status_code == 200
    body = stale.json()
    assert body["stale"] is True
    assert body["stock"] == fresh.json()["stock"]
    assert body["served_at"] == fresh.json()["served_at"]
    assert body["stale_because"] == "retries_exhausted"
    assert stale.headers["Cache-Status"] == (
        "inventory; fwd=stale; fwd-status=503; ttl=-1; detail=retries_exhausted"
    )
    assert await upstream_requests(control) == 1 + 3  # the first read, then 3 attempts

    for _ in range(2):  # two more exhausted reads reach the breaker's threshold of 3
        assert (await client.get("/inventory/widget")).json()["stale"] is True
    calls_when_open = await upstream_requests(control)
    for _ in range(5):
        response = await client.get("/inventory/widget")
        assert response.json()["stale_because"] == "circuit_open"
        # Not forwarded (the breaker refused), so "hit"; a negative ttl marks it stale.
        assert re.fullmatch(
            r"inventory; hit; ttl=-\d+; detail=circuit_open", response.headers["Cache-Status"]
        )
    assert await upstream_requests(control) == calls_when_open


async def test_without_a_cached_copy_the_error_or_the_fallback_answers(
    setup: tuple[httpx.AsyncClient, httpx.AsyncClient, ManualClock],
) -> None:
    """Nothing cached: the plain route answers 503 circuit_open, the fallback route degrades."""
    client, control, _clock = setup
    await control.post("/_control", json={"failure_rate": 1.0})
    for _ in range(3):
        assert (await client.get("/inventory/gadget")).status_code == 502
    refused = await client.get("/inventory/gadget")
    assert refused.status_code == 503
    assert refused.json()["code"] == "circuit_open"
    assert refused.headers["Retry-After"] == "10"
    degraded = await client.get("/inventory/gadget/availability")
    assert degraded.status_code == 200
    assert degraded.json() == {
        "sku": "gadget",
        "available": None,
        "degraded": True,
        "stale": False,
    }


async def test_failed_reservation_is_parked_and_replayed_after_recovery(
    setup: tuple[httpx.AsyncClient, httpx.AsyncClient, ManualClock],
) -> None:
    """A reservation that fails goes to the dead-letter queue; replay after recovery applies it."""
    client, control, clock = setup
    await control.post("/_control", json={"failure_rate": 1.0})
    queued = await client.post("/inventory/bolt/reserve", params={"qty": 2})
    assert queued.status_code == 202
    assert queued.json()["reason"] == "upstream_error"
    letters = (await client.get(f"{ADMIN}/dead-letters", headers=TOKEN)).json()["letters"]
    assert [x["context"] for x in letters] == [{"sku": "bolt", "qty": 2}]
    assert await upstream_requests(control) == 1  # not idempotent: tried once, not retried

    await control.post("/_control", json={"failure_rate": 0.0})
    clock.advance(11)
    report = (await client.post(f"{ADMIN}/dead-letters/replay", headers=TOKEN)).json()
    assert report["succeeded"] == [letters[0]["id"]]
    assert report["failed"] == []
    assert (await client.get(f"{ADMIN}/dead-letters", headers=TOKEN)).json()["letters"] == []
    stock = (await control.get("/stock/bolt")).json()["stock"]
    assert stock == sum(b"bolt") % 50 - 2


async def test_one_line_transport_route_also_degrades_to_stale(
    setup: tuple[httpx.AsyncClient, httpx.AsyncClient, ManualClock],
) -> None:
    """The resilient_client route serves its cached copy, marked stale, when the upstream fails."""
    client, control, clock = setup
    fresh = await client.get("/catalog/nut")
    assert fresh.status_code == 200
    assert fresh.json()["stale"] is False
    await control.post("/_control", json={"failure_rate": 1.0})
    clock.advance(6)
    stale = await client.get("/catalog/nut")
    assert stale.status_code == 200
    assert stale.json()["stale"] is True
    assert stale.json()["served_at"] == fresh.json()["served_at"]
    assert stale.headers["Cache-Status"] == (
        "catalog; fwd=stale; fwd-status=503; ttl=-1; detail=retries_exhausted"
    )


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/catalog/%14%C3%81%C3%B8%09"),  # control characters: httpx refuses such a URL
        ("GET", "/inventory/%F3%A4%A3%BD%0E"),
        ("GET", "/inventory/%2E%2E/availability"),  # "..": the upstream's path would climb
        ("GET", "/inventory/a%20b%25c"),
        ("POST", "/inventory/%18T%C3%89/reserve"),
        ("GET", "/catalog/" + "a" * 65),
        ("GET", "/inventory/.hidden"),
    ],
)
async def test_a_sku_that_cannot_be_forwarded_is_refused_with_422(
    setup: tuple[httpx.AsyncClient, httpx.AsyncClient, ManualClock], method: str, path: str
) -> None:
    """A path value the example could not forward as it is answers 422 problem+json, like any
    invalid input; the upstream is not called and no breaker counts it."""
    client, control, _clock = setup
    for _ in range(5):  # more than the breakers' threshold of 3
        refused = await client.request(method, path)
        assert refused.status_code == 422
        assert refused.headers["content-type"] == "application/problem+json"
        problem = refused.json()
        assert problem["status"] == 422
        assert [error["loc"] for error in problem["errors"]] == [["path", "sku"]]
    assert await upstream_requests(control) == 0
    assert (await client.get("/inventory/tea-earl-grey")).status_code == 200  # breaker closed


@pytest.mark.parametrize("qty", ["0", "-3", "1001", "99999999999999999999"])
async def test_a_quantity_out_of_range_is_refused_with_422(
    setup: tuple[httpx.AsyncClient, httpx.AsyncClient, ManualClock], qty: str
) -> None:
    client, control, _clock = setup
    refused = await client.post("/inventory/bolt/reserve", params={"qty": qty})
    assert refused.status_code == 422
    assert [error["loc"] for error in refused.json()["errors"]] == [["query", "qty"]]
    assert await upstream_requests(control) == 0
