"""The in-process rate-limit storage: the embedded default, and the fallback while Redis is down.

Atomic on the event loop: ``check`` never awaits between reading and writing counts. Bounded:
windows that have emptied are dropped as time passes, and each period of the app's limits keeps
at most ``max_keys`` windows. A live window is never dropped to make room: that would forget its
counts and admit more than its limit. While a period holds ``max_keys`` live windows, a request
that needs a new one of that period is refused until one of them expires; windows of other
periods are not touched (``docs/rate-limit-storage.md``, ADR 0059).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Sequence

from fastapi_resilience.clock import SYSTEM_CLOCK, Clock, SystemClock
from fastapi_resilience.exceptions import ConfigurationError
from fastapi_resilience.ratelimit._storage import (
    Decision,
    LimitCheck,
    LimitState,
    admitted_decision,
    new_decision,
    new_state,
)

__all__ = ["DEFAULT_MAX_KEYS", "MemoryStorage"]

#: Windows kept at most per period of the limits (one per identity and limit): about 49 MB
#: for one period at the cap, measured (docs/rate-limit-storage.md).
DEFAULT_MAX_KEYS = 100_000

#: Expired windows dropped from the front of the LRU order per call, so cleanup outpaces growth.
_SWEEP_PER_CALL = 4


class _Window:
    """The units one limit holds for one identity.

    ``entries`` is ``[bucket, count, bucket, count, ...]``, oldest first; ``first_expiry`` is when
    the oldest bucket leaves the window, ``bucket_end`` when the newest bucket stops taking
    units, and ``expires`` when the newest bucket leaves the window. ``queue`` is the storage's
    queue of the windows of this one's period.
    """

    __slots__ = ("bucket_end", "entries", "expires", "first_expiry", "queue", "total")

    def __init__(self, queue: OrderedDict[str, _Window]) -> None:
        self.queue = queue
        self.entries: list[int] = []
        self.total = 0
        self.first_expiry = 0.0
        self.bucket_end = 0.0
        self.expires = 0.0

    def drop_expired(self, now: float, width: float, period: int) -> None:
        entries = self.entries
        index, size, total = 0, len(entries), self.total
        while index < size and (entries[index] + 1) * width + period <= now:
            total -= entries[index + 1]
            index += 2
        del entries[:index]
        self.total = total
        self.first_expiry = (entries[0] + 1) * width + period if entries else 0.0

    def add(self, cost: int, now: float, width: float, period: int) -> None:
        """Count ``cost`` units at ``now``."""
        self.total += cost
        entries = self.entries
        if now < self.bucket_end and entries:
            # Still the newest bucket (or a clock that stepped back: never reorder buckets).
            entries[-1] += cost
            return
        bucket = int(now // width)
        if entries and entries[-2] >= bucket:
            entries[-1] += cost  # ``bucket_end`` rounded the other way: the same bucket
            return
        entries.append(bucket)
        entries.append(cost)
        self.bucket_end = end = (bucket + 1) * width
        self.expires = end + period
        if len(entries) == 2:
            self.first_expiry = end + period

    def retry_after(self, need: int, now: float, width: float, period: int) -> float:
        """Seconds until ``need`` more units have left the window (walks from the oldest)."""
        entries = self.entries
        freed = 0
        for index in range(0, len(entries), 2):
            freed += entries[index + 1]
            if freed >= need:
                return max(0.0, (entries[index] + 1) * width + period - now)
        return float(period)  # pragma: no cover - need <= total by construction


def _new_windows(
    checks: Sequence[LimitCheck], found: list[_Window | None], *, shadow_too: bool
) -> dict[int, int]:
    """How many of ``checks`` need a new window (those of shadow limits only if
    ``shadow_too``), per period."""
    needed: dict[int, int] = {}
    for check, window in zip(checks, found, strict=True):
        if window is None and (shadow_too or not check.shadow):
            needed[check.period] = needed.get(check.period, 0) + 1
    return needed


def _peek_state(check: LimitCheck, window: _Window | None, now: float) -> LimitState:
    """What ``MemoryStorage._state`` says of ``window`` before a request of ``check``, read
    without changing the window: its expired buckets are skipped, not dropped."""
    amount, cost, width, period = check.amount, check.cost, check.width, check.period
    entries = window.entries if window is not None else []
    total = window.total if window is not None else 0
    start = 0
    while start < len(entries) and (entries[start] + 1) * width + period <= now:
        total -= entries[start + 1]
        start += 2
    if start >= len(entries):
        fits = cost <= amount
        return new_state(check, fits, amount, 0.0, 0.0 if fits else float(period))
    remaining = max(0, amount - total)
    reset = (entries[start] + 1) * width + period - now
    if total + cost <= amount:
        return new_state(check, True, remaining, reset, 0.0)
    retry = float(period)
    if cost <= amount:
        need, freed = total + cost - amount, 0
        for index in range(start, len(entries), 2):
            freed += entries[index + 1]
            if freed >= need:
                retry = max(0.0, (entries[index] + 1) * width + period - now)
                break
    return new_state(check, False, remaining, reset, retry)


class MemoryStorage:
    """Counts in this process's memory, on the bucketed sliding log of ``_rate_limit_core``.

    Args:
        clock: monotonic time source (inject ``ManualClock`` in tests).
        max_keys: windows kept at most for each period of the limits (a ``1/day`` limit's
            windows never take the room of a ``10/minute`` limit's), so limits of N periods
            hold at most N times ``max_keys``. Expired windows of a period make room for new
            ones; a live window is never dropped, so while a period holds ``max_keys`` live
            windows a request that needs a new window of that period is refused (429,
            ``Retry-After`` until the first of them expires) and counted in ``full_refusals``.
            ``len(storage)`` is the number of windows held.

    .. versionadded:: 0.1.0
    """

    def __init__(self, *, clock: Clock = SYSTEM_CLOCK, max_keys: int = DEFAULT_MAX_KEYS) -> None:
        if max_keys < 1:
            raise ConfigurationError(f"max_keys must be >= 1, got {max_keys!r}")
        self._clock = clock
        # The system clock's method only calls ``time.monotonic``: call it directly.
        self._monotonic = time.monotonic if type(clock) is SystemClock else clock.monotonic
        self.max_keys = max_keys
        self._windows: dict[str, _Window] = {}
        #: The windows of each period, least recently counted first. Within one period that is
        #: also the order of their expiry, so the expired ones are at the front of their queue,
        #: whatever longer periods hold.
        self._queues: dict[int, OrderedDict[str, _Window]] = {}
        self._next_sweep = 0.0
        #: Requests refused because ``max_keys`` live windows were held and theirs was new.
        self.full_refusals = 0

    def __len__(self) -> int:
        """The number of windows held (one per identity and limit), expired ones not yet
        dropped included."""
        return len(self._windows)

    async def check(self, identity_tag: str, checks: Sequence[LimitCheck]) -> Decision:
        return self.check_now(checks)

    def check_now(self, checks: Sequence[LimitCheck]) -> Decision:
        """The synchronous core of ``check``: decide and count ``checks`` at once."""
        if len(checks) == 1 and not checks[0].shadow:
            admitted = self.try_admit(checks[0])
            if admitted is not None:
                return admitted_decision(checks[0], admitted)
        return self.check_many(checks)

    def check_many(self, checks: Sequence[LimitCheck]) -> Decision:
        """``check_now`` without its lean case: any checks, and the states of every limit.

        Also what a caller uses right after ``try_admit`` refused (nothing was counted then):
        it says why, without trying the lean case a second time.
        """
        now = self._monotonic()
        if now >= self._next_sweep:
            # Before the check: a window the sweep drops is one the check would not hold.
            self._sweep(now)
        return self._check_many(checks, now)

    def try_admit(self, check: LimitCheck) -> tuple[int, float] | None:
        """``check_now((check,))`` of one enforced limit that admits the request, lean.

        Returns ``(remaining, reset_after)`` of the admitted request (counted), or ``None`` when
        the limit would refuse it, or its new window needs room first (nothing counted:
        ``check_many`` then makes room or tells why). Builds no
        ``Decision``, and the newest bucket's case of ``_Window.add`` is inlined: this is the
        embedded default's common case, on every request. Same decisions, same counts.
        """
        now = self._monotonic()
        if now >= self._next_sweep:
            self._sweep(now)
        key = check.window_key
        windows = self._windows
        window = windows.get(key)
        cost = check.cost
        if window is None:
            queue = self._queues.get(check.period)
            if cost > check.amount or (queue is not None and len(queue) >= self.max_keys):
                # Too costly, or its period's room must be made first: ``check_many`` does
                # it or says why.
                return None
            window = self._new(check, now)
            return check.amount - cost, window.first_expiry - now
        if window.first_expiry <= now:
            window.drop_expired(now, check.width, check.period)
        total = window.total + cost
        if total > check.amount:
            return None
        window.queue.move_to_end(key)
        entries = window.entries
        if now < window.bucket_end and entries:
            entries[-1] += cost
            window.total = total
        else:
            window.add(cost, now, check.width, check.period)
        return check.amount - total, window.first_expiry - now

    def _check_many(self, checks: Sequence[LimitCheck], now: float) -> Decision:
        found = [self._held(check, now) for check in checks]
        allowed = True
        for check, window in zip(checks, found, strict=True):
            total = 0 if window is None else window.total
            if total + check.cost > check.amount and not check.shadow:
                allowed = False
        make: list[bool] = []
        if allowed and None in found:
            fitted = self._fit_new(checks, found, now)
            if fitted is None:
                return self._refuse_full(checks, found, now)
            found, make = fitted
        states = []
        for index, (check, window) in enumerate(zip(checks, found, strict=True)):
            before = 0 if window is None else window.total
            if allowed:
                if window is not None:
                    self._count(check, window, now)
                elif make[index]:
                    window = self._new(check, now)
                # Else a shadow limit with no room: not counted this time (it never refuses).
            states.append(self._state(check, window, before, now))
        return new_decision(allowed, tuple(states))

    def _fit_new(
        self, checks: Sequence[LimitCheck], found: list[_Window | None], now: float
    ) -> tuple[list[_Window | None], list[bool]] | None:
        """Room for the new windows of an admitted request, each in its own period's share,
        made from that period's expired windows only.

        Returns the windows of ``checks`` (looked up again: an expired one may have gone) and
        which new windows to make: every enforced one, and the shadow ones that fit; ``None``
        when a new enforced window does not fit.
        """
        needed = _new_windows(checks, found, shadow_too=True)
        for period, count in needed.items():
            queue = self._queues.get(period)
            if queue is not None and len(queue) + count > self.max_keys:
                self._drop_expired(queue, now, len(queue) + count - self.max_keys)
        windows = self._windows
        found = [windows.get(check.window_key) for check in checks]
        room = {period: self._room(period) for period in needed}
        for check, window in zip(checks, found, strict=True):
            if window is None and not check.shadow:
                room[check.period] -= 1
        if any(left < 0 for left in room.values()):
            return None
        make = []
        for check, window in zip(checks, found, strict=True):
            fits = window is None and (not check.shadow or room[check.period] > 0)
            if fits and check.shadow:
                room[check.period] -= 1
            make.append(fits)
        return found, make

    def _room(self, period: int) -> int:
        """How many more windows of ``period`` fit in its share."""
        queue = self._queues.get(period)
        return self.max_keys - (0 if queue is None else len(queue))

    def _refuse_full(
        self, checks: Sequence[LimitCheck], found: list[_Window | None], now: float
    ) -> Decision:
        """The refusal of a request whose new window does not fit: counts nothing, and says
        when the first window of each full period expires (room for it, unless others take
        it first)."""
        self.full_refusals += 1
        first = now
        for period, count in _new_windows(checks, found, shadow_too=False).items():
            queue = self._queues.get(period)
            if queue and self._room(period) < count:
                first = max(first, next(iter(queue.values())).expires)
        wait = first - now
        states = []
        for check, window in zip(checks, found, strict=True):
            if window is None and not check.shadow:
                states.append(new_state(check, False, 0, 0.0, wait))
            else:
                before = 0 if window is None else window.total
                states.append(self._state(check, window, before, now))
        return new_decision(False, tuple(states))

    def _held(self, check: LimitCheck, now: float) -> _Window | None:
        """The window of ``check``, its expired buckets dropped; ``None`` when it has none."""
        window = self._windows.get(check.window_key)
        if window is not None and window.first_expiry <= now:
            window.drop_expired(now, check.width, check.period)
        return window

    def _count(self, check: LimitCheck, window: _Window, now: float) -> None:
        window.queue.move_to_end(check.window_key)
        window.add(check.cost, now, check.width, check.period)

    def _new(self, check: LimitCheck, now: float) -> _Window:
        """A new window for ``check`` with its cost counted; the caller made room for it."""
        period = check.period
        queue = self._queues.get(period)
        if queue is None:
            queue = self._queues[period] = OrderedDict()
        key = check.window_key
        window = self._windows[key] = queue[key] = _Window(queue)
        window.add(check.cost, now, check.width, period)
        if window.expires < self._next_sweep:
            # The first window of its queue may expire before every other queue's first.
            self._next_sweep = window.expires
        return window

    @staticmethod
    def _state(check: LimitCheck, window: _Window | None, before: int, now: float) -> LimitState:
        amount = check.amount
        cost = check.cost
        if window is None or not window.entries:
            fits = cost <= amount
            return new_state(check, fits, amount, 0.0, 0.0 if fits else float(check.period))
        remaining = amount - window.total
        reset = window.first_expiry - now
        if before + cost <= amount:
            return new_state(check, True, remaining if remaining > 0 else 0, reset, 0.0)
        if cost > amount:
            retry = float(check.period)
        else:
            retry = window.retry_after(before + cost - amount, now, check.width, check.period)
        return new_state(check, False, remaining if remaining > 0 else 0, reset, retry)

    def _drop_expired(self, queue: OrderedDict[str, _Window], now: float, budget: int) -> None:
        """Drop up to ``budget`` expired windows from the front of one period's ``queue``."""
        windows = self._windows
        while queue and budget:
            key, window = next(iter(queue.items()))
            if window.expires > now:
                return
            del queue[key]
            del windows[key]
            budget -= 1

    def _sweep(self, now: float, budget: int = _SWEEP_PER_CALL) -> None:
        """Drop up to ``budget`` expired windows from the fronts of the queues."""
        windows = self._windows
        next_sweep = math.inf
        for queue in self._queues.values():
            while queue:
                key, window = next(iter(queue.items()))
                if window.expires > now:
                    # Until then this queue's front cannot have expired (windows only move back).
                    next_sweep = min(next_sweep, window.expires)
                    break
                if not budget:
                    next_sweep = now  # more to drop: go on at the next call
                    break
                del queue[key]
                del windows[key]
                budget -= 1
        self._next_sweep = next_sweep

    def sweep(self) -> int:
        """Drop every expired window now; returns how many were dropped."""
        now = self._clock.monotonic()
        dropped = 0
        for queue in self._queues.values():
            expired = [key for key, window in queue.items() if window.expires <= now]
            for key in expired:
                del queue[key]
                del self._windows[key]
            dropped += len(expired)
        return dropped

    async def peek(self, identity_tag: str, checks: Sequence[LimitCheck]) -> list[LimitState]:
        """The state of each of ``checks`` now; counts nothing, creates no window, and drops no
        bucket (an expired one is read as gone, as a check would drop it)."""
        now = self._monotonic()
        windows = self._windows
        return [_peek_state(check, windows.get(check.window_key), now) for check in checks]

    async def reset(self, identity_tag: str, checks: Sequence[LimitCheck]) -> int:
        """Drop the windows of ``checks``; returns how many still held units."""
        now = self._monotonic()
        removed = 0
        for check in checks:
            key = check.window_key
            window = self._windows.pop(key, None)
            if window is None:
                continue
            del window.queue[key]
            if window.expires > now:
                removed += 1
        return removed

    async def ping(self) -> bool:
        return True

    async def aclose(self) -> None:
        self._windows.clear()
        self._queues.clear()

    def __repr__(self) -> str:
        return f"MemoryStorage(max_keys={self.max_keys}, windows={len(self._windows)})"
