"""Shared breaker state in a real redis-server: two breakers with two clients stand for two
instances of an app."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from loopback import RedisServer
from redis.asyncio import Redis

from fastapi_resilience import CircuitBreaker, deadline, timeout
from fastapi_resilience.events import Event, EventBus
from fastapi_resilience.exceptions import (
    CircuitOpenError,
    ConfigurationError,
    NotFoundError,
    UpstreamError,
    UpstreamTimeoutError,
)
from fastapi_resilience.outbound import BreakerRegistry, RedisBreakerStore
from fastapi_resilience.testing import ManualClock

pytestmark = [pytest.mark.anyio, pytest.mark.redis]


class Instance:
    """One app instance: its own Redis client, store, registry and breaker."""

    def __init__(self, url: str, clock: ManualClock, bus: EventBus, **options: Any) -> None:
        self.client: Redis = Redis.from_url(url)
        self.store = RedisBreakerStore(
            self.client,
            refresh_interval=options.pop("refresh_interval", 10.0),
            timeout=options.pop("store_timeout", 2.0),
            retry_interval=1.0,
        )
        self.breaker = CircuitBreaker(
            "shared",
            clock=clock,
            events=bus,
            registry=BreakerRegistry(),
            state_store=self.store,
            **options,
        )

    async def fail(self, n: int = 1) -> None:
        for _ in range(n):
            with pytest.raises(UpstreamError):
                await self.breaker.call(_failing)
        await self.store.flush()


async def _failing() -> None:
    raise UpstreamError("boom")


async def _ok() -> str:
    return "ok"


@pytest.fixture(name="bus")
def _bus() -> tuple[EventBus, list[Event]]:
    bus = EventBus(log=False)
    seen: list[Event] = []
    bus.subscribe(seen.append)
    return bus, seen


@pytest.fixture(name="pair")
async def _pair(redis_server: RedisServer, bus: tuple[EventBus, list[Event]]) -> AsyncIterator[Any]:
    clock = ManualClock()
    made: list[Instance] = []

    def make(**options: Any) -> Instance:
        instance = Instance(redis_server.url, clock, bus[0], **options)
        made.append(instance)
        return instance

    yield make, clock
    for instance in made:
        await instance.store.aclose()
        await instance.client.aclose()


async def test_failures_from_two_instances_add_up_and_both_see_it_open(pair: Any) -> None:
    """2 failures on A and 1 on B reach a threshold of 3: the shared breaker opens for both."""
    make, _ = pair
    a, b = make(failure_threshold=3), make(failure_threshold=3)
    await a.fail(2)
    assert a.breaker.state == "closed"
    await b.fail(1)
    assert b.breaker.state == "open"  # B's failure was the one that tripped it in Redis
    await a.store.refresh(a.breaker)
    assert a.breaker.state == "open"
    calls = 0

    async def counted() -> str:
        nonlocal calls
        calls += 1
        return "ok"

    with pytest.raises(CircuitOpenError) as info:
        await a.breaker.call(counted)
    assert calls == 0
    assert 25 < info.value.retry_after <= 30  # time left from Redis' clock


async def test_closed_calls_make_no_redis_call(pair: Any, redis_server: RedisServer) -> None:
    """In the closed state, between refreshes, 1000 successful calls send no Redis command."""
    make, _ = pair
    a = make(failure_threshold=3)
    probe = Redis.from_url(redis_server.url)
    try:
        await a.breaker.call(_ok)  # connects and refreshes once in the background
        await a.store.flush()
        before = int((await probe.info("stats"))["total_commands_processed"])
        for _ in range(1000):
            await a.breaker.call(_ok)
        await a.store.flush()
        after = int((await probe.info("stats"))["total_commands_processed"])
    finally:
        await probe.aclose()
    assert after - before == 1  # the INFO command itself


async def test_background_refresh_picks_up_another_instance_opening(pair: Any) -> None:
    """A closed instance learns that another one opened the breaker within refresh_interval."""
    make, clock = pair
    a = make(failure_threshold=1, refresh_interval=0.1)
    b = make(failure_threshold=1, refresh_interval=0.1)
    await a.breaker.call(_ok)  # A has refreshed once, closed
    await a.store.flush()
    await b.fail(1)
    assert b.breaker.state == "open"
    clock.advance(0.1)
    await a.breaker.call(_ok)  # let through on the stale view, refresh started
    await a.store.flush()
    assert a.breaker.state == "open"


async def test_half_open_permits_are_counted_across_instances(pair: Any) -> None:
    """After recovery, 50 concurrent callers on each of two instances: exactly
    half_open_max_calls reach the upstream in total, and their success closes both."""
    make, _ = pair
    options = {"failure_threshold": 1, "recovery_timeout": 0.0, "half_open_max_calls": 2}
    a, b = make(**options), make(**options)
    await a.fail(1)
    await b.store.refresh(b.breaker)
    gate = asyncio.Event()
    entered = 0

    async def trial() -> str:
        nonlocal entered
        entered += 1
        await gate.wait()
        return "ok"

    async def one(instance: Instance) -> str:
        try:
            return await instance.breaker.call(trial)
        except CircuitOpenError:
            return "rejected"

    tasks = [asyncio.create_task(one(i)) for i in (a, b) for _ in range(50)]
    for _ in range(200):  # bounded: each admission is one Redis round trip
        if sum(t.done() for t in tasks) == 98:
            break
        await asyncio.sleep(0.01)
    assert entered == 2
    gate.set()
    results = await asyncio.gather(*tasks)
    assert results.count("ok") == 2
    assert results.count("rejected") == 98
    await b.store.refresh(b.breaker)
    await a.store.refresh(a.breaker)
    assert (a.breaker.state, b.breaker.state) == ("closed", "closed")


async def test_failed_trial_reopens_for_everyone(pair: Any) -> None:
    """A failed trial on one instance reopens the shared breaker."""
    make, _ = pair
    a = make(failure_threshold=1, recovery_timeout=0.0)
    b = make(failure_threshold=1, recovery_timeout=0.0)
    await a.fail(1)
    await b.store.refresh(b.breaker)
    assert b.breaker.state == "half_open"
    with pytest.raises(UpstreamError):
        await b.breaker.call(_failing)
    await a.store.refresh(a.breaker)
    # recovery_timeout 0: open again and at once half-open, with the trial counted.
    assert a.breaker.state == "half_open"
    assert await a.breaker.call(_ok) == "ok"
    await b.store.refresh(b.breaker)
    assert b.breaker.state == "closed"


async def test_async_with_and_ignored_trials_use_shared_permits(pair: Any) -> None:
    """`async with` in half-open holds a shared permit (the other instance is refused), and a
    trial ending in a ClientError hands its permit back without closing or opening."""
    make, _ = pair
    a = make(failure_threshold=1, recovery_timeout=0.0)
    b = make(failure_threshold=1, recovery_timeout=0.0)
    await a.fail(1)
    await b.store.refresh(b.breaker)

    async def not_found() -> None:
        raise NotFoundError("no such sku")

    with pytest.raises(NotFoundError):
        await a.breaker.call(not_found)
    async with a.breaker:
        with pytest.raises(CircuitOpenError):
            async with b.breaker:
                pytest.fail("the permit is held by the other instance")
    await b.store.refresh(b.breaker)
    assert (a.breaker.state, b.breaker.state) == ("closed", "closed")


async def test_a_trial_the_deadline_stopped_hands_its_shared_permit_back(
    pair: Any, bus: tuple[EventBus, list[Event]]
) -> None:
    """A half-open trial that the request's deadline stopped before it started is neither a
    failure (no instance opens the breaker again) nor a success: the shared permit goes back
    and the other instance's trial closes the breaker."""
    make, clock = pair
    a = make(failure_threshold=1, recovery_timeout=0.0)
    b = make(failure_threshold=1, recovery_timeout=0.0)
    await a.fail(1)
    await b.store.refresh(b.breaker)
    assert b.breaker.state == "half_open"
    opened = [e.kind for e in bus[1]].count("breaker.opened")
    started = 0

    async def guarded() -> None:
        nonlocal started
        async with timeout(5.0):
            started += 1

    with deadline(1.0, clock=clock):
        clock.advance(1.0)
        with pytest.raises(UpstreamTimeoutError):
            await a.breaker.call(guarded)
    await a.store.refresh(a.breaker)
    assert started == 0
    assert [e.kind for e in bus[1]].count("breaker.opened") == opened
    assert await b.breaker.call(_ok) == "ok"
    await a.store.refresh(a.breaker)
    assert (a.breaker.state, b.breaker.state) == ("closed", "closed")


async def test_force_open_and_closed_are_shared(pair: Any) -> None:
    """force_open on one instance opens the breaker for the others; force_closed closes it."""
    make, _ = pair
    a, b = make(), make()
    a.breaker.force_open(60)
    await a.store.flush()
    await b.store.refresh(b.breaker)
    assert b.breaker.state == "open"
    assert 55 < b.breaker.time_left_open() <= 60
    a.breaker.force_closed()
    await a.store.flush()
    await b.store.refresh(b.breaker)
    assert b.breaker.state == "closed"


async def test_redis_down_falls_back_to_local_state_and_says_so_once(
    pair: Any, redis_server: RedisServer, bus: tuple[EventBus, list[Event]]
) -> None:
    """With Redis gone the breaker keeps working on local state, publishing one
    store_unavailable event, and store_recovered once Redis answers again."""
    make, clock = pair
    _, seen = bus
    a = make(failure_threshold=2, recovery_timeout=5.0)
    redis_server.kill()
    await a.fail(2)
    assert a.breaker.state == "open"
    with pytest.raises(CircuitOpenError):
        await a.breaker.call(_ok)
    kinds = [e.kind for e in seen]
    assert kinds.count("breaker.store_unavailable") == 1
    assert not a.store.available

    redis_server.start()
    clock.advance(5)
    assert await a.breaker.call(_ok) == "ok"  # local half-open trial, then a push to Redis
    await a.store.flush()
    assert a.breaker.state == "closed"
    assert [e.kind for e in seen].count("breaker.store_recovered") == 1
    assert a.store.available


async def test_stalled_redis_never_holds_a_closed_call(
    pair: Any, redis_server: RedisServer, bus: tuple[EventBus, list[Event]]
) -> None:
    """With Redis stalled (SIGSTOP), closed calls, failures included, run at local speed; the
    background calls give up after the store's timeout and say so once."""
    make, _ = pair
    _, seen = bus
    # A call held for the store would take its whole timeout: 1 s, far above the bound below
    # even on a loaded machine.
    a = make(failure_threshold=1000, refresh_interval=0.0, store_timeout=1.0)
    await a.breaker.call(_ok)
    await a.store.flush()
    redis_server.stall()
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        for i in range(200):
            if i % 2:
                await a.breaker.call(_ok)
            else:
                with pytest.raises(UpstreamError):
                    await a.breaker.call(_failing)
        elapsed = loop.time() - started
        await a.store.flush()
    finally:
        redis_server.resume()
    assert elapsed < 0.5, f"200 calls took {elapsed:.3f}s with Redis stalled"
    assert [e.kind for e in seen].count("breaker.store_unavailable") == 1


async def test_stalled_redis_holds_a_trial_admission_at_most_the_store_timeout(
    pair: Any, redis_server: RedisServer
) -> None:
    """A half-open call waits for a stalled Redis no longer than the store's timeout, then the
    local breaker decides (here: a local trial that succeeds and closes it)."""
    make, clock = pair
    a = make(failure_threshold=1, recovery_timeout=0.0, store_timeout=0.2)
    await a.fail(1)
    clock.advance(1.0)  # past retry_interval, in case a slow start-up marked Redis down
    redis_server.stall()
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await a.breaker.call(_ok) == "ok"
        elapsed = loop.time() - started
    finally:
        redis_server.resume()
    assert 0.15 < elapsed < 0.5, f"waited {elapsed:.3f}s for a stalled Redis"
    assert a.breaker.state == "closed"


def test_bad_store_arguments() -> None:
    """Negative intervals or a zero timeout are configuration errors."""
    client = Redis()
    with pytest.raises(ConfigurationError, match="refresh_interval"):
        RedisBreakerStore(client, refresh_interval=-1)
    with pytest.raises(ConfigurationError, match="timeout"):
        RedisBreakerStore(client, timeout=0)
