"""Request hedging: if a call is slow, start a second one; the first success wins.

A few slow replicas make the tail latency of every caller slow. Hedging sends a backup request
once the first has taken longer than a fixed delay or a latency percentile of recent calls
(Dean & Barroso, "The Tail at Scale"), takes whichever succeeds first and cancels the other.
Only for idempotent calls, and with a cap on the extra load it may add.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, ParamSpec, TypeVar

from fastapi_resilience.clock import SYSTEM_CLOCK, Clock
from fastapi_resilience.exceptions import ConfigurationError
from fastapi_resilience.outbound._retry_budget import seconds

__all__ = ["Hedge"]

P = ParamSpec("P")
T = TypeVar("T")

# Recompute the percentile after this many new samples, not on every call.
_REFRESH_EVERY = 16


def _consume(task: asyncio.Future[Any]) -> None:
    # A cancelled loser may still end with an error; read it so asyncio does not log
    # "exception was never retrieved".
    if not task.cancelled():
        task.exception()


class Hedge:
    """Starts a backup attempt when the first is slow; the first success wins.

    ``await hedge.call(fn, *args, **kwargs)``. The backup starts after ``delay`` seconds, or,
    with ``percentile``, after that percentile of the latencies of recent successful calls
    (``delay`` then serves until ``min_samples`` calls were seen; without it, no hedging
    until then). The losing attempt is cancelled. If both fail, the primary's error is raised.

    Extra load is capped: each call earns ``max_extra`` of a backup, so at most about
    ``max_extra`` (10%) more calls reach the upstream, whatever its latency.

    Args:
        delay: fixed seconds before the backup, or the fallback while samples are few.
        percentile: e.g. ``0.95``: hedge calls slower than the 95th percentile.
        max_extra: cap on backups per call, in [0, 1].
        samples: how many recent latencies to keep.
        min_samples: samples needed before ``percentile`` is used.
        clock: injectable time.

    .. versionadded:: 0.1.0
    """

    def __init__(
        self,
        *,
        delay: float | timedelta | None = None,
        percentile: float | None = None,
        max_extra: float = 0.1,
        samples: int = 1000,
        min_samples: int = 20,
        name: str = "default",
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.delay = seconds(delay, "delay")
        if percentile is not None and not 0 < percentile < 1:
            raise ConfigurationError(f"percentile must be in (0, 1), got {percentile!r}")
        if self.delay is None and percentile is None:
            raise ConfigurationError("give a delay, a percentile, or both")
        if not 0 <= max_extra <= 1:
            raise ConfigurationError(f"max_extra must be in [0, 1], got {max_extra!r}")
        if samples < 1 or min_samples < 1:
            raise ConfigurationError("samples and min_samples must be >= 1")
        self.percentile = percentile
        self.max_extra = max_extra
        self.min_samples = min_samples
        self.name = name
        self._clock = clock
        self._latencies: deque[float] = deque(maxlen=samples)
        self._since_refresh = 0
        self._percentile_delay: float | None = None
        self._cap = max(1.0, 10 * max_extra)
        self._tokens = self._cap if max_extra > 0 else 0.0
        self.calls = 0
        self.hedges = 0
        self.hedge_wins = 0

    def current_delay(self) -> float | None:
        """Seconds before a backup starts now; ``None`` means no hedging yet."""
        if self.percentile is not None and self._percentile_delay is not None:
            return self._percentile_delay
        return self.delay

    def _record(self, latency: float) -> None:
        if self.percentile is None:
            return
        self._latencies.append(latency)
        self._since_refresh += 1
        if len(self._latencies) >= self.min_samples and (
            self._percentile_delay is None or self._since_refresh >= _REFRESH_EVERY
        ):
            ordered = sorted(self._latencies)
            index = min(len(ordered) - 1, math.ceil(self.percentile * len(ordered)) - 1)
            self._percentile_delay = ordered[max(0, index)]
            self._since_refresh = 0

    async def call(self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """``await fn(...)``, with a backup attempt if it is slow.

        Raises:
            Exception: the primary attempt's error when every attempt failed.
        """
        self.calls += 1
        self._tokens = min(self._cap, self._tokens + self.max_extra)
        delay = self.current_delay()
        clock = self._clock
        started = clock.monotonic()
        if delay is None:
            result = await fn(*args, **kwargs)
            self._record(clock.monotonic() - started)
            return result

        async def attempt() -> T:
            return await fn(*args, **kwargs)

        primary = asyncio.ensure_future(attempt())
        timer = asyncio.ensure_future(clock.sleep(delay))
        running: list[asyncio.Future[T]] = [primary]
        try:
            await asyncio.wait((primary, timer), return_when=asyncio.FIRST_COMPLETED)
            if not primary.done() and self._tokens >= 1:
                self._tokens -= 1
                self.hedges += 1
                running.append(asyncio.ensure_future(attempt()))
            pending = set(running)
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in running:
                    if task in done and not task.cancelled() and task.exception() is None:
                        if task is not primary:
                            self.hedge_wins += 1
                        self._record(clock.monotonic() - started)
                        return task.result()
            return primary.result()  # every attempt failed: the primary's error
        finally:
            leftovers: list[asyncio.Future[Any]] = [timer, *running]
            for leftover in leftovers:
                if leftover.done():
                    _consume(leftover)
                else:
                    leftover.cancel()
                    leftover.add_done_callback(_consume)

    def snapshot(self) -> dict[str, float | None]:
        """Calls, backups started, backups that won, and the current delay."""
        return {
            "calls": self.calls,
            "hedges": self.hedges,
            "hedge_wins": self.hedge_wins,
            "delay": self.current_delay(),
        }

    def __repr__(self) -> str:
        return (
            f"Hedge(name={self.name!r}, delay={self.delay}, percentile={self.percentile}, "
            f"max_extra={self.max_extra})"
        )
