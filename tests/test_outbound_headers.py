from __future__ import annotations

import httpx
import pytest
from fastapi import FastAPI, Request
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from fastapi_resilience import CorrelationIdMiddleware
from fastapi_resilience.outbound import CorrelationIdTransport, correlation_id_hook
from tests._asgi import in_request

pytestmark = pytest.mark.anyio


def _upstream() -> FastAPI:
    upstream = FastAPI()

    @upstream.get("/echo")
    async def echo(request: Request) -> dict[str, str | None]:
        return {
            "x-request-id": request.headers.get("x-request-id"),
            "traceparent": request.headers.get("traceparent"),
        }

    return upstream


async def test_transport_forwards_the_request_id_from_a_route() -> None:
    """A call made inside a request carries that request's ID to the upstream."""
    upstream = httpx.ASGITransport(app=_upstream())
    app = FastAPI()
    app.add_middleware(CorrelationIdMiddleware)

    @app.get("/proxy")
    async def proxy() -> dict[str, str | None]:
        transport = CorrelationIdTransport(upstream)
        async with httpx.AsyncClient(transport=transport, base_url="http://up") as client:
            seen: dict[str, str | None] = (await client.get("/echo")).json()
            return seen

    inbound = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=inbound, base_url="http://t") as client:
        response = await client.get("/proxy", headers={"X-Request-ID": "out-1"})
    assert response.json()["x-request-id"] == "out-1"


async def test_hook_forwards_id_and_keeps_an_explicit_header() -> None:
    """The event hook adds the ID, but never overrides a header the caller set."""

    async def call_upstream() -> tuple[dict[str, str | None], dict[str, str | None]]:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=_upstream()),
            base_url="http://up",
            event_hooks={"request": [correlation_id_hook()]},
        ) as client:
            plain = (await client.get("/echo")).json()
            explicit = (await client.get("/echo", headers={"X-Request-ID": "mine"})).json()
        return plain, explicit

    plain, explicit = await in_request("hook-1", call_upstream)
    assert plain["x-request-id"] == "hook-1"
    assert explicit["x-request-id"] == "mine"
    assert plain["traceparent"] is None


async def test_traceparent_is_forwarded_when_a_span_is_active() -> None:
    """With an active OpenTelemetry span, the W3C traceparent goes out too."""
    context = SpanContext(
        trace_id=0x0AF7651916CD43DD8448EB211C80319C,
        span_id=0xB7AD6B7169203331,
        is_remote=False,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
    )
    transport = CorrelationIdTransport(httpx.ASGITransport(app=_upstream()))
    with trace.use_span(NonRecordingSpan(context)):
        async with httpx.AsyncClient(transport=transport, base_url="http://up") as client:
            seen = (await client.get("/echo")).json()
    assert seen["traceparent"] == "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
