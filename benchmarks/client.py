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
import dataclasses
import importlib
import os
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


def resilience_transport() -> httpx.AsyncBaseTransport:
    from fastapi_resilience.outbound import ResilientTransport

    # The defaults: per-host breaker, 3 attempts under a retry budget, 10 s timeout.
    return ResilientTransport(httpx.AsyncHTTPTransport())


#: Every case, by name; ``httpx_plain`` is always measured.
CLIENT_CASES: dict[str, ClientCase] = {
    "httpx_plain": ClientCase(
        "httpx `AsyncHTTPTransport`, nothing added (baseline)", plain_transport
    ),
    # ---- outbound calls: ResilientTransport goes here.
    "resilience_transport": ClientCase(
        "fastapi-resilience `ResilientTransport()` defaults (breaker, retry + budget, timeout)",
        resilience_transport,
    ),
}


@dataclass(frozen=True, slots=True)
class ClientSummary:
    """A case over all repeats: median rates and their ratios to ``httpx_plain``."""

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
    #: Client CPU per request, and its ratio per pair of bursts, from ``measure_cpu``.
    cpu_us_per_request: float | None = None
    cpu_ratio: float | None = None
    cpu_ratio_q1: float | None = None
    cpu_ratio_q3: float | None = None


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


async def _open_clients(
    stack: AsyncExitStack, names: Sequence[str], cases: dict[str, ClientCase], base_url: str
) -> dict[str, httpx.AsyncClient]:
    """One ``AsyncClient`` per case, closed when ``stack`` closes."""
    return {
        name: await stack.enter_async_context(
            httpx.AsyncClient(transport=cases[name].transport(), base_url=base_url)
        )
        for name in names
    }


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
        clients = await _open_clients(stack, wanted, cases, base_url)
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
    cpu_pairs: int = 0,
    log: Callable[[str], None] = print,
) -> list[ClientSummary]:
    """Throughput one case at a time, then (``cpu_pairs``) client CPU per request in pairs."""
    from benchmarks.capacity import LOAD_CPU, SERVER_CPU, can_pin, pin_process

    upstream = UvicornServer(UPSTREAM_FACTORY, env={})
    upstream.start()
    previous = os.sched_getaffinity(0) if can_pin() else None
    try:
        if previous is not None:
            # Client on one CPU, upstream on the other: neither takes the other's time slices.
            pin_process(upstream.pid, LOAD_CPU)
            os.sched_setaffinity(0, {SERVER_CPU})
        base_url = upstream.url.rstrip("/")
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            summaries = runner.run(
                measure(
                    names,
                    base_url=base_url,
                    repeats=repeats,
                    requests=requests,
                    concurrency=concurrency,
                    log=log,
                )
            )
            if cpu_pairs:
                cpu = runner.run(
                    measure_cpu([s.case for s in summaries], base_url=base_url, pairs=cpu_pairs)
                )
                summaries = [dataclasses.replace(s, **cpu[s.case]) for s in summaries]
        return summaries
    finally:
        upstream.stop()
        if previous is not None:
            os.sched_setaffinity(0, previous)


#: Requests per burst of the CPU measurement: short, so a pair's two bursts are milliseconds
#: apart and the machine's drift between them is small.
CPU_BURST = 50


async def measure_cpu(
    names: Sequence[str],
    *,
    base_url: str,
    pairs: int,
    burst: int = CPU_BURST,
    cases: dict[str, ClientCase] = CLIENT_CASES,
) -> dict[str, dict[str, float]]:
    """Client CPU time per request, ``httpx_plain`` and each case in alternating short bursts.

    One request at a time (no batching of ready sockets to vary the cost), this process's CPU
    time only (the upstream runs in its own process): the transport's own cost. Each pair is a
    burst of the baseline and one of the case, in alternating order; the ratio of the two is
    taken per pair, and the median and quartiles over ``pairs`` pairs are returned.
    """
    wanted = list(dict.fromkeys([BASELINE, *names]))
    per_request: dict[str, list[float]] = {name: [] for name in wanted}
    async with AsyncExitStack() as stack:
        clients = await _open_clients(stack, wanted, cases, base_url)

        async def cpu_burst(client: httpx.AsyncClient, count: int) -> float:
            start = time.process_time()
            for _ in range(count):
                response = await client.get("/")
                if response.status_code != 200:
                    raise RuntimeError(f"upstream answered {response.status_code}")
            return (time.process_time() - start) / count

        for client in clients.values():
            await cpu_burst(client, 4 * burst)  # warm-up
        for pair in range(pairs):
            order = wanted if pair % 2 == 0 else wanted[::-1]
            for name in order:
                per_request[name].append(await cpu_burst(clients[name], burst))
    out: dict[str, dict[str, float]] = {}
    for name in wanted:
        ratios = sorted(
            b / c for b, c in zip(per_request[BASELINE], per_request[name], strict=True) if c
        )
        out[name] = {
            "cpu_us_per_request": statistics.median(per_request[name]) * 1e6,
            "cpu_ratio": statistics.median(ratios),
            "cpu_ratio_q1": ratios[len(ratios) // 4],
            "cpu_ratio_q3": ratios[(3 * len(ratios)) // 4],
        }
    return out
