"""Error analytics: problem counts per code and route over a sliding window, a spike detector,
and the problems of recent correlation IDs, for ``GET {admin_path}/api/errors``.

Everything is bounded and advanced lazily from the clock on each call: no background task.
"""

from __future__ import annotations

import logging
import math
import time
import weakref
from collections import OrderedDict, deque
from typing import Any, Literal

from starlette.types import Scope

from fastapi_resilience._asgi.paths import MountTemplates
from fastapi_resilience._asgi.routes import route_template
from fastapi_resilience._tally import OUTBOUND_OBSERVERS
from fastapi_resilience.clock import SYSTEM_CLOCK, Clock, SystemClock
from fastapi_resilience.correlation._ids import get_correlation_id
from fastapi_resilience.events import EventBus, EventSource
from fastapi_resilience.exceptions import ConfigurationError

__all__ = [
    "MAX_BUCKETS",
    "MAX_CODE_CHARS",
    "MAX_ID_CHARS",
    "MAX_ROUTE_CHARS",
    "OTHER",
    "SPIKE_ENDED",
    "SPIKE_STARTED",
    "ErrorAnalytics",
    "ProblemRecorder",
    "record_outbound_failures",
]

logger = logging.getLogger("fastapi_resilience.errors")

#: Event kinds, published on the analytics' bus under the name ``"errors"``.
SPIKE_STARTED = "errors.spike_started"
SPIKE_ENDED = "errors.spike_ended"

#: Stands for the routes (and, past the second bound, the codes) no longer tracked one by one.
OTHER = "(other)"
#: Strings from a request are cut to these lengths before they are kept.
MAX_CODE_CHARS = 64
MAX_ROUTE_CHARS = 200
MAX_ID_CHARS = 128
#: The most buckets a window may have (window_seconds / bucket_seconds).
MAX_BUCKETS = 3600

Direction = Literal["inbound", "outbound"]


class _Tally:
    """The counts of one (code, route, direction) key, one per bucket of the ring.

    ``counts[b % n]`` holds bucket ``b`` for ``last - n < b <= last``; slots of buckets after
    ``last`` are stale and are zeroed when the tally is next written (lazily, so advancing the
    ring costs nothing per key).
    """

    __slots__ = ("code", "counts", "direction", "last", "route", "status")

    def __init__(self, code: str, route: str, direction: str, buckets: int, now: int) -> None:
        self.code = code
        self.route = route
        self.direction = direction
        self.status = 0
        self.counts = [0] * buckets
        self.last = now


def _text(value: object, limit: int) -> str:
    """``value`` as a string of at most ``limit`` characters; never raises."""
    if type(value) is not str:
        try:
            value = str(value)
        except Exception:
            value = "(unprintable)"
    return value if len(value) <= limit else value[:limit]


def _positive(value: float, argument: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigurationError(f"{argument} must be a number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ConfigurationError(f"{argument} must be > 0, got {value!r}")
    return float(value)


def _count(value: int, argument: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigurationError(f"{argument} must be an integer >= {minimum}, got {value!r}")
    return value


class ErrorAnalytics(EventSource):
    """Counts problem answers per code and route over a sliding window and detects spikes.

    Call :meth:`record` once per problem: the app's own problem+json answers (``inbound``)
    and failed upstream calls (``outbound``). Both count; ``routes`` tells them apart by
    ``direction``. :meth:`snapshot` is what ``GET {admin_path}/api/errors`` shows.

    **The window** is a ring of ``window_seconds / bucket_seconds`` buckets; counts and trends
    cover the buckets of the last ``window_seconds`` (the current one included), so a bucket
    falls out whole once the window has passed it.

    **The spike rule**, looked at each time a bucket closes: the error rate of each bucket
    (errors / ``bucket_seconds``) feeds a fast moving average (time constant
    ``spike_fast_seconds``) and a slow one, the baseline (``spike_slow_seconds``); both are
    bias-corrected, so at first the baseline is the average seen so far rather than zero. A
    spike starts when the fast rate is at least ``spike_ratio`` times the baseline *and* at
    least ``spike_min_errors`` errors fell in the last ``spike_fast_seconds`` (whole buckets);
    it ends when the fast rate is back under ``spike_end_ratio`` times the baseline *or* fewer
    than half of ``spike_min_errors`` fell in that time. The gap between the two thresholds is
    the hysteresis: a burst starts one spike and ends it once. A level that stays becomes the
    baseline, so a spike that lasts ends by itself, in about ``spike_slow_seconds`` after a
    long history and sooner after a short one. With no errors for a while the state advances
    when next read (:meth:`record`, :meth:`snapshot`, :attr:`spiking`), and the times of a
    spike are those of the buckets that closed, not of the read.

    **Memory bound.** With ``B = window_seconds / bucket_seconds`` (at most 3600), it keeps at
    most ``2 * max_keys + 2`` tallies of ``B`` counters (``max_keys`` (code, route, direction)
    keys; past them a new key is counted under route ``"(other)"`` for its code and direction,
    for at most ``max_keys`` codes; past those, under code and route ``"(other)"``), at most
    ``recent_ids`` correlation IDs with at most ``problems_per_id`` problems each, and at most
    ``spike_history`` spikes. Codes are cut to 64 characters, routes to 200, IDs to 128. In
    bytes, at most about::

        (2 * max_keys + 2) * (40 * B + 600)
        + recent_ids * (400 + 560 * problems_per_id)
        + 40 * B + 250 * spike_history + 4096

    (a counter above 256 is an int object of its own: 40 bytes per counter is the worst case);
    about 1.9 MB with the defaults.
    A tally that saw nothing for a whole window gives its place to a new key, so a scan of
    random paths does not keep real routes out for good. Each record is O(1); a snapshot
    walks the tallies, O(max_keys * B).

    Called from the event loop: no locks, so read it there too (:attr:`spiking` and
    :meth:`snapshot` advance the state; not from a metrics exporter's own thread).
    :meth:`record` never raises.

    Args:
        window_seconds: the span the counts cover.
        bucket_seconds: the width of one bucket; ``window_seconds`` must be a whole multiple.
        max_keys: (code, route, direction) keys counted one by one.
        recent_ids: correlation IDs whose problems are kept (the most recently active).
        problems_per_id: problems kept per ID (the latest).
        spike_ratio: how many times the baseline the fast rate must reach to start a spike.
        spike_end_ratio: under how many times the baseline it must fall to end one.
        spike_min_errors: errors needed in the last ``spike_fast_seconds`` to start one.
        spike_fast_seconds: the fast average's time constant and the span of the volume check.
        spike_slow_seconds: the baseline's time constant.
        spike_history: how many past spikes :meth:`snapshot` lists.
        clock: ``monotonic()`` for the buckets, ``time()`` for the times shown to operators.
        events: the bus for ``errors.spike_started`` and ``errors.spike_ended`` (``None``: the
            fallback bus, which logs).

    Raises:
        ConfigurationError: (a ``ValueError``) naming the argument at fault.
    """

    __slots__ = (
        "__weakref__",
        "_active",
        "_catch_all",
        "_clock",
        "_current",
        "_fast_keep",
        "_fast_raw",
        "_fast_weight",
        "_now",
        "_overflow",
        "_recent",
        "_slow_keep",
        "_slow_raw",
        "_slow_weight",
        "_spike",
        "_spikes",
        "_tallies",
        "_totals",
        "_width",
        "bucket_seconds",
        "buckets",
        "fast_buckets",
        "max_keys",
        "problems_per_id",
        "recent_ids",
        "spike_end_ratio",
        "spike_fast_seconds",
        "spike_history",
        "spike_min_errors",
        "spike_ratio",
        "spike_slow_seconds",
        "window_seconds",
    )

    def __init__(
        self,
        *,
        window_seconds: float = 300.0,
        bucket_seconds: float = 10.0,
        max_keys: int = 200,
        recent_ids: int = 100,
        problems_per_id: int = 20,
        spike_ratio: float = 3.0,
        spike_end_ratio: float = 1.5,
        spike_min_errors: int = 10,
        spike_fast_seconds: float = 30.0,
        spike_slow_seconds: float = 1800.0,
        spike_history: int = 10,
        clock: Clock = SYSTEM_CLOCK,
        events: EventBus | None = None,
    ) -> None:
        window = _positive(window_seconds, "window_seconds")
        width = _positive(bucket_seconds, "bucket_seconds")
        buckets = round(window / width)
        if buckets < 1 or abs(buckets * width - window) > 1e-9 * window:
            raise ConfigurationError(
                f"window_seconds must be a whole multiple of bucket_seconds, got "
                f"{window_seconds!r} and {bucket_seconds!r}"
            )
        if buckets > MAX_BUCKETS:
            raise ConfigurationError(
                f"window_seconds / bucket_seconds must be at most {MAX_BUCKETS} buckets, got "
                f"{buckets}: widen bucket_seconds"
            )
        fast = _positive(spike_fast_seconds, "spike_fast_seconds")
        if not width <= fast <= window:
            raise ConfigurationError(
                f"spike_fast_seconds must be between bucket_seconds and window_seconds "
                f"({width} to {window}), got {spike_fast_seconds!r}"
            )
        slow = _positive(spike_slow_seconds, "spike_slow_seconds")
        if slow <= fast:
            raise ConfigurationError(
                f"spike_slow_seconds must be longer than spike_fast_seconds ({fast}), got "
                f"{spike_slow_seconds!r}"
            )
        ratio = _positive(spike_ratio, "spike_ratio")
        if ratio <= 1:
            raise ConfigurationError(f"spike_ratio must be > 1, got {spike_ratio!r}")
        end_ratio = _positive(spike_end_ratio, "spike_end_ratio")
        if end_ratio > ratio:
            raise ConfigurationError(
                f"spike_end_ratio must be at most spike_ratio ({ratio}), got {spike_end_ratio!r}"
            )
        self.window_seconds = window
        self.bucket_seconds = width
        self.buckets = buckets
        self.max_keys = _count(max_keys, "max_keys", 1)
        self.recent_ids = _count(recent_ids, "recent_ids", 0)
        self.problems_per_id = _count(problems_per_id, "problems_per_id", 1)
        self.spike_ratio = ratio
        self.spike_end_ratio = end_ratio
        self.spike_min_errors = _count(spike_min_errors, "spike_min_errors", 1)
        self.spike_fast_seconds = fast
        self.spike_slow_seconds = slow
        self.spike_history = _count(spike_history, "spike_history", 1)
        #: Buckets the volume check spans.
        self.fast_buckets = min(buckets, math.ceil(fast / width - 1e-9))
        self._width = width
        self._clock = clock
        # The system clock's method only forwards to time.monotonic: call that directly.
        self._now = time.monotonic if isinstance(clock, SystemClock) else clock.monotonic
        self._events = events
        self._current = int(self._now() // width)
        #: All problems per bucket (same ring layout as a tally, advanced eagerly).
        self._totals = [0] * buckets
        self._tallies: OrderedDict[tuple[str, str, str], _Tally] = OrderedDict()
        self._overflow: OrderedDict[tuple[str, str], _Tally] = OrderedDict()
        self._catch_all: dict[str, _Tally] = {}
        self._recent: OrderedDict[str, list[tuple[str, int, str, str, float]]] = OrderedDict()
        # Each average keeps (1 - alpha) of itself per bucket; raw / weight is bias-corrected.
        self._fast_keep = math.exp(-width / fast)
        self._slow_keep = math.exp(-width / slow)
        self._fast_raw = self._fast_weight = 0.0
        self._slow_raw = self._slow_weight = 0.0
        self._active = False
        #: The spike under way, or the last one: [started, ended or None, peak_rate].
        self._spike: list[Any] | None = None
        self._spikes: deque[list[Any]] = deque(maxlen=self.spike_history)

    # -- recording ---------------------------------------------------------------------

    def record(
        self,
        code: str,
        status: int,
        *,
        route: str,
        correlation_id: str | None,
        direction: Direction = "inbound",
    ) -> None:
        """Count one problem: ``code`` and ``status`` as answered, ``route`` (the template, or
        the upstream for an outbound call) and the request's correlation ID. Never raises."""
        try:
            self._record(code, status, route, correlation_id, direction)
        except Exception:  # a bad input must not break the answer being sent
            logger.debug("error analytics could not record a problem", exc_info=True)

    def _record(
        self, code: str, status: int, route: str, correlation_id: str | None, direction: str
    ) -> None:
        if type(code) is not str or len(code) > MAX_CODE_CHARS:
            code = _text(code, MAX_CODE_CHARS)
        if type(route) is not str or len(route) > MAX_ROUTE_CHARS:
            route = _text(route, MAX_ROUTE_CHARS)
        if type(status) is not int:
            try:
                status = int(status)
            except Exception:
                status = 0
        direction = "outbound" if direction == "outbound" else "inbound"
        now = int(self._now() // self._width)
        if now != self._current:
            self._roll(now)
            now = self._current
        n = self.buckets
        slot = now % n
        self._totals[slot] += 1
        key = (code, route, direction)
        tally = self._tallies.get(key)
        if tally is None:
            tally = self._new_tally(code, route, direction, now)
        else:
            self._tallies.move_to_end(key)
            # Share the kept strings rather than keep the request's copies in ``recent``.
            code, route = tally.code, tally.route
        tally.status = status
        last = tally.last
        if last != now:
            counts = tally.counts
            if now - last >= n:
                for i in range(n):
                    counts[i] = 0
            else:
                for b in range(last + 1, now + 1):
                    counts[b % n] = 0
            tally.last = now
        tally.counts[slot] += 1
        if correlation_id is not None and self.recent_ids:
            self._remember(correlation_id, (code, status, route, direction, self._clock.time()))

    def _new_tally(self, code: str, route: str, direction: str, now: int) -> _Tally:
        tallies = self._tallies
        if len(tallies) < self.max_keys or self._reclaim(tallies, now):
            tally = tallies[(code, route, direction)] = _Tally(
                code, route, direction, self.buckets, now
            )
            return tally
        overflow = self._overflow
        key = (code, direction)
        other = overflow.get(key)
        if other is not None:
            overflow.move_to_end(key)
            return other
        if len(overflow) < self.max_keys or self._reclaim(overflow, now):
            other = overflow[key] = _Tally(code, OTHER, direction, self.buckets, now)
            return other
        catch_all = self._catch_all.get(direction)
        if catch_all is None:
            catch_all = self._catch_all[direction] = _Tally(
                OTHER, OTHER, direction, self.buckets, now
            )
        return catch_all

    def _reclaim(self, table: OrderedDict[Any, _Tally], now: int) -> bool:
        """Drop the least recently used tally if it counted nothing in the window."""
        key, oldest = next(iter(table.items()))
        if oldest.last > now - self.buckets:
            return False
        del table[key]
        return True

    def _remember(self, correlation_id: str, problem: tuple[str, int, str, str, float]) -> None:
        if type(correlation_id) is not str or len(correlation_id) > MAX_ID_CHARS:
            correlation_id = _text(correlation_id, MAX_ID_CHARS)
        recent = self._recent
        problems = recent.get(correlation_id)
        if problems is None:
            if len(recent) >= self.recent_ids:
                recent.popitem(last=False)
            recent[correlation_id] = [problem]
            return
        recent.move_to_end(correlation_id)
        problems.append(problem)
        if len(problems) > self.problems_per_id:
            del problems[0]

    # -- the ring and the detector ------------------------------------------------------

    def _advance(self) -> None:
        now = int(self._now() // self._width)
        if now != self._current:
            self._roll(now)

    def _roll(self, now: int) -> None:
        """Close the buckets from the current one up to ``now`` (exclusive), in order."""
        current = self._current
        if now <= current:  # a clock that went back: keep counting in the current bucket
            return
        self._close(current)
        totals = self._totals
        n = self.buckets
        empty = now - current - 1
        # One by one while they can matter (a spike ends within fast_buckets empty buckets),
        # then the averages decay in one step however long the silence was.
        one_by_one = min(empty, n)
        for b in range(current + 1, current + 1 + one_by_one):
            totals[b % n] = 0
            self._close(b)
        if empty > one_by_one:
            self._decay(empty - one_by_one)
        totals[now % n] = 0
        self._current = now

    def _close(self, bucket: int) -> None:
        totals = self._totals
        n = self.buckets
        rate = totals[bucket % n] / self._width
        keep = self._fast_keep
        self._fast_raw = self._fast_raw * keep + (1.0 - keep) * rate
        self._fast_weight = self._fast_weight * keep + (1.0 - keep)
        keep = self._slow_keep
        self._slow_raw = self._slow_raw * keep + (1.0 - keep) * rate
        self._slow_weight = self._slow_weight * keep + (1.0 - keep)
        fast, slow = self.rate, self.baseline
        count = 0
        for b in range(bucket - self.fast_buckets + 1, bucket + 1):
            count += totals[b % n]
        if not self._active:
            if count >= self.spike_min_errors and fast >= self.spike_ratio * slow:
                self._start(bucket, fast, slow, count)
        else:
            spike = self._spike
            if spike is not None and fast > spike[2]:
                spike[2] = fast
            if 2 * count < self.spike_min_errors or fast < self.spike_end_ratio * slow:
                self._end(bucket, fast, slow)

    def _decay(self, buckets: int) -> None:
        keep = self._fast_keep**buckets
        self._fast_raw *= keep
        self._fast_weight = 1.0 - (1.0 - self._fast_weight) * keep
        keep = self._slow_keep**buckets
        self._slow_raw *= keep
        self._slow_weight = 1.0 - (1.0 - self._slow_weight) * keep

    def _wall(self, bucket: int) -> float:
        """The wall time at which ``bucket`` closed (it may be noticed later, lazily)."""
        closed = (bucket + 1) * self._width
        return self._clock.time() - (self._clock.monotonic() - closed)

    def _start(self, bucket: int, fast: float, slow: float, count: int) -> None:
        self._active = True
        since = self._wall(bucket)
        self._spike = [since, None, fast]
        self._spikes.append(self._spike)
        self.events.emit(
            SPIKE_STARTED,
            "errors",
            rate=round(fast, 3),
            baseline=round(slow, 3),
            count=count,
        )

    def _end(self, bucket: int, fast: float, slow: float) -> None:
        self._active = False
        ended = self._wall(bucket)
        peak = 0.0
        if self._spike is not None:
            self._spike[1] = ended
            peak = self._spike[2]
        self.events.emit(
            SPIKE_ENDED,
            "errors",
            level=logging.INFO,
            rate=round(fast, 3),
            baseline=round(slow, 3),
            peak_rate=round(peak, 3),
        )

    # -- reading -----------------------------------------------------------------------

    @property
    def rate(self) -> float:
        """The fast average of the error rate, errors/s, as of the last closed bucket."""
        return self._fast_raw / self._fast_weight if self._fast_weight else 0.0

    @property
    def baseline(self) -> float:
        """The slow average (the baseline), errors/s, as of the last closed bucket."""
        return self._slow_raw / self._slow_weight if self._slow_weight else 0.0

    @property
    def spiking(self) -> bool:
        """Whether a spike is under way (the state is brought up to the clock first)."""
        self._advance()
        return self._active

    def problems_of(self, correlation_id: str) -> list[dict[str, Any]]:
        """The problems recorded for ``correlation_id``, oldest first, inbound and outbound;
        ``[]`` for an ID never seen or no longer kept."""
        if type(correlation_id) is not str or len(correlation_id) > MAX_ID_CHARS:
            correlation_id = _text(correlation_id, MAX_ID_CHARS)
        problems = self._recent.get(correlation_id)
        return [] if problems is None else [_problem(p) for p in problems]

    def snapshot(self) -> dict[str, Any]:
        """What the admin API shows, JSON-ready. Counts cover the window only; ``codes`` and
        ``routes`` are sorted by count, highest first; ``spikes`` and ``recent`` newest first."""
        self._advance()
        n = self.buckets
        now = self._current
        first = now - n + 1
        codes: dict[str, list[Any]] = {}
        routes: list[dict[str, Any]] = []
        tallies = [
            *self._tallies.values(),
            *self._overflow.values(),
            *self._catch_all.values(),
        ]
        for tally in tallies:
            last = tally.last
            if last < first:
                continue
            counts = tally.counts
            trend = [counts[b % n] if b <= last else 0 for b in range(first, now + 1)]
            count = sum(trend)
            if not count:
                continue
            routes.append(
                {
                    "code": tally.code,
                    "route": tally.route,
                    "direction": tally.direction,
                    "count": count,
                }
            )
            entry = codes.get(tally.code)
            if entry is None:
                codes[tally.code] = [tally.status, count, trend, last]
            else:
                if last >= entry[3]:
                    entry[0], entry[3] = tally.status, last
                entry[1] += count
                entry[2] = [a + b for a, b in zip(entry[2], trend, strict=True)]
        routes.sort(key=lambda r: (-r["count"], r["code"], r["route"], r["direction"]))
        spike = self._spike if self._active else None
        return {
            "window_seconds": self.window_seconds,
            "bucket_seconds": self.bucket_seconds,
            "total": sum(self._totals),
            "codes": [
                {"code": code, "status": status, "count": count, "trend": trend}
                for code, (status, count, trend, _) in sorted(
                    codes.items(), key=lambda item: (-item[1][1], item[0])
                )
            ],
            "routes": routes,
            "spike": {
                "active": self._active,
                "rate": round(self.rate, 4),
                "baseline": round(self.baseline, 4),
                "since": None if spike is None else spike[0],
            },
            "spikes": [
                {"started": s[0], "ended": s[1], "peak_rate": round(s[2], 4)}
                for s in reversed(self._spikes)
            ],
            "recent": [
                {"correlation_id": cid, "problems": [_problem(p) for p in problems]}
                for cid, problems in reversed(self._recent.items())
            ],
        }

    def __repr__(self) -> str:
        return (
            f"ErrorAnalytics(window_seconds={self.window_seconds}, "
            f"bucket_seconds={self.bucket_seconds}, max_keys={self.max_keys}, "
            f"recent_ids={self.recent_ids})"
        )


def _problem(problem: tuple[str, int, str, str, float]) -> dict[str, Any]:
    code, status, route, direction, at = problem
    return {"code": code, "status": status, "route": route, "direction": direction, "at": at}


class ProblemRecorder:
    """Records an app's problem answers in its :class:`ErrorAnalytics`. The problem renderer
    finds it from the request's app (``resilience.problem_recorder``) when it builds an
    answer: nothing runs for a request that ends well."""

    __slots__ = ("analytics", "mounts")

    def __init__(self, analytics: ErrorAnalytics, mounts: MountTemplates | None = None) -> None:
        self.analytics = analytics
        #: The app's mounts as templates (``install()`` fills them at start-up).
        self.mounts = mounts

    def record_problem(self, scope: Scope, code: str, status: int, correlation_id: str) -> None:
        """One problem answer of the request, by the template of the route it matched."""
        # The renderer catches what this raises: no second guard (this runs per refusal).
        route = route_template(scope, self.mounts)
        self.analytics._record(code, status, route, correlation_id, "inbound")


#: The analytics of every installed app; outbound failures have no request scope to say
#: which app they belong to, so each live one records them (one app per process is the case
#: the contract supports).
_OUTBOUND_TARGETS: weakref.WeakSet[ErrorAnalytics] = weakref.WeakSet()


def record_outbound_failures(analytics: ErrorAnalytics) -> None:
    """Record the resilient client's failed calls in ``analytics``, by upstream, with the
    correlation ID of the request that made them."""
    if _record_outbound not in OUTBOUND_OBSERVERS:
        OUTBOUND_OBSERVERS.append(_record_outbound)
    _OUTBOUND_TARGETS.add(analytics)


def _record_outbound(upstream: str, outcome: str, code: str, status: int) -> None:
    correlation_id = get_correlation_id()
    for analytics in list(_OUTBOUND_TARGETS):
        analytics.record(
            code, status, route=upstream, correlation_id=correlation_id, direction="outbound"
        )
