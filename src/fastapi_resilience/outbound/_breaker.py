"""Circuit breakers: stop calling an upstream that keeps failing, and try it again carefully.

States: ``"closed"`` (calls pass, outcomes are counted), ``"open"`` (calls fail at once with
``CircuitOpenError``), ``"half_open"`` (at most ``half_open_max_calls`` trial calls at once;
``success_threshold`` successes close it, one failure opens it again).

Everything runs on one event loop with no lock: between reading the state and changing it
there is never an ``await``, so the checks and the counts are exact under any concurrency.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from contextvars import ContextVar
from datetime import timedelta
from types import TracebackType
from typing import Any, Literal, ParamSpec, Protocol, TypeVar, runtime_checkable

from fastapi_resilience.clock import SYSTEM_CLOCK, Clock
from fastapi_resilience.events import EventBus, EventSource
from fastapi_resilience.exceptions import (
    CircuitOpenError,
    ClientError,
    ConfigurationError,
)
from fastapi_resilience.health._checks import CheckResult
from fastapi_resilience.outbound._adaptive_throttle import refused_here
from fastapi_resilience.outbound._breaker_window import (
    CountWindowState,
    SlidingWindow,
    TimeWindowState,
    WindowCounts,
)
from fastapi_resilience.outbound._deadline import not_the_upstreams_failure, to_seconds

__all__ = [
    "CLOSED",
    "EVENT_KINDS",
    "HALF_OPEN",
    "OPEN",
    "BreakerListener",
    "BreakerPermit",
    "BreakerRegistry",
    "BreakerState",
    "BreakerStateStore",
    "CircuitBreaker",
    "TrialVerdict",
    "breaker_health_check",
    "default_registry",
    "get_breaker",
    "holds_calls_back",
]

P = ParamSpec("P")
T = TypeVar("T")

BreakerState = Literal["closed", "open", "half_open"]
CLOSED: BreakerState = "closed"
OPEN: BreakerState = "open"
HALF_OPEN: BreakerState = "half_open"

#: ``listener(breaker, old_state, new_state)``, called once per state change.
BreakerListener = Callable[["CircuitBreaker", BreakerState, BreakerState], None]

#: Detail of the error raised while open; tests assert on it.
CIRCUIT_OPEN_DETAIL = "Circuit {name!r} is open; the call was not made."
HALF_OPEN_FULL_DETAIL = "Circuit {name!r} is half-open and its trial calls are taken."

#: The event published on entering each state.
EVENT_KINDS: dict[BreakerState, str] = {
    OPEN: "breaker.opened",
    HALF_OPEN: "breaker.half_open",
    CLOSED: "breaker.closed",
}

_DEFAULT_FAILURE_THRESHOLD = 5
_UNSET: Any = object()

logger = logging.getLogger("fastapi_resilience.breaker")


#: What a shared store says about a half-open trial: ``"granted"`` (run it), ``"full"``
#: (the trial permits are taken), ``"open"`` / ``"closed"`` (the shared state moved on),
#: ``"local"`` (the store is unreachable: decide locally).
TrialVerdict = Literal["granted", "full", "open", "closed", "local"]


@runtime_checkable
class BreakerStateStore(Protocol):
    """Keeps a breaker's state somewhere shared (Redis), so every instance sees one breaker.

    In the closed state the breaker decides locally and only tells the store (without
    waiting) about failures and transitions; the store refreshes its view in the background
    and makes the breaker :meth:`CircuitBreaker.adopt` a shared state that moved. Half-open
    trial permits are granted by the store, so they are counted across instances.
    """

    def attach(self, breaker: CircuitBreaker) -> None: ...

    def before_call(self, breaker: CircuitBreaker) -> None: ...

    def on_local_failure(self, breaker: CircuitBreaker) -> None: ...

    def on_local_success(self, breaker: CircuitBreaker) -> None: ...

    def on_transition(
        self, breaker: CircuitBreaker, old: BreakerState, new: BreakerState
    ) -> None: ...

    async def acquire_trial(self, breaker: CircuitBreaker) -> TrialVerdict: ...

    async def trial_result(self, breaker: CircuitBreaker, failure: bool | None) -> None: ...


def _default_is_failure(exc: BaseException) -> bool:
    # httpx.HTTPStatusError from ``raise_for_status()``: a 4xx answer is the caller's fault,
    # not a sign of a sick upstream.
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    return not (isinstance(status, int) and status < 500)


#: An admitted call: the generation it was admitted in, whether it holds a half-open trial
#: permit, when it started (``0.0`` unless timed) and whether a shared store granted it.
_Ticket = tuple[int, bool, float, bool]


def _check_parameters(
    name: str,
    failure_threshold: int | None,
    recovery_timeout: float,
    half_open_max_calls: int,
    success_threshold: int,
    window: SlidingWindow | None,
    max_recovery_timeout: float | None,
) -> None:
    """Refuse parameters out of range, naming the breaker and the parameter."""
    if failure_threshold is not None and failure_threshold < 1:
        raise ConfigurationError(
            f"CircuitBreaker {name!r}: failure_threshold must be >= 1 or None, "
            f"got {failure_threshold!r}"
        )
    if failure_threshold is None and window is None:
        raise ConfigurationError(
            f"CircuitBreaker {name!r}: give a failure_threshold or a window, or it never opens"
        )
    if math.isnan(recovery_timeout) or recovery_timeout < 0:
        raise ConfigurationError(
            f"CircuitBreaker {name!r}: recovery_timeout must be >= 0 seconds, "
            f"got {recovery_timeout!r}"
        )
    if half_open_max_calls < 1:
        raise ConfigurationError(
            f"CircuitBreaker {name!r}: half_open_max_calls must be >= 1, "
            f"got {half_open_max_calls!r}"
        )
    if success_threshold < 1:
        raise ConfigurationError(
            f"CircuitBreaker {name!r}: success_threshold must be >= 1, got {success_threshold!r}"
        )
    if max_recovery_timeout is not None and max_recovery_timeout < recovery_timeout:
        raise ConfigurationError(
            f"CircuitBreaker {name!r}: max_recovery_timeout must be >= recovery_timeout, "
            f"got {max_recovery_timeout!r}"
        )


class CircuitBreaker(EventSource):
    """A circuit breaker for one upstream (or one kind of call).

    Counts as a failure, by default: any ``Exception`` except a :class:`ClientError` (and an
    httpx ``HTTPStatusError`` for a 4xx answer); so an :class:`UpstreamError` (5xx, connect
    error), a ``TimeoutError`` / :class:`UpstreamTimeoutError` and transport errors count.
    An exception in ``ignore_on``, cancellation, a refusal made in this process before the
    call left it (:class:`BulkheadFullError`, a ``ThrottledError``, or retries whose last
    attempt was one of those), and a call the request's
    deadline ended for the caller's reasons (it never started, or a deadline the client chose
    cut it; see :func:`~fastapi_resilience.outbound._deadline.not_the_upstreams_failure`) are
    *ignored*: neither a success nor a failure (in half-open they give the trial permit back).
    An exception that is neither ignored nor a failure (``record_on`` / ``is_failure`` said
    no) counts as a success.

    Opening rules: ``failure_threshold`` failures in a row; and, with a ``window``, a failure
    rate or slow-call rate over the window's thresholds. Without a window
    ``failure_threshold`` defaults to 5; with a window it defaults to off (pass it to keep both).

    Args:
        name: the registry key; also in events, errors and the readiness check.
        failure_threshold: consecutive failures that open the breaker; ``None``: off.
        recovery_timeout: seconds the breaker stays open before half-open trials (a
            ``timedelta`` is accepted for every duration).
        half_open_max_calls: trial calls admitted at once while half-open.
        success_threshold: trial successes that close it again.
        window: a :class:`SlidingWindow` (count- or time-based) for rate-based opening.
        record_on: exception types that count as failures (default: ``Exception``).
        ignore_on: exception types that count as nothing (default: ``ClientError``).
        is_failure: a predicate that replaces ``record_on`` for the exceptions not ignored.
        max_recovery_timeout: when set, every trip straight from half-open doubles the
            open time, up to this cap; a close resets it.
        clock: time source (inject :class:`~fastapi_resilience.testing.ManualClock` in tests).
        events: the event bus for ``breaker.opened`` / ``breaker.half_open`` /
            ``breaker.closed``.
        registry: where to register by name; ``None`` registers nowhere. A name that is
            already registered is replaced (the newest breaker wins).
        state_store: shared state (see :mod:`fastapi_resilience.outbound._breaker_redis`).

    Raises:
        ConfigurationError: an argument is out of range.

    .. versionadded:: 0.1
    """

    __slots__ = (
        "__weakref__",
        "_clock",
        "_ctx",
        "_failures",
        "_fast",
        "_generation",
        "_half_open_in_flight",
        "_half_open_successes",
        "_listeners",
        "_open_duration",
        "_open_until",
        "_opened_at",
        "_state",
        "_trips",
        "_window",
        "calls_failed",
        "calls_rejected",
        "calls_succeeded",
        "changed_at",
        "failure_threshold",
        "half_open_max_calls",
        "ignore_on",
        "is_failure",
        "max_recovery_timeout",
        "name",
        "record_on",
        "recovery_timeout",
        "state_store",
        "success_threshold",
        "window",
    )

    def __init__(
        self,
        name: str,
        *,
        failure_threshold: int | None = _UNSET,
        recovery_timeout: float | timedelta = 30.0,
        half_open_max_calls: int = 1,
        success_threshold: int = 1,
        window: SlidingWindow | None = None,
        record_on: tuple[type[BaseException], ...] = (Exception,),
        ignore_on: tuple[type[BaseException], ...] = (ClientError,),
        is_failure: Callable[[BaseException], bool] | None = None,
        max_recovery_timeout: float | timedelta | None = None,
        clock: Clock = SYSTEM_CLOCK,
        events: EventBus | None = None,
        registry: BreakerRegistry | None = _UNSET,
        state_store: BreakerStateStore | None = None,
    ) -> None:
        if not name:
            raise ConfigurationError("CircuitBreaker name must be a non-empty string")
        recovery_timeout = to_seconds(recovery_timeout) or 0.0
        max_recovery_timeout = to_seconds(max_recovery_timeout)
        if failure_threshold is _UNSET:
            failure_threshold = None if window is not None else _DEFAULT_FAILURE_THRESHOLD
        _check_parameters(
            name,
            failure_threshold,
            recovery_timeout,
            half_open_max_calls,
            success_threshold,
            window,
            max_recovery_timeout,
        )
        self.name = name
        self.failure_threshold: int | None = failure_threshold
        self.recovery_timeout = float(recovery_timeout)
        self.half_open_max_calls = half_open_max_calls
        self.success_threshold = success_threshold
        self.window = window
        self.record_on = record_on
        self.ignore_on = ignore_on
        self.is_failure = is_failure
        self.max_recovery_timeout = max_recovery_timeout
        self._clock = clock
        self._events = events
        self.state_store = state_store
        self._window: CountWindowState | TimeWindowState | None = (
            window.new_state() if window is not None else None
        )
        self._listeners: list[BreakerListener] = []
        self._state: BreakerState = CLOSED
        self._generation = 0
        self._failures = 0
        self._half_open_in_flight = 0
        self._half_open_successes = 0
        self._opened_at = 0.0
        self._open_until = 0.0
        self._open_duration = self.recovery_timeout
        self._trips = 0
        #: Calls by outcome since the breaker was made, read by the metrics: ``rejected``
        #: were refused without calling, the others ended as the breaker classified them.
        self.calls_succeeded = 0
        self.calls_failed = 0
        self.calls_rejected = 0
        #: Wall time (``clock.time()``) of the latest state change; ``None`` before one.
        self.changed_at: float | None = None
        self._ctx: ContextVar[tuple[_Ticket, ...]] = ContextVar(
            f"fastapi_resilience.breaker.{name}", default=()
        )
        self._fast = True
        self._refresh_fast()
        if registry is _UNSET:
            registry = default_registry
        if registry is not None:
            registry.register(self)
        if state_store is not None:
            state_store.attach(self)

    # -- reading -----------------------------------------------------------------------

    @property
    def state(self) -> BreakerState:
        """``"closed"``, ``"open"`` or ``"half_open"``; an open breaker whose time is up reads
        (and becomes) half-open."""
        if self._state is OPEN and self._clock.monotonic() >= self._open_until:
            self._transition(HALF_OPEN)
        return self._state

    @property
    def clock(self) -> Clock:
        return self._clock

    @property
    def generation(self) -> int:
        """Counts state changes; an outcome or reply from an older generation is stale."""
        return self._generation

    @property
    def failures(self) -> int:
        """Consecutive failures counted in the closed state."""
        return self._failures

    @property
    def opened_at(self) -> float | None:
        """``clock.monotonic()`` when it last opened; ``None`` unless open now."""
        return self._opened_at if self._state is OPEN else None

    @property
    def open_duration(self) -> float:
        """How long the current (or next) open period lasts, growth included."""
        return self._open_duration

    def time_left_open(self) -> float:
        """Seconds until half-open trials are allowed; 0 unless open."""
        if self._state is not OPEN:
            return 0.0
        return max(0.0, self._open_until - self._clock.monotonic())

    def window_counts(self) -> WindowCounts | None:
        """The window's calls, failures and slow calls now (``None`` without a window)."""
        if self._window is None:
            return None
        return self._window.counts(self._clock.monotonic())

    # -- calling -----------------------------------------------------------------------

    async def call(self, fn: Callable[..., Awaitable[T]], /, *args: Any, **kwargs: Any) -> T:
        """``await fn(*args, **kwargs)`` through the breaker.

        Raises:
            CircuitOpenError: the breaker is open, or half-open with its trials taken; ``fn``
                was not called.
        """
        if self._fast:
            # The closed state with nothing to measure: one check, no clock, no allocation.
            generation = self._generation
            try:
                result = await fn(*args, **kwargs)
            except BaseException as exc:
                self._on_error(exc, generation, False, 0.0)
                raise
            self.calls_succeeded += 1
            if self._failures and generation == self._generation:
                self._failures = 0
            return result
        return await self._call_guarded(fn, args, kwargs)

    async def _call_guarded(
        self, fn: Callable[..., Awaitable[T]], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> T:
        store = self.state_store
        if store is not None:
            store.before_call(self)
            if self._state is not CLOSED:
                verdict = await self._shared_admission(store)
                if verdict == "granted":
                    return await self._shared_trial(store, fn, args, kwargs)
        trial = self._admit()
        generation = self._generation
        started = self._clock.monotonic() if self._measures_time() else 0.0
        try:
            result = await fn(*args, **kwargs)
        except BaseException as exc:
            self._on_error(exc, generation, trial, started)
            raise
        self._on_success(generation, trial, started)
        return result

    async def _shared_admission(self, store: BreakerStateStore) -> TrialVerdict:
        if self._state is OPEN and self._clock.monotonic() < self._open_until:
            raise self._open_error()  # known locally: no network call
        verdict = await store.acquire_trial(self)
        if verdict == "open":
            raise self._open_error()
        if verdict == "full":
            raise self._half_open_full_error()
        return verdict  # "closed" or "local": the local path decides

    async def _shared_trial(
        self,
        store: BreakerStateStore,
        fn: Callable[..., Awaitable[T]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> T:
        try:
            result = await fn(*args, **kwargs)
        except Exception as exc:
            verdict = self._classify(exc)
            if verdict is not None:
                self._count(failure=verdict)
            await store.trial_result(self, verdict)
            raise
        except BaseException:
            # Cancelled: hand the permit back without awaiting inside a cancelled task.
            _background(store.trial_result(self, None))
            raise
        self.calls_succeeded += 1
        await store.trial_result(self, False)
        return result

    async def __aenter__(self) -> CircuitBreaker:
        # ``async with`` has no per-call object to keep the admission in, so it rides on a
        # per-task stack (a context variable holding tuples: tasks never share it).
        ticket = await self._enter()
        self._ctx.set((*self._ctx.get(), ticket))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        stack = self._ctx.get()
        self._ctx.set(stack[:-1])
        await self._settle(stack[-1], exc)

    async def admit(self) -> BreakerPermit:
        """Admit one call whose outcome is told later, through the permit it returns.

        For a call that outlives the function that made it (a streamed answer): the permit
        holds a half-open trial slot until :meth:`BreakerPermit.settle` or
        :meth:`BreakerPermit.abandon`, and the call is counted once, then.

        Raises:
            CircuitOpenError: the breaker is open, or half-open with its trials taken.
        """
        return BreakerPermit(self, await self._enter())

    async def _enter(self) -> _Ticket:
        store = self.state_store
        shared = False
        if store is not None:
            store.before_call(self)
            if self._state is not CLOSED:
                shared = await self._shared_admission(store) == "granted"
        trial = False if shared else self._admit()
        started = self._clock.monotonic() if self._measures_time() else 0.0
        return (self._generation, trial, started, shared)

    async def _settle(
        self, ticket: _Ticket, exc: BaseException | None, *, ignore: bool = False
    ) -> None:
        """Count an admitted call: a success (``exc`` is ``None``), what ``exc`` says, or
        nothing (``ignore``: the trial permit goes back)."""
        generation, trial, started, shared = ticket
        if shared and self.state_store is not None:
            if ignore:
                await self.state_store.trial_result(self, None)
            elif exc is None:
                self.calls_succeeded += 1
                await self.state_store.trial_result(self, False)
            elif isinstance(exc, Exception):
                verdict = self._classify(exc)
                if verdict is not None:
                    self._count(failure=verdict)
                await self.state_store.trial_result(self, verdict)
            else:
                _background(self.state_store.trial_result(self, None))
        elif ignore:
            if trial and generation == self._generation:
                self._half_open_in_flight -= 1
        elif exc is None:
            self._on_success(generation, trial, started)
        else:
            self._on_error(exc, generation, trial, started)

    def __call__(self, fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
        """Use as a decorator on an ``async def``: every call goes through the breaker."""

        @functools.wraps(fn)
        async def guarded(*args: P.args, **kwargs: P.kwargs) -> T:
            return await self.call(fn, *args, **kwargs)

        return guarded

    def allow(self) -> bool:
        """Would a call be admitted now? (Does not take a half-open permit.)"""
        state = self.state
        if state is CLOSED:
            return True
        return state is HALF_OPEN and self._half_open_in_flight < self.half_open_max_calls

    # -- recording from outside ----------------------------------------------------------

    def record_success(self) -> None:
        """Count a success for a call made outside ``call`` (e.g. a 2xx answer)."""
        self._on_success(self._generation, False, 0.0)

    def record_failure(self, exc: BaseException | None = None) -> None:
        """Count a failure for a call made outside ``call`` (e.g. a 5xx answer).

        ``exc`` is not classified: the caller already decided it is a failure.
        """
        self._failure(self._generation, False, 0.0)

    # -- manual control ------------------------------------------------------------------

    def force_open(self, duration: float | timedelta | None = None) -> None:
        """Open now, for ``duration`` seconds (default: the recovery timeout)."""
        seconds = to_seconds(duration)
        self._open(self.recovery_timeout if seconds is None else max(0.0, seconds), grow=False)

    def force_closed(self) -> None:
        """Close now and forget the counts."""
        self._close()

    def reset(self) -> None:
        """Back to a fresh closed breaker: counts, window and open-time growth cleared."""
        self._trips = 0
        self._open_duration = self.recovery_timeout
        if self._window is not None:
            self._window.reset()
        self._close()

    def reconfigure(
        self,
        *,
        failure_threshold: int | None = _UNSET,
        recovery_timeout: float | timedelta | None = None,
        half_open_max_calls: int | None = None,
        success_threshold: int | None = None,
    ) -> None:
        """Change the thresholds in place: the state, the counts and the listeners stay.

        A closed breaker whose consecutive failures already reach a lowered threshold opens at
        its next failure; an open one keeps the end of its open period, and the new
        ``recovery_timeout`` applies from its next opening. An argument left out is unchanged.

        Raises:
            ConfigurationError: a value is out of range; nothing is changed.
        """
        threshold = self.failure_threshold if failure_threshold is _UNSET else failure_threshold
        recovery = to_seconds(recovery_timeout)
        recovery = self.recovery_timeout if recovery is None else recovery
        half_open = self.half_open_max_calls if half_open_max_calls is None else half_open_max_calls
        successes = self.success_threshold if success_threshold is None else success_threshold
        _check_parameters(
            self.name,
            threshold,
            recovery,
            half_open,
            successes,
            self.window,
            self.max_recovery_timeout,
        )
        self.failure_threshold = threshold
        self.recovery_timeout = float(recovery)
        self.half_open_max_calls = half_open
        self.success_threshold = successes
        if self._state is not OPEN:
            self._open_duration = self.recovery_timeout

    def add_listener(self, listener: BreakerListener) -> Callable[[], None]:
        """Call ``listener(breaker, old_state, new_state)`` on every state change.

        Returns a function that removes it. A failing listener is logged and ignored.
        """
        self._listeners.append(listener)

        def remove() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return remove

    # -- the state machine ---------------------------------------------------------------

    def _measures_time(self) -> bool:
        window = self.window
        return window is not None and (
            window.slow_call_duration is not None or window.kind == "time"
        )

    def _refresh_fast(self) -> None:
        self._fast = self._state is CLOSED and self._window is None and self.state_store is None

    def _admit(self) -> bool:
        """Admit a call or raise; returns whether it holds a half-open trial permit."""
        state = self._state
        if state is CLOSED:
            return False
        if state is OPEN:
            if self._clock.monotonic() < self._open_until:
                raise self._open_error()
            self._transition(HALF_OPEN)
        if self._half_open_in_flight >= self.half_open_max_calls:
            raise self._half_open_full_error()
        self._half_open_in_flight += 1
        return True

    def _count(self, *, failure: bool) -> None:
        if failure:
            self.calls_failed += 1
        else:
            self.calls_succeeded += 1

    def _half_open_full_error(self) -> CircuitOpenError:
        self.calls_rejected += 1
        return CircuitOpenError(
            HALF_OPEN_FULL_DETAIL.format(name=self.name),
            retry_after=0.0,
            extensions={"breaker": self.name, "state": HALF_OPEN},
        )

    def _open_error(self) -> CircuitOpenError:
        self.calls_rejected += 1
        left = self.time_left_open()
        return CircuitOpenError(
            CIRCUIT_OPEN_DETAIL.format(name=self.name),
            retry_after=left,
            extensions={"breaker": self.name, "time_left_open": round(left, 3)},
        )

    def _classify(self, exc: BaseException) -> bool | None:
        """``True`` failure, ``False`` success, ``None`` ignored."""
        if not isinstance(exc, Exception) or isinstance(exc, self.ignore_on):
            return None
        if refused_here(exc) or not_the_upstreams_failure(exc):
            # A full bulkhead, a throttle or the caller's deadline ended the call (retries
            # included): no evidence either way, and in half-open the trial slot goes back for
            # a call that can tell.
            return None
        if self.is_failure is not None:
            return bool(self.is_failure(exc))
        return isinstance(exc, self.record_on) and _default_is_failure(exc)

    def _on_error(self, exc: BaseException, generation: int, trial: bool, started: float) -> None:
        verdict = self._classify(exc)
        if verdict is None:
            if trial and generation == self._generation:
                self._half_open_in_flight -= 1
            return
        if verdict:
            self._failure(generation, trial, started)
        else:
            self._on_success(generation, trial, started)

    def _failure(self, generation: int, trial: bool, started: float) -> None:
        self.calls_failed += 1
        if generation != self._generation:
            return  # admitted under an older state: its verdict is stale
        if self._state is HALF_OPEN:
            if trial:
                self._half_open_in_flight -= 1
            self._open(self._next_open_duration(), grow=True)
            return
        if self._state is not CLOSED:
            return
        if self.state_store is not None:
            self.state_store.on_local_failure(self)
        self._failures += 1
        trip = self.failure_threshold is not None and self._failures >= self.failure_threshold
        if self._window is not None:
            now = self._clock.monotonic()
            slow = self._is_slow(started, now)
            trip = self._window.record(True, slow, now) or trip
        if trip:
            self._open(self.recovery_timeout, grow=False)

    def _on_success(self, generation: int, trial: bool, started: float) -> None:
        self.calls_succeeded += 1
        if generation != self._generation:
            return
        if self._state is HALF_OPEN:
            if trial:
                self._half_open_in_flight -= 1
            self._half_open_successes += 1
            if self._half_open_successes >= self.success_threshold:
                self._close()
            return
        if self._state is not CLOSED:
            return
        self._failures = 0
        if self.state_store is not None:
            self.state_store.on_local_success(self)
        if self._window is not None:
            now = self._clock.monotonic() if self._measures_time() else 0.0
            if self._window.record(False, self._is_slow(started, now), now):
                self._open(self.recovery_timeout, grow=False)

    def _is_slow(self, started: float, now: float) -> bool:
        window = self.window
        if window is None or window.slow_call_duration is None or not started:
            return False
        return now - started >= window.slow_call_duration

    def _next_open_duration(self) -> float:
        if self.max_recovery_timeout is None:
            return self.recovery_timeout
        grown: float = self.recovery_timeout * 2.0 ** (self._trips + 1)
        return min(self.max_recovery_timeout, grown)

    def _open(self, duration: float, *, grow: bool) -> None:
        self._trips = self._trips + 1 if grow else 0
        self._open_duration = duration
        self._opened_at = self._clock.monotonic()
        self._open_until = self._opened_at + duration
        self._transition(OPEN, force=True)

    def _close(self) -> None:
        self._trips = 0
        self._open_duration = self.recovery_timeout
        if self._window is not None:
            self._window.reset()
        self._transition(CLOSED, force=True)

    def _transition(self, new: BreakerState, *, force: bool = False) -> None:
        old = self._state
        if old is new and not force:
            return
        failures = self._failures
        self._state = new
        self._generation += 1
        self._failures = 0
        self._half_open_in_flight = 0
        self._half_open_successes = 0
        self._refresh_fast()
        if old is new:
            return  # re-opened while open (force_open): new times, no new event
        self._announce(old, new, failures)

    def _announce(
        self, old: BreakerState, new: BreakerState, failures: int, *, remote: bool = False
    ) -> None:
        self.changed_at = self._clock.time()
        if self.state_store is not None and not remote:
            self.state_store.on_transition(self, old, new)
        attributes: dict[str, Any] = {
            "from_state": old,
            "shared": remote,
            "failures": failures,
            "time_left_open": round(self.time_left_open(), 3),
        }
        if new is OPEN:
            attributes["trips"] = self._trips
        level = logging.WARNING if new is OPEN else logging.INFO
        self.events.emit(EVENT_KINDS[new], self.name, level=level, **attributes)
        for listener in tuple(self._listeners):
            try:
                listener(self, old, new)
            except Exception:
                logger.exception("breaker %r listener %r failed", self.name, listener)

    def adopt(self, state: str, time_left_open: float = 0.0) -> None:
        """Take a state decided elsewhere (a shared store), publishing it like a local change.

        ``time_left_open`` is how long an ``"open"`` state still lasts.
        """
        new: BreakerState = OPEN if state == OPEN else HALF_OPEN if state == HALF_OPEN else CLOSED
        if new is OPEN:
            now = self._clock.monotonic()
            self._open_until = now + max(0.0, time_left_open)
            if self._state is not OPEN:
                self._opened_at = now
                self._open_duration = max(0.0, time_left_open)
        old = self._state
        if old is new:
            return
        failures = self._failures
        self._state = new
        self._generation += 1
        self._failures = 0
        self._half_open_in_flight = 0
        self._half_open_successes = 0
        self._refresh_fast()
        self._announce(old, new, failures, remote=True)

    def __repr__(self) -> str:
        return (
            f"CircuitBreaker({self.name!r}, state={self._state!r}, failures={self._failures}, "
            f"time_left_open={self.time_left_open():.3f})"
        )


class BreakerPermit:
    """One call admitted by :meth:`CircuitBreaker.admit`, counted when it is settled.

    Settle it exactly once: :meth:`settle` counts the outcome as ``call`` would, and
    :meth:`abandon` counts nothing (the caller gave up; in half-open the trial slot goes
    back). Later calls do nothing. :meth:`answered` marks when the upstream first answered:
    a window's slow-call rule then times the call to that point, not to the settlement, so a
    long stream that started at once is not a slow call.
    """

    __slots__ = ("_answered_at", "_breaker", "_settled", "_ticket")

    def __init__(self, breaker: CircuitBreaker, ticket: _Ticket) -> None:
        self._breaker = breaker
        self._ticket = ticket
        self._answered_at: float | None = None
        self._settled = False

    @property
    def settled(self) -> bool:
        return self._settled

    def answered(self) -> None:
        """The upstream's first answer arrived (a streamed answer's headers)."""
        if self._answered_at is None and self._ticket[2]:
            self._answered_at = self._breaker.clock.monotonic()

    async def settle(self, exc: BaseException | None = None) -> None:
        """Count the call: a success when ``exc`` is ``None``, else as the breaker classifies
        ``exc`` (a failure, a success, or nothing)."""
        if self._settled:
            return
        self._settled = True
        generation, trial, started, shared = self._ticket
        if self._answered_at is not None:
            # Shift the start so that "now - started" is the time to the first answer.
            started += self._breaker.clock.monotonic() - self._answered_at
        await self._breaker._settle((generation, trial, started, shared), exc)

    async def abandon(self) -> None:
        """Count nothing: the caller ended the call, which tells nothing of the upstream."""
        if self._settled:
            return
        self._settled = True
        await self._breaker._settle(self._ticket, None, ignore=True)


def holds_calls_back(breaker: CircuitBreaker) -> bool:
    """Whether ``breaker`` keeps calls from its upstream now: open with time left, or half-open
    with a trial running. Reads without changing anything (``state`` turns an open breaker whose
    time is up half-open, and says so on the event bus)."""
    state = breaker._state
    if state is OPEN:
        return breaker._clock.monotonic() < breaker._open_until
    return state is HALF_OPEN and breaker._half_open_in_flight > 0


_BACKGROUND: set[asyncio.Task[Any]] = set()


def _background(coro: Coroutine[Any, Any, Any]) -> None:
    """Run ``coro`` on its own, keeping a reference so it is not collected half-way."""
    task = asyncio.get_running_loop().create_task(coro)
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)


class BreakerRegistry:
    """Breakers by name. Registering a name again replaces the older breaker.

    Replacing (not raising) keeps module reloads (``uvicorn --reload``) and tests that build a
    breaker per test working; ``breaker_dependency`` looks the name up per request, so it
    always hands out the newest one.
    """

    def __init__(self, *, events: EventBus | None = None) -> None:
        self._breakers: dict[str, CircuitBreaker] = {}
        self.events = events

    def register(self, breaker: CircuitBreaker) -> CircuitBreaker:
        self._breakers[breaker.name] = breaker
        if self.events is not None and breaker._events is None:
            breaker.events = self.events
        return breaker

    def unregister(self, name: str) -> None:
        self._breakers.pop(name, None)

    def get(self, name: str) -> CircuitBreaker:
        """The breaker called ``name``.

        Raises:
            LookupError: no breaker of that name is registered.
        """
        try:
            return self._breakers[name]
        except KeyError:
            raise LookupError(
                f"no circuit breaker named {name!r} is registered "
                f"(known: {sorted(self._breakers) or 'none'})"
            ) from None

    def use_events(self, bus: EventBus) -> None:
        """Publish every registered breaker's changes (and later ones') on ``bus``."""
        self.events = bus
        for breaker in self._breakers.values():
            if breaker._events is None:
                breaker.events = bus

    def __contains__(self, name: object) -> bool:
        return name in self._breakers

    def __iter__(self) -> Iterator[CircuitBreaker]:
        return iter(tuple(self._breakers.values()))

    def __len__(self) -> int:
        return len(self._breakers)

    def names(self) -> list[str]:
        return sorted(self._breakers)

    def open_breakers(self) -> list[CircuitBreaker]:
        """Breakers that are open or half-open now, by name."""
        return [b for _, b in sorted(self._breakers.items()) if b.state != CLOSED]

    def clear(self) -> None:
        self._breakers.clear()


default_registry = BreakerRegistry()


def get_breaker(name: str, registry: BreakerRegistry | None = None) -> CircuitBreaker:
    """The registered breaker called ``name`` (default registry).

    Raises:
        LookupError: none is registered under that name.
    """
    return (registry or default_registry).get(name)


class _BreakersCheck:
    """The readiness check of :func:`breaker_health_check`."""

    #: It reads this process's breakers only, so it is never served again from a cache: an
    #: open breaker shows at the next call (``HealthChecks.add`` takes this as its default).
    cache_seconds = 0.0

    def __init__(self, registry: BreakerRegistry | None) -> None:
        self._registry = registry

    async def __call__(self) -> CheckResult:
        target = self._registry if self._registry is not None else default_registry
        not_closed = target.open_breakers()
        if not not_closed:
            return CheckResult("ok")
        parts = [
            f"{b.name} {b.state}"
            + (f" ({b.time_left_open():.1f}s left)" if b.state == OPEN else "")
            for b in not_closed
        ]
        return CheckResult("degraded", "breakers not closed: " + ", ".join(parts))


def breaker_health_check(
    registry: BreakerRegistry | None = None,
) -> Callable[[], Awaitable[CheckResult]]:
    """A readiness check: ``"degraded"`` naming every open or half-open breaker.

    Register it with ``resilience.health.add("breakers", breaker_health_check(),
    critical=False)``; readiness then never says ``"ok"`` while a breaker is open. It is
    never cached, unless ``add`` is given a ``cache_seconds`` of its own.
    """
    return _BreakersCheck(registry)
