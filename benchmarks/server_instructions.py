"""Instructions per request in a real uvicorn server, counted by valgrind's callgrind.

``benchmarks.instructions`` drives the app in process and leaves out the server; capacity
(``benchmarks.capacity``) includes the server but is a timing, which the machine's drift moves by
a percent or two. This counts what the server process executes, uvicorn, uvloop, httptools, the
collector and the kernel-facing calls included (system calls themselves excluded), under the
same wrk load as the HTTP benchmark: repeatable to a fraction of a percent on any machine.

For each variant: start ``uvicorn benchmarks.apps:create_app`` (the harness's options) under
callgrind, warm it up with wrk, zero the counters (``callgrind_control -z``), send an exact
number of requests over 64 keep-alive connections (a small client here: wrk stops with requests
in flight, which the server counts and wrk does not), dump the counters
(``callgrind_control -d``) and divide. Slow (about 50 s per variant)::

    python -m benchmarks.server_instructions bare resilience_errors_ids resilience_full_memory
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks._procs import UvicornServer
from benchmarks._wrk import WrkSettings, run_wrk
from benchmarks.apps import VARIANT_ENV, VARIANTS
from benchmarks.instructions import print_table

#: Under callgrind a request takes 50 times as long: wait longer for answers than wrk's default.
_SETTINGS = WrkSettings(timeout_s=10)
#: The connections of the measured load, as wrk's in the HTTP benchmark.
CONNECTIONS = 64
_REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


async def _one_connection(port: int, count: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for _ in range(count):
            writer.write(_REQUEST)
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            await reader.readexactly(length)
            if not head.startswith(b"HTTP/1.1 200 "):
                raise RuntimeError(f"unexpected answer: {head[:60]!r}")
    finally:
        writer.close()
        await writer.wait_closed()


def load(port: int, per_connection: int) -> int:
    """Send ``per_connection`` requests on each of ``CONNECTIONS`` connections; all answered."""

    async def run() -> None:
        async with asyncio.timeout(600):
            await asyncio.gather(
                *(_one_connection(port, per_connection) for _ in range(CONNECTIONS))
            )

    asyncio.run(run())
    return CONNECTIONS * per_connection


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise SystemExit(f"{name} is not installed (apt-get install valgrind)")
    return path


def dumped_instructions(directory: Path, *, timeout_s: float = 30.0) -> int:
    """The ``totals`` of the dump ``callgrind_control -d`` asked for (``<file>.1``).

    The server process writes it; wait until its last line, ``totals:``, is there.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for dump in directory.glob("callgrind.*.1"):
            for line in dump.read_text(encoding="utf-8").splitlines():
                if line.startswith("totals:"):
                    return int(line.split()[1])
        time.sleep(0.2)
    raise RuntimeError(f"no callgrind dump with totals in {directory} after {timeout_s:g} s")


def measure(name: str, per_connection: int) -> tuple[int, int]:
    """(requests answered, instructions executed) for the measured load against ``name``."""
    if VARIANTS[name].needs_redis:
        raise SystemExit(f"{name} needs Redis: not measured here")
    control = _tool("callgrind_control")
    with tempfile.TemporaryDirectory(prefix="bench-callgrind-") as tmp:
        callgrind = [_tool("valgrind"), "-q", "--tool=callgrind"]
        server = UvicornServer(
            "benchmarks.apps:create_app",
            env={VARIANT_ENV: name, "PYTHONHASHSEED": "0"},
            prefix=[*callgrind, f"--callgrind-out-file={tmp}/callgrind.%p"],
            timeout_s=120.0,
        )
        server.start()
        try:
            run_wrk(_SETTINGS, server.url, duration_s=5)  # imports, caches, first collections
            time.sleep(1.0)  # the requests wrk left in flight
            subprocess.run([control, "-z", str(server.pid)], check=True, capture_output=True)
            requests = load(server.port, per_connection)
            subprocess.run([control, "-d", str(server.pid)], check=True, capture_output=True)
            total = dumped_instructions(Path(tmp))
        finally:
            server.stop()
    return requests, total


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.server_instructions")
    parser.add_argument("variants", nargs="+", choices=sorted(VARIANTS))
    parser.add_argument("--per-connection", type=int, default=50)
    args = parser.parse_args(argv)
    names = list(dict.fromkeys(["bare", *args.variants]))
    per_request: dict[str, float] = {}
    for name in names:
        requests, total = measure(name, args.per_connection)
        per_request[name] = total / requests
        print(f"{name}: {requests:,} requests, {per_request[name]:,.0f} instructions each")
    print_table(per_request, "instructions per request (server)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
