"""A retry budget, as Finagle and Envoy have: retries are at most a ratio of recent calls.

Without a budget, a total outage of an upstream multiplies the load on it by the number of
attempts, just when it can least take it. With a budget, retries are allowed only while

    retries in the window < ratio * calls in the window + min_retries_per_second * window

so the extra load stays near ``ratio`` whatever the failure rate, and a quiet client still
gets a few retries (the floor).
"""

from __future__ import annotations

import logging
import math
import time
from datetime import timedelta

from fastapi_resilience.clock import SYSTEM_CLOCK, Clock, SystemClock
from fastapi_resilience.events import EventBus, EventSource
from fastapi_resilience.exceptions import ConfigurationError

__all__ = ["RetryBudget", "SlidingCounter", "seconds"]

BUDGET_EXHAUSTED = "retry.budget_exhausted"
BUDGET_RECOVERED = "retry.budget_recovered"


def seconds(value: float | timedelta | None, argument: str) -> float | None:
    """A duration argument as float seconds (``timedelta`` accepted); ``None`` passes through."""
    if value is None:
        return None
    if isinstance(value, timedelta):
        value = value.total_seconds()
    value = float(value)
    if value < 0 or math.isnan(value):
        raise ConfigurationError(f"{argument} must be >= 0 seconds, got {value!r}")
    return value


class SlidingCounter:
    """Counts events of several kinds over a sliding window made of ``buckets`` slices.

    Adding is O(1) (one clock read, one list write); summing walks the buckets, which happens
    only on the rare path (a retry, a throttling decision).
    """

    __slots__ = ("_buckets", "_counts", "_current", "_kinds", "_now", "_width")

    def __init__(self, window: float, *, kinds: int = 1, buckets: int = 10, clock: Clock) -> None:
        self._width = window / buckets
        self._buckets = buckets
        self._kinds = kinds
        # The system clock's method only forwards to time.monotonic: call that directly.
        self._now = time.monotonic if isinstance(clock, SystemClock) else clock.monotonic
        self._counts = [[0] * buckets for _ in range(kinds)]
        self._current = int(self._now() // self._width)

    def _rotate(self) -> int:
        now = int(self._now() // self._width)
        current = self._current
        if now != current:
            # Zero the slices that fell out of the window since the last event.
            for step in range(1, min(now - current, self._buckets) + 1):
                index = (current + step) % self._buckets
                for counts in self._counts:
                    counts[index] = 0
            self._current = now
        return now % self._buckets

    def add(self, kind: int = 0, amount: int = 1) -> None:
        now = int(self._now() // self._width)
        if now != self._current:
            self._rotate()
        self._counts[kind][now % self._buckets] += amount

    def total(self, kind: int = 0) -> int:
        self._rotate()
        return sum(self._counts[kind])


class RetryBudget(EventSource):
    """Allows retries to one target at most ``ratio`` of recent calls plus a small floor.

    Give one budget to each target (a host, a dependency): the transport does this per host.
    When the budget runs out, the event ``retry.budget_exhausted`` is published once, and
    ``retry.budget_recovered`` once when a retry is allowed after a whole window with no
    refusal: one pair per exhaustion episode, however many retries were refused.

    Args:
        ratio: retries allowed per call made, over the window (0.1 = 10% extra load).
        min_retries_per_second: a floor so that a client with little traffic can still retry.
        window: the sliding window in seconds over which calls and retries are counted.
        name: names the target in events.
        clock: injectable time.
        events: the event bus; ``None``: a shared bus that only logs.

    .. versionadded:: 0.1.0
    """

    __slots__ = (
        "_clock",
        "_counter",
        "_exhausted",
        "_floor",
        "_last_refusal",
        "min_retries_per_second",
        "name",
        "ratio",
        "window",
    )

    def __init__(
        self,
        *,
        ratio: float = 0.1,
        min_retries_per_second: float = 1.0,
        window: float | timedelta = 10.0,
        name: str = "default",
        clock: Clock = SYSTEM_CLOCK,
        events: EventBus | None = None,
    ) -> None:
        if not 0 <= ratio <= 1000 or math.isnan(ratio):
            raise ConfigurationError(f"ratio must be between 0 and 1000, got {ratio!r}")
        if min_retries_per_second < 0 or math.isnan(min_retries_per_second):
            raise ConfigurationError(
                f"min_retries_per_second must be >= 0, got {min_retries_per_second!r}"
            )
        window_s = seconds(window, "window")
        if not window_s:
            raise ConfigurationError("window must be > 0 seconds")
        self.ratio = ratio
        self.min_retries_per_second = min_retries_per_second
        self.window = window_s
        self.name = name
        self._floor = min_retries_per_second * window_s
        self._events = events
        self._exhausted = False
        self._last_refusal = -math.inf
        self._clock = clock
        # kind 0: calls (first attempts), kind 1: retries.
        self._counter = SlidingCounter(window_s, kinds=2, clock=clock)

    def record_call(self) -> None:
        """Count one call (its first attempt); each call earns ``ratio`` retries."""
        self._counter.add(0)

    def try_spend(self) -> bool:
        """Take one retry from the budget; ``False`` (and nothing taken) when it is spent."""
        counter = self._counter
        calls = counter.total(0)
        retries = counter.total(1)
        if retries + 1 <= self.ratio * calls + self._floor:
            counter.add(1)
            # An episode ends only after a whole window without a refusal, so a sustained
            # outage (refused, allowed, refused...) is reported once, not every few calls.
            if self._exhausted and self._clock.monotonic() - self._last_refusal >= self.window:
                self._exhausted = False
                self.events.emit(BUDGET_RECOVERED, self.name, level=logging.INFO)
            return True
        self._last_refusal = self._clock.monotonic()
        if not self._exhausted:
            self._exhausted = True
            self.events.emit(
                BUDGET_EXHAUSTED,
                self.name,
                calls=calls,
                retries=retries,
                ratio=self.ratio,
                window=self.window,
            )
        return False

    @property
    def exhausted(self) -> bool:
        """Whether an exhaustion episode is under way (a retry was refused in the window)."""
        return self._exhausted

    def snapshot(self) -> dict[str, float]:
        """Calls and retries in the current window, for health pages and tests."""
        return {"calls": self._counter.total(0), "retries": self._counter.total(1)}

    def __repr__(self) -> str:
        return (
            f"RetryBudget(name={self.name!r}, ratio={self.ratio}, "
            f"min_retries_per_second={self.min_retries_per_second}, window={self.window})"
        )
