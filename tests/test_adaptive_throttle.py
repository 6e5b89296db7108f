from __future__ import annotations

import pytest

from fastapi_resilience import Bulkhead, Retry, deadline, timeout
from fastapi_resilience.events import Event, EventBus
from fastapi_resilience.exceptions import (
    BulkheadFullError,
    ConfigurationError,
    DeadlineCutError,
    NotFoundError,
    RetryExhaustedError,
    ThrottledError,
    UpstreamError,
    UpstreamTimeoutError,
)
from fastapi_resilience.outbound import AdaptiveThrottle
from fastapi_resilience.testing import ManualClock

pytestmark = pytest.mark.anyio


def test_healthy_upstream_is_never_throttled() -> None:
    """While the upstream accepts everything, the drop probability stays 0."""
    throttle = AdaptiveThrottle(clock=ManualClock(), random=lambda: 0.0)
    for _ in range(1000):
        assert throttle.allow()
        throttle.record()
    assert throttle.probability() == 0.0


def test_probability_follows_the_sre_book_formula() -> None:
    """p = max(0, (requests - K * accepts) / (requests + 1)) over the window."""
    throttle = AdaptiveThrottle(k=2, min_requests=0, clock=ManualClock(), random=lambda: 0.99)
    for i in range(100):
        assert throttle.allow()
        throttle.record(None if i < 20 else UpstreamError())
    assert throttle.probability() == pytest.approx((100 - 2 * 20) / 101)


async def test_refusing_upstream_gets_about_k_times_its_accepts() -> None:
    """When the upstream refuses everything, few calls reach it; the rest are dropped locally."""
    throttle = AdaptiveThrottle(k=2, min_requests=10, clock=ManualClock())
    reached = 0

    async def down() -> None:
        nonlocal reached
        reached += 1
        raise UpstreamError()

    outcomes: dict[str, int] = {"throttled": 0, "upstream": 0}
    for _ in range(1000):
        try:
            await throttle.call(down)
        except ThrottledError:
            outcomes["throttled"] += 1
        except UpstreamError:
            outcomes["upstream"] += 1
    assert reached == outcomes["upstream"]
    # With zero accepts, p = n / (n + 1): only a handful of calls get through.
    assert reached < 60
    assert outcomes["throttled"] > 900


async def test_calls_the_callers_deadline_ended_are_no_refusals() -> None:
    """Calls a spent request deadline stopped before they started never raise the drop
    probability: the upstream refused nothing."""
    clock = ManualClock()
    throttle = AdaptiveThrottle(min_requests=1, clock=clock, random=lambda: 0.0)
    started = 0

    async def guarded() -> None:
        nonlocal started
        async with timeout(5.0):
            started += 1

    with deadline(1.0, clock=clock):
        clock.advance(1.0)
        for _ in range(50):
            with pytest.raises(UpstreamTimeoutError):
                await throttle.call(guarded)
    assert started == 0
    assert throttle.probability() == 0.0


async def test_calls_a_clients_deadline_cut_leave_the_drop_probability_as_it_was() -> None:
    """After 20 refusals, 50 calls that a deadline the client chose cut are neither accepts
    nor refusals: the drop probability is where the refusals put it (as accepts they would
    have brought it to 0)."""
    throttle = AdaptiveThrottle(k=2, clock=ManualClock(), random=lambda: 0.999)
    for _ in range(20):
        assert throttle.allow()
        throttle.record(UpstreamError())
    before = throttle.probability()

    async def cut() -> None:
        raise DeadlineCutError("the client's deadline ran out")

    for _ in range(50):
        with pytest.raises(DeadlineCutError):
            await throttle.call(cut)
    assert before == pytest.approx(20 / 21)
    assert throttle.probability() == before


async def test_recovers_when_the_window_forgets_the_outage() -> None:
    """After a window of accepts, calls are let through again and a stop event is published."""
    clock = ManualClock()
    bus = EventBus(log=False)
    seen: list[Event] = []
    bus.subscribe(seen.append)
    throttle = AdaptiveThrottle(window=60, clock=clock, events=bus, name="payments")
    for _ in range(100):
        if throttle.allow():
            throttle.record(UpstreamError())
    assert throttle.probability() > 0.9
    clock.advance(61)
    assert throttle.probability() == 0.0
    assert throttle.allow()
    assert [e.kind for e in seen] == ["throttle.started", "throttle.stopped"]
    assert seen[0].name == "payments"


def test_non_overload_errors_count_as_accepted() -> None:
    """A 404 from the upstream is an answer, not a refusal; nor is a local drop. Only a
    refusal by the upstream raises the drop probability."""

    def probability_after_20(error: Exception) -> float:
        throttle = AdaptiveThrottle(k=2, min_requests=0, clock=ManualClock(), random=lambda: 0.999)
        for _ in range(20):
            assert throttle.allow()
            throttle.record(error)
        return throttle.probability()

    assert probability_after_20(NotFoundError()) == 0.0
    assert probability_after_20(UpstreamError()) == pytest.approx(20 / 21)
    assert probability_after_20(ThrottledError()) == 0.0


async def test_retries_that_ended_on_a_full_bulkhead_are_no_refusals() -> None:
    """Behind a user's own Retry that names BulkheadFullError, calls that a full bulkhead
    refused at every attempt end in RetryExhaustedError chaining the refusal: the upstream
    refused nothing, so the drop probability stays 0."""
    clock = ManualClock()
    throttle = AdaptiveThrottle(min_requests=0, clock=clock, random=lambda: 0.999)
    bulkhead = Bulkhead("pool", max_concurrent=1, registry=None)
    retry = Retry(attempts=2, retry_on=(BulkheadFullError,), clock=clock)

    async def upstream() -> None:
        raise AssertionError("a full bulkhead let a call through")

    async with bulkhead:
        for _ in range(20):
            with pytest.raises(RetryExhaustedError):
                await throttle.call(retry.call, bulkhead.call, upstream)
    assert throttle.probability() == 0.0


async def test_throttled_error_is_not_retried() -> None:
    """A local drop is never retried: it would add the load the throttle sheds."""
    assert not Retry().is_retryable(ThrottledError())


@pytest.mark.parametrize("kwargs", [{"k": 0.5}, {"window": 0}, {"min_requests": -1}])
def test_bad_arguments(kwargs: dict[str, float]) -> None:
    """K below 1, an empty window or a negative minimum are configuration errors."""
    with pytest.raises(ConfigurationError):
        AdaptiveThrottle(**kwargs)  # type: ignore[arg-type]
