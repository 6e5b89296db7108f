from __future__ import annotations

import random
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from fastapi_resilience import CircuitBreaker, install_exception_handlers
from fastapi_resilience.exceptions import CircuitOpenError, ConfigurationError
from fastapi_resilience.outbound import BreakerRegistry
from fastapi_resilience.testing import (
    FAULT_CODE,
    FaultInjectionMiddleware,
    FaultInjectionTransport,
    FaultRule,
    ManualClock,
    force_breaker,
)

pytestmark = pytest.mark.anyio


def upstream_app() -> FastAPI:
    app = FastAPI()

    @app.get("/stock/{sku}")
    async def stock(sku: str) -> dict[str, Any]:
        return {"sku": sku, "stock": 4}

    return app


def faulty_client(faults: FaultInjectionTransport) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=faults, base_url="http://inventory")


# --- FaultInjectionTransport ------------------------------------------------------------------


async def test_transport_passes_requests_through_by_default() -> None:
    """With no fault configured, the wrapped transport answers as usual."""
    faults = FaultInjectionTransport(httpx.ASGITransport(app=upstream_app()))
    async with faulty_client(faults) as client:
        response = await client.get("/stock/a")
    assert response.json() == {"sku": "a", "stock": 4}
    assert (faults.requests, faults.injected) == (1, 0)


async def test_transport_error_rate_one_raises_the_chosen_exception() -> None:
    """error_rate=1 raises the configured httpx exception, carrying the request."""
    faults = FaultInjectionTransport(
        httpx.ASGITransport(app=upstream_app()), error_rate=1.0, exception=httpx.ReadTimeout
    )
    async with faulty_client(faults) as client:
        with pytest.raises(httpx.ReadTimeout) as info:
            await client.get("/stock/a")
    assert info.value.request.url.path == "/stock/a"
    assert faults.injected == 1


async def test_transport_status_faults_answer_error_statuses_with_retry_after() -> None:
    """status_rate=1 answers one of status_codes, with Retry-After when asked."""
    faults = FaultInjectionTransport(
        httpx.ASGITransport(app=upstream_app()),
        status_rate=1.0,
        status_codes=(429,),
        retry_after=2.5,
    )
    async with faulty_client(faults) as client:
        response = await client.get("/stock/a")
    assert response.status_code == 429
    assert response.headers["Retry-After"] == "3"
    assert response.json()["code"] == FAULT_CODE


async def test_transport_faults_only_the_chosen_hosts() -> None:
    """Hosts outside `hosts` are never disturbed."""
    faults = FaultInjectionTransport(
        httpx.ASGITransport(app=upstream_app()), error_rate=1.0, hosts={"payments"}
    )
    async with faulty_client(faults) as client:
        assert (await client.get("/stock/a")).status_code == 200
        with pytest.raises(httpx.ConnectError):
            await client.get("http://PAYMENTS/charge")


async def test_transport_latency_uses_the_injected_sleep() -> None:
    """Latency goes through the injected sleep, so a manual clock makes it instant and exact."""
    clock = ManualClock()
    faults = FaultInjectionTransport(
        httpx.ASGITransport(app=upstream_app()), latency=0.75, sleep=clock.sleep
    )
    async with faulty_client(faults) as client:
        await client.get("/stock/a")
        await client.get("/stock/b")
    assert clock.slept == [0.75, 0.75]


async def test_transport_error_rate_is_a_probability_and_can_change_at_run_time() -> None:
    """With a seeded random, error_rate=0.3 fails about 30% of 500 calls; 0 then stops faults."""
    faults = FaultInjectionTransport(
        httpx.ASGITransport(app=upstream_app()), error_rate=0.3, random=random.Random(7).random
    )
    failures = 0
    async with faulty_client(faults) as client:
        for _ in range(500):
            try:
                await client.get("/stock/a")
            except httpx.ConnectError:
                failures += 1
        assert 110 <= failures <= 190
        faults.error_rate = 0.0
        assert (await client.get("/stock/a")).status_code == 200


async def test_transport_faults_open_a_breaker() -> None:
    """Injected connect errors count as breaker failures, as a real outage would."""
    breaker = CircuitBreaker("inventory", failure_threshold=3, registry=None, clock=ManualClock())
    faults = FaultInjectionTransport(httpx.ASGITransport(app=upstream_app()), error_rate=1.0)
    async with faulty_client(faults) as client:
        for _ in range(3):
            with pytest.raises(httpx.ConnectError):
                await breaker.call(client.get, "/stock/a")
        with pytest.raises(CircuitOpenError):
            await breaker.call(client.get, "/stock/a")
    assert faults.requests == 3


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"error_rate": 1.5}, "error_rate"),
        ({"status_rate": -0.1}, "status_rate"),
        ({"latency": -1}, "latency"),
        ({"status_codes": ()}, "status_codes"),
    ],
)
def test_transport_rejects_bad_arguments(kwargs: dict[str, Any], name: str) -> None:
    """Out-of-range fault settings raise ConfigurationError naming the argument."""
    with pytest.raises(ConfigurationError, match=name):
        FaultInjectionTransport(httpx.ASGITransport(app=upstream_app()), **kwargs)


# --- FaultInjectionMiddleware -----------------------------------------------------------------


def my_app(rules: list[FaultRule], **kwargs: Any) -> FastAPI:
    app = FastAPI()
    install_exception_handlers(app)

    @app.get("/orders/{order_id}")
    async def order(order_id: str) -> dict[str, str]:
        return {"order": order_id}

    @app.post("/orders")
    async def create() -> dict[str, str]:
        return {"order": "new"}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    app.add_middleware(FaultInjectionMiddleware, rules=rules, **kwargs)
    return app


async def test_middleware_fails_matching_routes_as_problem_json() -> None:
    """A matching rule with error_rate=1 answers its status as problem+json with Retry-After."""
    rules = [FaultRule(path_prefix="/orders", error_rate=1.0, status=503, retry_after=4)]
    app = my_app(rules)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        failed = await c.get("/orders/1")
        untouched = await c.get("/health")
    assert failed.status_code == 503
    assert failed.headers["content-type"] == "application/problem+json"
    assert failed.headers["Retry-After"] == "4"
    assert failed.json()["code"] == FAULT_CODE
    assert untouched.json() == {"status": "ok"}


async def test_middleware_rules_filter_by_method_and_change_at_run_time() -> None:
    """methods= limits a rule; the kept rules list can be edited while the app runs."""
    rules = [FaultRule(path_prefix="/orders", error_rate=1.0, status=500, methods=["post"])]
    app = my_app(rules)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        assert (await c.get("/orders/1")).status_code == 200
        assert (await c.post("/orders")).status_code == 500
        rules[0].error_rate = 0.0
        assert (await c.post("/orders")).status_code == 200
        rules.append(FaultRule(path_prefix="/health", error_rate=1.0, status=502))
        assert (await c.get("/health")).status_code == 502


async def test_middleware_latency_is_added_before_the_route() -> None:
    """Latency on a rule delays matching requests through the injected sleep."""
    clock = ManualClock()
    app = my_app([FaultRule(path_prefix="/orders", latency=1.5)], sleep=clock.sleep)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        assert (await c.get("/orders/1")).status_code == 200
        await c.get("/health")
    assert clock.slept == [1.5]


def test_fault_rule_rejects_bad_values() -> None:
    """A rule with an impossible rate or status is refused when built."""
    with pytest.raises(ConfigurationError, match="error_rate"):
        FaultRule(error_rate=2)
    with pytest.raises(ConfigurationError, match="status"):
        FaultRule(status=42)


# --- force_breaker ----------------------------------------------------------------------------


async def test_force_breaker_open_by_name_then_restores_closed() -> None:
    """Inside the block calls fail fast without reaching fn; afterwards the breaker is closed."""
    registry = BreakerRegistry()
    breaker = CircuitBreaker("payments", registry=registry, clock=ManualClock())
    calls = 0

    async def charge() -> str:
        nonlocal calls
        calls += 1
        return "ok"

    with force_breaker("payments", "open", registry=registry) as forced:
        assert forced is breaker
        assert breaker.state == "open"
        with pytest.raises(CircuitOpenError) as info:
            await breaker.call(charge)
        assert info.value.headers["Retry-After"] == "30"
    assert breaker.state == "closed"
    assert await breaker.call(charge) == "ok"
    assert calls == 1


async def test_force_breaker_half_open_admits_only_the_trial_calls() -> None:
    """Half-open admits half_open_max_calls trial calls; a success closes it as usual."""
    breaker = CircuitBreaker("h", half_open_max_calls=1, registry=None, clock=ManualClock())
    with force_breaker(breaker, "half_open"):
        assert breaker.state == "half_open"
        assert await breaker.call(_ok) == "ok"
        assert breaker.state == "closed"


async def test_force_breaker_restores_an_open_breaker_with_its_time_left() -> None:
    """A breaker that was open goes back to open, with the open time it had left."""
    clock = ManualClock()
    breaker = CircuitBreaker("o", recovery_timeout=30, registry=None, clock=clock)
    breaker.force_open()
    clock.advance(10)
    with force_breaker(breaker, "closed"):
        assert await breaker.call(_ok) == "ok"
    assert breaker.state == "open"
    assert breaker.time_left_open() == pytest.approx(20)


def test_force_breaker_rejects_unknown_states_and_names() -> None:
    """An unknown state raises ConfigurationError; an unknown name raises LookupError."""
    registry = BreakerRegistry()
    CircuitBreaker("known", registry=registry)
    with (
        pytest.raises(ConfigurationError, match="state"),
        force_breaker("known", "ajar", registry=registry),
    ):  # type: ignore[arg-type]
        pass
    with pytest.raises(LookupError), force_breaker("unknown", "open", registry=registry):
        pass


async def _ok() -> str:
    return "ok"
