"""The app the rate-limit process tests run under uvicorn; configured by RESILIENCE_* variables."""

from __future__ import annotations

import os

from fastapi import Depends, FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fastapi_resilience import install, rate_limit

#: Every answer names the worker process that gave it, refusals included, so a test run under
#: ``uvicorn --workers N`` can tell that several workers answered.
WORKER_HEADER = b"x-worker-pid"


class WorkerPidHeader:
    """Outermost middleware: adds this process's id to every response, 429s included."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.pid = str(os.getpid()).encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_pid(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), (WORKER_HEADER, self.pid)]
            await send(message)

        await self.app(scope, receive, send_with_pid)


app = FastAPI()
resilience = install(app)
# Added after install(): outside its middleware, so it sees the limiter's refusals too.
app.add_middleware(WorkerPidHeader)


@app.get("/limited")
async def limited() -> dict[str, str]:
    return {"ok": "yes"}


@app.get("/exempt")
async def exempt() -> dict[str, str]:
    return {"ok": "yes"}


@app.post("/login", dependencies=[Depends(rate_limit("5/minute"))])
async def login() -> dict[str, str]:
    return {"ok": "yes"}
