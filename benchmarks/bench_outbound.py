"""Outbound-call costs: ``Retry`` per call, and ``ResilientTransport`` against a loopback upstream.

Run: ``.venv/bin/python -m benchmarks.bench_outbound [--repeats 7] [--requests 2000]``.

1. Per-call overhead on a call that succeeds first time: ``Retry().call(noop)`` (and the
   decorator, and with a ``RetryBudget``), tenacity and stamina when installed, each minus a
   plain ``await noop()`` timed in the same repeat; cases interleaved, medians reported.
2. Outbound HTTP: one ``httpx.AsyncClient`` per transport (plain ``AsyncHTTPTransport`` vs
   ``ResilientTransport`` with its defaults), GETs from 10 tasks to a raw ASGI upstream in its
   own uvicorn process on 127.0.0.1; ratio of requests/s to plain, per repeat, median.

These are the same measurements as the ``resilience_retry`` / ``resilience_transport`` entries
meant for the bench harness (``benchmarks/micro.py`` / ``benchmarks/client.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

UPSTREAM_BODY = b'{"status":"ok"}'


async def upstream_app(scope: Any, receive: Any, send: Any) -> None:
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


async def noop() -> None:
    return None


Call = Callable[[], Awaitable[Any]]


def micro_cases() -> dict[str, Call]:
    from fastapi_resilience._retry import Retry
    from fastapi_resilience._retry_budget import RetryBudget

    retry = Retry(attempts=3)
    budgeted = Retry(attempts=3, budget=RetryBudget())
    decorated = Retry(attempts=3)(noop)
    cases: dict[str, Call] = {
        "plain_await": noop,
        "resilience_retry": lambda: retry.call(noop),
        "resilience_retry_decorator": decorated,
        "resilience_retry_budget": lambda: budgeted.call(noop),
    }
    try:
        from tenacity import retry as t_retry
        from tenacity import stop_after_attempt, wait_exponential_jitter

        cases["tenacity_decorator"] = t_retry(
            stop=stop_after_attempt(3), wait=wait_exponential_jitter()
        )(noop)
    except ImportError:
        pass
    try:
        import stamina

        cases["stamina_decorator"] = stamina.retry(on=Exception, attempts=3)(noop)
    except ImportError:
        pass
    return cases


async def _time(call: Call, n: int) -> float:
    start = time.perf_counter_ns()
    for _ in range(n):
        await call()
    return (time.perf_counter_ns() - start) / n


async def micro(repeats: int, n: int) -> None:
    cases = micro_cases()
    results: dict[str, list[float]] = {name: [] for name in cases}
    names = list(cases)
    for repeat in range(repeats):
        shift = repeat % len(names)
        order = names[shift:] + names[:shift]
        base = await _time(noop, n)
        for name in order:
            results[name].append(await _time(cases[name], n) - base)
    print(f"per-call overhead over `await noop()` (median of {repeats}, {n} calls each), ns:")
    for name in names:
        values = results[name]
        print(
            f"  {name:28s} {statistics.median(values):9.0f}  "
            f"(min {min(values):.0f}, max {max(values):.0f})"
        )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _burst(client: httpx.AsyncClient, requests: int, concurrency: int) -> float:
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


async def transport(repeats: int, requests: int, concurrency: int) -> None:
    from fastapi_resilience._transport import ResilientTransport

    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "benchmarks.bench_outbound:upstream_app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--no-access-log",
        ]
    )
    try:
        for _ in range(200):
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                await asyncio.sleep(0.05)
        base_url = f"http://127.0.0.1:{port}"
        clients = {
            "httpx_plain": httpx.AsyncClient(
                transport=httpx.AsyncHTTPTransport(), base_url=base_url
            ),
            "resilience_transport": httpx.AsyncClient(
                transport=ResilientTransport(), base_url=base_url
            ),
        }
        for client in clients.values():
            await _burst(client, max(100, requests // 10), concurrency)
        ratios: list[float] = []
        rates: dict[str, list[float]] = {name: [] for name in clients}
        names = list(clients)
        for repeat in range(repeats):
            order = names if repeat % 2 == 0 else names[::-1]
            now = {name: await _burst(clients[name], requests, concurrency) for name in order}
            for name, rate in now.items():
                rates[name].append(rate)
            ratios.append(now["resilience_transport"] / now["httpx_plain"])
        for client in clients.values():
            await client.aclose()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    print(f"outbound GETs, {requests} per repeat from {concurrency} tasks, {repeats} repeats:")
    for name in names:
        print(f"  {name:22s} {statistics.median(rates[name]):8.0f} req/s (median)")
    print(
        f"  ratio resilience/plain: median {statistics.median(ratios):.3f} "
        f"(min {min(ratios):.3f}, max {max(ratios):.3f})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--sections", default="micro,transport")
    args = parser.parse_args()
    sections = args.sections.split(",")
    if "micro" in sections:
        asyncio.run(micro(args.repeats, args.calls))
    if "transport" in sections:
        asyncio.run(transport(args.repeats, args.requests, args.concurrency))


if __name__ == "__main__":
    main()
