"""How often CPython's garbage collector runs in a served variant, under wrk, and why.

Found while measuring the correlation-ID middleware: a context variable kept set through the
response made the server run the collector about seventy times as often, finding nothing to
collect (ADR 0044). This reproduces that count for any variant::

    python -m benchmarks.gc_count noop_asgi noop_contextvar resilience_errors_ids

Each variant runs in its own uvicorn process (the harness's options) whose app is wrapped to
count collections and their time with ``gc.callbacks``, and to read the gen-0 count as each
request starts; wrk loads it, the server is stopped, and the figures it wrote at lifespan
shutdown (over its whole life, the 2 s warm-up included) are printed next to the number of
requests of the measured run.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from benchmarks._procs import UvicornServer
from benchmarks._wrk import WrkSettings, run_wrk
from benchmarks.apps import VARIANT_ENV, VARIANTS

#: The file the served app writes its counts to when it shuts down.
REPORT_ENV = "BENCH_GC_REPORT"


class GcCounter:
    """Counts collections per generation, the objects they found unreachable, and their time."""

    def __init__(self) -> None:
        self.collections = [0, 0, 0]
        self.collected = 0
        self.seconds = 0.0
        self._started = 0.0
        #: ``gc.get_count()[0]`` as each request starts (ints: untracked, they move no count).
        self.counts: list[int] = []

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        self.seconds += time.perf_counter() - self._started
        self.collections[info["generation"]] += 1
        self.collected += info["collected"]

    def note_request(self) -> None:
        if len(self.counts) < _MAX_NOTED:
            self.counts.append(gc.get_count()[0])

    def as_dict(self) -> dict[str, Any]:
        return {
            "collections": self.collections,
            "collected": self.collected,
            "seconds": self.seconds,
            **count_growth(self.counts),
        }


#: Requests whose starting gen-0 count is kept (a few seconds of load).
_MAX_NOTED = 500_000


def count_growth(counts: Sequence[int]) -> dict[str, int]:
    """How the gen-0 count moves from one request's start to the next.

    ``rise``: the most common step up, i.e. the tracked objects a request leaves reachable
    after it (they count until a later request's end frees them, or a collection runs).
    ``peak``: the highest count a request started at. With ``peak`` near CPython's threshold
    (700 by default) a few more objects per request mean a collection every round of requests.
    """
    steps = [b - a for a, b in itertools.pairwise(counts) if b > a]
    return {"rise": statistics.mode(steps) if steps else 0, "peak": max(counts, default=0)}


def counting_app(app: ASGIApp, counter: GcCounter, report: Path) -> ASGIApp:
    """``app``, writing ``counter``'s figures to ``report`` when the lifespan shuts down."""

    async def wrapper(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            if scope["type"] == "http":
                counter.note_request()
            await app(scope, receive, send)
            return

        async def reporting_send(message: Message) -> None:
            if message["type"] == "lifespan.shutdown.complete":
                report.write_text(json.dumps(counter.as_dict()), encoding="utf-8")
            await send(message)

        await app(scope, receive, reporting_send)

    return wrapper


def create_app() -> ASGIApp:
    """The uvicorn factory: the variant named by ``BENCH_VARIANT``, counting collections."""
    from benchmarks.apps import create_app as variant_app

    counter = GcCounter()
    gc.callbacks.append(counter)
    return counting_app(variant_app(), counter, Path(os.environ[REPORT_ENV]))


def count(name: str, seconds: int) -> dict[str, Any]:
    """Serve ``name``, load it for ``seconds`` (after a 2 s warm-up), return its counts."""
    with tempfile.TemporaryDirectory(prefix="bench-gc-") as tmp:
        report = Path(tmp) / "gc.json"
        server = UvicornServer(
            "benchmarks.gc_count:create_app", env={VARIANT_ENV: name, REPORT_ENV: str(report)}
        )
        server.start()
        try:
            settings = WrkSettings(duration_s=seconds)
            run_wrk(settings, server.url, duration_s=2)
            result = run_wrk(settings, server.url)
        finally:
            server.stop()  # the app writes the report as its lifespan shuts down
        figures: dict[str, Any] = json.loads(report.read_text(encoding="utf-8"))
    figures["requests"] = result.requests
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gc_count")
    parser.add_argument("variants", nargs="+", choices=sorted(VARIANTS))
    parser.add_argument("--seconds", type=int, default=5)
    args = parser.parse_args(argv)
    print(
        "| variant | requests measured | collections (gen 0, 1, 2) | objects collected"
        " | time collecting (ms) | gen-0 count rise per request | highest gen-0 count |"
    )
    print("| :--- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name in args.variants:
        figures = count(name, args.seconds)
        gens = ", ".join(str(n) for n in figures["collections"])
        print(
            f"| `{name}` | {figures['requests']:,} | {gens} | {figures['collected']:,}"
            f" | {figures['seconds'] * 1000:.1f} | {figures['rise']} | {figures['peak']} |"
        )
    print(
        "\nCollections and objects are counted over the server's life (warm-up included); the"
        " gen-0 count is read as each request starts."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
