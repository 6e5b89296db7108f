"""A small upstream for the outbound must-show tests, served by uvicorn in a subprocess.

``GET /item?delay=S`` answers 200 after ``delay`` seconds, or 500 while the mode is
``fail``, or never while it is ``hang``; ``GET /item?hold=1`` answers 200 once ``POST /release``
is called. ``POST /mode/{mode}`` switches the mode and ``GET /hits`` tells how many ``/item``
requests arrived (counted on arrival, here).
"""

from __future__ import annotations

import asyncio
import contextlib

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

STATE: dict[str, object] = {"mode": "ok", "hits": 0}
# Set whenever the mode changes, so a hanging request ends with the test that hung it
# (and the process can shut down at once).
RELEASED = asyncio.Event()
HOLD = asyncio.Event()


async def item(request: Request) -> JSONResponse:
    STATE["hits"] = int(STATE["hits"]) + 1  # type: ignore[call-overload]
    mode = STATE["mode"]
    if mode == "hang":
        RELEASED.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(RELEASED.wait(), 30)
    if mode == "fail":
        return JSONResponse({"error": "down"}, status_code=500)
    if request.query_params.get("hold"):
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(HOLD.wait(), 30)
    delay = float(request.query_params.get("delay", "0"))
    if delay:
        await asyncio.sleep(delay)
    return JSONResponse({"ok": True})


async def set_mode(request: Request) -> JSONResponse:
    STATE["mode"] = request.path_params["mode"]
    RELEASED.set()
    return JSONResponse(STATE)


async def release(request: Request) -> JSONResponse:
    HOLD.set()
    return JSONResponse(STATE)


async def hits(request: Request) -> JSONResponse:
    return JSONResponse(STATE)


async def reset(request: Request) -> JSONResponse:
    STATE.update(mode="ok", hits=0)
    RELEASED.set()
    HOLD.set()
    HOLD.clear()  # held requests already woke; later ones wait for the next release
    return JSONResponse(STATE)


app = Starlette(
    routes=[
        Route("/item", item),
        Route("/mode/{mode}", set_mode, methods=["POST"]),
        Route("/hits", hits),
        Route("/release", release, methods=["POST"]),
        Route("/reset", reset, methods=["POST"]),
    ]
)
