from __future__ import annotations

import asyncio
import logging

import httpx
import pytest
from fastapi import Depends, FastAPI

from fastapi_resilience import (
    Bulkhead,
    bulkhead_dependency,
    get_bulkhead,
    install_exception_handlers,
)
from fastapi_resilience.events import Event, EventBus
from fastapi_resilience.exceptions import BulkheadFullError, ConfigurationError
from fastapi_resilience.outbound import BulkheadRegistry, TieredBulkhead

pytestmark = pytest.mark.anyio

#: Where the rate limiter (or a middleware of the app's own) records the request's tier, as
#: docs/bulkhead.md names it.
TIER_SCOPE_KEY = "fastapi_resilience.rate_limit_tier"


def make(**kwargs: object) -> Bulkhead:
    return Bulkhead("b", registry=None, **kwargs)  # type: ignore[arg-type]


async def hold(bulkhead: Bulkhead, gate: asyncio.Event) -> str:
    async with bulkhead:
        await gate.wait()
    return "done"


async def settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


async def test_refuses_at_once_when_full_and_no_line() -> None:
    """With max_waiting=0 the call beyond max_concurrent gets BulkheadFullError at once."""
    bulkhead = make(max_concurrent=2)
    gate = asyncio.Event()
    holders = [asyncio.create_task(hold(bulkhead, gate)) for _ in range(2)]
    await settle()
    assert bulkhead.active == 2
    with pytest.raises(BulkheadFullError) as info:
        async with bulkhead:
            pytest.fail("must not run")
    assert info.value.extensions == {"bulkhead": "b"}
    assert bulkhead.rejected == 1
    gate.set()
    await asyncio.gather(*holders)
    assert bulkhead.active == 0


async def test_waiting_line_is_first_come_first_served() -> None:
    """Waiters get freed slots in arrival order; the line is bounded by max_waiting."""
    bulkhead = make(max_concurrent=1, max_waiting=2)
    order: list[int] = []
    gate = asyncio.Event()

    async def worker(i: int) -> None:
        async with bulkhead:
            order.append(i)
            await gate.wait()

    first = asyncio.create_task(worker(0))
    await settle()
    waiters = [asyncio.create_task(worker(i)) for i in (1, 2)]
    await settle()
    assert bulkhead.waiting == 2
    with pytest.raises(BulkheadFullError):
        await bulkhead.acquire()
    gate.set()
    await asyncio.gather(first, *waiters)
    assert order == [0, 1, 2]
    assert (bulkhead.active, bulkhead.waiting) == (0, 0)


async def test_wait_timeout_refuses_and_frees_the_place_in_line() -> None:
    """A wait longer than wait_timeout ends in BulkheadFullError and leaves no trace."""
    bulkhead = make(max_concurrent=1, max_waiting=1, wait_timeout=0.02)
    gate = asyncio.Event()
    holder = asyncio.create_task(hold(bulkhead, gate))
    await settle()
    with pytest.raises(BulkheadFullError, match="no slot freed"):
        await bulkhead.acquire()
    assert bulkhead.waiting == 0
    gate.set()
    await holder
    async with bulkhead:
        assert bulkhead.active == 1


async def test_cancelled_waiter_does_not_leak_a_slot() -> None:
    """Cancelling a waiting call, even one just handed a slot, never loses capacity."""
    bulkhead = make(max_concurrent=1, max_waiting=5)
    gate = asyncio.Event()
    holder = asyncio.create_task(hold(bulkhead, gate))
    await settle()
    waiter = asyncio.create_task(hold(bulkhead, asyncio.Event()))
    await settle()
    gate.set()
    await holder  # the slot is handed to ``waiter`` ...
    waiter.cancel()  # ... which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert bulkhead.active == 0
    async with bulkhead:
        pass


async def test_full_and_available_are_published_once() -> None:
    """bulkhead.full is published when refusing starts, bulkhead.available when it ends."""
    bus = EventBus(log=False)
    seen: list[Event] = []
    bus.subscribe(seen.append)
    bulkhead = Bulkhead("pub", max_concurrent=1, events=bus, registry=None)
    gate = asyncio.Event()
    holder = asyncio.create_task(hold(bulkhead, gate))
    await settle()
    for _ in range(5):
        with pytest.raises(BulkheadFullError):
            await bulkhead.acquire()
    gate.set()
    await holder
    # Once each, at WARNING and INFO; every refused call besides at DEBUG (a span event).
    changes = [e for e in seen if e.kind != "bulkhead.rejected"]
    assert [e.kind for e in changes] == ["bulkhead.full", "bulkhead.available"]
    assert changes[1].attributes["rejected"] == 5
    rejections = [e for e in seen if e.kind == "bulkhead.rejected"]
    assert len(rejections) == 5
    assert {e.level for e in rejections} == {logging.DEBUG}


async def test_call_and_decorator_hold_a_slot() -> None:
    """bulkhead.call and @bulkhead run the function holding a slot and give it back."""
    bulkhead = make(max_concurrent=1)

    @bulkhead
    async def work() -> int:
        return bulkhead.active

    assert await work() == 1
    assert await bulkhead.call(work.__wrapped__) == 1  # type: ignore[attr-defined]
    assert bulkhead.active == 0


async def test_tiered_compartments_are_independent() -> None:
    """A full free compartment leaves the premium one untouched; unknown tiers use the default."""
    tiered = TieredBulkhead("t", {"free": (1, 0), "premium": (2, 0)}, registry=None)
    assert tiered.default_tier == "free"
    assert tiered.for_tier("nobody") is tiered.for_tier("free")
    assert tiered.for_tier(None) is tiered.for_tier("free")
    assert tiered.for_scope({TIER_SCOPE_KEY: "premium"}) is tiered.for_tier("premium")
    gate = asyncio.Event()
    holder = asyncio.create_task(hold(tiered.for_tier("free"), gate))
    await settle()
    with pytest.raises(BulkheadFullError, match="t:free"):
        async with tiered.acquire("free"):
            pass
    async with tiered.acquire("premium") as compartment:
        assert compartment.name == "t:premium"
    gate.set()
    await holder


async def test_registry_and_dependency_pick_the_tier_compartment() -> None:
    """bulkhead_dependency hands the request's tier compartment, and 503 bulkhead_full when full."""
    registry = BulkheadRegistry()
    tiered = TieredBulkhead("dep", {"free": (1, 0), "premium": (1, 0)}, registry=registry)
    assert get_bulkhead("dep", registry) is tiered
    assert bulkhead_dependency("dep", registry=registry) is bulkhead_dependency(
        "dep", registry=registry
    )
    app = FastAPI()
    install_exception_handlers(app)
    gate = asyncio.Event()

    @app.get("/work")
    async def work(
        bulkhead: Bulkhead = Depends(bulkhead_dependency("dep", registry=registry)),  # noqa: B008
    ) -> dict[str, str]:
        async with bulkhead:
            await gate.wait()
        return {"compartment": bulkhead.name}

    async def tiered_app(scope, receive, send):  # type: ignore[no-untyped-def]
        for key, value in scope.get("headers", ()):
            if key == b"x-tier":
                scope[TIER_SCOPE_KEY] = value.decode()
        await app(scope, receive, send)

    transport = httpx.ASGITransport(app=tiered_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        busy = asyncio.create_task(client.get("/work"))
        for _ in range(1000):  # bounded: the request reaches the route in a few loop turns
            if tiered.for_tier("free").active:
                break
            await asyncio.sleep(0)
        refused = await client.get("/work")
        assert refused.status_code == 503
        assert refused.json()["code"] == "bulkhead_full"
        gate.set()
        premium = await client.get("/work", headers={"x-tier": "premium"})
        assert premium.json() == {"compartment": "dep:premium"}
        assert (await busy).json() == {"compartment": "dep:free"}


async def test_default_registry_replaces_by_name(default_bulkheads: BulkheadRegistry) -> None:
    """Registering a bulkhead name again replaces it; unknown names raise LookupError."""
    first = Bulkhead("reg-test")
    second = Bulkhead("reg-test")
    assert get_bulkhead("reg-test") is second is not first
    default_bulkheads.unregister("reg-test")
    with pytest.raises(LookupError, match="reg-test"):
        get_bulkhead("reg-test")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_concurrent": 0}, "max_concurrent"),
        ({"max_waiting": -1}, "max_waiting"),
        ({"wait_timeout": -1.0}, "wait_timeout"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs: dict[str, object], field: str) -> None:
    """A bad argument raises ConfigurationError naming it."""
    with pytest.raises(ConfigurationError, match=field):
        make(**kwargs)


def test_bad_tiers_fail_at_construction() -> None:
    """No tiers, a malformed size or an unknown default tier are configuration errors."""
    with pytest.raises(ConfigurationError, match="at least one tier"):
        TieredBulkhead("t", {}, registry=None)
    with pytest.raises(ConfigurationError, match="default_tier"):
        TieredBulkhead("t", {"free": (1, 0)}, default_tier="gold", registry=None)
    with pytest.raises(ConfigurationError, match="max_concurrent, max_waiting"):
        TieredBulkhead("t", {"free": 3}, registry=None)  # type: ignore[dict-item]


async def test_installed_rate_limiter_picks_the_tier_compartment() -> None:
    """Under ``install()``, the compartment is the tier the rate limiter resolved (API key)."""
    from fastapi_resilience import ResilienceSettings, install

    registry = BulkheadRegistry()
    TieredBulkhead("api", {"free": (1, 0), "premium": (5, 0)}, registry=registry)
    app = FastAPI()
    install(
        app,
        ResilienceSettings(
            rate_limit_tiers={"anonymous": "100/minute", "premium": "1000/minute"},
            rate_limit_api_keys={"pk-1": "premium"},
        ),
    )

    @app.get("/which")
    async def which(
        bulkhead: Bulkhead = Depends(bulkhead_dependency("api", registry=registry)),  # noqa: B008
    ) -> dict[str, str]:
        return {"compartment": bulkhead.name}

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        premium = await client.get("/which", headers={"X-API-Key": "pk-1"})
        anonymous = await client.get("/which")
    assert premium.json() == {"compartment": "api:premium"}
    assert anonymous.json() == {"compartment": "api:free"}


async def test_a_smaller_bulkhead_lets_no_waiter_in_past_its_new_size() -> None:
    bulkhead = Bulkhead("shrunk", max_concurrent=4, max_waiting=4, registry=None)
    for _ in range(4):
        await bulkhead.acquire()
    waiters = [asyncio.create_task(bulkhead.acquire()) for _ in range(4)]
    await asyncio.sleep(0)
    bulkhead.resize(max_concurrent=1, max_waiting=4)
    for _ in range(4):
        bulkhead.release()
    await asyncio.sleep(0)
    assert bulkhead.active <= 1
    assert sum(task.done() for task in waiters) == 1
    for task in waiters:
        task.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)
