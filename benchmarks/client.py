"""Outbound HTTP: an httpx ``AsyncClient`` per transport, against an upstream on loopback.

The upstream is a raw ASGI app in its own uvicorn process, so it stays cheaper than the client
and the client side is what is measured. Each case is a transport factory; a repeat sends
``requests`` GETs from ``concurrency`` tasks through one ``AsyncClient`` per case, and the
cases are interleaved. The ratio to ``httpx_plain`` is taken per repeat; the median is reported.

To add a case, write a factory returning an ``httpx.AsyncBaseTransport`` (wrapping
``httpx.AsyncHTTPTransport()``) and add one :class:`ClientCase` to ``CLIENT_CASES``.
"""

from __future__ import annotations

import asyncio
import importlib
import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass

import httpx
from starlette.types import Receive, Scope, Send

from benchmarks._loop import loop_factory
from benchmarks._procs import UvicornServer

BASELINE = "httpx_plain"
UPSTREAM_FACTORY = "benchmarks.client:upstream_app"
UPSTREAM_BODY = b'{"status":"ok"}'

#: A transport factory: a callable or an import string ``"package.module:function"``.
TransportFactory = Callable[[], httpx.AsyncBaseTransport] | str


async def _upstream(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": UPSTREAM_BODY})


def upstream_app() -> Callable[[Scope, Receive, Send], object]:
    """The uvicorn factory of the loopback upstream: a fixed tiny JSON answer."""
    return _upstream


@dataclass(frozen=True, slots=True)
class ClientCase:
    """One outbound transport measured against the loopback upstream.

    Args:
        description: one line for the results table.
        transport_factory: builds the transport the ``AsyncClient`` uses.
        group: the results table it appears in.
    """

    description: str
    transport_factory: TransportFactory
    group: str = "outbound"

    def transport(self) -> httpx.AsyncBaseTransport:
        factory = self.transport_factory
        if isinstance(factory, str):
            module_name, _, attr = factory.partition(":")
            factory = getattr(importlib.import_module(module_name), attr)
        return factory()


def plain_transport() -> httpx.AsyncBaseTransport:
    return httpx.AsyncHTTPTransport()


#: Every case, by name; ``httpx_plain`` is always measured.
CLIENT_CASES: dict[str, ClientCase] = {
    "httpx_plain": ClientCase(
        "httpx `AsyncHTTPTransport`, nothing added (baseline)", plain_transport
    ),
    # ---- outbound calls (issue 4): ResilientTransport goes here.
}


@dataclass(frozen=True, slots=True)
class ClientSummary:
    """A case over all repeats: median requests per second and its ratio to ``httpx_plain``."""

    case: str
    description: str
    group: str
    requests_per_sec: float
    ratio: float
    ratio_min: float
    ratio_max: float
    requests: int
    concurrency: int
    repeats: int


async def _burst(client: httpx.AsyncClient, *, requests: int, concurrency: int) -> float:
    """Send ``requests`` GETs from ``concurrency`` tasks; requests per second."""
    left = requests

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            response = await client.get("/")
            if response.status_code != 200 or response.content != UPSTREAM_BODY:
                raise RuntimeError(f"upstream answered {response.status_code}")

    start = time.perf_counter()
    async with asyncio.TaskGroup() as group:
        for _ in range(concurrency):
            group.create_task(worker())
    return requests / (time.perf_counter() - start)


async def measure(
    names: Sequence[str],
    *,
    base_url: str,
    repeats: int,
    requests: int,
    concurrency: int,
    cases: dict[str, ClientCase] = CLIENT_CASES,
    log: Callable[[str], None] = print,
) -> list[ClientSummary]:
    wanted = list(dict.fromkeys([BASELINE, *names]))
    rates: dict[str, list[float]] = {name: [] for name in wanted}
    async with AsyncExitStack() as stack:
        clients = {
            name: await stack.enter_async_context(
                httpx.AsyncClient(transport=cases[name].transport(), base_url=base_url)
            )
            for name in wanted
        }
        for client in clients.values():  # warm the connection pools
            await _burst(client, requests=max(50, requests // 10), concurrency=concurrency)
        for repeat in range(repeats):
            shift = repeat % len(wanted)
            for name in [*wanted[shift:], *wanted[:shift]]:
                rates[name].append(
                    await _burst(clients[name], requests=requests, concurrency=concurrency)
                )
            log(f"client repeat {repeat + 1}/{repeats} done")
    summaries = []
    for name in wanted:
        ratios = [r / b for r, b in zip(rates[name], rates[BASELINE], strict=True)]
        case = cases[name]
        summaries.append(
            ClientSummary(
                case=name,
                description=case.description,
                group=case.group,
                requests_per_sec=statistics.median(rates[name]),
                ratio=statistics.median(ratios),
                ratio_min=min(ratios),
                ratio_max=max(ratios),
                requests=requests,
                concurrency=concurrency,
                repeats=repeats,
            )
        )
    return summaries


def run_client(
    names: Sequence[str],
    *,
    repeats: int,
    requests: int,
    concurrency: int,
    log: Callable[[str], None] = print,
) -> list[ClientSummary]:
    upstream = UvicornServer(UPSTREAM_FACTORY, env={})
    upstream.start()
    try:
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            return runner.run(
                measure(
                    names,
                    base_url=upstream.url.rstrip("/"),
                    repeats=repeats,
                    requests=requests,
                    concurrency=concurrency,
                    log=log,
                )
            )
    finally:
        upstream.stop()
