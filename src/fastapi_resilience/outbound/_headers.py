"""Carry the correlation ID (and W3C ``traceparent``) onto outbound httpx calls."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping

import httpx

from fastapi_resilience.correlation._ids import get_correlation_id

__all__ = ["CorrelationIdTransport", "correlation_id_hook", "inject_outbound_headers"]

try:  # OpenTelemetry is an optional extra.
    from opentelemetry import propagate as _otel_propagate
    from opentelemetry import trace as _otel_trace
except ImportError:  # pragma: no cover - exercised only without the extra
    _otel_propagate = None  # type: ignore[assignment]
    _otel_trace = None  # type: ignore[assignment]


def inject_outbound_headers(
    headers: MutableMapping[str, str], *, header_name: str = "X-Request-ID"
) -> None:
    """Add the current correlation ID, and ``traceparent`` when a span is active.

    A header the caller set explicitly is left alone.
    """
    correlation_id = get_correlation_id()
    if correlation_id and header_name not in headers:
        headers[header_name] = correlation_id
    if (
        _otel_trace is not None
        and "traceparent" not in headers
        and _otel_trace.get_current_span().get_span_context().is_valid
    ):
        _otel_propagate.inject(headers)


def correlation_id_hook(
    header_name: str = "X-Request-ID",
) -> Callable[[httpx.Request], Awaitable[None]]:
    """An httpx ``request`` event hook: ``AsyncClient(event_hooks={"request": [hook]})``."""

    async def hook(request: httpx.Request) -> None:
        inject_outbound_headers(request.headers, header_name=header_name)

    return hook


class CorrelationIdTransport(httpx.AsyncBaseTransport):
    """Wraps an httpx async transport and forwards the correlation ID on every request."""

    def __init__(
        self,
        transport: httpx.AsyncBaseTransport | None = None,
        *,
        header_name: str = "X-Request-ID",
    ) -> None:
        self._transport = transport or httpx.AsyncHTTPTransport()
        self._header_name = header_name

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        inject_outbound_headers(request.headers, header_name=self._header_name)
        return await self._transport.handle_async_request(request)

    async def aclose(self) -> None:
        await self._transport.aclose()
