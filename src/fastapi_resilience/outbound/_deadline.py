"""Timeouts and the per-request deadline that outbound calls inherit.

A request gets one time budget (``deadline(seconds)``, set by ``RequestDeadlineMiddleware``
or a dependency); every guarded call inside it takes ``min(its own timeout, what is left)``,
never a fresh budget, so a chain of calls cannot outlive the request.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Awaitable, Mapping
from contextlib import asynccontextmanager
from contextvars import ContextVar
from datetime import timedelta
from types import TracebackType
from typing import Any, TypeVar

from fastapi_resilience._optional import exception_of
from fastapi_resilience.clock import SYSTEM_CLOCK, Clock
from fastapi_resilience.exceptions import (
    ConfigurationError,
    DeadlineCutError,
    RetryExhaustedError,
    UpstreamTimeoutError,
)

__all__ = [
    "DEADLINE_EXCEEDED_DETAIL",
    "Deadline",
    "DeadlineCutError",
    "DeadlineScope",
    "current_deadline",
    "deadline",
    "not_the_upstreams_failure",
    "remaining",
    "timeout",
    "timeout_error",
    "to_seconds",
    "with_timeout",
]

T = TypeVar("T")

#: The ``detail`` of the error raised when the request's deadline, not a call's own
#: timeout, ran out.
DEADLINE_EXCEEDED_DETAIL = "The request's deadline ran out before the upstream answered."


class Deadline:
    """An absolute point on a clock's monotonic time line by which the request must be done.

    ``from_client`` is true when the client chose this deadline (a header shorter than the
    server's budget): a call it cuts says nothing about the upstream.
    """

    __slots__ = ("_outer", "_scope", "at", "clock", "from_client")

    def __init__(
        self,
        at: float,
        clock: Clock = SYSTEM_CLOCK,
        *,
        from_client: bool = False,
        outer: Deadline | None = None,
        scope: DeadlineScope | None = None,
    ) -> None:
        self.at = at
        self.clock = clock
        self.from_client = from_client
        #: The deadline this one replaced when its scope set it, put back when that exits.
        #: The links from the current deadline are the task's entered scopes, innermost first.
        self._outer = outer
        #: The scope whose entry set it.
        self._scope = scope

    def remaining(self) -> float:
        """Seconds left, never below 0."""
        return max(0.0, self.at - self.clock.monotonic())

    def __repr__(self) -> str:
        return f"Deadline(remaining={self.remaining():.3f}s, from_client={self.from_client})"


_DEADLINE: ContextVar[Deadline | None] = ContextVar("fastapi_resilience.deadline", default=None)


def current_deadline() -> Deadline | None:
    """The deadline of the current request (or task), ``None`` when none is set."""
    return _DEADLINE.get()


def remaining() -> float | None:
    """Seconds left of the current request's deadline; ``None`` when no deadline is set.

    .. versionadded:: 0.1
    """
    current = _DEADLINE.get()
    return None if current is None else current.remaining()


def to_seconds(value: float | timedelta | None) -> float | None:
    """Seconds as a float (a ``timedelta`` converted); ``None`` stays ``None``."""
    if value is None:
        return None
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


def _check_seconds(value: float | timedelta | None, argument: str) -> float | None:
    seconds = to_seconds(value)
    if seconds is not None and (math.isnan(seconds) or seconds < 0):
        raise ConfigurationError(f"{argument} must be >= 0 seconds or None, got {value!r}")
    return seconds


def deadline(
    seconds: float | timedelta | None,
    *,
    clock: Clock = SYSTEM_CLOCK,
    from_client: bool = False,
) -> DeadlineScope:
    """Give the code inside a deadline ``seconds`` from now; nested deadlines only shrink.

    Works with ``with`` and with ``async with``. An inner ``deadline(10)`` inside an outer one
    with 2 s left keeps the 2 s: a callee never gets more time than its caller has. ``None``
    keeps whatever is already set. ``from_client=True`` says the client chose this deadline
    (as ``RequestDeadlineMiddleware`` does for a shorter ``X-Request-Timeout``): a call it
    cuts is not counted against the upstream by any breaker.

    Raises:
        ConfigurationError: ``seconds`` is negative or NaN.
    """
    return DeadlineScope(_check_seconds(seconds, "deadline seconds"), clock, from_client)


class DeadlineScope:
    """What :func:`deadline` returns: sets the deadline on entry, restores the outer on exit.

    Both forms set the same context variable in the current task, so ``async with`` costs
    nothing more than ``with``. One scope may be entered by many tasks at once and nested in
    itself (``FIVE = deadline(5)`` at module level, ``async with FIVE:`` in every handler):
    each entry starts its own deadline from the time it is entered, and each exit puts back
    the deadline that its own entry replaced in its own task. The scope keeps no state of its
    own between entry and exit: each deadline it sets names it and links to the one it
    replaced, so a task's current deadline leads through the scopes the task has entered.

    Exits may come out of order: an async generator with a deadline of its own runs in the
    task that iterates it and may be left suspended inside it while the caller's scope exits.
    The caller's exit then puts back what the caller had, dropping the generator's deadline
    too, and the generator's later exit, finding nothing of its own, changes nothing. Only a
    scope entered both by such a generator and by its caller cannot tell the two entries apart
    (its exit takes the innermost): give the generator a ``deadline()`` of its own.
    """

    __slots__ = ("_clock", "_from_client", "_seconds")

    def __init__(self, seconds: float | None, clock: Clock, from_client: bool) -> None:
        self._seconds = seconds
        self._clock = clock
        self._from_client = from_client

    def __enter__(self) -> Deadline | None:
        outer = _DEADLINE.get()
        seconds = self._seconds
        if seconds is None:
            return outer
        now = self._clock.monotonic()
        at, from_client = now + seconds, self._from_client
        if outer is not None:
            # Compare on one time line: the outer deadline may use another clock.
            left = outer.remaining()
            if left <= seconds:
                # The outer deadline is the one that will cut: whoever chose it still owns it.
                at, from_client = now + left, outer.from_client
        current = Deadline(at, self._clock, from_client=from_client, outer=outer, scope=self)
        _DEADLINE.set(current)
        return current

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._seconds is None:
            return  # entering set nothing
        # This scope's innermost entry in this task is the one exiting (a scope nested in
        # itself exits innermost first). Usually it set the current deadline; out of order,
        # deadlines set since (a suspended generator's) go with it.
        mine = _DEADLINE.get()
        while mine is not None and mine._scope is not self:
            mine = mine._outer
        if mine is not None:
            _DEADLINE.set(mine._outer)
        # else: entered in another task, or already dropped by an exit out of order.

    async def __aenter__(self) -> Deadline | None:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)


def effective_timeout(seconds: float | None) -> tuple[float | None, bool]:
    """``min(seconds, remaining())`` and whether the request's deadline is the tighter bound."""
    left = remaining()
    if left is None:
        return seconds, False
    if seconds is None or left < seconds:
        return left, True
    return seconds, False


def timeout_error(
    detail: str,
    *,
    started: bool,
    by_deadline: bool,
    extensions: Mapping[str, Any] | None = None,
) -> UpstreamTimeoutError:
    """The error for a call that ran out of time.

    A :class:`DeadlineCutError` when the call never started, or when the request's deadline
    was the tighter bound and the client chose it; otherwise an :class:`UpstreamTimeoutError`,
    which breakers count.
    """
    current = _DEADLINE.get()
    if not started or (by_deadline and current is not None and current.from_client):
        return DeadlineCutError(detail, extensions=extensions)
    return UpstreamTimeoutError(detail, extensions=extensions)


def not_the_upstreams_failure(exc: BaseException) -> bool:
    """Whether ``exc`` ended a call for the caller's reasons, not the upstream's.

    True for a :class:`DeadlineCutError` and for a ``RetryExhaustedError`` that chains one.
    Under a deadline the client chose, also for any error raised once it has run out, and for
    a timeout this library did not judge (a ``TimeoutError`` that is not an
    :class:`UpstreamTimeoutError`, an ``httpx.TimeoutException``) while time is left: a
    driver's timeout set from ``remaining()``, less a margin to answer in, ends before the
    deadline does and says no more than ours does. Breakers skip such outcomes.
    """
    if isinstance(exc, DeadlineCutError):
        return True
    cause = exc.__cause__ if isinstance(exc, RetryExhaustedError) else None
    if isinstance(cause, DeadlineCutError):
        return True
    current = _DEADLINE.get()
    if current is None or not current.from_client:
        return False
    return current.remaining() <= 0.0 or _unjudged_timeout(exc) or _unjudged_timeout(cause)


def _unjudged_timeout(exc: BaseException | None) -> bool:
    """A timeout raised by other code: the library's own say whose bound was tighter."""
    return isinstance(
        exc, (TimeoutError, exception_of("httpx", "TimeoutException"))
    ) and not isinstance(exc, UpstreamTimeoutError)


@asynccontextmanager
async def timeout(seconds: float | timedelta | None) -> AsyncIterator[None]:
    """Run the block for at most ``min(seconds, remaining())``; ``None`` means no own limit.

    On expiry the block is cancelled and :class:`UpstreamTimeoutError` (also a
    ``TimeoutError``) is raised. When the deadline has already run out, the block does not
    start at all (a :class:`DeadlineCutError`, as when a deadline the client chose cuts it).
    A ``TimeoutError`` raised by the block itself passes through unchanged.

    Raises:
        UpstreamTimeoutError: the time ran out.
        ConfigurationError: ``seconds`` is negative or NaN.
    """
    seconds = _check_seconds(seconds, "timeout seconds")
    limit, by_deadline = effective_timeout(seconds)
    if limit is None:
        yield
        return
    if limit <= 0:
        raise timeout_error(
            DEADLINE_EXCEEDED_DETAIL if by_deadline else "Timed out before the call started.",
            started=False,
            by_deadline=by_deadline,
            extensions={"timeout": seconds},
        )
    cm = asyncio.timeout(limit)
    try:
        async with cm:
            yield
    except TimeoutError as exc:
        if not cm.expired():
            raise
        detail = DEADLINE_EXCEEDED_DETAIL if by_deadline else f"Timed out after {limit:g}s."
        raise timeout_error(
            detail, started=True, by_deadline=by_deadline, extensions={"timeout": round(limit, 3)}
        ) from exc


async def with_timeout(awaitable: Awaitable[T], seconds: float | timedelta | None) -> T:
    """``await awaitable`` for at most ``min(seconds, remaining())``.

    Raises:
        UpstreamTimeoutError: the time ran out (the awaitable is cancelled).
    """
    try:
        async with timeout(seconds):
            return await awaitable
    finally:
        # A coroutine that never started (the deadline was already spent) must still be
        # closed, or Python warns that it was never awaited.
        close = getattr(awaitable, "close", None)
        if close is not None and asyncio.iscoroutine(awaitable):
            close()
