from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from contextlib import nullcontext

import httpx
import pytest
from fastapi import Depends, FastAPI

from fastapi_resilience import (
    Bulkhead,
    CircuitBreaker,
    ResilienceSettings,
    Retry,
    breaker_dependency,
    get_breaker,
    install,
    install_exception_handlers,
    watch_outbound,
)
from fastapi_resilience.events import Event, EventBus
from fastapi_resilience.exceptions import (
    BadRequestError,
    BulkheadFullError,
    CircuitOpenError,
    ConfigurationError,
    NotFoundError,
    RetryExhaustedError,
    UpstreamError,
    UpstreamTimeoutError,
)
from fastapi_resilience.health import HealthChecks
from fastapi_resilience.outbound import (
    BreakerRegistry,
    BreakerState,
    BulkheadRegistry,
    SlidingWindow,
    breaker_health_check,
)
from fastapi_resilience.testing import ManualClock

pytestmark = pytest.mark.anyio


class Upstream:
    """An async callable standing in for an upstream: fails while ``failing``, counts calls."""

    def __init__(self) -> None:
        self.calls = 0
        self.failing = False
        self.error: Callable[[], BaseException] = lambda: UpstreamError("boom")

    async def __call__(self) -> str:
        self.calls += 1
        if self.failing:
            raise self.error()
        return "ok"


@pytest.fixture(name="clock")
def _clock() -> ManualClock:
    return ManualClock()


@pytest.fixture(name="registry")
def _registry() -> BreakerRegistry:
    return BreakerRegistry()


@pytest.fixture(name="events")
def _events() -> tuple[EventBus, list[Event]]:
    bus = EventBus(log=False)
    seen: list[Event] = []
    bus.subscribe(seen.append)
    return bus, seen


def make(
    clock: ManualClock, registry: BreakerRegistry, name: str = "inv", **kwargs: object
) -> CircuitBreaker:
    return CircuitBreaker(name, clock=clock, registry=registry, **kwargs)  # type: ignore[arg-type]


async def fail_times(breaker: CircuitBreaker, upstream: Upstream, n: int) -> None:
    upstream.failing = True
    for _ in range(n):
        with pytest.raises(UpstreamError):
            await breaker.call(upstream)


async def test_opens_after_threshold_consecutive_failures(
    clock: ManualClock, registry: BreakerRegistry
) -> None:
    """The breaker opens on the failure_threshold-th failure in a row, not before."""
    breaker = make(clock, registry, failure_threshold=3)
    upstream = Upstream()
    await fail_times(breaker, upstream, 2)
    assert breaker.state == "closed"
    assert breaker.failures == 2
    await fail_times(breaker, upstream, 1)
    assert breaker.state == "open"


async def test_success_resets_the_consecutive_count(
    clock: ManualClock, registry: BreakerRegistry
) -> None:
    """A success in between starts the count of consecutive failures again."""
    breaker = make(clock, registry, failure_threshold=3)
    upstream = Upstream()
    await fail_times(breaker, upstream, 2)
    upstream.failing = False
    assert await breaker.call(upstream) == "ok"
    await fail_times(breaker, upstream, 2)
    assert breaker.state == "closed"


async def test_open_rejects_at_once_without_calling(
    clock: ManualClock, registry: BreakerRegistry
) -> None:
    """While open, calls raise CircuitOpenError with the time left and never reach fn."""
    breaker = make(clock, registry, failure_threshold=1, recovery_timeout=30)
    upstream = Upstream()
    await fail_times(breaker, upstream, 1)
    clock.advance(10.5)
    with pytest.raises(CircuitOpenError) as info:
        await breaker.call(upstream)
    assert upstream.calls == 1
    assert info.value.retry_after == pytest.approx(19.5)
    assert info.value.headers["Retry-After"] == "20"
    assert info.value.extensions["breaker"] == "inv"
    assert info.value.detail == "Circuit 'inv' is open; the call was not made."
    assert breaker.time_left_open() == pytest.approx(19.5)


async def test_half_open_after_recovery_then_success_closes(
    clock: ManualClock, registry: BreakerRegistry
) -> None:
    """After recovery_timeout a trial call goes through and its success closes the breaker."""
    breaker = make(clock, registry, failure_threshold=1, recovery_timeout=5)
    upstream = Upstream()
    await fail_times(breaker, upstream, 1)
    clock.advance(5)
    assert breaker.state == "half_open"
    assert breaker.time_left_open() == 0
    upstream.failing = False
    assert await breaker.call(upstream) == "ok"
    assert breaker.state == "closed"


async def test_half_open_failure_reopens(clock: ManualClock, registry: BreakerRegistry) -> None:
    """A failed trial opens the breaker again for another recovery_timeout."""
    breaker = make(clock, registry, failure_threshold=1, recovery_timeout=5)
    upstream = Upstream()
    await fail_times(breaker, upstream, 1)
    clock.advance(5)
    await fail_times(breaker, upstream, 1)
    assert breaker.state == "open"
    assert breaker.time_left_open() == pytest.approx(5)


@pytest.mark.parametrize("max_calls", [1, 3])
async def test_half_open_admits_exactly_max_calls_among_100_concurrent(
    clock: ManualClock, registry: BreakerRegistry, max_calls: int
) -> None:
    """100 concurrent callers after recovery: exactly half_open_max_calls reach fn."""
    breaker = make(
        clock, registry, failure_threshold=1, recovery_timeout=1, half_open_max_calls=max_calls
    )
    upstream = Upstream()
    await fail_times(breaker, upstream, 1)
    clock.advance(1)
    upstream.failing = False
    gate = asyncio.Event()
    entered = 0

    async def slow_trial() -> str:
        nonlocal entered
        entered += 1
        await gate.wait()
        return "ok"

    async def one() -> str:
        try:
            return await breaker.call(slow_trial)
        except CircuitOpenError:
            return "rejected"

    tasks = [asyncio.create_task(one()) for _ in range(100)]
    await asyncio.sleep(0)
    assert entered == max_calls
    gate.set()
    results = await asyncio.gather(*tasks)
    assert results.count("ok") == max_calls
    assert results.count("rejected") == 100 - max_calls
    assert breaker.state == "closed"


async def test_success_threshold_needs_that_many_trials(
    clock: ManualClock, registry: BreakerRegistry
) -> None:
    """With success_threshold=3 the breaker stays half-open until the third trial success."""
    breaker = make(clock, registry, failure_threshold=1, recovery_timeout=1, success_threshold=3)
    upstream = Upstream()
    await fail_times(breaker, upstream, 1)
    clock.advance(1)
    upstream.failing = False
    await breaker.call(upstream)
    await breaker.call(upstream)
    assert breaker.state == "half_open"
    await breaker.call(upstream)
    assert breaker.state == "closed"


@pytest.mark.parametrize(
    "error", [BadRequestError("no"), NotFoundError("gone")], ids=["400", "404"]
)
async def test_client_errors_are_ignored(
    clock: ManualClock, registry: BreakerRegistry, error: Exception
) -> None:
    """A ClientError neither counts as a failure nor resets the consecutive count."""
    breaker = make(clock, registry, failure_threshold=3)
    upstream = Upstream()
    await fail_times(breaker, upstream, 2)
    upstream.error = lambda: error
    for _ in range(10):
        with pytest.raises(type(error)):
            await breaker.call(upstream)
    assert breaker.state == "closed"
    assert breaker.failures == 2


async def test_retries_that_ended_on_a_full_bulkhead_are_ignored(
    clock: ManualClock, registry: BreakerRegistry
) -> None:
    """A breaker around a user's own Retry that names BulkheadFullError: while the bulkhead is
    full, each call ends in RetryExhaustedError chaining the refusal, which says nothing about
    the upstream, so the breaker (threshold 2) stays closed and the upstream was never called."""
    breaker = make(clock, registry, failure_threshold=2)
    bulkhead = Bulkhead("pool", max_concurrent=1, registry=None)
    retry = Retry(attempts=2, retry_on=(BulkheadFullError,), clock=clock)
    upstream = Upstream()
    async with bulkhead:
        for _ in range(5):
            with pytest.raises(RetryExhaustedError) as info:
                await breaker.call(retry.call, bulkhead.call, upstream)
            assert isinstance(info.value.__cause__, BulkheadFullError)
    assert breaker.state == "closed"
    assert upstream.calls == 0
    assert await breaker.call(retry.call, bulkhead.call, upstream) == "ok"


@pytest.mark.parametrize(
    "error",
    [UpstreamTimeoutError("slow"), TimeoutError(), httpx.ConnectError("refused")],
    ids=["upstream-timeout", "timeout", "connect"],
)
async def test_timeouts_and_transport_errors_count(
    clock: ManualClock, registry: BreakerRegistry, error: Exception
) -> None:
    """Timeouts and connect errors count as failures by default."""
    breaker = make(clock, registry, failure_threshold=2)
    upstream = Upstream()
    upstream.failing = True
    upstream.error = lambda: error
    for _ in range(2):
        with pytest.raises(type(error)):
            await breaker.call(upstream)
    assert breaker.state == "open"


async def test_http_status_error_4xx_is_not_a_failure_but_5xx_is(
    clock: ManualClock, registry: BreakerRegistry
) -> None:
    """httpx's raise_for_status: a 404 leaves the breaker alone, a 503 counts."""
    breaker = make(clock, registry, failure_threshold=1)
    request = httpx.Request("GET", "http://upstream/x")

    def status_error(code: int) -> httpx.HTTPStatusError:
        return httpx.HTTPStatusError("x", request=request, response=httpx.Response(code))

    upstream = Upstream()
    upstream.failing = True
    upstream.error = lambda: status_error(404)
    with pytest.raises(httpx.HTTPStatusError):
        await breaker.call(upstream)
    assert breaker.state == "closed"
    upstream.error = lambda: status_error(503)
    with pytest.raises(httpx.HTTPStatusError):
        await breaker.call(upstream)
    assert breaker.state == "open"


async def test_record_on_and_predicate_classify(
    clock: ManualClock, registry: BreakerRegistry
) -> None:
    """Only record_on types count; an unrecorded exception counts as a success."""
    breaker = make(clock, registry, failure_threshold=2, record_on=(UpstreamTimeoutError,))
    upstream = Upstream()
    await fail_times(breaker, upstream, 1)  # UpstreamError: not recorded -> success
    assert breaker.failures == 0
    upstream.error = lambda: UpstreamTimeoutError("slow")
    for _ in range(2):
        with pytest.raises(UpstreamTimeoutError):
            await breaker.call(upstream)
    assert breaker.state == "open"

    picky = make(clock, registry, "picky", failure_threshold=1, is_failure=lambda e: "db" in str(e))
    upstream.error = lambda: RuntimeError("cache miss")
    with pytest.raises(RuntimeError):
        await picky.call(upstream)
    assert picky.state == "closed"
    upstream.error = lambda: RuntimeError("db down")
    with pytest.raises(RuntimeError):
        await picky.call(upstream)
    assert picky.state == "open"


async def test_cancelled_trial_gives_its_permit_back(
    clock: ManualClock, registry: BreakerRegistry
) -> None:
    """A trial call cancelled in half-open is ignored and frees its permit for the next."""
    breaker = make(clock, registry, failure_threshold=1, recovery_timeout=1)
    upstream = Upstream()
    await fail_times(breaker, upstream, 1)
    clock.advance(1)
    task = asyncio.create_task(breaker.call(asyncio.sleep, 10))
    await asyncio.sleep(0)
    with pytest.raises(CircuitOpenError):
        await breaker.call(upstream)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert breaker.state == "half_open"
    upstream.failing = False
    assert await breaker.call(upstream) == "ok"
    assert breaker.state == "closed"


async def test_stale_outcome_from_before_opening_is_ignored(
    clock: ManualClock, registry: BreakerRegistry
) -> None:
    """A slow call admitted while closed cannot close (or re-open) a breaker that moved on."""
    breaker = make(clock, registry, failure_threshold=1, recovery_timeout=5)
    gate = asyncio.Event()

    async def slow_ok() -> str:
        await gate.wait()
        return "ok"

    slow = asyncio.create_task(breaker.call(slow_ok))
    await asyncio.sleep(0)
    await fail_times(breaker, Upstream(), 1)
    assert breaker.state == "open"
    gate.set()
    assert await slow == "ok"
    assert breaker.state == "open"


async def test_count_window_opens_on_failure_rate(
    clock: ManualClock, registry: BreakerRegistry
) -> None:
    """A count window opens at the failure rate once minimum_calls are in, not before."""
    window = SlidingWindow.count_based(10, failure_rate_threshold=0.5, minimum_calls=6)
    breaker = make(clock, registry, window=window)
    upstream = Upstream()
    # Alternate: the consecutive-failure rule is off with a window, so only the rate trips it.
    for i in range(5):
        upstream.failing = i % 2 == 0
        with pytest.raises(UpstreamError) if upstream.failing else nullcontext():
            await breaker.call(upstream)
    assert breaker.state == "closed"  # 3/5 failing, but under minimum_calls
    upstream.failing = False
    await breaker.call(upstream)
    assert breaker.state == "open"  # 3/6 = 50 %
    counts = breaker.window_counts()
    assert counts is not None


async def test_count_window_forgets_old_calls(
    clock: ManualClock, registry: BreakerRegistry
) -> None:
    """Only the last `size` calls count: old failures roll out of a count window."""
    window = SlidingWindow.count_based(4, failure_rate_threshold=0.75, minimum_calls=4)
    breaker = make(clock, registry, window=window)
    upstream = Upstream()
    await fail_times(breaker, upstream, 2)
    upstream.failing = False
    for _ in range(4):
        await breaker.call(upstream)
    await fail_times(breaker, upstream, 2)
    assert breaker.state == "closed"  # 2 of the last 4
    assert breaker.window_counts().failures == 2


async def test_slow_calls_open_the_breaker(clock: ManualClock, registry: BreakerRegistry) -> None:
    """Calls slower than slow_call_duration count as slow and open it at the slow rate."""
    window = SlidingWindow.count_based(
        4, minimum_calls=4, slow_call_duration=1.0, slow_call_rate_threshold=0.75
    )
    breaker = make(clock, registry, window=window)

    async def slow() -> str:
        clock.advance(1.5)
        return "ok"

    for _ in range(3):
        await breaker.call(slow)
    await breaker.call(Upstream())
    assert breaker.state == "open"


async def test_time_window_ages_out_failures(clock: ManualClock, registry: BreakerRegistry) -> None:
    """A time window counts only the last `size` seconds of calls."""
    window = SlidingWindow.time_based(10, failure_rate_threshold=0.5, minimum_calls=4)
    breaker = make(clock, registry, window=window)
    upstream = Upstream()
    await fail_times(breaker, upstream, 3)
    clock.advance(11)
    upstream.failing = False
    for _ in range(3):
        await breaker.call(upstream)
    await fail_times(breaker, upstream, 1)
    assert breaker.state == "closed"  # 1 failure of 4 in the window
    clock.advance(1)
    await fail_times(breaker, upstream, 2)
    assert breaker.state == "open"  # 3 of 6


async def test_window_and_threshold_together(clock: ManualClock, registry: BreakerRegistry) -> None:
    """With a window and an explicit failure_threshold, either rule opens it."""
    window = SlidingWindow.count_based(100, minimum_calls=100)
    breaker = make(clock, registry, window=window, failure_threshold=2)
    await fail_times(breaker, Upstream(), 2)
    assert breaker.state == "open"


async def test_open_time_grows_on_repeated_trips_and_is_capped(
    clock: ManualClock, registry: BreakerRegistry
) -> None:
    """Each trip straight from half-open doubles the open time up to the cap; a close resets."""
    breaker = make(
        clock, registry, failure_threshold=1, recovery_timeout=2, max_recovery_timeout=10
    )
    upstream = Upstream()
    await fail_times(breaker, upstream, 1)
    seen = [breaker.time_left_open()]
    for _ in range(4):
        clock.advance(breaker.time_left_open())
        await fail_times(breaker, upstream, 1)
        seen.append(breaker.time_left_open())
    assert seen == [2, 4, 8, 10, 10]
    clock.advance(10)
    upstream.failing = False
    await breaker.call(upstream)
    await fail_times(breaker, upstream, 1)
    assert breaker.time_left_open() == 2


async def test_every_transition_published_once_and_listeners_called(
    clock: ManualClock, registry: BreakerRegistry, events: tuple[EventBus, list[Event]]
) -> None:
    """opened, half_open, closed: one event each, with the figures, and listeners see them."""
    bus, seen = events
    breaker = make(clock, registry, failure_threshold=2, recovery_timeout=3, events=bus)
    changes: list[tuple[BreakerState, BreakerState]] = []
    remove = breaker.add_listener(lambda b, old, new: changes.append((old, new)))
    breaker.add_listener(lambda b, old, new: 1 / 0)  # a broken listener changes nothing
    upstream = Upstream()
    await fail_times(breaker, upstream, 2)
    for _ in range(5):
        with pytest.raises(CircuitOpenError):
            await breaker.call(upstream)
    clock.advance(3)
    upstream.failing = False
    await breaker.call(upstream)
    assert [e.kind for e in seen] == ["breaker.opened", "breaker.half_open", "breaker.closed"]
    assert seen[0].name == "inv"
    assert seen[0].attributes["failures"] == 2
    assert seen[0].attributes["time_left_open"] == 3
    assert changes == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]
    remove()
    breaker.force_open()
    assert len(changes) == 3


async def test_manual_control(clock: ManualClock, registry: BreakerRegistry) -> None:
    """force_open rejects calls, force_closed admits them, reset clears counts."""
    breaker = make(clock, registry, failure_threshold=3)
    upstream = Upstream()
    breaker.force_open()
    with pytest.raises(CircuitOpenError):
        await breaker.call(upstream)
    assert upstream.calls == 0
    breaker.force_closed()
    assert await breaker.call(upstream) == "ok"
    await fail_times(breaker, upstream, 2)
    breaker.reset()
    assert breaker.failures == 0
    await fail_times(breaker, upstream, 2)
    assert breaker.state == "closed"


async def test_context_manager_and_decorator(clock: ManualClock, registry: BreakerRegistry) -> None:
    """`async with breaker:` and `@breaker` guard calls exactly like breaker.call."""
    breaker = make(clock, registry, failure_threshold=2)

    @breaker
    async def fetch(fail: bool) -> str:
        if fail:
            raise UpstreamError("boom")
        return "ok"

    assert await fetch(False) == "ok"
    assert fetch.__name__ == "fetch"
    with pytest.raises(UpstreamError):
        await fetch(True)
    with pytest.raises(UpstreamError):
        async with breaker:
            raise UpstreamError("boom")
    assert breaker.state == "open"
    with pytest.raises(CircuitOpenError):
        async with breaker:
            pytest.fail("the block must not run while open")


async def test_context_manager_holds_a_half_open_permit(
    clock: ManualClock, registry: BreakerRegistry
) -> None:
    """A half-open `async with` block is the trial: others are rejected until it ends."""
    breaker = make(clock, registry, failure_threshold=1, recovery_timeout=1)
    await fail_times(breaker, Upstream(), 1)
    clock.advance(1)
    async with breaker:
        with pytest.raises(CircuitOpenError):
            await breaker.call(Upstream())
    assert breaker.state == "closed"


async def test_record_success_and_failure_from_outside(
    clock: ManualClock, registry: BreakerRegistry
) -> None:
    """Code that judges a result itself (a 5xx answer) can feed the breaker directly."""
    breaker = make(clock, registry, failure_threshold=2)
    breaker.record_failure()
    breaker.record_success()
    breaker.record_failure()
    assert breaker.state == "closed"
    breaker.record_failure(UpstreamError("503"))
    assert breaker.state == "open"
    assert not breaker.allow()


async def test_registry_by_name(clock: ManualClock, default_breakers: BreakerRegistry) -> None:
    """Breakers register by name; the newest of a name wins; unknown names raise LookupError."""
    first = CircuitBreaker("catalog-test", clock=clock)
    assert get_breaker("catalog-test") is first
    second = CircuitBreaker("catalog-test", clock=clock)
    assert get_breaker("catalog-test") is second
    default_breakers.unregister("catalog-test")
    with pytest.raises(LookupError, match="catalog-test"):
        get_breaker("catalog-test")
    alone = CircuitBreaker("alone", registry=None)
    with pytest.raises(LookupError, match="alone"):
        get_breaker("alone")
    assert alone.state == "closed"


async def test_health_check_degraded_while_a_breaker_is_open(
    clock: ManualClock, registry: BreakerRegistry
) -> None:
    """The readiness check says degraded and names the open breaker, ok once all are closed."""
    breaker = make(clock, registry, "payments", failure_threshold=1)
    make(clock, registry, "search")
    checks = HealthChecks()
    checks.add("breakers", breaker_health_check(registry), critical=False)
    assert (await checks.run())[0] == "ok"
    breaker.force_open()
    status, results = await checks.run()
    assert status == "degraded"
    assert "payments open" in results["breakers"]["detail"]
    assert "search" not in results["breakers"]["detail"]
    breaker.force_closed()
    assert (await checks.run())[0] == "ok"


async def test_breaker_dependency_is_cached_and_overridable(
    clock: ManualClock, default_breakers: BreakerRegistry
) -> None:
    """breaker_dependency(name) is one callable per name, so dependency_overrides replace it."""
    CircuitBreaker("inventory-dep", failure_threshold=1, clock=clock)
    assert breaker_dependency("inventory-dep") is breaker_dependency("inventory-dep")
    app = FastAPI()
    install_exception_handlers(app)

    @app.get("/state")
    async def state(
        b: CircuitBreaker = Depends(breaker_dependency("inventory-dep")),  # noqa: B008
    ) -> dict[str, str]:
        return {"name": b.name, "state": b.state}

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        assert (await client.get("/state")).json() == {"name": "inventory-dep", "state": "closed"}
        fake = CircuitBreaker("fake", registry=None)
        fake.force_open()
        app.dependency_overrides[breaker_dependency("inventory-dep")] = lambda: fake
        assert (await client.get("/state")).json() == {"name": "fake", "state": "open"}
    default_breakers.unregister("inventory-dep")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"failure_threshold": 0}, "failure_threshold"),
        ({"recovery_timeout": -1}, "recovery_timeout"),
        ({"half_open_max_calls": 0}, "half_open_max_calls"),
        ({"success_threshold": 0}, "success_threshold"),
        ({"recovery_timeout": 10, "max_recovery_timeout": 5}, "max_recovery_timeout"),
        ({"failure_threshold": None}, "failure_threshold"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs: dict[str, object], field: str) -> None:
    """A bad argument raises ConfigurationError naming it."""
    with pytest.raises(ConfigurationError, match=field):
        CircuitBreaker("bad", registry=None, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"size": 0}, "size"),
        ({"failure_rate_threshold": 0}, "failure_rate_threshold"),
        ({"failure_rate_threshold": 1.5}, "failure_rate_threshold"),
        ({"minimum_calls": 0}, "minimum_calls"),
        ({"slow_call_duration": 0}, "slow_call_duration"),
        ({"kind": "hourly"}, "kind"),
    ],
)
def test_bad_window_fails_at_construction(kwargs: dict[str, object], field: str) -> None:
    """A bad window argument raises ConfigurationError naming it."""
    with pytest.raises(ConfigurationError, match=field):
        SlidingWindow(**kwargs)  # type: ignore[arg-type]


async def test_watch_outbound_makes_readiness_degraded_and_routes_events(
    clock: ManualClock, registry: BreakerRegistry
) -> None:
    """After watch_outbound, /health/ready says degraded naming an open breaker, and breaker
    and bulkhead events reach the app's event bus."""
    app = FastAPI()
    resilience = install(app, ResilienceSettings(rate_limit_enabled=False))
    seen: list[Event] = []
    resilience.events.subscribe(seen.append)
    bulkheads = BulkheadRegistry()
    watch_outbound(resilience, breakers=registry, bulkheads=bulkheads)
    breaker = make(clock, registry, "payments", failure_threshold=1)
    bulkhead = Bulkhead("pool", max_concurrent=1, registry=bulkheads)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        assert (await client.get("/health/ready")).json()["status"] == "ok"
        breaker.force_open()
        ready = await client.get("/health/ready")
    assert ready.status_code == 200
    body = ready.json()
    assert body["status"] == "degraded"
    assert "payments open" in body["checks"]["breakers"]["detail"]
    async with bulkhead:
        with pytest.raises(CircuitOpenError):
            await breaker.call(Upstream())
        with pytest.raises(BulkheadFullError):
            await bulkhead.acquire()
    changes = [e.kind for e in seen if e.level > logging.DEBUG]  # not the per-call refusal
    assert changes == ["breaker.opened", "bulkhead.full", "bulkhead.available"]
