"""The rate-limit engine's types and algorithm, shared by every storage.

The storage contract (``LimitCheck``, ``LimitState``, ``Decision``, ``RateLimitStorage`` and
``RESOLUTION``) lives in ``fastapi_resilience._limits``, a layer below both ``ratelimit`` and
``outbound``, so that the HTTP client can count its outbound limit in a storage too (ADR 0069);
it is imported here under the names it always had.

The algorithm is a *bucketed sliding log* (see ``adr/0010-rate-limit-algorithm.md``): each limit
keeps the requests it admitted in at most ``RESOLUTION + 1`` time buckets of width
``period / RESOLUTION``, and a request is admitted when the requests still held plus its cost fit
in the limit. A request is held until the end of its bucket plus the period, so it is never
forgotten before a full period has passed: no window of ``period`` seconds ever contains more
than ``amount`` admitted units. The price is precision, not safety: a unit may be held up to one
bucket width (1/60 of the period) longer than a perfect sliding log would hold it.

Memory per identity and limit is bounded by ``min(amount, RESOLUTION + 1)`` buckets whatever the
limit, and Redis does O(1) amortised work per check.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Protocol, runtime_checkable

from fastapi_resilience._limits import (
    RESOLUTION,
    Decision,
    Limit,
    LimitCheck,
    LimitState,
    RateLimitStorage,
)
from fastapi_resilience.exceptions import ConfigurationError, StorageUnavailableError

__all__ = [
    "DEFAULT_STORAGE_TIMEOUT",
    "RESOLUTION",
    "Decision",
    "IdentityStateStorage",
    "LimitCheck",
    "LimitState",
    "LocalStorage",
    "RateLimitStorage",
    "StorageUnavailableError",
    "bucket_width",
    "positive_seconds",
    "supports_identity_state",
]

#: Seconds a storage call may take before it counts as unavailable (contract: at most 0.25).
DEFAULT_STORAGE_TIMEOUT = 0.25


def positive_seconds(value: float | timedelta, name: str) -> float:
    """``value`` in seconds (a ``timedelta`` is accepted); ConfigurationError unless > 0."""
    seconds = value.total_seconds() if isinstance(value, timedelta) else value
    if not seconds or seconds <= 0:
        raise ConfigurationError(f"{name} must be > 0 seconds, got {value!r}")
    return float(seconds)


def bucket_width(limit: Limit) -> float:
    """The width in seconds of one time bucket of ``limit`` (``period / RESOLUTION``)."""
    return limit.period / RESOLUTION


def bucket_width_ms(limit: Limit) -> int:
    """The bucket width in whole milliseconds, as the Redis script uses it (at least 1)."""
    return max(1, (limit.period * 1000) // RESOLUTION)


# Both are named tuples: immutable, and built in C (``tuple.__new__``) on the request path,
# about half the cost of a frozen dataclass, whose ``__init__`` goes through
# ``object.__setattr__`` field by field.
_tuple_new = tuple.__new__


def new_state(
    check: LimitCheck, allowed: bool, remaining: int, reset_after: float, retry_after: float
) -> LimitState:
    """``LimitState(check, allowed, remaining, reset_after, retry_after)``, built faster."""
    return _tuple_new(LimitState, (check, allowed, remaining, reset_after, retry_after))


def new_decision(allowed: bool, states: tuple[LimitState, ...]) -> Decision:
    """``Decision(allowed, states)``, built faster."""
    return _tuple_new(Decision, (allowed, states, False))


def admitted_decision(check: LimitCheck, admitted: tuple[int, float]) -> Decision:
    """The ``Decision`` of one limit that admitted a request, from what ``try_admit`` returns:
    ``(remaining, reset_after)``."""
    state = new_state(check, True, admitted[0], admitted[1], 0.0)
    return new_decision(True, (state,))


@runtime_checkable
class LocalStorage(Protocol):
    """A storage that answers without awaiting (its counts are in this process).

    The limiter calls these instead of ``check`` on every request: no coroutine for a decision
    that never waits. A storage that has them is asked only through them: a subclass of
    ``MemoryStorage`` that changes the answers (a test double for an outage) overrides
    ``try_admit`` and ``check_many``, which may raise ``StorageUnavailableError`` as ``check``
    may.
    """

    def try_admit(self, check: LimitCheck) -> tuple[int, float] | None:
        """Count a request of one enforced limit when it is admitted: its units left and seconds
        to reset; ``None``, with nothing counted, when it is not."""
        ...

    def check_many(self, checks: Sequence[LimitCheck]) -> Decision:
        """``check``, answered at once."""
        ...


@runtime_checkable
class IdentityStateStorage(Protocol):
    """A storage that can show and forget one identity's counts (the admin API's, never a
    request's): optional, so a custom storage without it still limits requests.

    Both take the ``identity_tag`` and ``checks`` that ``check`` takes for that identity; the
    checks' ``cost`` and ``shadow`` do not change which counters they name.
    """

    async def peek(self, identity_tag: str, checks: Sequence[LimitCheck]) -> list[LimitState]:
        """The state of each of ``checks`` now, in their order, counting nothing and creating
        nothing: ``remaining`` is what is left before this request, ``reset_after`` 0.0 and
        ``remaining`` the whole limit when nothing is counted. Raises
        ``StorageUnavailableError`` when the storage cannot answer."""
        ...

    async def reset(self, identity_tag: str, checks: Sequence[LimitCheck]) -> int:
        """Remove the counters of ``checks``; returns how many held units (the others did not
        exist). Raises ``StorageUnavailableError`` when the storage cannot answer."""
        ...


def supports_identity_state(storage: object) -> bool:
    """Whether ``storage`` has ``peek`` and ``reset``. A wrapper (``GuardedStorage``) says so
    itself with a ``supports_identity_state`` attribute: it has the methods whether or not the
    storage it wraps does."""
    declared = getattr(storage, "supports_identity_state", None)
    if declared is not None:
        return bool(declared)
    return isinstance(storage, IdentityStateStorage)
