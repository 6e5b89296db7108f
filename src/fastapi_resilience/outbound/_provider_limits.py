"""What providers say about their rate limits, and the two per-host guards built on it.

Providers (OpenAI-style APIs, graph APIs) say when to come back in more ways than
``Retry-After``: ``retry-after-ms``, and the ``x-ratelimit-remaining-*`` /
``x-ratelimit-reset-*`` family, whose durations look like ``1s``, ``6m0s``, ``20ms`` or
``1h2m3.5s``. Every parser here is strict and total: a value it cannot read is ignored (``None``),
never an exception, since it comes from the upstream.

- :class:`QuotaGate`: per host. Closed while the upstream has said its quota is used up (a
  ``remaining: 0`` with its reset, or a 429 that says when to come back); a call meanwhile waits
  for it to open, within a bound, or fails fast with :class:`QuotaExhaustedError`.
- :class:`OutboundLimiter`: per host. This client's own rate limit (``"10/second; 500/minute"``),
  counted in memory, or in a shared rate-limit storage (Redis) so that several processes keep one
  limit together; a call over it waits until it fits, within the same bound, or fails fast.

See ``docs/provider-rate-limits.md`` and ADR 0069.
"""

from __future__ import annotations

import email.utils
import logging
import math
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence

from fastapi_resilience._limits import (
    Decision,
    Limit,
    LimitCheck,
    LimitState,
    RateLimitStorage,
    parse_limits,
)
from fastapi_resilience.clock import SYSTEM_CLOCK, Clock
from fastapi_resilience.events import EventBus, EventSource
from fastapi_resilience.exceptions import (
    ConfigurationError,
    QuotaExhaustedError,
    StorageUnavailableError,
)

__all__ = [
    "DEFAULT_RATE_LIMIT_WAIT",
    "QUOTA_EXHAUSTED",
    "QUOTA_RESTORED",
    "OutboundLimiter",
    "QuotaGate",
    "parse_duration",
    "parse_retry_after",
    "parse_retry_after_ms",
    "provider_wait",
    "quota_reset",
]

logger = logging.getLogger("fastapi_resilience.outbound")

#: Published (WARNING) when a host's quota runs out: the gate closes.
QUOTA_EXHAUSTED = "outbound.quota_exhausted"
#: Published (INFO) when a closed gate is first found open again.
QUOTA_RESTORED = "outbound.quota_restored"

#: Seconds a call may wait for a closed gate or for room under ``rate_limit`` by default.
DEFAULT_RATE_LIMIT_WAIT = 5.0

#: Longer header values are not read: no provider needs more, and nothing unbounded is parsed.
_MAX_VALUE_LENGTH = 64

_NUMBER = r"\d+(?:\.\d+)?"
_SECONDS = re.compile(_NUMBER, re.ASCII)
#: A Go-style duration, units in descending order, each at most once: ``1h2m3.5s``, ``6m0s``,
#: ``20ms``, ``1.5µs``. ``m`` not followed by ``s`` is minutes.
_DURATION = re.compile(
    rf"(?:(?P<h>{_NUMBER})h)?"
    rf"(?:(?P<m>{_NUMBER})m(?!s))?"
    rf"(?:(?P<s>{_NUMBER})s)?"
    rf"(?:(?P<ms>{_NUMBER})ms)?"
    rf"(?:(?P<us>{_NUMBER})(?:us|\u00b5s|\u03bcs))?"
    rf"(?:(?P<ns>{_NUMBER})ns)?",
    re.ASCII,
)
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}

#: The reset headers of the ``x-ratelimit-*`` family, each with its ``remaining`` header.
_FAMILY = (
    ("x-ratelimit-remaining-requests", "x-ratelimit-reset-requests"),
    ("x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens"),
)


#: What every ``remaining`` header of the family starts with, as httpx's raw header names.
_REMAINING = b"x-ratelimit-remaining-"
_REMAINING_LENGTH = len(_REMAINING)


def _finite(seconds: float) -> float | None:
    return seconds if math.isfinite(seconds) else None


def parse_duration(value: str | None) -> float | None:
    """Seconds from a provider's reset duration: ``1s``, ``6m0s``, ``20ms``, ``1h2m3.5s``
    (units ``h``, ``m``, ``s``, ``ms``, ``us``/``µs``, ``ns``, largest first, each at most
    once), or a bare number of seconds (``2``, ``0.5``).

    ``None`` for anything else (empty, negative, another unit, an exponent, a value longer than
    64 characters): a malformed value is ignored, never raised.
    """
    if not value or len(value) > _MAX_VALUE_LENGTH:
        return None
    text = value.strip()
    if not text:
        return None
    if _SECONDS.fullmatch(text):
        return _finite(float(text))
    match = _DURATION.fullmatch(text)
    if match is None:
        return None
    total, seen = 0.0, False
    for unit, amount in match.groupdict().items():
        if amount is not None:
            total += float(amount) * _UNIT_SECONDS[unit]
            seen = True
    return _finite(total) if seen else None


def parse_retry_after_ms(value: str | None) -> float | None:
    """Seconds from a ``retry-after-ms`` header (milliseconds, ``1500`` or ``1500.5``);
    ``None`` if absent or unreadable."""
    if not value or len(value) > _MAX_VALUE_LENGTH:
        return None
    text = value.strip()
    if not _SECONDS.fullmatch(text):
        return None
    return _finite(float(text) / 1000.0)


def parse_retry_after(value: str | None, *, now: float) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date); ``None`` if absent
    or unreadable. ``now`` is the wall clock in seconds."""
    if not value or len(value) > _MAX_VALUE_LENGTH:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    try:
        seconds = when.timestamp() - now
    except (OverflowError, OSError, ValueError):
        return None
    return max(0.0, seconds) if math.isfinite(seconds) else None


def _may_say_remaining(headers: Mapping[str, str]) -> bool:
    """False when httpx's raw header names show no ``x-ratelimit-remaining-*``: the common
    answer, told in one pass, a third of the cost of the two look-ups (each of which lower-cases,
    encodes and raises ``KeyError``). True when it cannot tell (not httpx's headers)."""
    raw = getattr(headers, "raw", None)
    if raw is None:
        return True
    for name, _ in raw:
        if len(name) > _REMAINING_LENGTH and name[:_REMAINING_LENGTH].lower() == _REMAINING:
            return True
    return False


def quota_reset(headers: Mapping[str, str]) -> tuple[float, str] | None:
    """When the upstream says a quota of its is used up: the seconds until it resets and the
    ``remaining`` header that said so, from ``x-ratelimit-remaining-requests: 0`` (or
    ``-tokens: 0``) with a readable ``x-ratelimit-reset-requests`` (or ``-tokens``). The longer
    one when both are used up; ``None`` when neither is (or no reset can be read)."""
    if not _may_say_remaining(headers):
        return None
    found: tuple[float, str] | None = None
    for remaining_name, reset_name in _FAMILY:
        remaining = headers.get(remaining_name)
        if remaining is None:
            continue
        remaining = remaining.strip()
        if not (remaining.isascii() and remaining.isdigit() and int(remaining) == 0):
            continue
        reset = parse_duration(headers.get(reset_name))
        if reset is not None and (found is None or reset > found[0]):
            found = (reset, remaining_name)
    return found


def _family_wait(headers: Mapping[str, str]) -> float | None:
    """The ``x-ratelimit-reset-*`` family's answer to "when may I come back": the reset of a
    used-up quota (the longest), else the earliest reset given."""
    exhausted = quota_reset(headers)
    if exhausted is not None:
        return exhausted[0]
    waits = [
        wait
        for wait in (parse_duration(headers.get(reset)) for _, reset in _FAMILY)
        if wait is not None
    ]
    return min(waits) if waits else None


def provider_wait(headers: Mapping[str, str], *, now: float) -> float | None:
    """Seconds a 429 or 503 answer asks the caller to wait: the first readable of
    ``retry-after-ms``, ``Retry-After`` (seconds or an HTTP date; ``now`` is the wall clock),
    then the ``x-ratelimit-reset-requests`` / ``-tokens`` family (see ADR 0069). ``None`` when
    none of them says."""
    wait = parse_retry_after_ms(headers.get("retry-after-ms"))
    if wait is not None:
        return wait
    wait = parse_retry_after(headers.get("retry-after"), now=now)
    if wait is not None:
        return wait
    return _family_wait(headers)


#: The longest a quota gate stays closed on an upstream's word, seconds.
MAX_QUOTA_WAIT = 3600.0


class QuotaGate(EventSource):
    """Holds calls to one upstream back while it has said its quota is used up.

    The transport closes it from the upstream's answers (:func:`quota_reset`, and a 429 that
    says when to come back) and passes each attempt through :meth:`pass_within`. One
    ``outbound.quota_exhausted`` (WARNING) when it closes, one ``outbound.quota_restored``
    (INFO) when a call first finds it open again; a gate closed again while closed only moves
    its reopening later. Costs nothing while open: no clock read.

    Args:
        name: the host, in events and errors.
        clock: injectable time. events: the event bus; ``None``: a shared bus that logs.

    .. versionadded:: 0.1.0
    """

    __slots__ = ("_clock", "_closed_at", "_reason", "_until", "name")

    def __init__(
        self, name: str = "default", *, clock: Clock = SYSTEM_CLOCK, events: EventBus | None = None
    ) -> None:
        self.name = name
        self._clock = clock
        self._events = events
        #: Monotonic time the gate opens at; 0.0 while open (and the restore was published).
        self._until = 0.0
        self._closed_at = 0.0
        self._reason = ""

    def time_left(self) -> float:
        """Seconds until calls may go again (0.0: open). The first look that finds a closed
        gate's time up opens it and publishes ``outbound.quota_restored``."""
        until = self._until
        if not until:
            return 0.0
        now = self._clock.monotonic()
        if until > now:
            return until - now
        self._until = 0.0
        self.events.emit(
            QUOTA_RESTORED,
            self.name,
            level=logging.INFO,
            closed_for=round(now - self._closed_at, 3),
        )
        return 0.0

    def holds_calls_back(self) -> bool:
        """Whether it is closed with time left, read without opening it or publishing."""
        return bool(self._until) and self._until > self._clock.monotonic()

    def close(self, seconds: float, *, reason: str) -> None:
        """Hold calls back for ``seconds`` (no shorter than it already does). ``reason`` names
        what said so (``"x-ratelimit-remaining-requests"``, ``"429"``...), for the event."""
        if not (isinstance(seconds, int | float) and 0 < seconds < math.inf):
            return
        # An upstream's word is taken for an hour at most: a wrong or hostile header must not
        # shut a host off for days.
        seconds = min(seconds, MAX_QUOTA_WAIT)
        self.time_left()  # a gate whose time is up is open: this is a new episode
        now = self._clock.monotonic()
        until = now + seconds
        if self._until:
            if until > self._until:
                self._until = until
            return
        self._until, self._closed_at, self._reason = until, now, reason
        self.events.emit(QUOTA_EXHAUSTED, self.name, wait=round(seconds, 3), reason=reason)

    def reopen(self) -> None:
        """Open it now (an operator knows better than the upstream's last answer)."""
        if self._until:
            self._until = self._clock.monotonic()
            self.time_left()

    async def pass_within(self, budget: float) -> float:
        """Wait for the gate to open if that takes at most ``budget`` seconds; returns the
        seconds slept.

        Raises:
            QuotaExhaustedError: it stays closed longer than ``budget``; nothing was sent.
        """

        async def left() -> float:
            return self.time_left()

        def refusal(wait: float) -> QuotaExhaustedError:
            return QuotaExhaustedError(
                f"Calls to {self.name} are held back for {wait:.3g}s: the upstream said "
                f"its quota is used up ({self._reason}).",
                extensions={"upstream": self.name, "reason": "upstream_quota"},
                retry_after=wait,
            )

        return await _wait_within(self._clock, budget, left, refusal)

    def __repr__(self) -> str:
        closed = "closed" if self.holds_calls_back() else "open"
        return f"QuotaGate(name={self.name!r}, {closed})"


class _Window:
    """The units one limit holds, as ``[bucket, count, ...]`` oldest first: the bucketed sliding
    log of ADR 0010, so no ``period`` holds more than ``amount`` units and memory stays at most
    ``RESOLUTION + 1`` buckets."""

    __slots__ = ("entries", "total")

    def __init__(self) -> None:
        self.entries: list[int] = []
        self.total = 0

    def drop_expired(self, now: float, check: LimitCheck) -> None:
        entries, width, period = self.entries, check.width, check.period
        index = 0
        while index < len(entries) and (entries[index] + 1) * width + period <= now:
            self.total -= entries[index + 1]
            index += 2
        del entries[:index]

    def state(self, now: float, check: LimitCheck) -> LimitState:
        entries, width, period = self.entries, check.width, check.period
        reset = (entries[0] + 1) * width + period - now if entries else 0.0
        if self.total + check.cost <= check.amount:
            return LimitState(check, True, check.amount - self.total - check.cost, reset, 0.0)
        retry = float(period)
        if check.cost <= check.amount:
            need, freed = self.total + check.cost - check.amount, 0
            for index in range(0, len(entries), 2):
                freed += entries[index + 1]
                if freed >= need:
                    retry = max(0.0, (entries[index] + 1) * width + period - now)
                    break
        return LimitState(check, False, max(0, check.amount - self.total), reset, retry)

    def add(self, now: float, check: LimitCheck) -> None:
        bucket = int(now // check.width)
        entries = self.entries
        self.total += check.cost
        if entries and entries[-2] >= bucket:
            entries[-1] += check.cost
        else:
            entries += (bucket, check.cost)


class _MemoryCounts:
    """One host's outbound counts in this process: the ``check`` of a rate-limit storage,
    answered at once, for the few limits of one limiter."""

    __slots__ = ("_clock", "windows")

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self.windows: dict[str, _Window] = {}

    async def check(self, identity_tag: str, checks: Sequence[LimitCheck]) -> Decision:
        now = self._clock.monotonic()
        windows = self.windows
        states = []
        allowed = True
        for check in checks:
            window = windows.get(check.window_key)
            if window is None:
                window = windows[check.window_key] = _Window()
            window.drop_expired(now, check)
            state = window.state(now, check)
            allowed = allowed and state.allowed
            states.append(state)
        if allowed:
            for check in checks:
                windows[check.window_key].add(now, check)
        return Decision(allowed, tuple(states))


class OutboundLimiter:
    """This client's own rate limit towards one upstream.

    ``limits`` is a limit string (``"10/second; 500/minute"``, parsed by ``parse_limits``) or
    parsed limits. Counted in this process by default; with ``storage`` (any object with the
    rate-limit storage's ``async check(identity_tag, checks) -> Decision``, such as
    ``fastapi_resilience.ratelimit.storage_from_url("redis://...")``), counted there, so every
    client using that storage keeps one limit per host together. A storage that cannot answer
    (``StorageUnavailableError``) lets the call go: the upstream's own limit, seen through the
    :class:`QuotaGate`, still holds.

    Args:
        name: the host: the key counted (``outbound:<name>``) and the storage's identity tag.
        limits: the limit string or limits.
        storage: the shared storage, or ``None`` to count in memory.
        clock: injectable time (the memory counts and the waits).

    Raises:
        ConfigurationError: the limit string is invalid, or ``storage`` has no ``check``.

    .. versionadded:: 0.1.0
    """

    __slots__ = ("_checks", "_clock", "_memory", "_storage", "_storage_down", "limits", "name")

    def __init__(
        self,
        name: str,
        limits: str | Sequence[Limit],
        *,
        storage: RateLimitStorage | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        if isinstance(limits, str):
            parsed = parse_limits(limits)
        else:
            parsed = tuple(limits)
            if not parsed or not all(isinstance(limit, Limit) for limit in parsed):
                raise ConfigurationError(f"rate_limit must be a limit string, got {limits!r}")
        if storage is not None and not callable(getattr(storage, "check", None)):
            raise ConfigurationError(
                "rate_limit_storage must be a rate-limit storage (an object with "
                f"`async check(identity_tag, checks)`), got {storage!r}"
            )
        self.name = name
        self.limits = parsed
        self._checks = tuple(LimitCheck(f"outbound:{name}", limit) for limit in parsed)
        self._clock = clock
        self._memory = _MemoryCounts(clock) if storage is None else None
        self._storage = storage
        self._storage_down = False

    @property
    def shared(self) -> bool:
        """Whether it counts in a shared storage (else in this process)."""
        return self._storage is not None

    def holds_units(self) -> bool:
        """Whether forgetting it would forget counts: units held in this process's memory."""
        memory = self._memory
        if memory is None:
            return False
        now = self._clock.monotonic()
        for check in self._checks:
            window = memory.windows.get(check.window_key)
            if window is not None and window.entries:
                newest = window.entries[-2]
                if (newest + 1) * check.width + check.period > now:
                    return True
        return False

    async def _decide(self) -> Decision | None:
        memory = self._memory
        if memory is not None:
            return await memory.check(self.name, self._checks)
        assert self._storage is not None
        try:
            decision = await self._storage.check(self.name, self._checks)
        except StorageUnavailableError as exc:
            if not self._storage_down:
                self._storage_down = True
                logger.warning(
                    "outbound rate limit of %s not counted: the storage is unavailable (%s); "
                    "calls go unlimited until it answers",
                    self.name,
                    exc,
                )
            return None
        self._storage_down = False
        return decision

    async def acquire_within(self, budget: float) -> float:
        """Count one call, waiting until it fits if that takes at most ``budget`` seconds;
        returns the seconds slept.

        Raises:
            QuotaExhaustedError: it would not fit within ``budget``; nothing was counted.
        """

        async def left() -> float:
            decision = await self._decide()
            if decision is None or decision.allowed:
                return 0.0
            return max(decision.retry_after, 0.001)

        def refusal(wait: float) -> QuotaExhaustedError:
            return QuotaExhaustedError(
                f"Calls to {self.name} are over this client's rate limit "
                f"({'; '.join(str(limit) for limit in self.limits)}) for {wait:.3g}s.",
                extensions={"upstream": self.name, "reason": "rate_limit"},
                retry_after=wait,
            )

        return await _wait_within(self._clock, budget, left, refusal)

    def __repr__(self) -> str:
        limits = "; ".join(str(limit) for limit in self.limits)
        where = "shared" if self.shared else "memory"
        return f"OutboundLimiter(name={self.name!r}, limits={limits!r}, counted={where!r})"


async def _wait_within(
    clock: Clock,
    budget: float,
    left: Callable[[], Awaitable[float]],
    refusal: Callable[[float], QuotaExhaustedError],
) -> float:
    """Sleep until ``left()`` says 0 seconds remain; the seconds slept. Raises ``refusal(wait)``
    at once when the next wait would take the total past ``budget``."""
    slept = 0.0
    while True:
        wait = await left()
        if wait <= 0.0:
            return slept
        if wait > budget - slept:
            raise refusal(wait)
        await clock.sleep(wait)
        slept += wait
