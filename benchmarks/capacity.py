"""Capacity: server CPU time per request, each variant loaded beside ``bare`` on one shared core.

On a shared VM the speed of a core drifts by 20-30 % from one 5-second run to the next, so
ratios of runs taken one after another spread too widely to tell 0.95 from 0.90 (ADR 0031).
Here a variant's server and ``bare``'s are pinned to the same core and loaded *at the same
time*, each by its own wrk pinned to the other core; the scheduler interleaves the two every few
milliseconds, so a slow spell of the machine lands on both alike. Pairs, not all variants at
once: with eleven servers on one core the ratios spread two to ten times wider (ADR 0031); and
while a pair runs the other variants' servers are stopped (ADR 0051).
Each server's CPU time is read from ``/proc/<pid>/task/*/schedstat`` (nanoseconds on the CPU)
around the run; ``requests / CPU seconds`` is its capacity, and its ratio to the ``bare`` beside
it is what a single CPU-bound worker's throughput ratio would be.

What it leaves out: time a server spends waiting (on Redis, on a blocked event loop) costs no
CPU, so for variants that wait the sequential throughput of ``http_bench`` is the figure.
"""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from benchmarks._procs import UvicornServer
from benchmarks._wrk import WrkSettings, finish_wrk, start_wrk
from benchmarks.apps import VARIANT_ENV
from benchmarks.http_bench import (
    APP_FACTORY,
    BASELINE,
    HttpSummary,
    round_order,
    started_servers,
)

SERVER_CPU = 0
LOAD_CPU = 1


@dataclass(frozen=True, slots=True)
class CapacitySample:
    """One variant in one round: requests served and server CPU seconds spent on them."""

    variant: str
    round: int
    requests: int
    cpu_s: float
    non_2xx: int
    socket_errors: int

    @property
    def per_cpu_second(self) -> float:
        return self.requests / self.cpu_s if self.cpu_s > 0 else 0.0


@dataclass(frozen=True, slots=True)
class CapacitySummary:
    """A variant over all rounds: median CPU per request and the spread of its ratio to bare."""

    variant: str
    rounds: int
    cpu_us_per_request: float
    ratio: float
    ratio_min: float
    ratio_max: float


def can_pin() -> bool:
    """Two CPUs to keep servers and load generators apart, and a kernel that pins."""
    return hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) >= 2


def pin_process(pid: int, cpu: int) -> None:
    """Pin every thread of ``pid`` to ``cpu`` (a thread that ends meanwhile is skipped)."""
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(task), {cpu})


def cpu_seconds(pid: int) -> float:
    """Time on the CPU of every thread of ``pid`` (schedstat: nanoseconds, not clock ticks).

    A helper thread (an executor's) may end between listing the threads and reading its
    figure: it is skipped, and with it the little time it ran.
    """
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            text = Path(f"/proc/{pid}/task/{task}/schedstat").read_text(encoding="ascii")
        except (FileNotFoundError, ProcessLookupError):
            continue
        total += int(text.split()[0])
    return total / 1e9


def _pinned_to_load_cpu() -> None:  # runs in the child before exec
    os.sched_setaffinity(0, {LOAD_CPU})


def run_capacity(
    names: Sequence[str],
    *,
    settings: WrkSettings,
    rounds: int,
    warmup_s: int,
    idle: int = 0,
    log: Callable[[str], None] = print,
) -> list[CapacitySample]:
    """Each variant loaded at the same time as ``bare``, in pairs, ``rounds`` times.

    Every pair has its own round number, so each variant's ratio is taken against the ``bare``
    that ran beside it; the other variants' servers are stopped meanwhile. ``idle``: that many
    more ``bare`` servers are started on the servers' CPU, never loaded nor stopped (an
    experiment: do idle servers move the ratios? ADR 0051).
    """
    if not can_pin():
        raise RuntimeError("capacity needs two CPUs and sched_setaffinity")
    samples: list[CapacitySample] = []
    with started_servers(names, log=log) as running, contextlib.ExitStack() as idlers:
        servers = running.servers
        for server in servers.values():
            pin_process(server.pid, SERVER_CPU)
        for _ in range(idle):
            extra = UvicornServer(APP_FACTORY, env={VARIANT_ENV: BASELINE})
            idlers.callback(extra.stop)
            extra.start()
            pin_process(extra.pid, SERVER_CPU)
        if running.redis_pid is not None:
            pin_process(running.redis_pid, LOAD_CPU)
        others = [name for name in servers if name != BASELINE]
        # The variants not in a pair are stopped (SIGSTOP) while it runs, so that nothing idle
        # shares the core with the pair (ADR 0051).
        idlers.callback(_resume, [server.pid for server in servers.values()])
        pair_id = 0
        for round_ in range(-1, rounds):  # round -1 warms every pair up
            duration = warmup_s if round_ < 0 else settings.duration_s
            for name in round_order(others, max(round_, 0)) if others else []:
                pair = {BASELINE: servers[BASELINE], name: servers[name]}
                _only_running(servers, pair)
                measured = _load_at_once(pair, settings, duration, pair_id)
                pair_id += 1
                if round_ < 0:
                    continue
                samples.extend(measured)
                bare, other = measured
                errors = sum(s.non_2xx + s.socket_errors for s in measured)
                log(
                    f"capacity round {round_ + 1}/{rounds} {name:<28} "
                    f"{other.per_cpu_second / bare.per_cpu_second:.3f} x bare"
                    + (f"  ERRORS {errors} (non-2xx or socket)" if errors else "")
                )
    return samples


def _only_running(servers: dict[str, UvicornServer], pair: dict[str, UvicornServer]) -> None:
    """Continue the pair's servers and stop every other one."""
    running = {server.pid for server in pair.values()}
    for server in servers.values():
        os.kill(server.pid, signal.SIGCONT if server.pid in running else signal.SIGSTOP)


def _resume(pids: Sequence[int]) -> None:
    """Continue every server, so that it can be shut down as usual."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def _load_at_once(
    servers: dict[str, UvicornServer], settings: WrkSettings, duration: int, pair_id: int
) -> list[CapacitySample]:
    """Load ``servers`` at the same time, one wrk each on the load CPU; one sample each."""
    before = {name: cpu_seconds(server.pid) for name, server in servers.items()}
    loads = {
        name: start_wrk(settings, server.url, duration_s=duration, preexec_fn=_pinned_to_load_cpu)
        for name, server in servers.items()
    }
    results = {name: finish_wrk(proc, timeout_s=duration + 60) for name, proc in loads.items()}
    after = {name: cpu_seconds(server.pid) for name, server in servers.items()}
    return [
        CapacitySample(
            variant=name,
            round=pair_id,
            requests=result.requests,
            cpu_s=after[name] - before[name],
            non_2xx=result.non_2xx,
            socket_errors=result.socket_errors,
        )
        for name, result in results.items()
    ]


def summarize_capacity(samples: Sequence[CapacitySample]) -> dict[str, CapacitySummary]:
    """Per variant: median CPU microseconds per request, and its ratio to bare per round."""
    bare = {s.round: s.per_cpu_second for s in samples if s.variant == BASELINE}
    if not bare:
        raise ValueError(f"no {BASELINE!r} samples: ratios need the baseline in the same run")
    out: dict[str, CapacitySummary] = {}
    for name in dict.fromkeys(s.variant for s in samples):
        runs = [s for s in samples if s.variant == name and s.requests > 0]
        ratios = [s.per_cpu_second / bare[s.round] for s in runs if s.round in bare]
        out[name] = CapacitySummary(
            variant=name,
            rounds=len(runs),
            cpu_us_per_request=statistics.median(s.cpu_s / s.requests * 1e6 for s in runs),
            ratio=statistics.median(ratios),
            ratio_min=min(ratios),
            ratio_max=max(ratios),
        )
    return out


def with_capacity(
    summaries: Sequence[HttpSummary], capacity: dict[str, CapacitySummary]
) -> list[HttpSummary]:
    """The throughput summaries with each variant's capacity figures filled in."""
    out = []
    for summary in summaries:
        cap = capacity.get(summary.variant)
        if cap is None:
            out.append(summary)
            continue
        out.append(
            replace(
                summary,
                cpu_us_per_request=cap.cpu_us_per_request,
                capacity_ratio=cap.ratio,
                capacity_min=cap.ratio_min,
                capacity_max=cap.ratio_max,
            )
        )
    return out
