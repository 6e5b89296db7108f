"""Cumulative counts and duration histograms, kept by the components and read at scrape time.

Counting here costs a dictionary update and no lock: the request path and the guarded calls
run on the event loop. The metrics collector (``operations``) turns these into Prometheus
families only when ``/metrics`` is read, so an app that never scrapes pays for the additions
alone. They are per process, like Prometheus' default registry.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator

__all__ = [
    "DEAD_LETTERS",
    "DURATION_BUCKETS",
    "OUTBOUND_DURATIONS",
    "OUTBOUND_OBSERVERS",
    "PROBLEMS",
    "RATE_LIMIT_DECISIONS",
    "REQUEST_DURATIONS",
    "RESPONSE_CACHE",
    "RETRIES",
    "Histograms",
    "Tally",
    "quantile",
]

#: Upper bounds (seconds) of the duration histograms: Prometheus' defaults, which place p50 to
#: p99 of a web request between a few milliseconds and a few seconds.
DURATION_BUCKETS: tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
)

#: How many distinct label sets one tally or histogram keeps; beyond it, new ones share
#: ``OVERFLOW``. Labels come from code (route templates, breaker names), but a bug or a
#: generated name must not grow a process without bound.
MAX_LABEL_SETS = 2_000
OVERFLOW = "(other)"


class Tally:
    """Counts by label values, only ever growing (a Prometheus counter's semantics)."""

    __slots__ = ("counts",)

    def __init__(self) -> None:
        self.counts: dict[tuple[str, ...], int] = {}

    def add(self, labels: tuple[str, ...], amount: int = 1) -> None:
        counts = self.counts
        if labels in counts:
            counts[labels] += amount
        elif len(counts) < MAX_LABEL_SETS:
            counts[labels] = amount
        else:
            key = (OVERFLOW,) * len(labels)
            counts[key] = counts.get(key, 0) + amount

    def items(self) -> list[tuple[tuple[str, ...], int]]:
        return list(self.counts.items())


class _Series:
    __slots__ = ("buckets", "count", "sum")

    def __init__(self, size: int) -> None:
        # One slot per bound and the last for +Inf; not cumulative (scrapes add them up).
        self.buckets = [0] * (size + 1)
        self.count = 0
        self.sum = 0.0


class Histograms:
    """Duration histograms by label values, with fixed bucket bounds."""

    __slots__ = ("bounds", "series", "sinks")

    def __init__(self, bounds: tuple[float, ...] = DURATION_BUCKETS) -> None:
        self.bounds = bounds
        self.series: dict[tuple[str, ...], _Series] = {}
        #: Also told each observation (the OpenTelemetry histograms, when a meter is set).
        self.sinks: list[Callable[[tuple[str, ...], float], None]] = []

    def observe(self, labels: tuple[str, ...], seconds: float) -> None:
        series = self.series.get(labels)
        if series is None:
            series = self._new(labels)
        series.buckets[bisect_left(self.bounds, seconds)] += 1
        series.count += 1
        series.sum += seconds
        if self.sinks:
            for sink in tuple(self.sinks):  # a sink may remove itself
                sink(labels, seconds)

    def _new(self, labels: tuple[str, ...]) -> _Series:
        if len(self.series) >= MAX_LABEL_SETS:
            labels = (OVERFLOW,) * len(labels)
            found = self.series.get(labels)
            if found is not None:
                return found
        series = self.series[labels] = _Series(len(self.bounds))
        return series

    def collect(self) -> Iterator[tuple[tuple[str, ...], list[int], int, float]]:
        """Each label set with its cumulative bucket counts (the last is +Inf), count, sum."""
        for labels, series in list(self.series.items()):
            running = 0
            cumulative = []
            for value in series.buckets:
                running += value
                cumulative.append(running)
            yield labels, cumulative, series.count, series.sum

    def merged(self) -> tuple[list[int], int]:
        """Bucket counts (not cumulative) and count over every label set."""
        total = [0] * (len(self.bounds) + 1)
        count = 0
        for series in list(self.series.values()):
            for i, value in enumerate(series.buckets):
                total[i] += value
            count += series.count
        return total, count


def quantile(bounds: tuple[float, ...], buckets: list[int], q: float) -> float | None:
    """The ``q`` quantile estimated from bucket counts (not cumulative), interpolating
    linearly inside the bucket as Prometheus' ``histogram_quantile`` does; ``None`` when
    there is no observation. Past the last bound it answers that bound."""
    count = sum(buckets)
    if count == 0:
        return None
    rank = q * count
    seen = 0
    for i, value in enumerate(buckets):
        if value and seen + value >= rank:
            if i >= len(bounds):
                return bounds[-1]
            lower = bounds[i - 1] if i else 0.0
            return lower + (bounds[i] - lower) * (rank - seen) / value
        seen += value
    return bounds[-1]


#: Problem answers, by ``(code, status)``.
PROBLEMS = Tally()
#: Rate-limit decisions, by ``(tier, decision)``: ``admitted``, ``refused``, ``shadow_refused``.
RATE_LIMIT_DECISIONS = Tally()
#: Retries, by ``(outcome,)``: ``retried``, ``exhausted``, ``budget_exhausted``.
RETRIES = Tally()
#: Response-cache lookups, by ``(cache, result)``: ``hit``, ``miss``, ``stale``.
RESPONSE_CACHE = Tally()
#: Dead letters recorded, by ``(queue,)``.
DEAD_LETTERS = Tally()
#: Request durations, by ``(route template, method)``.
REQUEST_DURATIONS = Histograms()
#: Outbound call durations, by ``(upstream, outcome)``.
OUTBOUND_DURATIONS = Histograms()

#: Called with ``(upstream, outcome, code, status)`` for every outbound call of the resilient
#: client that did not succeed (the error analytics of ``install()``).
OUTBOUND_OBSERVERS: list[Callable[[str, str, str, int], None]] = []
