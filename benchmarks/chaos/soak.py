"""``make soak``: mixed traffic with periodic faults for ten minutes, the processes sampled.

    SOAK_SECONDS=600 python -m benchmarks.chaos.soak [--rate 60] [--no-doc]

The cluster and load of ``make chaos``; a warm-up (``WARMUP`` seconds of healthy traffic, then
one round of every fault kind), then cycles of a quiet stretch, one fault (the kinds of ``make
chaos`` in turn) and a stretch after it, then a last quiet stretch. Every
``SAMPLE_SECONDS`` it reads, for each app process, its resident memory (``VmRSS`` in
``/proc/<pid>/status``), its open file descriptors (``/proc/<pid>/fd``) and its asyncio tasks
(``GET /_runtime``, which the example serves only with ``EXAMPLE_RUNTIME_STATS=1``), and the
clients connected to Redis (``INFO clients``, less the sampler's own connection).

The faults kill app process 2, never process 1: process 1 lives through the whole run, so its
figures are the ones judged. Pass: process 1's memory at the end (median over the last quiet
stretch) is within 10 % of its memory after the warm-up (median over the first quiet stretch),
and its tasks and descriptors, and Redis's clients, did not grow between the two stretches by
more than ``SLACK`` (what one request in flight more or less moves).

Why the warm-up holds a round of faults: a process's resident memory takes a step the first
time it lives through a slow upstream and the first time through a failing one, and never
again. ``python -m benchmarks.chaos.memory_steps`` shows what those steps are: the memory
Python's objects hold (tracemalloc) stays flat through every fault; its peak rises once, during
the first slow upstream (hundreds of requests waiting at once), and the allocator keeps the
pages it took for them. A baseline taken before any fault would count that high-water mark as
growth; taken after one round of each fault, the 10 % rule judges what repeats.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from benchmarks._report import markdown_table
from benchmarks.chaos.cluster import ROOT, Cluster
from benchmarks.chaos.load import BULK_KEY, Record
from benchmarks.chaos.report import replace_between
from benchmarks.chaos.scenario import (
    FAULTS,
    LoadProcess,
    Span,
    Timeline,
    app_killed,
    join_balancer_log,
)

DOC = ROOT / "docs" / "reliability.md"
PLOT = ROOT / "docs" / "images" / "soak-memory.png"
BEGIN = "<!-- soak report: begin (written by make soak) -->"
END = "<!-- soak report: end -->"

SAMPLE_SECONDS = 5.0
WARMUP = 60.0
#: Seconds of each fault of the warm-up's round, and of the healthy traffic after it.
WARMUP_FAULT, WARMUP_AFTER = 10.0, 15.0
QUIET, FAULT, AFTER = 25.0, 10.0, 15.0
FINAL_QUIET = 30.0
#: The soak's faults: those of ``make chaos``, the process killed being app process 2.
SOAK_FAULTS = (*FAULTS[:-1], app_killed(1))
#: Growth allowed between the first and the last quiet stretch, by measure.
SLACK = {"tasks": 2, "fds": 2, "redis_clients": 2}
MEMORY_TOLERANCE = 0.10


@dataclass(slots=True)
class Sample:
    at: float
    phase: str
    kind: str
    #: Per app process (1, 2): pid, rss in bytes, open fds, asyncio tasks (None: unreadable).
    pids: list[int | None] = field(default_factory=list)
    rss: list[int | None] = field(default_factory=list)
    fds: list[int | None] = field(default_factory=list)
    tasks: list[int | None] = field(default_factory=list)
    redis_clients: int | None = None


def _rss(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def _tasks(client: httpx.Client, port: int) -> int | None:
    try:
        response = client.get(f"http://127.0.0.1:{port}/_runtime", headers={"X-API-Key": BULK_KEY})
        return int(response.json()["tasks"])
    except (httpx.HTTPError, ValueError, KeyError):
        return None


def _redis_clients(port: int) -> int | None:
    import redis

    try:
        with redis.Redis(port=port, socket_timeout=0.5, socket_connect_timeout=0.5) as client:
            info = client.info("clients")
    except redis.RedisError:
        return None
    return int(info["connected_clients"]) - 1  # this sampler's own connection


class Sampler:
    """Samples the cluster every ``SAMPLE_SECONDS`` in a thread, tagged with the current span."""

    def __init__(self, cluster: Cluster, timeline: Timeline) -> None:
        self.cluster = cluster
        self.timeline = timeline
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        with httpx.Client(timeout=2.0) as client:
            while not self._stop.wait(SAMPLE_SECONDS):
                self.samples.append(self._sample(client))

    def _sample(self, client: httpx.Client) -> Sample:
        span = self.timeline.spans[-1]
        sample = Sample(time.monotonic(), span.name, span.kind)
        for app in self.cluster.apps:
            pid = app.pid
            sample.pids.append(pid)
            sample.rss.append(_rss(pid) if pid else None)
            sample.fds.append(_fds(pid) if pid else None)
            sample.tasks.append(_tasks(client, app.port) if pid else None)
        if span.kind != "fault":  # a stalled Redis would hold the sampler
            sample.redis_clients = _redis_clients(self.cluster.redis.port)
        return sample


@dataclass(slots=True)
class SoakResult:
    seconds: float
    rate: float
    spans: list[Span]
    samples: list[Sample]
    records: list[Record]
    kills: int


def warmup_seconds() -> float:
    """The healthy warm-up and its round of every fault."""
    return WARMUP + len(SOAK_FAULTS) * (WARMUP_FAULT + WARMUP_AFTER)


def run_soak(seconds: float, rate: float, work: Path, log: object = print) -> SoakResult:
    least = warmup_seconds() + 2 * (QUIET + FAULT + AFTER) + FINAL_QUIET
    if seconds < least:
        raise ValueError(f"the soak needs at least {least:g} s: two faults after its warm-up")
    with Cluster(rate=rate, runtime_stats=True, workdir=work) as cluster:
        load = LoadProcess(cluster.url, rate, 10.0, work / "records.jsonl")
        timeline = Timeline(load)
        sampler = Sampler(cluster, timeline)
        kills = 0
        try:
            start = time.monotonic()
            timeline.begin("warm-up", "warm-up", "traffic, no fault")
            sampler.start()
            _until(start + WARMUP)
            for fault in SOAK_FAULTS:  # every bounded structure and high-water mark, once
                _say(log, f"soak: {time.monotonic() - start:.0f} s, warm-up, {fault.name}")
                span = timeline.begin(
                    f"warm-up: {fault.name}", "fault", fault.description, fault.name
                )
                fault.begin(cluster)
                kills += fault.name == "app-killed"
                _until(span.start + WARMUP_FAULT)
                fault.end(cluster)
                after = timeline.begin(
                    f"warm-up: {fault.name}: after", "recovery", "repaired", fault.name
                )
                _until(after.start + WARMUP_AFTER)
            n = 0
            cycle = QUIET + FAULT + AFTER
            while time.monotonic() + cycle + FINAL_QUIET <= start + seconds:
                fault = SOAK_FAULTS[n % len(SOAK_FAULTS)]
                n += 1
                _say(log, f"soak: {time.monotonic() - start:.0f} s, {fault.name}")
                quiet = timeline.begin("quiet", "quiet", "traffic, no fault")
                _until(quiet.start + QUIET)
                span = timeline.begin(fault.name, "fault", fault.description, fault.name)
                fault.begin(cluster)
                kills += fault.name == "app-killed"
                _until(span.start + FAULT)
                fault.end(cluster)
                after = timeline.begin(f"{fault.name}: after", "recovery", "repaired", fault.name)
                _until(after.start + AFTER)
            timeline.begin("quiet", "quiet", "traffic, no fault")
            _until(start + seconds)
            sampler.stop()
            timeline.close()
            records = join_balancer_log(load.finish(), cluster)
        finally:
            load.kill()
    return SoakResult(seconds, rate, timeline.spans, sampler.samples, records, kills)


def _until(deadline: float) -> None:
    time.sleep(max(0.0, deadline - time.monotonic()))


def _say(log: object, message: str) -> None:
    if callable(log):
        log(message)


# The verdict ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Figure:
    measure: str
    unit: str
    first: float
    last: float
    limit: float

    @property
    def passed(self) -> bool:
        return self.last <= self.limit


def _quiet_stretches(samples: Sequence[Sample]) -> list[list[Sample]]:
    """Runs of consecutive samples taken in quiet spans (after the warm-up)."""
    stretches: list[list[Sample]] = []
    previous = ""
    for sample in samples:
        if sample.kind == "quiet":
            if previous != "quiet":
                stretches.append([])
            stretches[-1].append(sample)
        previous = sample.kind
    return stretches


def _median(values: Sequence[int | None]) -> float:
    known = [v for v in values if v is not None]
    if not known:
        raise ValueError("no sample of this measure")
    return float(statistics.median(known))


def figures(samples: Sequence[Sample]) -> list[Figure]:
    """Process 1 (never killed) and Redis, first quiet stretch against the last."""
    stretches = _quiet_stretches(samples)
    if len(stretches) < 2:
        raise ValueError("the soak needs two quiet stretches after its warm-up: run it longer")
    first, last = stretches[0], stretches[-1]
    mib = 1024 * 1024
    rss0, rss1 = _median([s.rss[0] for s in first]), _median([s.rss[0] for s in last])
    result = [Figure("app 1 memory (RSS)", "MiB", rss0 / mib, rss1 / mib, rss0 * 1.1 / mib)]
    for measure, name, index in (
        ("fds", "app 1 open file descriptors", 0),
        ("tasks", "app 1 asyncio tasks", 0),
    ):
        a = _median([getattr(s, measure)[index] for s in first])
        b = _median([getattr(s, measure)[index] for s in last])
        result.append(Figure(name, "", a, b, a + SLACK[measure]))
    a = _median([s.redis_clients for s in first])
    b = _median([s.redis_clients for s in last])
    result.append(Figure("Redis connected clients", "", a, b, a + SLACK["redis_clients"]))
    return result


def _fmt(value: float, unit: str) -> str:
    return f"{value:.1f} {unit}" if unit else f"{value:g}"


def render(result: SoakResult, found: Sequence[Figure], command: str) -> str:
    answered = [r for r in result.records if r.status is not None]
    never = len(result.records) - len(answered)
    server_errors = sum(r.status == 500 for r in answered)
    faults = [s for s in result.spans if s.kind == "fault"]
    warmup_faults = [s for s in faults if s.name.startswith("warm-up")]
    rows = [
        [
            f.measure,
            _fmt(f.first, f.unit),
            _fmt(f.last, f.unit),
            _fmt(f.limit, f.unit),
            "pass" if f.passed else "FAIL",
        ]
        for f in found
    ]
    table = markdown_table(
        ["measure", "after warm-up", "at the end", "at most", "verdict"], rows, "lrrrl"
    )
    app2 = [s.rss[1] for s in result.samples if s.kind == "quiet" and s.rss[1] is not None]
    app2_rss = f"{app2[-1] / 1024 / 1024:.1f} MiB" if app2 and app2[-1] is not None else "-"
    healthy = [s.rss[0] for s in result.samples if s.phase == "warm-up"][-5:]
    before = f"{_median(healthy) / 1024 / 1024:.1f} MiB" if healthy else "-"
    lines = [
        f"Written by `{command}`: {result.seconds:.0f} s at {result.rate:g} requests a second "
        f"({len(result.records)} requests: {never} never answered, {server_errors} answered "
        f"500), {len(faults)} fault{'' if len(faults) == 1 else 's'} in turn "
        f"({', '.join(sorted({s.fault or s.name for s in faults}))}; the first "
        f"{len(warmup_faults)}, one of each kind, in the warm-up), "
        f'a sample every {SAMPLE_SECONDS:g} s. "After warm-up": the median over the first '
        f"quiet stretch after {WARMUP:g} s of healthy traffic and one round of every fault; "
        '"at the end": over the last quiet stretch. App process 1\'s memory before any fault '
        f"(the median of the last five samples of healthy traffic) was {before}. App process 2 "
        f"was killed and started again {result.kills} times (its memory at the end, since its "
        f"last start: {app2_rss}).",
        "",
        table,
        "",
        "![Resident memory of both app processes over the soak, faults shaded]"
        "(images/soak-memory.png)",
    ]
    return "\n".join(lines) + "\n"


def draw(result: SoakResult, path: Path) -> None:
    """Memory of both processes over time, faults shaded, the 10 % line of process 1."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure as MplFigure

    t0 = result.spans[0].start
    figure = MplFigure(figsize=(8, 3.6))
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    for span in result.spans:
        if span.kind == "fault":
            ax.axvspan(span.start - t0, span.end - t0, color="#e07b14", alpha=0.15, linewidth=0)
    colours = ("#1f6fb4", "#a0a0a0")
    for index, colour in enumerate(colours):
        # One line per process incarnation: a restarted process is a new line.
        segments: dict[int, list[tuple[float, float]]] = {}
        for s in result.samples:
            pid, rss = s.pids[index], s.rss[index]
            if pid is not None and rss is not None:
                segments.setdefault(pid, []).append((s.at - t0, rss / 1024 / 1024))
        for n, points in enumerate(segments.values()):
            xs, ys = zip(*points, strict=True)
            label = f"app process {index + 1}" + (" (killed, restarted)" if index else "")
            ax.plot(xs, ys, color=colour, linewidth=1.2, label=label if n == 0 else None)
    found = figures(result.samples)
    baseline = next(span for span in result.spans if span.kind == "quiet")
    ax.axvline(baseline.start - t0, color="#333333", linewidth=1, linestyle=":")
    ax.annotate(
        "warm-up ends",
        (baseline.start - t0, 0),
        xycoords=("data", "axes fraction"),
        xytext=(3, 4),
        textcoords="offset points",
        fontsize=7,
    )
    ax.axhline(found[0].limit, color="#333333", linewidth=1, linestyle="--")
    ax.annotate(
        "+10 % of process 1 after warm-up",
        (0, found[0].limit),
        xytext=(2, 3),
        textcoords="offset points",
        fontsize=7,
    )
    ax.set_xlabel("seconds (faults shaded)", fontsize=8)
    ax.set_ylabel("resident memory, MiB", fontsize=8)
    ax.set_title(
        f"Soak: {result.seconds:.0f} s at {result.rate:g} requests/s, periodic faults "
        "(the warm-up: healthy traffic, then one of each)",
        loc="left",
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    ax.tick_params(labelsize=8)
    ax.legend(fontsize=7, loc="best")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110, metadata={"Software": None})


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.chaos.soak", description=__doc__)
    parser.add_argument(
        "--seconds", type=float, default=float(os.environ.get("SOAK_SECONDS", "600"))
    )
    parser.add_argument("--rate", type=float, default=60.0, help="requests per second")
    parser.add_argument("--no-doc", action="store_true", help="print the figures only")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        result = run_soak(args.seconds, args.rate, Path(tmp), log=_log)
    found = figures(result.samples)
    report = render(result, found, "make soak")
    print(report)
    for f in found:
        verdict = "pass" if f.passed else "FAIL"
        print(
            f"{verdict}: {f.measure}: {_fmt(f.first, f.unit)} -> {_fmt(f.last, f.unit)} "
            f"(at most {_fmt(f.limit, f.unit)})"
        )
    never = sum(r.status is None for r in result.records)
    errors = sum(r.status == 500 for r in result.records)
    print(f"{'pass' if not never else 'FAIL'}: requests never answered: {never}")
    print(f"{'pass' if not errors else 'FAIL'}: 500 answers: {errors}")
    if not args.no_doc:
        draw(result, PLOT)
        replace_between(DOC, BEGIN, END, report)
        print(f"written into {DOC.relative_to(ROOT)} and {PLOT.relative_to(ROOT)}")
    return 0 if all(f.passed for f in found) and not never and not errors else 1


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
