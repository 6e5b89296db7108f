"""Retry with exponential backoff, jitter, a total deadline and an optional retry budget.

The first attempt costs one ``try`` around one ``await``: no clock read and no object of its
own (beyond the argument tuple), so a call that succeeds pays about a quarter of a microsecond.
Everything else (classification, backoff, deadlines, the budget, the hooks and the log line)
runs only after a failure.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import random as _random
from collections.abc import Awaitable, Callable, Collection
from datetime import timedelta
from typing import Any, Literal, ParamSpec, TypeVar

from fastapi_resilience._optional import exception_of
from fastapi_resilience._tally import RETRIES
from fastapi_resilience._text import printable
from fastapi_resilience.clock import SYSTEM_CLOCK, Clock
from fastapi_resilience.correlation._ids import get_correlation_id
from fastapi_resilience.events import EventBus, EventSource
from fastapi_resilience.exceptions import AppError, ConfigurationError, RetryExhaustedError
from fastapi_resilience.outbound._deadline import not_the_upstreams_failure
from fastapi_resilience.outbound._deadline import remaining as _request_remaining
from fastapi_resilience.outbound._retry_budget import RetryBudget, seconds

__all__ = [
    "DEFAULT_IDEMPOTENT_METHODS",
    "RETRY_ATTEMPT",
    "GiveupHook",
    "Jitter",
    "Retry",
    "RetryHook",
    "RetryPredicate",
    "default_retryable",
]

#: One INFO line per retry (attempt, wait, cause, correlation ID), and a failing hook's error.
logger = logging.getLogger("fastapi_resilience.retry")

P = ParamSpec("P")
T = TypeVar("T")

Jitter = bool | Literal["full", "equal", "decorrelated"]
RetryPredicate = Callable[[BaseException], bool]
#: ``on_retry(attempt, delay, error)``: before the wait of each retry; ``attempt`` is the number
#: of the attempt about to be made (2 for the first retry). Sync or async.
RetryHook = Callable[[int, float, BaseException], Awaitable[None] | None]
#: ``on_giveup(attempts, error)``: once, when retrying stops without a success. Sync or async.
GiveupHook = Callable[[int, BaseException], Awaitable[None] | None]

#: Methods that RFC 9110 defines as idempotent: repeating them has the effect of doing it once.
DEFAULT_IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})

#: Published (DEBUG) before each retry: one per retried attempt, never on a first attempt.
RETRY_ATTEMPT = "retry.attempt"

# Why a retry loop stopped, as given in RetryExhaustedError.extensions["reason"].
REASON_ATTEMPTS = "attempts"
REASON_DEADLINE = "deadline"
REASON_BUDGET = "retry_budget_exhausted"
#: The labels of the retry counts, by outcome.
_RETRIED, _EXHAUSTED, _BUDGET_EXHAUSTED = ("retried",), ("exhausted",), ("budget_exhausted",)

_REASON_TEXT = {
    REASON_ATTEMPTS: "every attempt failed",
    REASON_DEADLINE: "the next attempt would have started after the deadline",
    REASON_BUDGET: "the retry budget for this target is spent",
}


def default_retryable(exc: BaseException) -> bool:
    """What ``Retry()`` retries by default.

    An :class:`AppError` whose ``retryable`` is true (upstream errors and timeouts, 503s, a
    429 that carries ``Retry-After``), and httpx's transport errors (connect, read, timeout).
    Never a :class:`ClientError` or any other error.
    """
    if isinstance(exc, AppError):
        return exc.retryable
    return isinstance(exc, exception_of("httpx", "TransportError"))


def _types_predicate(types: tuple[type[BaseException], ...]) -> RetryPredicate:
    # A non-retryable AppError is retried only if one of the named types is a specific
    # AppError class that covers it: retry_on=Exception must not start retrying a 404.
    named_app_errors = tuple(t for t in types if issubclass(t, AppError) and t is not AppError)

    def predicate(exc: BaseException) -> bool:
        if not isinstance(exc, types):
            return False
        if isinstance(exc, AppError) and not exc.retryable:
            return isinstance(exc, named_app_errors)
        return True

    return predicate


def _as_predicate(
    retry_on: type[BaseException] | tuple[type[BaseException], ...] | RetryPredicate | None,
) -> RetryPredicate:
    if retry_on is None:
        return default_retryable
    if isinstance(retry_on, type):
        if issubclass(retry_on, BaseException):
            return _types_predicate((retry_on,))
        raise ConfigurationError(f"retry_on must be exception types, got {retry_on!r}")
    if isinstance(retry_on, tuple):
        if not retry_on or not all(
            isinstance(t, type) and issubclass(t, BaseException) for t in retry_on
        ):
            raise ConfigurationError("retry_on must be exception types or a predicate")
        return _types_predicate(retry_on)
    if callable(retry_on):
        return retry_on
    raise ConfigurationError(f"retry_on must be exception types or a predicate, got {retry_on!r}")


class Retry(EventSource):
    """Retries an async call with exponential backoff and jitter.

    ``await retry.call(fn, *args, **kwargs)``, or decorate an ``async def`` with ``@retry``.
    The n-th retry waits up to ``base_delay * 2 ** (n - 1)``, capped at ``max_delay``, spread
    by ``jitter``; a failure that carries ``retry_after`` (an :class:`AppError`, or a
    429/503 ``Retry-After`` from an upstream) is never retried sooner than that; if it asks
    for more than ``max_delay`` it is raised unchanged (an open breaker stays a
    :class:`CircuitOpenError` with its own ``Retry-After``).

    It stops, raising :class:`RetryExhaustedError` with the last error as ``__cause__`` and
    ``extensions = {"attempts": n, "reason": ...}``, when the attempts are spent, when the next
    attempt would start after ``deadline`` or after the current request's deadline, or when
    ``budget`` refuses a retry. An error it must not retry is re-raised unchanged.

    Args:
        attempts: total attempts, the first included (1 = no retry).
        base_delay: seconds before the first retry, before jitter.
        max_delay: cap of any single wait, in seconds.
        jitter: ``True`` or ``"full"`` (uniform in [0, delay]), ``"equal"`` (half fixed, half
            random), ``"decorrelated"`` (AWS's "decorrelated jitter"), ``False`` (none).
        deadline: total seconds for all attempts and waits; ``None`` means no limit of its own
            (the request's deadline still applies).
        retry_on: exception types, or a predicate ``(exc) -> bool``. By default
            :func:`default_retryable`. Types never widen to a non-retryable ``AppError``
            (a ``ClientError``) unless that error's own class, or a subclass of ``AppError``
            containing it, is named.
        budget: a :class:`RetryBudget` shared by every call to one target; a call counts in it
            when its first attempt ends, unless the caller's own deadline ended that attempt.
        idempotent_methods: HTTP methods that may be retried (used by the httpx transport).
        retry_non_idempotent: also retry other methods (POST, PATCH); off by default.
        name: names this policy in errors and events.
        clock: injectable time (``monotonic`` and ``sleep``).
        random: a ``() -> float in [0, 1)`` source for jitter.
        events: where ``retry.attempt`` events go (each retry, at DEBUG level), and the bus
            given to ``budget`` if it has none; by default the shared bus that logs them.
        on_retry: ``(attempt, delay, error)``, sync or async, called before each retry's wait:
            ``attempt`` is the number of the attempt about to be made (2 for the first retry),
            ``delay`` the seconds it will wait, ``error`` what the previous attempt raised.
        on_giveup: ``(attempts, error)``, sync or async, called once when retrying stops
            without a success (attempts spent, a deadline, the budget, a ``retry_after`` longer
            than ``max_delay``, or a later attempt's error it does not retry): ``attempts`` made,
            ``error`` the last attempt's. Not called when the first attempt's error is not one
            it retries. A hook that raises is logged and changes nothing.

    Each retry also writes one INFO line on the ``fastapi_resilience.retry`` logger: its name,
    the attempt about to be made, the wait, the cause (escaped) and the correlation ID.

    Raises:
        ConfigurationError: an argument is out of range.

    .. versionadded:: 0.1.0
    """

    __slots__ = (
        "_budget",
        "_clock",
        "_jitter",
        "_predicate",
        "_random",
        "attempts",
        "base_delay",
        "deadline",
        "idempotent_methods",
        "max_delay",
        "name",
        "on_giveup",
        "on_retry",
        "retry_non_idempotent",
    )

    def __init__(
        self,
        attempts: int = 3,
        *,
        base_delay: float | timedelta = 0.1,
        max_delay: float | timedelta = 10.0,
        jitter: Jitter = True,
        deadline: float | timedelta | None = None,
        retry_on: type[BaseException]
        | tuple[type[BaseException], ...]
        | RetryPredicate
        | None = None,
        budget: RetryBudget | None = None,
        idempotent_methods: Collection[str] = DEFAULT_IDEMPOTENT_METHODS,
        retry_non_idempotent: bool = False,
        name: str = "retry",
        clock: Clock = SYSTEM_CLOCK,
        random: Callable[[], float] = _random.random,
        events: EventBus | None = None,
        on_retry: RetryHook | None = None,
        on_giveup: GiveupHook | None = None,
    ) -> None:
        for hook_name, hook in (("on_retry", on_retry), ("on_giveup", on_giveup)):
            if hook is not None and not callable(hook):
                raise ConfigurationError(f"{hook_name} must be a callable, got {hook!r}")
        if not isinstance(attempts, int) or isinstance(attempts, bool) or attempts < 1:
            raise ConfigurationError(f"attempts must be an int >= 1, got {attempts!r}")
        if jitter not in (True, False, "full", "equal", "decorrelated"):
            raise ConfigurationError(
                f"jitter must be True, False, 'full', 'equal' or 'decorrelated', got {jitter!r}"
            )
        self.attempts = attempts
        self.base_delay = seconds(base_delay, "base_delay") or 0.0
        self.max_delay = seconds(max_delay, "max_delay") or 0.0
        if self.max_delay < self.base_delay:
            raise ConfigurationError(
                f"max_delay ({self.max_delay}) must be >= base_delay ({self.base_delay})"
            )
        self.deadline = seconds(deadline, "deadline")
        self._jitter: str | None = "full" if jitter is True else (jitter or None)
        self._predicate = _as_predicate(retry_on)
        if budget is not None and events is not None and budget._events is None:
            budget.events = events
        self._budget = budget
        self._events = events
        self.idempotent_methods = frozenset(m.upper() for m in idempotent_methods)
        self.retry_non_idempotent = retry_non_idempotent
        self.name = name
        self._clock = clock
        self._random = random
        self.on_retry = on_retry
        self.on_giveup = on_giveup

    @property
    def budget(self) -> RetryBudget | None:
        return self._budget

    def allows_method(self, method: str) -> bool:
        """Whether a request with this HTTP method may be retried."""
        return self.retry_non_idempotent or method.upper() in self.idempotent_methods

    def is_retryable(self, exc: BaseException) -> bool:
        """Whether ``exc`` is a failure this policy retries (before attempts and budget)."""
        return self._predicate(exc)

    async def call(self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """``await fn(*args, **kwargs)``, retried on retryable failures.

        Raises:
            RetryExhaustedError: retrying stopped; the last error is ``__cause__``.
            Exception: an error that is not retried, unchanged.
        """
        budget = self._budget
        started = None if self.deadline is None else self._clock.monotonic()
        try:
            result = await fn(*args, **kwargs)
        except Exception as exc:
            if budget is not None and not not_the_upstreams_failure(exc):
                budget.record_call()
            return await self._retry(exc, started, fn, args, kwargs)
        if budget is not None:
            budget.record_call()
        return result

    def __call__(self, fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
        """Use as a decorator: every call of ``fn`` goes through :meth:`call`."""

        @functools.wraps(fn)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
            return await self.call(fn, *args, **kwargs)

        return wrapper

    def backoff(self, retry_number: int, previous: float) -> float:
        """The wait before retry ``retry_number`` (1-based), before ``retry_after``."""
        if self._jitter == "decorrelated":
            # min(cap, uniform(base, previous * 3)), previous starting at base_delay.
            upper = max(self.base_delay, previous * 3)
            return min(self.max_delay, self.base_delay + self._random() * (upper - self.base_delay))
        delay = min(self.max_delay, self.base_delay * 2.0 ** (retry_number - 1))
        if self._jitter == "full":
            return self._random() * delay
        if self._jitter == "equal":
            return delay / 2 + self._random() * delay / 2
        return delay

    async def _retry(
        self,
        exc: Exception,
        started: float | None,
        fn: Callable[..., Awaitable[T]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> T:
        last = exc
        attempt = 1
        previous = self.base_delay
        clock = self._clock
        while True:
            if not self._predicate(last):
                if attempt > 1:
                    await self._gave_up(attempt, last)
                raise last
            retry_after = getattr(last, "retry_after", None)
            if not isinstance(retry_after, int | float) or math.isnan(retry_after):
                retry_after = None
            elif retry_after > self.max_delay:
                # It says when to come back and we will not wait that long: pass it on as it
                # is, so an open breaker stays a 503 with its own Retry-After.
                await self._gave_up(attempt, last)
                raise last
            reason = None
            if attempt >= self.attempts:
                reason = REASON_ATTEMPTS
            else:
                delay = previous = self.backoff(attempt, previous)
                if retry_after is not None:
                    delay = max(delay, float(retry_after))
                if self._too_late(delay, started):
                    reason = REASON_DEADLINE
                elif self._budget is not None and not self._budget.try_spend():
                    reason = REASON_BUDGET
            if reason is not None:
                exhausted = self._exhausted(attempt, reason)
                await self._gave_up(attempt, last)
                raise exhausted from last
            RETRIES.add(_RETRIED)
            self.events.emit(
                RETRY_ATTEMPT,
                self.name,
                level=logging.DEBUG,
                attempt=attempt + 1,
                delay=round(delay, 3),
                error=type(last).__name__,
            )
            self._log_retry(attempt + 1, delay, last)
            if self.on_retry is not None:
                await self._run_hook(self.on_retry, attempt + 1, delay, last)
            await clock.sleep(delay)
            attempt += 1
            try:
                return await fn(*args, **kwargs)
            except Exception as next_exc:
                last = next_exc

    def _log_retry(self, attempt: int, delay: float, error: BaseException) -> None:
        """The INFO line of one retry; the cause and the name may come from the upstream, so
        they are escaped."""
        if not logger.isEnabledFor(logging.INFO):
            return
        correlation_id = get_correlation_id() or "-"
        logger.info(
            "retry %s attempt=%d/%d wait=%.3fs cause=%s correlation_id=%s",
            printable(self.name),
            attempt,
            self.attempts,
            delay,
            printable(f"{type(error).__name__}: {error}"),
            printable(correlation_id),
            extra={"correlation_id": correlation_id},
        )

    async def _gave_up(self, attempts: int, error: BaseException) -> None:
        if self.on_giveup is not None:
            await self._run_hook(self.on_giveup, attempts, error)

    async def _run_hook(self, hook: Callable[..., Any], *args: Any) -> None:
        """Call a hook, awaiting what it returns if it must; whatever it raises is logged and
        ends there: a hook never changes the call's outcome."""
        try:
            result = hook(*args)
            if inspect.isawaitable(result):
                await result
        except Exception:
            logger.exception(
                "retry %s: hook %s failed",
                printable(self.name),
                printable(getattr(hook, "__qualname__", repr(hook))),
                extra={"correlation_id": get_correlation_id() or "-"},
            )

    def _too_late(self, delay: float, started: float | None) -> bool:
        left = _request_remaining()
        if left is not None and left <= delay:
            return True
        if started is not None and self.deadline is not None:
            return self._clock.monotonic() + delay >= started + self.deadline
        return False

    def _exhausted(self, attempts: int, reason: str) -> RetryExhaustedError:
        RETRIES.add(_BUDGET_EXHAUSTED if reason == REASON_BUDGET else _EXHAUSTED)
        return RetryExhaustedError(
            f"Gave up after {attempts} attempt{'s' if attempts > 1 else ''}: "
            f"{_REASON_TEXT[reason]}.",
            extensions={"attempts": attempts, "reason": reason},
        )

    def __repr__(self) -> str:
        return (
            f"Retry(attempts={self.attempts}, base_delay={self.base_delay}, "
            f"max_delay={self.max_delay}, jitter={self._jitter or False!r}, "
            f"deadline={self.deadline}, name={self.name!r})"
        )
