from __future__ import annotations

import httpx
import pytest
from fastapi import FastAPI

from fastapi_resilience import (
    ConfigurationError,
    CorrelationIdMiddleware,
    Resilience,
    ResilienceSettings,
    install,
)

pytestmark = pytest.mark.anyio


async def test_install_returns_resilience_and_wires_everything() -> None:
    """install() returns a Resilience object, echoes IDs, renders errors and serves health."""
    app = FastAPI()
    resilience = install(app, ResilienceSettings(correlation_header="X-Correlation-ID"))
    assert isinstance(resilience, Resilience)
    assert app.state.resilience is resilience
    assert app.user_middleware[0].cls is CorrelationIdMiddleware
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
    resilience.events.emit("breaker.opened", "inventory", failures=5)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        text = (await client.get("/metrics")).text
    assert 'fastapi_resilience_events_total{kind="breaker.opened",name="inventory"} 1.0' in text


async def test_metrics_can_be_switched_off() -> None:
    """metrics_enabled=False mounts no /metrics route."""
    app = FastAPI()
    install(app, ResilienceSettings(metrics_enabled=False))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        assert (await client.get("/metrics")).status_code == 404
