"""A streaming upstream for the streaming must-show tests, served by uvicorn in a subprocess.

``GET /events`` answers ``text/event-stream``, one event per chunk (``id: i``, ``data: event
i``), ids from 1 to ``n``, or from ``Last-Event-ID`` + 1 when the request carries one.
Query parameters:

- ``gate=1``: send the first event, then wait for ``POST /gate`` before sending the rest;
- ``cut_after=k``: after ``k`` events of a fresh stream (no ``Last-Event-ID``), break the
  connection without ending the chunked body;
- ``stall_after=k``: after ``k`` events, go silent (until ``POST /reset``);
- ``fail_first=1``: answer the first request 503;
- ``retry=ms``: start with a ``retry:`` field.

``GET /state`` tells how many ``/events`` requests arrived, how many events were sent, and
the ``Last-Event-ID`` of each request; ``POST /reset`` clears it and wakes what waits.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

STATE: dict[str, object] = {"hits": 0, "sent": 0, "last_event_ids": []}
GATE = asyncio.Event()
RESET = asyncio.Event()


class Cut(Exception):
    """Raised mid-body: uvicorn drops the connection without the chunked body's end."""


async def _wait(event: asyncio.Event) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), 30)


def _event(number: int) -> bytes:
    return f"id: {number}\ndata: event {number}\n\n".encode()


async def events(request: Request) -> Response:
    STATE["hits"] = hits = int(STATE["hits"]) + 1  # type: ignore[call-overload]
    last_id = request.headers.get("last-event-id")
    STATE["last_event_ids"].append(last_id)  # type: ignore[attr-defined]
    query = request.query_params
    if query.get("fail_first") and hits == 1:
        return JSONResponse({"error": "warming up"}, status_code=503)
    total = int(query.get("n", "10"))
    first = int(last_id) + 1 if last_id else 1
    cut_after = int(query["cut_after"]) if query.get("cut_after") and not last_id else None
    stall_after = int(query["stall_after"]) if query.get("stall_after") else None

    async def body() -> AsyncIterator[bytes]:
        if query.get("retry"):
            yield f"retry: {query['retry']}\n\n".encode()
        for sent, number in enumerate(range(first, total + 1)):
            if sent == cut_after:
                raise Cut
            if sent == stall_after:
                await _wait(RESET)
                return
            if sent == 1 and query.get("gate"):
                await _wait(GATE)
            STATE["sent"] = int(STATE["sent"]) + 1  # type: ignore[call-overload]
            yield _event(number)

    return StreamingResponse(body(), media_type="text/event-stream")


async def gate(request: Request) -> JSONResponse:
    GATE.set()
    return JSONResponse(STATE)


async def state(request: Request) -> JSONResponse:
    return JSONResponse(STATE)


async def reset(request: Request) -> JSONResponse:
    STATE.update(hits=0, sent=0, last_event_ids=[])
    RESET.set()
    GATE.set()  # whatever still waits ends now
    RESET.clear()
    GATE.clear()
    return JSONResponse(STATE)


app = Starlette(
    routes=[
        Route("/events", events),
        Route("/gate", gate, methods=["POST"]),
        Route("/state", state),
        Route("/reset", reset, methods=["POST"]),
    ]
)
