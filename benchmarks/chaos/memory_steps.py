"""What the soak's memory steps are: the soak's cluster and load, the app traced by tracemalloc.

    python -m benchmarks.chaos.memory_steps [--rate 60] [--warmup 60] [--top 12]

The cluster and load of ``make soak``, both app processes started with ``PYTHONTRACEMALLOC=1``
(one frame per allocation: cheap enough for the load) and ``EXAMPLE_RUNTIME_STATS=1``. After
a warm-up it runs the faults that do not kill a process, each for ``FAULT`` seconds followed by
``AFTER`` seconds of healthy traffic, the upstream's two first then again at the end, and after
each reads process 1's resident memory (``/proc``) and, through ``GET /_runtime?top=N``, the
memory Python's allocations hold (tracemalloc's current figure) and the source lines holding
the most. It prints, per step, how both figures moved and the lines that grew the most.

Resident memory that rises while traced memory does not is the allocator's high-water mark
(freed memory kept by the process), not objects alive; traced memory that rises and stays is
objects alive, to be named by the lines listed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from benchmarks.chaos.cluster import Cluster
from benchmarks.chaos.load import BULK_KEY
from benchmarks.chaos.scenario import FAULTS, Fault, LoadProcess, Timeline
from benchmarks.chaos.soak import _rss

FAULT, AFTER = 10.0, 15.0
#: The faults in the order run: each of the upstream's first (where the soak's steps are),
#: then the others, then the upstream's two again (a bounded structure does not step twice).
ORDER = (
    "upstream-slow",
    "upstream-failing",
    "upstream-flapping",
    "redis-killed",
    "redis-stalled",
    "upstream-slow",
    "upstream-failing",
)
MIB = 1024 * 1024


def _probe(client: httpx.Client, cluster: Cluster, top: int) -> dict[str, Any]:
    app = cluster.apps[0]
    url = f"http://127.0.0.1:{app.port}/_runtime"
    stats: dict[str, Any] = client.get(
        url, params={"top": top}, headers={"X-API-Key": BULK_KEY}
    ).json()
    stats["rss"] = _rss(app.pid) if app.pid else None
    stats["threads"] = _threads(app.pid) if app.pid else None
    return stats


def _threads(pid: int) -> int | None:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return None


def _lines(stats: dict[str, Any]) -> dict[str, int]:
    return {entry["where"]: entry["size"] for entry in stats.get("top", [])}


def _growth(before: dict[str, Any], after: dict[str, Any], n: int) -> list[tuple[str, int]]:
    old, new = _lines(before), _lines(after)
    grown = [(where, size - old.get(where, 0)) for where, size in new.items()]
    return sorted(grown, key=lambda item: -item[1])[:n]


def _short(where: str) -> str:
    for marker in ("/src/", "/site-packages/", "/lib/python3"):
        if marker in where:
            return where.split(marker, 1)[1]
    return where


def run(rate: float, warmup: float, top: int, shown: int, work: Path) -> int:
    faults: dict[str, Fault] = {fault.name: fault for fault in FAULTS}
    env = {"PYTHONTRACEMALLOC": "1"}
    with (
        Cluster(rate=rate, runtime_stats=True, workdir=work, app_env=env) as cluster,
        httpx.Client(timeout=30.0) as client,
    ):
        load = LoadProcess(cluster.url, rate, 10.0, work / "records.jsonl")
        timeline = Timeline(load)
        try:
            timeline.begin("warm-up", "warm-up", "traffic, no fault")
            time.sleep(warmup)
            previous = _probe(client, cluster, top)
            print(_row("after warm-up", previous, None), flush=True)
            for name in ORDER:
                fault = faults[name]
                timeline.begin(name, "fault", fault.description, name)
                fault.begin(cluster)
                time.sleep(FAULT)
                fault.end(cluster)
                timeline.begin(f"{name}: after", "recovery", "repaired", name)
                time.sleep(AFTER)
                now = _probe(client, cluster, top)
                print(_row(f"after {name}", now, previous), flush=True)
                for where, size in _growth(previous, now, shown):
                    if size > 16 * 1024:
                        print(f"      {size / 1024:+9.1f} KiB  {_short(where)}", flush=True)
                previous = now
            timeline.close()
            load.finish()
        finally:
            load.kill()
    return 0


def _row(label: str, now: dict[str, Any], before: dict[str, Any] | None) -> str:
    rss, traced = now["rss"] / MIB, now.get("traced", 0) / MIB
    peak = now.get("traced_peak", 0) / MIB
    text = (
        f"{label:26} RSS {rss:6.1f} MiB  traced {traced:5.1f} MiB  traced peak {peak:5.1f} MiB"
        f"  threads {now['threads']}"
    )
    if before is not None:
        text += (
            f"   (RSS {rss - before['rss'] / MIB:+5.1f}, "
            f"traced {traced - before.get('traced', 0) / MIB:+5.1f})"
        )
    return text


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.chaos.memory_steps", description=__doc__
    )
    parser.add_argument("--rate", type=float, default=60.0, help="requests per second")
    parser.add_argument("--warmup", type=float, default=60.0, help="seconds before the faults")
    parser.add_argument("--top", type=int, default=400, help="source lines read per probe")
    parser.add_argument("--shown", type=int, default=12, help="lines printed per step")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="memory-steps-") as tmp:
        return run(args.rate, args.warmup, args.top, args.shown, Path(tmp))


if __name__ == "__main__":
    sys.exit(main())
