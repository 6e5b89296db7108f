"""Instructions per request under valgrind's callgrind: a figure other processes cannot move.

On a shared machine wall-clock ratios spread widely; the number of instructions one request
executes does not depend on the neighbours. For each HTTP variant the app is driven in process
(no server, no network: the ASGI request of ``micro.asgi_request``, after the app's lifespan
start-up, as a server sends it), once with ``warm`` requests
and once with ``warm + requests``; the difference divided by ``requests`` is the app's cost per
request. What it leaves out: system calls (``os.urandom``) and the server's own work, so use it
to compare middleware, and wrk for throughput. Slow (about a minute per run)::

    python -m benchmarks.instructions --only bare,resilience_errors_ids,asgi_correlation_id
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Sequence

from starlette.types import ASGIApp

from benchmarks._procs import ROOT
from benchmarks.apps import VARIANTS, BenchEnv
from benchmarks.micro import asgi_request
from benchmarks.route_matching import ROUTE_PROBES

#: Apps measured only here, by name.
PROBES = ROUTE_PROBES

_COLLECTED = re.compile(r"Collected : (\d+)")


def _build(name: str) -> ASGIApp:
    """A variant's app, or one of the probes (apps measured only here)."""
    probe = PROBES.get(name)
    return probe() if probe is not None else VARIANTS[name].build(BenchEnv())


def drive(name: str, count: int) -> None:
    """Start the variant's app (its lifespan, as a server does), then send ``count`` requests
    through it, in this process."""
    drive_app(_build(name), count)


def drive_app(app: ASGIApp, count: int) -> None:
    """``app``'s lifespan start-up, then ``count`` requests through it, in this process."""
    call = asgi_request(app)

    async def run() -> None:
        async with lifespan(app):
            for _ in range(count):
                await call()

    asyncio.run(run())


@contextlib.asynccontextmanager
async def lifespan(app: ASGIApp) -> AsyncIterator[None]:
    """The app's lifespan start-up on entry and its shutdown on exit, as uvicorn sends them."""
    inbox: asyncio.Queue[dict[str, str]] = asyncio.Queue()
    outbox: asyncio.Queue[dict[str, str]] = asyncio.Queue()
    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    task = asyncio.ensure_future(app(scope, inbox.get, outbox.put))  # type: ignore[arg-type]
    await inbox.put({"type": "lifespan.startup"})
    started = await outbox.get()
    if started["type"] != "lifespan.startup.complete":
        raise RuntimeError(f"the app did not start: {started}")
    try:
        yield
    finally:
        await inbox.put({"type": "lifespan.shutdown"})
        await outbox.get()
        await task


def instructions(name: str, count: int, *, module: str = "benchmarks.instructions") -> int:
    """Instructions of one process that drives ``name`` with ``count`` requests:
    ``python -m {module} --drive name count`` under callgrind."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise SystemExit("valgrind is not installed (apt-get install valgrind)")
    done = subprocess.run(
        [
            valgrind,
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            sys.executable,
            "-m",
            module,
            "--drive",
            name,
            str(count),
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONHASHSEED": "0"},
        capture_output=True,
        text=True,
    )
    found = _COLLECTED.search(done.stderr)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"callgrind failed for {name}: {done.stderr[-2000:]}")
    return int(found.group(1))


def per_request(
    names: Sequence[str], *, warm: int, requests: int, module: str = "benchmarks.instructions"
) -> dict[str, float]:
    """Instructions per request of each name: ``warm + requests`` requests less ``warm``."""
    counts: dict[str, float] = {}
    for name in names:
        before = instructions(name, warm, module=module)
        loaded = instructions(name, warm + requests, module=module)
        counts[name] = (loaded - before) / requests
        print(f"{name}: {counts[name]:,.0f} instructions per request", flush=True)
    return counts


def counted_names(
    argv: Sequence[str] | None,
    *,
    prog: str,
    first: str,
    only: str,
    requests: int,
    drive: Callable[[str, int], None],
) -> tuple[list[str], argparse.Namespace] | None:
    """The command line every instruction counter shares.

    ``--only`` names what to count (``first``, the reference, always counted first),
    ``--requests`` and ``--warm`` how many requests; the hidden ``--drive NAME COUNT`` is what
    each counted process runs: it calls ``drive`` and returns ``None``.
    """
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--only", default=only)
    parser.add_argument("--requests", type=int, default=requests)
    parser.add_argument("--warm", type=int, default=200)
    parser.add_argument("--drive", nargs=2, metavar=("NAME", "COUNT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.drive:
        drive(args.drive[0], int(args.drive[1]))
        return None
    return list(dict.fromkeys([first, *(n.strip() for n in args.only.split(",") if n)])), args


def main(argv: Sequence[str] | None = None) -> int:
    counted = counted_names(
        argv,
        prog="python -m benchmarks.instructions",
        first="bare",
        only="bare,noop_asgi,resilience_errors_ids",
        requests=2000,
        drive=drive,
    )
    if counted is None:
        return 0
    names, args = counted
    unknown = [
        n for n in names if n not in PROBES and (n not in VARIANTS or VARIANTS[n].needs_redis)
    ]
    if unknown:
        raise SystemExit(f"not in-process variants: {unknown}")
    print_table(
        per_request(names, warm=args.warm, requests=args.requests), "instructions per request"
    )
    return 0


def print_table(per_request: dict[str, float], column: str) -> None:
    """The Markdown table of instructions per request, against ``bare`` (first row)."""
    bare = per_request["bare"]
    print(f"\n| variant | {column} | over bare | bare / variant |")
    print("| :--- | ---: | ---: | ---: |")
    for name, value in per_request.items():
        print(f"| `{name}` | {value:,.0f} | {value - bare:+,.0f} | {bare / value:.3f} |")


if __name__ == "__main__":
    raise SystemExit(main())
