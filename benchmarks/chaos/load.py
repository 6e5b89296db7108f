"""The open-loop load generator: a second process that sends requests at a fixed rate.

    python -m benchmarks.chaos.load --url http://127.0.0.1:PORT --rate 60 --out records.jsonl

Request ``i`` is sent at ``start + i / rate`` whether or not earlier ones were answered (an
open loop: a slow server does not slow the sender, so its slowness is measured, not hidden).
Lines on stdin steer it: ``phase NAME`` tags the requests sent from then on, ``stop`` (or the
end of stdin) stops sending; it then waits for the requests in flight, up to the client timeout,
and writes one JSON object per request to ``--out``:

- ``phase``, ``route``: the phase at send time and the mix entry;
- ``sent``: ``time.monotonic()`` when it was sent (the same clock as the orchestrator's);
- ``status`` or ``error``: the answer's status, or why there was none (``timeout``,
  ``connect-failed``, ``connection-lost``, ``client-error``: never answered);
- ``latency``: seconds from send to the whole answer read;
- ``source``: ``app`` (a JSON or problem+json body) or ``balancer`` (anything else: nginx's
  own error pages);
- ``stale``: a 200 that said it was a stale copy;
- ``seq``: its number, sent as ``X-Chaos-Seq``, which nginx logs with what it did.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

__all__ = ["BULK_KEY", "METERED_KEY", "MIX", "SKUS", "Record", "Target", "schedule"]

#: An API key whose tier never refuses, and one whose tier refuses about half its requests.
BULK_KEY = "chaos-bulk-key"
METERED_KEY = "chaos-metered-key"
#: The skus read from the inventory upstream: few, so the response cache holds them all.
SKUS = tuple(f"tea-{n}" for n in range(8))


@dataclass(frozen=True, slots=True)
class Target:
    """One entry of the mix: what a request of this kind sends."""

    route: str
    method: str
    path: str  # ``{sku}`` is replaced by one of SKUS
    key: str = BULK_KEY
    body: str | None = None


#: (weight, target): about what a shop's API sees, every route of the example that a fault
#: touches. Not ``POST /login``: its limit of 5 a minute takes minutes to settle into a steady
#: mix, the metered key's per-second limit one second. No request creates data that lives on
#: (no valid POST /orders), so memory and connection counts in a soak are the library's, not a
#: growing demo database's (a reservation only raises a count per sku in the upstream; a failed
#: one is parked in the bounded dead-letter queue).
MIX: tuple[tuple[int, Target], ...] = (
    (25, Target("orders", "GET", "/orders/1")),
    (5, Target("orders-missing", "GET", "/orders/999")),
    (15, Target("orders-metered", "GET", "/orders/1", key=METERED_KEY)),
    (15, Target("inventory", "GET", "/inventory/{sku}")),
    (10, Target("availability", "GET", "/inventory/{sku}/availability")),
    (10, Target("live", "GET", "/inventory/{sku}/live")),
    (10, Target("catalog", "GET", "/catalog/{sku}")),
    (5, Target("orders-invalid", "POST", "/orders", body='{"sku": "", "quantity": 0}')),
    (5, Target("reserve", "POST", "/inventory/{sku}/reserve")),
)

#: The share of the mix the metered key sends: its tier is set to refuse about half of it.
METERED_SHARE = sum(w for w, t in MIX if t.key == METERED_KEY) / sum(w for w, _ in MIX)


@dataclass(slots=True)
class Record:
    seq: int
    phase: str
    route: str
    sent: float
    status: int | None = None
    error: str | None = None
    latency: float | None = None
    source: str | None = None
    stale: bool = False
    #: From nginx's log (joined after the run): how many more app processes it tried, the
    #: status it had from each (``"502, 200"``), their addresses.
    resent: int = 0
    balancer_statuses: str = ""
    servers: str = ""


def schedule(seed: int) -> list[Target]:
    """One shuffled round of the mix (100 requests), the same for the same seed."""
    targets = [target for weight, target in MIX for _ in range(weight)]
    random.Random(seed).shuffle(targets)
    return targets


async def _send(
    client: httpx.AsyncClient, target: Target, sku: str, record: Record, timeout: float
) -> None:
    headers = {"X-API-Key": target.key, "X-Chaos-Seq": str(record.seq)}
    if target.body is not None:
        headers["content-type"] = "application/json"
    path = target.path.replace("{sku}", sku)
    try:
        # httpx's timeout bounds each step (connect, each read...); this bounds the whole.
        async with asyncio.timeout(timeout):
            response = await client.request(
                target.method, path, headers=headers, content=target.body
            )
    except (httpx.TimeoutException, TimeoutError):
        record.error = "timeout"
    except httpx.ConnectError:
        record.error = "connect-failed"
    except httpx.TransportError as exc:
        record.error = f"connection-lost ({type(exc).__name__})"
    except Exception as exc:
        # Any other failure (an answer httpx cannot decode...) left the record with neither
        # a status nor an error: counted nowhere, neither answered nor never answered.
        record.error = f"client-error ({type(exc).__name__})"
    else:
        record.status = response.status_code
        kind = response.headers.get("content-type", "")
        record.source = "app" if "json" in kind else "balancer"
        record.stale = "ttl=-" in response.headers.get("cache-status", "")
    record.latency = time.monotonic() - record.sent


class _Steering:
    """The phase and the stop flag, changed by lines on stdin.

    Read by a daemon thread: a blocked ``readline`` must not hold the process at its exit (the
    default executor's threads are joined there)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.phase = "start"
        self.stopped = asyncio.Event()
        self._loop = loop
        threading.Thread(target=self._follow_stdin, name="stdin", daemon=True).start()

    def _follow_stdin(self) -> None:
        for line in sys.stdin:
            words = line.split(maxsplit=1)
            if words and words[0] == "phase" and len(words) == 2:
                self.phase = words[1].strip()
            elif words and words[0] == "stop":
                break
        self._loop.call_soon_threadsafe(self.stopped.set)


async def run(url: str, rate: float, timeout: float, seed: int) -> list[Record]:
    steering = _Steering(asyncio.get_running_loop())
    targets = schedule(seed)
    records: list[Record] = []
    in_flight: set[asyncio.Task[None]] = set()
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=200)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        start = time.monotonic()
        i = 0
        while not steering.stopped.is_set():
            due = start + i / rate
            wait = due - time.monotonic()
            if wait > 0:
                try:
                    await asyncio.wait_for(steering.stopped.wait(), wait)
                    break
                except TimeoutError:
                    pass
            else:
                await asyncio.sleep(0)  # behind schedule: still let the answers be read
            target = targets[i % len(targets)]
            record = Record(i, steering.phase, target.route, time.monotonic())
            records.append(record)
            task = asyncio.create_task(_send(client, target, SKUS[i % len(SKUS)], record, timeout))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
            i += 1
        print(f"load: stopped, {len(in_flight)} requests in flight", file=sys.stderr)
        if in_flight:
            await asyncio.wait(in_flight)
    return records


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.chaos.load")
    parser.add_argument("--url", required=True)
    parser.add_argument("--rate", type=float, default=60.0, help="requests per second")
    parser.add_argument("--timeout", type=float, default=10.0, help="client timeout, seconds")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    records = asyncio.run(run(args.url, args.rate, args.timeout, args.seed))
    with args.out.open("w", encoding="utf-8") as out:
        for record in records:
            out.write(json.dumps(asdict(record)) + "\n")
    return 0


def read_records(path: Path) -> list[Record]:
    rows: list[dict[str, Any]] = [json.loads(line) for line in path.read_text().splitlines()]
    return [Record(**row) for row in rows]


if __name__ == "__main__":
    sys.exit(main())
