"""The metrics through the OpenTelemetry metrics API: the same instruments, read by an
OpenTelemetry SDK reader."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from fastapi_resilience import CircuitBreaker, ResilienceSettings, install
from fastapi_resilience.testing import ManualClock

pytestmark = pytest.mark.anyio


def points(reader: InMemoryMetricReader) -> dict[str, list[Any]]:
    """Every data point the reader collected, by instrument name."""
    found: dict[str, list[Any]] = {}
    data = reader.get_metrics_data()
    for resource in data.resource_metrics if data is not None else ():
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                found.setdefault(metric.name, []).extend(metric.data.data_points)
    return found


def attributes_of(point: Any) -> dict[str, Any]:
    return dict(point.attributes or {})


async def test_the_same_instruments_reach_an_opentelemetry_reader() -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    app = FastAPI()
    install(app, ResilienceSettings(rate_limit_enabled=False), meter_provider=provider)
    breaker = CircuitBreaker("otel-breaker", failure_threshold=1, clock=ManualClock())

    @app.get("/otel-items/{item_id}")
    async def item(item_id: int) -> dict[str, int]:
        return {"id": item_id}

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        for n in range(3):
            assert (await client.get(f"/otel-items/{n}")).status_code == 200
        assert (await client.get("/otel-nowhere")).status_code == 404
    breaker.force_open()
    found = points(reader)
    states = {
        attributes_of(p)["state"]: p.value
        for p in found["fastapi_resilience_breaker_state"]
        if attributes_of(p)["breaker"] == "otel-breaker"
    }
    assert states == {"closed": 0, "open": 1, "half_open": 0}
    problems = {
        (attributes_of(p)["code"], attributes_of(p)["status"]): p.value
        for p in found["fastapi_resilience_problems"]
    }
    assert problems[("not_found", "404")] >= 1
    durations = [
        p
        for p in found["fastapi_resilience_request_duration_seconds"]
        if attributes_of(p) == {"route": "/otel-items/{item_id}", "method": "GET"}
    ]
    assert [p.count for p in durations] == [3]
    provider.shutdown()


async def test_the_bridge_can_be_turned_off() -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    app = FastAPI()
    settings = ResilienceSettings(rate_limit_enabled=False, metrics_opentelemetry=False)
    install(app, settings, meter_provider=provider)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        await client.get("/otel-off")
    assert points(reader) == {}
    provider.shutdown()
