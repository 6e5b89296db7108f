"""Driving an ASGI app over raw messages, for what httpx's ASGI transport does not speak."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fastapi_resilience import CorrelationIdMiddleware

T = TypeVar("T")


async def http_get(app: ASGIApp, headers: list[tuple[bytes, bytes]]) -> list[Message]:
    """One GET of ``/`` through ``app`` with exactly these raw headers; the messages it sent."""
    sent: list[Message] = []
    scope = {"type": "http", "method": "GET", "path": "/", "headers": headers, "query_string": b""}

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


async def websocket_connect(
    app: ASGIApp,
    path: str,
    *,
    headers: Sequence[tuple[bytes, bytes]] = (),
    client: tuple[str, int] = ("10.0.0.9", 5000),
) -> list[Message]:
    """Open a WebSocket connection to ``path`` (then disconnect); the messages the app sent."""
    sent: list[Message] = []
    incoming = iter([{"type": "websocket.connect"}])

    async def receive() -> Message:
        return next(incoming, {"type": "websocket.disconnect", "code": 1000})

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {
        "type": "websocket",
        "path": path,
        "root_path": "",
        "headers": list(headers),
        "client": client,
        "query_string": b"",
        "subprotocols": [],
    }
    await app(scope, receive, send)
    return sent


async def in_request(correlation_id: str, fn: Callable[[], Awaitable[T]]) -> T:
    """Run ``await fn()`` as a route would, in a request that came with ``X-Request-ID:
    <correlation_id>`` (behind ``CorrelationIdMiddleware``); what it returned, or what it
    raised."""
    results: list[T] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        results.append(await fn())
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        pass

    scope = {
        "type": "http",
        "method": "GET",
        "path": "/",
        "root_path": "",
        "headers": [(b"x-request-id", correlation_id.encode())],
        "query_string": b"",
    }
    await CorrelationIdMiddleware(app, raise_server_exceptions=True)(scope, receive, send)
    (result,) = results
    return result
