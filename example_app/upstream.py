"""A small, deliberately flaky inventory service: the upstream the example app calls.

Its failure rate and latency change while it runs, so you can watch the example app's
breaker open, its cache answer stale, and everything recover::

    python -m example_app.upstream --port 8001
    curl -X POST localhost:8001/_control -H 'content-type: application/json' \\
         -d '{"failure_rate": 1.0, "latency_ms": 200}'

``GET /_control`` shows the settings and how many requests it served and failed.
Serve it on loopback only: it is a test fixture, not a service.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from typing import Any

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, Field

__all__ = ["Control", "ControlChange", "app"]


class Control(BaseModel):
    """What the upstream does now; every field is optional in a ``POST /_control``."""

    failure_rate: float = Field(0.0, ge=0.0, le=1.0)
    latency_ms: int = Field(0, ge=0, le=60_000)
    failure_status: int = Field(503, ge=500, le=599)
    hang: bool = False


class _State:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.control = Control()
        self.requests = 0
        self.failures = 0
        self.reserved: dict[str, int] = {}


state = _State()
app = FastAPI(title="inventory (flaky upstream)")


def _stock_of(sku: str) -> int:
    return sum(sku.encode()) % 50


async def _misbehave() -> None:
    """Wait, hang or fail as the control says; counts every request."""
    state.requests += 1
    control = state.control
    if control.hang:
        await asyncio.sleep(3600)  # until the caller gives up
    if control.latency_ms:
        await asyncio.sleep(control.latency_ms / 1000)
    if control.failure_rate and random.random() < control.failure_rate:
        state.failures += 1
        raise HTTPException(control.failure_status, "inventory is having a bad day")


@app.get("/stock/{sku}")
async def stock(sku: str) -> dict[str, Any]:
    """Units in stock for ``sku``; ``served_at`` shows whether an answer is fresh."""
    await _misbehave()
    if sku.startswith("missing"):
        raise HTTPException(404, f"no such sku {sku!r}")
    return {
        "sku": sku,
        "stock": _stock_of(sku) - state.reserved.get(sku, 0),
        "served_at": time.time(),
    }


@app.post("/reserve/{sku}")
async def reserve(sku: str, qty: int = 1) -> dict[str, Any]:
    """Reserve ``qty`` units (not idempotent: never retried blindly)."""
    await _misbehave()
    state.reserved[sku] = state.reserved.get(sku, 0) + qty
    return {"sku": sku, "reserved": state.reserved[sku]}


@app.get("/health")
async def health() -> dict[str, str]:
    """Down (503) while every request fails or hangs; not counted as a request."""
    control = state.control
    if control.hang or control.failure_rate >= 1.0:
        raise HTTPException(503, "inventory is down")
    return {"status": "ok"}


@app.get("/_control")
async def read_control() -> dict[str, Any]:
    return {**state.control.model_dump(), "requests": state.requests, "failures": state.failures}


class ControlChange(BaseModel):
    """A ``POST /_control`` body: only the fields given change; ``reset`` restores defaults."""

    failure_rate: float | None = Field(None, ge=0.0, le=1.0)
    latency_ms: int | None = Field(None, ge=0, le=60_000)
    failure_status: int | None = Field(None, ge=500, le=599)
    hang: bool | None = None
    reset: bool = False


@app.post("/_control")
async def change_control(change: ControlChange) -> dict[str, Any]:
    """Change some settings (validated: a bad value answers 422); the others keep their values."""
    if change.reset:
        state.reset()
    updates = change.model_dump(exclude={"reset"}, exclude_none=True)
    state.control = state.control.model_copy(update=updates)
    return await read_control()


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args(argv)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
