"""The phases of a chaos run: a baseline, then each fault followed by a recovery phase.

The orchestrator (this process) injects the faults; the load comes from a second process
(``benchmarks.chaos.load``), told each phase's name as it begins, so that every request carries
the phase it was sent in. Phase boundaries are ``time.monotonic()`` readings, the clock the load
generator stamps requests with (one clock for every process of the machine).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from benchmarks.chaos.cluster import ROOT, Cluster
from benchmarks.chaos.load import Record, read_records

__all__ = [
    "FAULTS",
    "Fault",
    "LoadProcess",
    "Plan",
    "RunResult",
    "Span",
    "Timeline",
    "app_killed",
    "run_plan",
    "upstream_flapping",
]

#: Upstream latency in the "slow" state: past the example's 2 s client timeout, so calls time out.
SLOW_MS = 2500


@dataclass(frozen=True, slots=True)
class Fault:
    """A fault: what ``begin`` breaks, ``end`` repairs; ``end`` returns once it is repaired."""

    name: str
    description: str
    begin: Callable[[Cluster], None]
    end: Callable[[Cluster], None]


class _Flapper:
    """Switches the upstream between healthy, slow and failing every ``period`` seconds."""

    STATES = (
        {"failure_rate": 0.0, "latency_ms": 0},
        {"failure_rate": 0.0, "latency_ms": SLOW_MS},
        {"failure_rate": 1.0, "latency_ms": 0},
    )

    def __init__(self, period: float) -> None:
        self.period = period
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def begin(self, cluster: Cluster) -> None:
        self._stop.clear()

        def flap() -> None:
            n = 0
            while not self._stop.is_set():
                cluster.control(**self.STATES[n % len(self.STATES)])
                n += 1
                self._stop.wait(self.period)

        self._thread = threading.Thread(target=flap, name="flapper", daemon=True)
        self._thread.start()

    def end(self, cluster: Cluster) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        cluster.upstream_healthy()


def upstream_flapping(period: float = 2.0) -> Fault:
    """The upstream healthy, slow and failing in turn, ``period`` seconds each: a fault phase
    shorter than three periods never reaches the failing state."""
    flapper = _Flapper(period)
    return Fault(
        "upstream-flapping",
        f"upstream healthy, slow, failing, in turn, {period:g} s each",
        flapper.begin,
        flapper.end,
    )


#: Before the kill, the upstream is slow for a while, so the process dies with requests in it.
IN_FLIGHT_MS = 1500
IN_FLIGHT_WAIT = 2.0


def app_killed(index: int) -> Fault:
    """App process ``index + 1`` killed with calls in flight, then started again."""

    def begin(cluster: Cluster) -> None:
        cluster.control(latency_ms=IN_FLIGHT_MS)
        time.sleep(IN_FLIGHT_WAIT)
        cluster.kill_app(index)
        cluster.upstream_healthy()

    return Fault(
        "app-killed",
        f"upstream slowed to {IN_FLIGHT_MS} ms for {IN_FLIGHT_WAIT:g} s, so that calls to it are "
        f"in flight, then app process {index + 1} of 2 killed (SIGKILL) and the upstream fast "
        f"again; at the end process {index + 1} is started again on its port",
        begin,
        lambda c: c.restart_app(index),
    )


FAULTS: tuple[Fault, ...] = (
    Fault(
        "redis-killed",
        "Redis killed (SIGKILL), then started again empty on its port",
        lambda c: c.redis.kill(),
        lambda c: c.redis.start(),
    ),
    Fault(
        "redis-stalled",
        "Redis stopped (SIGSTOP: its port open, nothing answers), then continued (SIGCONT)",
        lambda c: c.redis.stall(),
        lambda c: c.redis.resume(),
    ),
    Fault(
        "upstream-slow",
        f"upstream answers after {SLOW_MS} ms (the example's client times out at 2 s)",
        lambda c: c.control(latency_ms=SLOW_MS),
        lambda c: c.upstream_healthy(),
    ),
    Fault(
        "upstream-failing",
        "upstream answers 503 to every request",
        lambda c: c.control(failure_rate=1.0),
        lambda c: c.upstream_healthy(),
    ),
    upstream_flapping(),
    app_killed(0),
)


@dataclass(frozen=True, slots=True)
class Plan:
    """How long each phase lasts and how hard the load is."""

    rate: float
    baseline: float
    fault: float
    recovery: float
    faults: Sequence[Fault] = FAULTS
    client_timeout: float = 10.0
    breaker_recovery: float = 10.0


@dataclass(slots=True)
class Span:
    """One phase as it happened: ``kind`` is baseline, fault or recovery."""

    name: str
    kind: str
    description: str
    start: float
    end: float = 0.0
    fault: str | None = None


@dataclass(slots=True)
class RunResult:
    plan: Plan
    spans: list[Span]
    records: list[Record]
    app_log: str
    extra: dict[str, object] = field(default_factory=dict)


class LoadProcess:
    """The load generator as a child process, steered through its stdin."""

    def __init__(self, url: str, rate: float, timeout: float, out: Path) -> None:
        self.out = out
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "benchmarks.chaos.load",
                "--url",
                url,
                "--rate",
                str(rate),
                "--timeout",
                str(timeout),
                "--out",
                str(out),
            ],
            stdin=subprocess.PIPE,
            cwd=str(ROOT),
            env=env,
            text=True,
        )
        self.timeout = timeout

    @property
    def _stdin(self) -> IO[str]:
        assert self.proc.stdin is not None
        return self.proc.stdin

    def phase(self, name: str) -> None:
        self._stdin.write(f"phase {name}\n")
        self._stdin.flush()

    def finish(self) -> list[Record]:
        """Stop sending, wait for the answers in flight, read every record."""
        self._stdin.write("stop\n")
        self._stdin.close()
        try:
            code = self.proc.wait(timeout=self.timeout + 60)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError("the load generator did not finish after its last answer") from None
        if code != 0:
            raise RuntimeError(f"the load generator exited with {code}")
        return read_records(self.out)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class Timeline:
    """The spans of a run, each begun and ended as the load generator is told."""

    def __init__(self, load: LoadProcess) -> None:
        self.load = load
        self.spans: list[Span] = []

    def begin(self, name: str, kind: str, description: str, fault: str | None = None) -> Span:
        now = time.monotonic()
        if self.spans and not self.spans[-1].end:
            self.spans[-1].end = now
        self.load.phase(name)
        span = Span(name, kind, description, now, fault=fault)
        self.spans.append(span)
        return span

    def close(self) -> None:
        if self.spans and not self.spans[-1].end:
            self.spans[-1].end = time.monotonic()


def join_balancer_log(records: list[Record], cluster: Cluster) -> list[Record]:
    """Each record with what nginx logged for it."""
    logged = cluster.balancer_log()
    for record in records:
        if record.seq in logged:
            record.resent, record.balancer_statuses, record.servers = logged[record.seq]
    return records


def _sleep_until(deadline: float) -> None:
    time.sleep(max(0.0, deadline - time.monotonic()))


def run_plan(
    cluster: Cluster,
    plan: Plan,
    out: Path,
    *,
    log: Callable[[str], None] = print,
) -> RunResult:
    """Run every phase of ``plan`` against a started cluster."""
    load = LoadProcess(cluster.url, plan.rate, plan.client_timeout, out)
    timeline = Timeline(load)
    try:
        timeline.begin("baseline", "baseline", "every process healthy")
        _sleep_until(time.monotonic() + plan.baseline)
        for fault in plan.faults:
            log(f"chaos: {fault.name}")
            span = timeline.begin(fault.name, "fault", fault.description, fault.name)
            fault.begin(cluster)
            _sleep_until(span.start + plan.fault)
            fault.end(cluster)
            # The fault is over when it is repaired (a restarted process listens again).
            timeline.begin(
                f"{fault.name}: after", "recovery", "everything repaired", fault=fault.name
            )
            _sleep_until(time.monotonic() + plan.recovery)
        timeline.close()
        records = join_balancer_log(load.finish(), cluster)
    finally:
        load.kill()
    return RunResult(plan, timeline.spans, records, cluster.app_log_text())
