"""Sliding windows for circuit breakers: the last N calls, or the calls of the last N seconds.

Both keep running totals, so recording a call and reading the rates is O(1) (the time-based
window clears at most one bucket per elapsed second).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from fastapi_resilience.exceptions import ConfigurationError

__all__ = ["SlidingWindow", "WindowCounts"]

WindowKind = Literal["count", "time"]


@dataclass(frozen=True, slots=True)
class WindowCounts:
    """What a window holds now: calls, failures and slow calls."""

    calls: int
    failures: int
    slow: int

    @property
    def failure_rate(self) -> float:
        return self.failures / self.calls if self.calls else 0.0

    @property
    def slow_call_rate(self) -> float:
        return self.slow / self.calls if self.calls else 0.0


@dataclass(frozen=True, slots=True)
class SlidingWindow:
    """How a breaker judges the recent past (Resilience4j's sliding window).

    The breaker opens when the window holds at least ``minimum_calls`` calls and the share of
    failures reaches ``failure_rate_threshold``, or the share of calls slower than
    ``slow_call_duration`` reaches ``slow_call_rate_threshold``. Rates are fractions in
    ``(0, 1]``: ``0.5`` is 50 %.

    Args:
        kind: ``"count"`` keeps the last ``size`` calls; ``"time"`` keeps the calls of the
            last ``size`` seconds (whole seconds, one bucket per second).
        size: calls (count) or seconds (time).
        failure_rate_threshold: share of failures that opens the breaker.
        minimum_calls: no verdict before the window holds this many calls.
        slow_call_duration: a call that takes at least this many seconds is slow;
            ``None`` (the default) does not measure durations at all.
        slow_call_rate_threshold: share of slow calls that opens the breaker.

    Use :meth:`count_based` or :meth:`time_based` to build one.

    .. versionadded:: 0.1
    """

    kind: WindowKind = "count"
    size: int = 100
    failure_rate_threshold: float = 0.5
    minimum_calls: int = 10
    slow_call_duration: float | None = None
    slow_call_rate_threshold: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in ("count", "time"):
            raise ConfigurationError(f"window kind must be 'count' or 'time', got {self.kind!r}")
        if not isinstance(self.size, int) or self.size < 1:
            raise ConfigurationError(f"window size must be an int >= 1, got {self.size!r}")
        for name in ("failure_rate_threshold", "slow_call_rate_threshold"):
            value = getattr(self, name)
            if not (0 < value <= 1):
                raise ConfigurationError(f"window {name} must be in (0, 1], got {value!r}")
        if self.minimum_calls < 1:
            raise ConfigurationError(
                f"window minimum_calls must be >= 1, got {self.minimum_calls!r}"
            )
        if self.slow_call_duration is not None and (
            math.isnan(self.slow_call_duration) or self.slow_call_duration <= 0
        ):
            raise ConfigurationError(
                f"window slow_call_duration must be > 0 seconds or None, "
                f"got {self.slow_call_duration!r}"
            )

    @classmethod
    def count_based(
        cls,
        size: int = 100,
        *,
        failure_rate_threshold: float = 0.5,
        minimum_calls: int | None = None,
        slow_call_duration: float | None = None,
        slow_call_rate_threshold: float = 1.0,
    ) -> SlidingWindow:
        """The last ``size`` calls; ``minimum_calls`` defaults to ``min(size, 10)``."""
        return cls(
            "count",
            size,
            failure_rate_threshold,
            min(size, 10) if minimum_calls is None else minimum_calls,
            slow_call_duration,
            slow_call_rate_threshold,
        )

    @classmethod
    def time_based(
        cls,
        seconds: int = 60,
        *,
        failure_rate_threshold: float = 0.5,
        minimum_calls: int = 10,
        slow_call_duration: float | None = None,
        slow_call_rate_threshold: float = 1.0,
    ) -> SlidingWindow:
        """The calls of the last ``seconds`` seconds."""
        return cls(
            "time",
            seconds,
            failure_rate_threshold,
            minimum_calls,
            slow_call_duration,
            slow_call_rate_threshold,
        )

    def new_state(self) -> CountWindowState | TimeWindowState:
        """Fresh, empty counters for one breaker."""
        return CountWindowState(self) if self.kind == "count" else TimeWindowState(self)


class CountWindowState:
    """A ring of the last ``size`` outcomes (bit 1 = failure, bit 2 = slow)."""

    __slots__ = ("_next", "_ring", "calls", "failures", "policy", "slow")

    def __init__(self, policy: SlidingWindow) -> None:
        self.policy = policy
        self._ring = bytearray(policy.size)
        self._next = 0
        self.calls = 0
        self.failures = 0
        self.slow = 0

    def record(self, failure: bool, slow: bool, now: float) -> bool:
        """Add one outcome; returns ``True`` when the window says "open"."""
        size = self.policy.size
        if self.calls == size:
            old = self._ring[self._next]
            self.failures -= old & 1
            self.slow -= old >> 1
        else:
            self.calls += 1
        self._ring[self._next] = failure | (slow << 1)
        self.failures += failure
        self.slow += slow
        self._next = (self._next + 1) % size
        return self.verdict()

    def verdict(self) -> bool:
        policy = self.policy
        if self.calls < policy.minimum_calls:
            return False
        return (
            self.failures >= policy.failure_rate_threshold * self.calls
            or self.slow >= policy.slow_call_rate_threshold * self.calls
        )

    def counts(self, now: float) -> WindowCounts:
        return WindowCounts(self.calls, self.failures, self.slow)

    def reset(self) -> None:
        self._ring = bytearray(self.policy.size)
        self._next = self.calls = self.failures = self.slow = 0


class TimeWindowState:
    """One bucket per second for the last ``size`` seconds, with running totals."""

    __slots__ = ("_buckets", "_epoch", "calls", "failures", "policy", "slow")

    def __init__(self, policy: SlidingWindow) -> None:
        self.policy = policy
        # Per bucket: [second it holds, calls, failures, slow].
        self._buckets = [[-1, 0, 0, 0] for _ in range(policy.size)]
        self._epoch = -1
        self.calls = 0
        self.failures = 0
        self.slow = 0

    def _advance(self, now: float) -> None:
        second = math.floor(now)
        if second <= self._epoch:
            return
        size = self.policy.size
        # Clear every bucket that fell out of the window, at most ``size`` of them.
        start = max(self._epoch + 1, second - size + 1)
        for s in range(start, second + 1):
            bucket = self._buckets[s % size]
            if bucket[0] != s:
                self.calls -= bucket[1]
                self.failures -= bucket[2]
                self.slow -= bucket[3]
                bucket[0], bucket[1], bucket[2], bucket[3] = s, 0, 0, 0
        self._epoch = second

    def record(self, failure: bool, slow: bool, now: float) -> bool:
        self._advance(now)
        bucket = self._buckets[self._epoch % self.policy.size]
        bucket[1] += 1
        bucket[2] += failure
        bucket[3] += slow
        self.calls += 1
        self.failures += failure
        self.slow += slow
        return self.verdict()

    def verdict(self) -> bool:
        policy = self.policy
        if self.calls < policy.minimum_calls:
            return False
        return (
            self.failures >= policy.failure_rate_threshold * self.calls
            or self.slow >= policy.slow_call_rate_threshold * self.calls
        )

    def counts(self, now: float) -> WindowCounts:
        self._advance(now)
        return WindowCounts(self.calls, self.failures, self.slow)

    def reset(self) -> None:
        self._buckets = [[-1, 0, 0, 0] for _ in range(self.policy.size)]
        self._epoch = -1
        self.calls = self.failures = self.slow = 0
