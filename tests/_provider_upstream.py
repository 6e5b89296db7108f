"""A provider-like upstream for the rate-limit must-show tests, served by uvicorn in a subprocess.

``GET /v1/thing`` records when it arrived (this process's wall clock) and answers the next
scripted answer, else 200 with the scripted ``ok_headers``. ``POST /script`` takes
``{"answers": [{"status": 429, "headers": {...}}, ...], "ok_headers": {...}}``;
``GET /arrivals`` tells the arrival times; ``POST /reset`` forgets everything.
"""

from __future__ import annotations

import time
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

STATE: dict[str, Any] = {"answers": [], "ok_headers": {}, "arrivals": [], "request_ids": []}


async def thing(request: Request) -> JSONResponse:
    STATE["arrivals"].append(time.time())
    STATE["request_ids"].append(request.headers.get("x-request-id"))
    answers: list[dict[str, Any]] = STATE["answers"]
    if answers:
        answer = answers.pop(0)
        return JSONResponse(
            {"error": "scripted"}, status_code=answer["status"], headers=answer.get("headers", {})
        )
    return JSONResponse({"ok": True}, headers=STATE["ok_headers"])


async def script(request: Request) -> JSONResponse:
    body = await request.json()
    STATE["answers"] = list(body.get("answers", []))
    STATE["ok_headers"] = dict(body.get("ok_headers", {}))
    return JSONResponse({"scripted": len(STATE["answers"])})


async def arrivals(request: Request) -> JSONResponse:
    return JSONResponse({"arrivals": STATE["arrivals"], "request_ids": STATE["request_ids"]})


async def reset(request: Request) -> JSONResponse:
    STATE.update(answers=[], ok_headers={}, arrivals=[], request_ids=[])
    return JSONResponse({"reset": True})


app = Starlette(
    routes=[
        Route("/v1/thing", thing),
        Route("/script", script, methods=["POST"]),
        Route("/arrivals", arrivals),
        Route("/reset", reset, methods=["POST"]),
    ]
)
