"""Limit strings in the slowapi / ``limits`` syntax (``"10/minute"``, ``"100 per 2 hours"``),
and the contract of the storages that count them.

The contract (``LimitCheck``, ``LimitState``, ``Decision``, ``RateLimitStorage``) sits here, a
layer below both ``ratelimit`` (the server's limiter and its storages) and ``outbound`` (the HTTP
client's outbound limit), so that either can hand the other's storage its checks (ADR 0069).
``fastapi_resilience.ratelimit`` exports the same objects.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol, runtime_checkable

from fastapi_resilience.exceptions import ConfigurationError

__all__ = [
    "RESOLUTION",
    "Decision",
    "Limit",
    "LimitCheck",
    "LimitState",
    "RateLimitStorage",
    "parse_limit",
    "parse_limits",
]

_UNITS = {
    "second": 1,
    "minute": 60,
    "hour": 3600,
    "day": 86400,
    "month": 30 * 86400,
    "year": 365 * 86400,
}
_LIMIT = re.compile(
    r"\s*(?P<amount>\d+)\s*(?:/|\s+per\s+)\s*(?P<multiple>\d+)?\s*"
    r"(?P<unit>second|minute|hour|day|month|year)s?\s*",
    re.IGNORECASE,
)
_SEPARATORS = re.compile(r"[;,|]")


@dataclass(frozen=True, slots=True)
class Limit:
    """``amount`` requests (or cost units) per ``period`` seconds."""

    amount: int
    period: int

    def __str__(self) -> str:
        for unit, seconds in reversed(_UNITS.items()):
            if self.period % seconds == 0:
                multiple = self.period // seconds
                return (
                    f"{self.amount}/{unit}"
                    if multiple == 1
                    else (f"{self.amount} per {multiple} {unit}s")
                )
        return f"{self.amount} per {self.period} seconds"  # pragma: no cover - seconds divide all

    @property
    def policy_name(self) -> str:
        """A short token for headers: ``"100-60s"``."""
        return f"{self.amount}-{self.period}s"


#: The longest amount or multiple a limit string may hold (a billion billions).
_MAX_DIGITS = 18


def parse_limit(text: str) -> Limit:
    """Parse one limit string; raises ``ConfigurationError`` naming the string."""
    match = _LIMIT.fullmatch(text)
    if match is None:
        raise ConfigurationError(
            f"invalid limit string {text!r}: expected e.g. '10/minute' or '100 per 2 hours'"
        )
    digits = match["amount"], match["multiple"] or "1"
    if any(len(d.lstrip("0")) > _MAX_DIGITS for d in digits):
        # int() refuses very long numbers with a bare ValueError; no limit needs them.
        raise ConfigurationError(
            f"invalid limit string {text[:80]!r}: numbers of at most {_MAX_DIGITS} digits"
        )
    amount, multiple = int(digits[0]), int(digits[1])
    if amount < 1 or multiple < 1:
        raise ConfigurationError(f"invalid limit string {text!r}: amount and period must be >= 1")
    return Limit(amount, multiple * _UNITS[match["unit"].lower()])


def parse_limits(text: str) -> tuple[Limit, ...]:
    """Parse one or more limits separated by ``;`` (or ``,``): ``"10/second; 300/hour"``."""
    parts = [p for p in _SEPARATORS.split(text) if p.strip()]
    if not parts:
        raise ConfigurationError(f"invalid limit string {text!r}: no limit in it")
    return tuple(parse_limit(p) for p in parts)


#: Buckets per period: a unit is held at most ``period / RESOLUTION`` longer than a perfect log.
RESOLUTION = 60


@dataclass(frozen=True, slots=True)
class LimitCheck:
    """One limit that applies to a request.

    ``key`` names what is counted, scoped by identity but without the storage prefix, for
    example ``"tier:premium:key:abc"`` or ``"route:/login:ip:1.2.3.4"``; the storage adds the
    prefix, the identity hash tag and the limit's policy name. ``cost`` is how many units the
    request uses. A ``shadow`` limit is report-only: it is counted and reported, it never
    refuses, and it never blocks the other limits.
    """

    key: str
    limit: Limit
    cost: int = 1
    shadow: bool = False
    #: ``"{key}@{amount}/{period}"``: the memory storage's key for this limit, built once (a
    #: string caches its hash; a tuple would hash its items on every lookup).
    window_key: str = field(init=False, repr=False, compare=False)
    #: ``limit.amount``, ``limit.period`` and the bucket width, read once per request each:
    #: one attribute read instead of two (the memory storage runs on every request).
    amount: int = field(init=False, repr=False, compare=False)
    period: int = field(init=False, repr=False, compare=False)
    width: float = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.cost < 1:
            raise ConfigurationError(f"rate-limit cost must be >= 1, got {self.cost!r}")
        limit = self.limit
        object.__setattr__(self, "window_key", f"{self.key}@{limit.amount}/{limit.period}")
        object.__setattr__(self, "amount", limit.amount)
        object.__setattr__(self, "period", limit.period)
        object.__setattr__(self, "width", limit.period / RESOLUTION)


class LimitState(NamedTuple):
    """The outcome of one ``LimitCheck``.

    ``allowed`` says whether this limit alone would admit the request. ``remaining`` is what is
    left of the limit after this call (unchanged when the request as a whole was refused, since
    then nothing was counted); never below 0. ``reset_after`` is the number of seconds until
    the oldest counted unit leaves the window and frees room (0.0 when nothing is counted).
    ``retry_after`` is the number of seconds until this limit would admit the request (0.0 when
    it admits it; the full period when ``cost`` exceeds the limit and it never will).
    """

    check: LimitCheck
    allowed: bool
    remaining: int
    reset_after: float
    retry_after: float


class Decision(NamedTuple):
    """The verdict on all limits of one request, states in the order the checks were given.

    ``allowed`` is true when every non-shadow limit admits the request; then every limit,
    shadow ones included, was counted. Otherwise nothing was counted. ``degraded`` is true when
    the answer came from a per-instance fallback limiter because the shared storage was down.
    """

    allowed: bool
    states: tuple[LimitState, ...]
    degraded: bool = False

    @property
    def retry_after(self) -> float:
        """Seconds until every refusing non-shadow limit would admit the request (0.0: now)."""
        wait = 0.0
        for state in self.states:
            if not state.allowed and not state.check.shadow and state.retry_after > wait:
                wait = state.retry_after
        return wait


@runtime_checkable
class RateLimitStorage(Protocol):
    """Where counts live. One ``check`` call decides and counts all limits atomically."""

    async def check(self, identity_tag: str, checks: Sequence[LimitCheck]) -> Decision:
        """Decide and count ``checks`` atomically, in one round trip for remote storages.

        ``identity_tag`` becomes the Redis Cluster hash tag, so every key of one call lives
        in one slot. Raises ``StorageUnavailableError`` when the storage cannot answer.
        """
        ...

    async def ping(self) -> bool:
        """True when the storage answers."""
        ...

    async def aclose(self) -> None:
        """Release connections; the storage is not used afterwards."""
        ...
