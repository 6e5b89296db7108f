from __future__ import annotations

import logging

import pytest

from fastapi_resilience.events import Event, EventBus
from tests._asgi import in_request


@pytest.mark.anyio
async def test_event_is_logged_once_with_the_correlation_id(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """emit() logs one record carrying the kind, the name, the figures and the request's ID."""
    bus = EventBus()
    caplog.set_level(logging.INFO)

    async def emit() -> Event:
        return bus.emit("breaker.opened", "inventory", failures=5)

    event = await in_request("ev-1", emit)
    records = [r for r in caplog.records if r.name == "fastapi_resilience.events"]
    assert len(records) == 1
    assert records[0].getMessage() == "breaker.opened inventory failures=5"
    assert records[0].correlation_id == "ev-1"
    assert event.correlation_id == "ev-1"


def test_listeners_subscribe_unsubscribe_and_cannot_break_the_publisher(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A failing listener is logged; the others still get the event; unsubscribe works."""
    bus = EventBus(log=False)
    seen: list[Event] = []

    def broken(event: Event) -> None:
        raise RuntimeError("listener bug")

    bus.subscribe(broken)
    unsubscribe = bus.subscribe(seen.append)
    bus.emit("storage.down", "redis")
    unsubscribe()
    unsubscribe()
    bus.emit("storage.up", "redis")
    assert [e.kind for e in seen] == ["storage.down"]
    assert any("listener" in r.getMessage() for r in caplog.records)


def test_a_shadow_refusal_logs_the_path_escaped(caplog: pytest.LogCaptureFixture) -> None:
    """The shadow-refusal event's log line writes the client's path with control characters
    escaped, so a ``%0A`` cannot start a forged line."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from fastapi_resilience import ResilienceSettings, install

    app = FastAPI()
    install(
        app,
        ResilienceSettings(rate_limit_shadow=True, rate_limit_tiers={"anonymous": "1/minute"}),
    )
    client = TestClient(app)
    with caplog.at_level(logging.INFO, logger="fastapi_resilience.events"):
        for _ in range(2):
            client.get("/x%0AERROR forged%1B")
    (line,) = [r.getMessage() for r in caplog.records if "shadow_refused" in r.getMessage()]
    assert "\n" not in line
    assert "\x1b" not in line
    assert "path=/x\\x0aERROR forged\\x1b" in line
