"""Driving an ASGI app over raw messages, for what httpx's ASGI transport does not speak."""

from __future__ import annotations

from collections.abc import Sequence

from starlette.types import ASGIApp, Message


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
