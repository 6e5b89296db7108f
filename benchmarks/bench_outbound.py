"""CPU cost that ``ResilientTransport`` adds to one httpx request, without a network.

Run: ``.venv/bin/python -m benchmarks.bench_outbound [--repeats 9] [--requests 3000]``.

The loopback comparison lives in the harness (``benchmarks/client.py``, case
``resilience_transport``); on a shared machine its ratio swings with the load of the upstream
process. This measures only the client side: ``AsyncClient.get`` through a transport that
answers a fixed 200 from memory, plain and wrapped in ``ResilientTransport`` (defaults, and
each guard turned off in turn), in CPU time (``time.process_time``), variants interleaved,
median per request over the repeats.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import httpx

BODY = b'{"status":"ok"}'


class FixedTransport(httpx.AsyncBaseTransport):
    """Answers every request with the same small JSON body, at once."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200, headers=[(b"content-type", b"application/json")], stream=httpx.ByteStream(BODY)
        )


def variants() -> dict[str, httpx.AsyncClient]:
    from fastapi_resilience.outbound import ResilientTransport

    def wrapped(**options: object) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=ResilientTransport(FixedTransport(), **options))  # type: ignore[arg-type]

    return {
        "plain": httpx.AsyncClient(transport=FixedTransport()),
        "resilient (defaults)": wrapped(),
        "  without read_body": wrapped(read_body=False),
        "  without breaker": wrapped(failure_threshold=None),
        "  without retry": wrapped(attempts=1),
        "  nothing on": wrapped(attempts=1, failure_threshold=None, timeout=None, read_body=False),
    }


async def _per_request(client: httpx.AsyncClient, n: int) -> float:
    start = time.process_time()
    for _ in range(n):
        response = await client.get("http://upstream.test/")
        if response.content != BODY:
            raise RuntimeError("unexpected body")
    return (time.process_time() - start) / n * 1e6


async def run(repeats: int, requests: int) -> None:
    clients = variants()
    times: dict[str, list[float]] = {name: [] for name in clients}
    names = list(clients)
    for client in clients.values():
        await _per_request(client, 200)
    for repeat in range(repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(await _per_request(clients[name], requests))
    plain = statistics.median(times["plain"])
    print(f"CPU µs per request, median of {repeats} interleaved repeats of {requests}:")
    for name in names:
        value = statistics.median(times[name])
        print(f"  {name:24s} {value:7.1f}   (+{value - plain:5.1f})")
    for client in clients.values():
        await client.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--requests", type=int, default=3000)
    args = parser.parse_args()
    asyncio.run(run(args.repeats, args.requests))


if __name__ == "__main__":
    main()
