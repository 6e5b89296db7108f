"""Accuracy of rate-limit algorithms on 100/minute, simulated (the figures in adr/0010).

Run: .venv/bin/python -m benchmarks.rate_limit_algorithms

Each algorithm sees the same request times and answers admit/refuse; we report the most
requests admitted in any 60 s window (the promise is 100) and how many were admitted.
"bucketed log" is this library's algorithm, driven through the real ``MemoryStorage``.
"""

from __future__ import annotations

import bisect
import math
import random
from collections import deque
from collections.abc import Callable, Iterator

from fastapi_resilience.ratelimit import Limit, LimitCheck, MemoryStorage
from fastapi_resilience.testing import ManualClock

N, P = 100, 60.0
Admit = Callable[[float], bool]


def fixed_window() -> Admit:
    counts: dict[int, int] = {}

    def admit(t: float) -> bool:
        window = int(t // P)
        if counts.get(window, 0) < N:
            counts[window] = counts.get(window, 0) + 1
            return True
        return False

    return admit


def sliding_window_counter() -> Admit:
    """The weighted two-window estimate (``limits``' "sliding window counter")."""
    counts: dict[int, int] = {}

    def admit(t: float) -> bool:
        window = int(t // P)
        weight = 1 - (t % P) / P
        estimate = counts.get(window - 1, 0) * weight + counts.get(window, 0)
        if estimate + 1 <= N:
            counts[window] = counts.get(window, 0) + 1
            return True
        return False

    return admit


def gcra() -> Admit:
    """GCRA / token bucket with a burst of N and one token every P/N seconds."""
    interval = P / N
    tat = [0.0]

    def admit(t: float) -> bool:
        new_tat = max(tat[0], t) + interval
        if new_tat - t <= P + 1e-9:
            tat[0] = new_tat
            return True
        return False

    return admit


def sliding_log() -> Admit:
    log: deque[float] = deque()

    def admit(t: float) -> bool:
        while log and log[0] <= t - P:
            log.popleft()
        if len(log) < N:
            log.append(t)
            return True
        return False

    return admit


def bucketed_log() -> Admit:
    clock = ManualClock(start=0.0)
    storage = MemoryStorage(clock=clock)
    check = (LimitCheck("k", Limit(N, int(P))),)

    def admit(t: float) -> bool:
        clock.advance(t - clock.monotonic())
        return storage.check_now(check).allowed

    return admit


ALGORITHMS: dict[str, Callable[[], Admit]] = {
    "fixed window": fixed_window,
    "sliding-window counter": sliding_window_counter,
    "GCRA / token bucket": gcra,
    "sliding log": sliding_log,
    "bucketed log (ours)": bucketed_log,
}


def max_in_any_window(times: list[float]) -> int:
    best = 0
    for index, start in enumerate(times):
        best = max(best, bisect.bisect_left(times, start + P) - index)
    return best


def run(times: list[float]) -> dict[str, tuple[int, int]]:
    results = {}
    for name, make in ALGORITHMS.items():
        admit = make()
        admitted = [t for t in times if admit(t)]
        results[name] = (len(admitted), max_in_any_window(admitted))
    return results


def scenarios() -> dict[str, list[float]]:
    rng = random.Random(7)
    start = 1_000 * P
    return {
        # 150 requests just before a minute boundary and 150 just after.
        "edge burst": sorted(
            [start - 0.5 + rng.random() * 0.4 for _ in range(150)]
            + [start + 0.1 + rng.random() * 0.4 for _ in range(150)]
        ),
        # The acceptance test: 400 requests from one identity over 3 s.
        "400 in 3 s": sorted(start + 20 + rng.random() * 3 for _ in range(400)),
        # A greedy client: one request every 100 ms for 10 minutes.
        "greedy 10/s for 10 min": [start + 0.1 * i for i in range(6000)],
        # A polite client pacing itself at exactly the limit (one every 0.6 s) for 10 minutes.
        "paced at the limit": [start + 0.6 * i for i in range(1000)],
        # Random bursts: Poisson, mean 3/s, for 10 minutes.
        "poisson 3/s": list(
            accumulate_poisson(rng, rate=3.0, start=start, duration=600.0),
        ),
    }


def accumulate_poisson(
    rng: random.Random, *, rate: float, start: float, duration: float
) -> Iterator[float]:
    t = start
    while t < start + duration:
        t += rng.expovariate(rate)
        yield t


def main() -> None:
    print(f"limit {N}/{int(P)}s; cells: admitted / most admitted in any {int(P)} s window\n")
    names = list(ALGORITHMS)
    print(f"| scenario | {' | '.join(names)} |")
    print(f"|---|{'---|' * len(names)}")
    for scenario, times in scenarios().items():
        results = run(times)
        cells = [f"{results[n][0]} / {results[n][1]}" for n in names]
        print(f"| {scenario} ({len(times)} requests) | {' | '.join(cells)} |")
    print(f"\nbucket width: {P / 60:g} s (a unit is held at most {math.ceil(P / 60)} s longer)")


if __name__ == "__main__":
    main()
