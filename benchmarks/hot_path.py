"""Per-request cost of a variant's ASGI app in process: no server, no socket, no wrk.

Pushes ``--requests`` GET / requests through the app on one event loop, ``--repeats`` times,
and prints the best (least disturbed) microseconds per request: on a shared machine the minimum
is the figure that moves only when the code does. ``--profile`` prints the top of cProfile.

    python -m benchmarks.hot_path bare resilience_errors_ids resilience_full_memory

For instruction counts (immune to other load), run one variant under callgrind twice, with two
request counts, and divide the difference of the totals by the difference of the counts::

    valgrind --tool=callgrind --callgrind-out-file=/dev/null \
        python -m benchmarks.hot_path resilience_full_memory --requests 2000 --repeats 1
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import time
from typing import Any

from benchmarks.apps import VARIANTS, BenchEnv

_HEADERS = [(b"host", b"127.0.0.1:8000"), (b"user-agent", b"wrk"), (b"accept", b"*/*")]


def _scope() -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 50000),
        "scheme": "http",
        "method": "GET",
        "root_path": "",
        "path": "/",
        "raw_path": b"/",
        "query_string": b"",
        "headers": list(_HEADERS),
        "state": {},
    }


async def _receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def _run(app: Any, requests: int) -> float:
    sent: list[int] = []

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            sent.append(message["status"])

    start = time.perf_counter()
    for _ in range(requests):
        await app(_scope(), _receive, send)
    elapsed = time.perf_counter() - start
    if set(sent) != {200}:
        raise RuntimeError(f"unexpected statuses {set(sent)}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="+", choices=sorted(VARIANTS))
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    loop = asyncio.new_event_loop()
    for name in args.variants:
        app = VARIANTS[name].build(BenchEnv())
        loop.run_until_complete(_run(app, 200))  # warm-up: caches, lazy imports
        if args.profile:
            profiler = cProfile.Profile()
            profiler.enable()
            loop.run_until_complete(_run(app, args.requests))
            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
            continue
        best = min(loop.run_until_complete(_run(app, args.requests)) for _ in range(args.repeats))
        print(f"{name:28s} {best / args.requests * 1e6:8.2f} us/request")
    loop.close()


if __name__ == "__main__":
    main()
