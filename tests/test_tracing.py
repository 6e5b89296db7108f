"""OpenTelemetry: the correlation ID on the server span, library events as span events, and
the trace ID as the correlation ID."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)

from fastapi_resilience import (
    Bulkhead,
    CircuitBreaker,
    CorrelationIdMiddleware,
    ResilienceSettings,
    Retry,
    RetryBudget,
    RetryExhaustedError,
    UpstreamError,
    fallback,
    install,
)
from fastapi_resilience.events import EventBus
from fastapi_resilience.operations import span_events
from fastapi_resilience.outbound import BreakerRegistry, ResponseCache
from fastapi_resilience.testing import ManualClock, force_breaker

pytestmark = pytest.mark.anyio

HEX = "0123456789abcdef"


@contextmanager
def instrumented(app: FastAPI) -> Iterator[InMemorySpanExporter]:
    """``app`` traced by opentelemetry-instrumentation-fastapi into an in-memory exporter."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    FastAPIInstrumentor.instrument_app(app, tracer_provider=provider)
    try:
        yield exporter
    finally:
        FastAPIInstrumentor.uninstrument_app(app)


def server_spans(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    return [span for span in exporter.get_finished_spans() if span.kind.name == "SERVER"]


def trace_id_of(span: ReadableSpan) -> str:
    assert span.context is not None
    return format(span.context.trace_id, "032x")


def events_named(span: ReadableSpan, kind: str) -> list[dict[str, Any]]:
    return [dict(event.attributes or {}) for event in span.events if event.name == kind]


async def get(app: FastAPI, *paths: str, **headers: str) -> list[httpx.Response]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        return [await client.get(path, headers=headers) for path in paths]


@contextmanager
def app_traced(
    settings: ResilienceSettings, *, instrument_first: bool = False
) -> Iterator[tuple[FastAPI, InMemorySpanExporter]]:
    """An app with ``install(app, settings)`` and a ``/ok`` route, instrumented before or
    after ``install()``."""
    app = FastAPI()
    if instrument_first:
        with instrumented(app) as exporter:
            install(app, settings)
            app.get("/ok")(_ok)
            yield app, exporter
        return
    install(app, settings)
    app.get("/ok")(_ok)
    with instrumented(app) as exporter:
        yield app, exporter


async def _ok() -> str:
    return "ok"


NO_LIMITS = ResilienceSettings(rate_limit_enabled=False, metrics_enabled=False)


@pytest.mark.parametrize("instrument_first", [True, False], ids=["before", "after"])
async def test_server_span_carries_the_correlation_id(instrument_first: bool) -> None:
    """Instrumented before or after install(), the server span's ``correlation_id`` is the
    ID the response carries, a generated one and one the client sent alike."""
    with app_traced(NO_LIMITS, instrument_first=instrument_first) as (app, exporter):
        (generated,) = await get(app, "/ok")
        (sent,) = await get(app, "/ok", **{"X-Request-ID": "client-id-1"})
    assert sent.headers["X-Request-ID"] == "client-id-1"
    first, second = server_spans(exporter)
    assert (first.attributes or {})["correlation_id"] == generated.headers["X-Request-ID"]
    assert (second.attributes or {})["correlation_id"] == "client-id-1"


async def test_the_span_attribute_can_be_renamed_or_left_out() -> None:
    """``span_attribute`` names the attribute; ``None`` sets none."""
    spans: dict[str | None, ReadableSpan] = {}
    for attribute in ("request.id", None):
        app = FastAPI()
        app.add_middleware(CorrelationIdMiddleware, span_attribute=attribute)
        app.get("/ok")(_ok)
        with instrumented(app) as exporter:
            await get(app, "/ok")
        (spans[attribute],) = server_spans(exporter)
    renamed = spans["request.id"].attributes or {}
    assert "correlation_id" not in renamed
    assert is_hex_id(str(renamed["request.id"]))
    assert "correlation_id" not in (spans[None].attributes or {})


def is_hex_id(value: str) -> bool:
    return len(value) == 32 and set(value) <= set(HEX)


@pytest.mark.parametrize("instrument_first", [True, False], ids=["before", "after"])
async def test_a_breaker_opening_in_a_route_is_a_span_event(
    instrument_first: bool, default_breakers: BreakerRegistry
) -> None:
    """A breaker that opens while a route runs adds ``breaker.opened`` to the request's span,
    with its name, figures and the request's correlation ID; one forced open too."""
    with app_traced(NO_LIMITS, instrument_first=instrument_first) as (app, exporter):
        breaker = CircuitBreaker("inventory-traced", failure_threshold=1)
        forced = CircuitBreaker("payments-traced", registry=None)

        async def failing() -> None:
            raise ConnectionError("down")

        @app.get("/stock")
        async def stock() -> str:
            with suppress(ConnectionError):
                await breaker.call(failing)
            with force_breaker(forced, "open"):
                return breaker.state

        try:
            (response,) = await get(app, "/stock")
        finally:
            default_breakers.unregister("inventory-traced")
    assert response.json() == "open"
    (span,) = server_spans(exporter)
    opened = events_named(span, "breaker.opened")
    assert [event["resilience.name"] for event in opened] == [
        "inventory-traced",
        "payments-traced",
    ]
    first = opened[0]
    assert first["resilience.from_state"] == "closed"
    assert first["resilience.failures"] == 1
    assert first["correlation_id"] == response.headers["X-Request-ID"]


async def test_a_rate_limit_refusal_is_a_span_event() -> None:
    """The refused request's span carries ``rate_limit.refused`` with the tier and policy."""
    settings = ResilienceSettings(rate_limit_tiers={"anonymous": "1/minute"}, metrics_enabled=False)
    with app_traced(settings) as (app, exporter):
        admitted, refused = await get(app, "/ok", "/ok")
    assert (admitted.status_code, refused.status_code) == (200, 429)
    first, second = server_spans(exporter)
    assert events_named(first, "rate_limit.refused") == []
    (event,) = events_named(second, "rate_limit.refused")
    assert event["resilience.name"] == "anonymous"
    assert isinstance(event["resilience.policies"], str)
    assert event["correlation_id"] == refused.headers["X-Request-ID"]


async def test_span_events_can_be_turned_off() -> None:
    """With ``trace_span_events=False`` the app's events stay off its spans."""
    settings = ResilienceSettings(
        rate_limit_tiers={"anonymous": "1/minute"},
        metrics_enabled=False,
        trace_span_events=False,
    )
    with app_traced(settings) as (app, exporter):
        _, refused = await get(app, "/ok", "/ok")
    assert refused.status_code == 429
    assert all(not span.events for span in server_spans(exporter))


@pytest.mark.parametrize("instrument_first", [True, False], ids=["before", "after"])
async def test_correlation_id_from_trace(instrument_first: bool) -> None:
    """``correlation_id_from_trace``: a request with no ID of its own is answered with its
    trace's ID; a valid ID the client sent is kept; an invalid one is replaced by the trace's."""
    settings = ResilienceSettings(
        rate_limit_enabled=False, metrics_enabled=False, correlation_id_from_trace=True
    )
    with app_traced(settings, instrument_first=instrument_first) as (app, exporter):
        (plain,) = await get(app, "/ok")
        (kept,) = await get(app, "/ok", **{"X-Request-ID": "client-id-2"})
        (invalid,) = await get(app, "/ok", **{"X-Request-ID": "bad id!"})
    first, _, third = server_spans(exporter)
    assert plain.headers["X-Request-ID"] == trace_id_of(first)
    assert (first.attributes or {})["correlation_id"] == trace_id_of(first)
    assert kept.headers["X-Request-ID"] == "client-id-2"
    assert invalid.headers["X-Request-ID"] == trace_id_of(third)


async def test_from_trace_without_a_span_generates_an_id() -> None:
    """Not traced, ``correlation_id_from_trace`` falls back to a new ID per request."""
    app = FastAPI()
    install(
        app,
        ResilienceSettings(
            rate_limit_enabled=False, metrics_enabled=False, correlation_id_from_trace=True
        ),
    )
    app.get("/ok")(_ok)
    one, two = await get(app, "/ok", "/ok")
    ids = {one.headers["X-Request-ID"], two.headers["X-Request-ID"]}
    assert len(ids) == 2
    assert all(is_hex_id(i) for i in ids)


def _tracer() -> tuple[Any, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider.get_tracer("test"), exporter


def test_span_events_turns_figures_into_attributes() -> None:
    """Numbers, booleans and text stay as they are; other values become text, cut to a
    bounded length; a figure that is ``None`` is left out."""
    tracer, exporter = _tracer()
    bus = EventBus(log=False)
    bus.subscribe(span_events)
    with tracer.start_as_current_span("work"):
        bus.emit(
            "demo.happened",
            "thing",
            count=3,
            ratio=0.5,
            shared=False,
            state="open",
            items=["a", "b"],
            text="x" * 1000,
            unknown=None,
        )
    (span,) = exporter.get_finished_spans()
    (event,) = span.events
    assert event.name == "demo.happened"
    attributes = dict(event.attributes or {})
    assert attributes == {
        "resilience.name": "thing",
        "resilience.count": 3,
        "resilience.ratio": 0.5,
        "resilience.shared": False,
        "resilience.state": "open",
        "resilience.items": "['a', 'b']",
        "resilience.text": attributes["resilience.text"],
    }
    assert 0 < len(attributes["resilience.text"]) < 1000


def test_span_events_outside_a_span_adds_nothing() -> None:
    """No current span (or one that is not recording): the listener does nothing."""
    tracer, exporter = _tracer()
    bus = EventBus(log=False)
    bus.subscribe(span_events)
    bus.emit("demo.happened", "thing")
    with tracer.start_as_current_span("work"):
        pass
    (span,) = exporter.get_finished_spans()
    assert span.events == ()


async def test_retries_fallbacks_and_stale_answers_are_span_events() -> None:
    """Per-request events of the app's own outbound code (a ``Retry``, a ``fallback``, a
    ``ResponseCache`` made without a bus) show on the request's span."""
    clock = ManualClock()
    retry = Retry(
        attempts=2,
        base_delay=0,
        jitter=False,
        retry_on=ConnectionError,
        name="orders-api",
        clock=clock,
    )
    cache = ResponseCache(ttl=1, stale_ttl=60, name="prices", clock=clock)
    with app_traced(NO_LIMITS) as (app, exporter):
        await cache.set("p1", 9.5)
        clock.advance(5)  # stale from here on

        async def down() -> float:
            raise ConnectionError("down")

        @fallback(lambda error: "no recommendations")
        async def recommendations() -> str:
            raise ConnectionError("down")

        @app.get("/page")
        async def page() -> dict[str, Any]:
            with suppress(RetryExhaustedError):
                await retry.call(down)
            price = await cache.call("p1", down)
            return {"price": price.value, "also": await recommendations()}

        (response,) = await get(app, "/page")
    assert response.json() == {"price": 9.5, "also": "no recommendations"}
    (span,) = server_spans(exporter)
    correlation_id = response.headers["X-Request-ID"]
    (attempt,) = events_named(span, "retry.attempt")
    assert attempt == {
        "resilience.name": "orders-api",
        "resilience.attempt": 2,
        "resilience.delay": 0,
        "resilience.error": "ConnectionError",
        "correlation_id": correlation_id,
    }
    (stale,) = events_named(span, "cache.stale_served")
    assert stale["resilience.name"] == "prices"
    assert stale["resilience.age"] == 5
    (served,) = events_named(span, "fallback.served")
    assert served["resilience.name"].endswith("recommendations")
    assert served["resilience.error"] == "ConnectionError"
    assert served["correlation_id"] == correlation_id


_WITHOUT_OPENTELEMETRY = """
import sys
sys.modules["opentelemetry"] = None  # not installed, as far as imports can tell
from fastapi_resilience.events import EventBus
from fastapi_resilience.operations import span_events

bus = EventBus(log=False)
bus.subscribe(span_events)
bus.emit("demo.happened", "thing", count=1)
print(sorted(m for m in sys.modules if m.startswith("opentelemetry")))
"""


def test_span_events_without_opentelemetry_does_nothing() -> None:
    """Without OpenTelemetry the listener imports nothing of it and adds nothing. (FastAPI
    releases that import OpenTelemetry themselves cannot run without it.)"""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_OPENTELEMETRY],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.stdout.strip() == "['opentelemetry']", result.stderr


async def test_bulkhead_rejections_budget_and_features_are_span_events() -> None:
    """A refused call of a full bulkhead, a spent retry budget and a feature switched off in
    a request all show on that request's span."""
    with app_traced(NO_LIMITS) as (app, exporter):
        resilience = app.state.resilience
        resilience.degraded.feature("traced-feature")
        full = Bulkhead("traced-bulkhead", max_concurrent=1, registry=None)
        budget = RetryBudget(ratio=0.0, min_retries_per_second=0.0, name="traced-budget")
        retry = Retry(attempts=3, base_delay=0.0, jitter=False, budget=budget)

        @app.get("/refused")
        async def refused() -> str:
            await full.acquire()  # held: the next acquire is refused
            try:
                await full.acquire()
            finally:
                full.release()
            return "unreachable"

        @app.get("/spent")
        async def spent() -> None:
            async def fail() -> None:
                raise UpstreamError("down")

            await retry.call(fail)

        @app.get("/switch")
        async def switch() -> str:
            resilience.degraded.disable("traced-feature")
            resilience.degraded.enable("traced-feature")
            return "ok"

        answers = await get(app, "/refused", "/spent", "/switch")
    assert [a.status_code for a in answers] == [503, 502, 200]
    refused_span, spent_span, switch_span = server_spans(exporter)
    assert events_named(refused_span, "bulkhead.rejected")[0]["resilience.name"] == (
        "traced-bulkhead"
    )
    assert events_named(spent_span, "retry.budget_exhausted")
    assert events_named(switch_span, "feature.disabled")
    assert events_named(switch_span, "feature.enabled")
