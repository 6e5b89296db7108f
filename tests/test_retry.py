from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import timedelta

import httpx
import pytest

from fastapi_resilience import Bulkhead, CircuitBreaker, Retry, RetryBudget, deadline
from fastapi_resilience.events import Event, EventBus
from fastapi_resilience.exceptions import (
    AppError,
    BadRequestError,
    BulkheadFullError,
    CircuitOpenError,
    ClientError,
    ConfigurationError,
    NotFoundError,
    RateLimitedError,
    RetryExhaustedError,
    ServiceUnavailableError,
    UpstreamError,
    UpstreamTimeoutError,
)
from fastapi_resilience.testing import ManualClock

pytestmark = pytest.mark.anyio


class Flaky:
    """An async callable that raises the given errors in turn, then returns ``"ok"``.

    With ``endless``, it raises a fresh ``endless()`` error on every call.
    """

    def __init__(
        self, *errors: BaseException, endless: Callable[[], BaseException] | None = None
    ) -> None:
        self.errors = list(errors)
        self.endless = endless
        self.calls = 0

    async def __call__(self, *args: object, **kwargs: object) -> str:
        self.calls += 1
        if self.endless is not None:
            raise self.endless()
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


def always(exc_factory: Callable[[], BaseException]) -> Flaky:
    return Flaky(endless=exc_factory)


def constant(value: float) -> Callable[[], float]:
    return lambda: value


async def test_success_first_time_makes_one_call_and_never_sleeps() -> None:
    """A call that succeeds at once is made once, with no wait."""
    clock = ManualClock()
    fn = Flaky()
    assert await Retry(clock=clock).call(fn) == "ok"
    assert fn.calls == 1
    assert clock.slept == []


async def test_passes_arguments_through() -> None:
    """Positional and keyword arguments reach the function."""

    async def add(a: int, *, b: int) -> int:
        return a + b

    assert await Retry().call(add, 1, b=2) == 3


async def test_retries_retryable_errors_then_succeeds() -> None:
    """Upstream errors are retried until the call succeeds."""
    clock = ManualClock()
    fn = Flaky(UpstreamError(), UpstreamTimeoutError())
    assert await Retry(attempts=3, clock=clock).call(fn) == "ok"
    assert fn.calls == 3


async def test_retries_httpx_transport_errors_by_default() -> None:
    """httpx's transport errors (connect, read, timeouts) are retried by default."""
    fn = Flaky(httpx.ConnectError("refused"), httpx.ReadTimeout("slow"))
    assert await Retry(clock=ManualClock()).call(fn) == "ok"
    assert fn.calls == 3


@pytest.mark.parametrize(
    "error",
    [BadRequestError(), NotFoundError(), AppError(), ValueError("bug"), RetryExhaustedError()],
)
async def test_never_retries_client_or_non_retryable_errors(error: Exception) -> None:
    """A ClientError, a non-retryable AppError or a plain bug is raised unchanged after one call."""
    fn = Flaky(error)
    with pytest.raises(type(error)) as info:
        await Retry(clock=ManualClock()).call(fn)
    assert info.value is error
    assert fn.calls == 1


async def test_a_full_bulkhead_is_raised_at_once_and_spends_no_retry() -> None:
    """A refusal made in this process, a full bulkhead, is final for a default Retry: raised
    unchanged (503 bulkhead_full) after one attempt, with no wait and nothing taken from the
    retry budget; the bulkhead has its own waiting line for callers who want to wait."""
    clock = ManualClock()
    budget = RetryBudget(clock=clock)
    bulkhead = Bulkhead("pool", max_concurrent=1, registry=None)
    fn = Flaky()
    async with bulkhead:
        with pytest.raises(BulkheadFullError):
            await Retry(attempts=3, budget=budget, clock=clock).call(bulkhead.call, fn)
    assert fn.calls == 0
    assert clock.slept == []
    assert budget.snapshot()["retries"] == 0


async def test_gives_up_with_retry_exhausted_chaining_the_last_error() -> None:
    """After the last attempt it raises RetryExhaustedError from the last error, with the count."""
    last = UpstreamError("third")
    fn = Flaky(UpstreamError("first"), UpstreamError("second"), last)
    with pytest.raises(RetryExhaustedError) as info:
        await Retry(attempts=3, clock=ManualClock()).call(fn)
    assert info.value.__cause__ is last
    assert info.value.extensions == {"attempts": 3, "reason": "attempts"}
    assert fn.calls == 3


async def test_exponential_backoff_without_jitter() -> None:
    """Waits double from base_delay and are capped by max_delay."""
    clock = ManualClock()
    retry = Retry(attempts=6, base_delay=0.1, max_delay=0.5, jitter=False, clock=clock)
    with pytest.raises(RetryExhaustedError):
        await retry.call(always(UpstreamError))
    assert clock.slept == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5])


@pytest.mark.parametrize(
    ("jitter", "rand", "expected"),
    [
        (True, 0.5, [0.05, 0.1, 0.2]),
        ("full", 0.0, [0.0, 0.0, 0.0]),
        ("equal", 0.0, [0.05, 0.1, 0.2]),
        ("equal", 0.999999, [0.1, 0.2, 0.4]),
        # decorrelated: base + r * (3 * previous - base), previous starting at base.
        ("decorrelated", 0.5, [0.2, 0.35, 0.575]),
    ],
)
async def test_jitter_modes(jitter: bool | str, rand: float, expected: list[float]) -> None:
    """Each jitter mode spreads the wait as documented, from an injected random source."""
    clock = ManualClock()
    retry = Retry(
        attempts=4,
        base_delay=0.1,
        max_delay=10,
        jitter=jitter,  # type: ignore[arg-type]
        clock=clock,
        random=constant(rand),
    )
    with pytest.raises(RetryExhaustedError):
        await retry.call(always(UpstreamError))
    assert clock.slept == pytest.approx(expected, abs=1e-5)


async def test_honours_retry_after_carried_by_the_failure() -> None:
    """A failure with retry_after is not retried sooner than it asks."""
    clock = ManualClock()
    fn = Flaky(ServiceUnavailableError(retry_after=2.5))
    retry = Retry(base_delay=0.1, jitter=False, max_delay=5, clock=clock)
    assert await retry.call(fn) == "ok"
    assert clock.slept == [2.5]


async def test_rate_limited_error_is_retried_after_its_retry_after() -> None:
    """RateLimitedError is the one retryable ClientError: it is retried after Retry-After."""
    clock = ManualClock()
    fn = Flaky(RateLimitedError(retry_after=1))
    assert await Retry(jitter=False, clock=clock).call(fn) == "ok"
    assert clock.slept == [1]


async def test_retry_after_longer_than_max_delay_is_raised_unchanged() -> None:
    """A failure asking to wait longer than max_delay is not waited for, and passed on as is."""
    clock = ManualClock()
    error = ServiceUnavailableError(retry_after=60)
    fn = Flaky(error)
    with pytest.raises(ServiceUnavailableError) as info:
        await Retry(max_delay=5, clock=clock).call(fn)
    assert info.value is error
    assert fn.calls == 1
    assert clock.slept == []


async def test_open_breaker_stays_circuit_open_error() -> None:
    """An open breaker's CircuitOpenError (retry_after = time left open) is not wrapped."""
    clock = ManualClock()
    breaker = CircuitBreaker("retry-open", failure_threshold=1, clock=clock, registry=None)
    breaker.force_open()
    calls = 0

    async def fetch() -> None:
        nonlocal calls
        calls += 1

    with pytest.raises(CircuitOpenError) as info:
        await Retry(clock=clock).call(breaker.call, fetch)
    assert calls == 0
    assert info.value.headers["Retry-After"] == "30"


async def test_total_deadline_stops_before_sleeping_past_it() -> None:
    """With deadline=1s, no wait is started that would end after the deadline."""
    clock = ManualClock()
    retry = Retry(attempts=10, base_delay=0.3, jitter=False, deadline=1.0, clock=clock)
    fn = always(UpstreamError)
    with pytest.raises(RetryExhaustedError) as info:
        await retry.call(fn)
    # 0.3 then 0.6 end at 0.9 s; the next wait (1.2 s) would end after 1 s, so it stops.
    assert clock.slept == pytest.approx([0.3, 0.6])
    assert info.value.extensions["reason"] == "deadline"
    assert sum(clock.slept) < 1.0


async def test_request_deadline_is_respected() -> None:
    """Retries never sleep past the current request's deadline."""
    clock = ManualClock()
    retry = Retry(attempts=10, base_delay=0.1, jitter=False, clock=clock)
    with deadline(0.5, clock=clock), pytest.raises(RetryExhaustedError) as info:
        await retry.call(always(UpstreamError))
    assert info.value.extensions["reason"] == "deadline"
    assert clock.slept == pytest.approx([0.1, 0.2])


async def test_retry_on_types_and_predicate() -> None:
    """retry_on names what is retried: types or a predicate."""
    clock = ManualClock()
    assert await Retry(retry_on=KeyError, clock=clock).call(Flaky(KeyError())) == "ok"
    with pytest.raises(UpstreamError):
        await Retry(retry_on=(KeyError,), clock=clock).call(Flaky(UpstreamError()))
    by_message = Retry(retry_on=lambda e: "again" in str(e), clock=clock)
    assert await by_message.call(Flaky(RuntimeError("again"))) == "ok"


async def test_broad_retry_on_does_not_widen_to_client_errors() -> None:
    """retry_on=Exception still never retries a ClientError, unless that class is named."""
    clock = ManualClock()
    with pytest.raises(NotFoundError):
        await Retry(retry_on=Exception, clock=clock).call(Flaky(NotFoundError()))
    told = Retry(retry_on=(ClientError,), clock=clock)
    assert await told.call(Flaky(NotFoundError())) == "ok"


async def test_decorator_use() -> None:
    """@retry wraps an async function and keeps its name."""
    clock = ManualClock()
    calls = 0

    @Retry(clock=clock)
    async def fetch(x: int) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise UpstreamError()
        return x * 2

    assert await fetch(21) == 42
    assert fetch.__name__ == "fetch"
    assert calls == 2


async def test_cancellation_is_not_retried() -> None:
    """Cancelling the caller cancels the retry loop at once."""

    async def hang() -> None:
        await asyncio.Event().wait()

    task = asyncio.ensure_future(Retry(attempts=5).call(hang))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_non_idempotent_methods_are_not_retried_unless_told() -> None:
    """POST and PATCH are not retried by default; retry_non_idempotent allows them."""
    retry = Retry()
    assert retry.allows_method("get")
    assert retry.allows_method("PUT")
    assert not retry.allows_method("POST")
    assert not retry.allows_method("PATCH")
    assert Retry(retry_non_idempotent=True).allows_method("POST")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"attempts": 0},
        {"attempts": 1.5},
        {"base_delay": -1},
        {"max_delay": 0.01, "base_delay": 1},
        {"jitter": "sometimes"},
        {"deadline": float("nan")},
        {"retry_on": ()},
        {"retry_on": 3},
    ],
)
def test_bad_arguments_fail_at_construction(kwargs: dict[str, object]) -> None:
    """Bad settings raise ConfigurationError naming the argument."""
    with pytest.raises(ConfigurationError):
        Retry(**kwargs)  # type: ignore[arg-type]


def test_timedelta_durations_are_accepted() -> None:
    """Durations accept datetime.timedelta as well as float seconds."""
    retry = Retry(base_delay=timedelta(milliseconds=50), max_delay=timedelta(seconds=2))
    assert (retry.base_delay, retry.max_delay) == (0.05, 2.0)


def test_default_retryable() -> None:
    """The default classification: retryable AppErrors and httpx transport errors only."""
    retry = Retry()
    assert retry.is_retryable(UpstreamError())
    assert retry.is_retryable(httpx.ReadError("x"))
    assert not retry.is_retryable(BadRequestError())
    assert not retry.is_retryable(OSError())


async def test_budget_stops_retries_and_reports_once() -> None:
    """With the budget spent, failures are not retried and one event is published."""
    clock = ManualClock()
    bus = EventBus(log=False)
    seen: list[Event] = []
    bus.subscribe(seen.append)
    budget = RetryBudget(ratio=0.1, min_retries_per_second=0, window=10, clock=clock)
    retry = Retry(attempts=3, budget=budget, clock=clock, events=bus, random=constant(0))
    calls = 0

    async def down() -> None:
        nonlocal calls
        calls += 1
        raise UpstreamError()

    for _ in range(100):
        with pytest.raises(RetryExhaustedError):
            await retry.call(down)
    assert calls <= 100 * 1.1 + 1
    # One event for the whole episode, not one per refused retry (each retry made is one
    # retry.attempt of its own).
    assert [e.kind for e in seen if e.kind != "retry.attempt"] == ["retry.budget_exhausted"]
    assert budget.exhausted
