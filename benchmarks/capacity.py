"""Capacity: server CPU time per request, every variant loaded at once on one shared core.

On a shared VM the speed of a core drifts by 20-30 % from one 5-second run to the next, so
ratios of runs taken one after another spread too widely to tell 0.95 from 0.90 (ADR 0031).
Here every variant's server is pinned to the same core and loaded *at the same time*, each by
its own wrk pinned to the other core; the scheduler interleaves the servers every few
milliseconds, so a slow spell of the machine lands on all of them alike. Each server's CPU
time is read from ``/proc/<pid>/task/*/schedstat`` (nanoseconds on the CPU) around the run;
``requests / CPU seconds`` is its capacity, and its ratio to ``bare`` in the same round is what
a single CPU-bound worker's throughput ratio would be.

What it leaves out: time a server spends waiting (on Redis, on a blocked event loop) costs no
CPU, so for variants that wait the sequential throughput of ``http_bench`` is the figure.
"""

from __future__ import annotations

import os
import statistics
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from benchmarks._wrk import WrkSettings, parse_wrk
from benchmarks.http_bench import BASELINE, HttpSummary, started_servers

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
    """Pin every thread of ``pid`` to ``cpu``."""
    for task in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(task), {cpu})


def cpu_seconds(pid: int) -> float:
    """Time on the CPU of every thread of ``pid`` (schedstat: nanoseconds, not clock ticks)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        text = Path(f"/proc/{pid}/task/{task}/schedstat").read_text(encoding="ascii")
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
    log: Callable[[str], None] = print,
) -> list[CapacitySample]:
    """Load every variant at once, ``rounds`` times, and return the per-round samples."""
    if not can_pin():
        raise RuntimeError("capacity needs two CPUs and sched_setaffinity")
    samples: list[CapacitySample] = []
    with started_servers(names, log=log) as running:
        servers = running.servers
        pids = {name: server.pid for name, server in servers.items()}
        for pid in pids.values():
            pin_process(pid, SERVER_CPU)
        if running.redis_pid is not None:
            pin_process(running.redis_pid, LOAD_CPU)
        for round_ in range(-1, rounds):  # round -1 is the warm-up, at the same load
            duration = warmup_s if round_ < 0 else settings.duration_s
            before = {name: cpu_seconds(pid) for name, pid in pids.items()}
            loads = {
                name: subprocess.Popen(
                    settings.argv(server.url, duration_s=duration),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    preexec_fn=_pinned_to_load_cpu,
                )
                for name, server in servers.items()
            }
            outputs = {
                name: proc.communicate(timeout=duration + 60) for name, proc in loads.items()
            }
            after = {name: cpu_seconds(pid) for name, pid in pids.items()}
            if round_ < 0:
                log(f"capacity warm-up done ({duration}s, {len(servers)} servers at once)")
                continue
            for name, (out, err) in outputs.items():
                if loads[name].returncode != 0:
                    raise RuntimeError(f"wrk failed for {name}: {err}")
                result = parse_wrk(out)
                samples.append(
                    CapacitySample(
                        variant=name,
                        round=round_,
                        requests=result.requests,
                        cpu_s=after[name] - before[name],
                        non_2xx=result.non_2xx,
                        socket_errors=result.socket_errors,
                    )
                )
            bare = next(s for s in samples[-len(servers) :] if s.variant == BASELINE)
            log(
                f"capacity round {round_ + 1}/{rounds}: "
                + ", ".join(
                    f"{s.variant} {s.per_cpu_second / bare.per_cpu_second:.3f}"
                    for s in samples[-len(servers) :]
                    if s.variant != BASELINE
                )
            )
    return samples


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
