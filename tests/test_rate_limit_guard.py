from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Coroutine, Sequence
from datetime import timedelta
from typing import Any

import pytest
from loopback import RedisServer

from fastapi_resilience.events import Event, EventBus
from fastapi_resilience.exceptions import ConfigurationError, StorageUnavailableError
from fastapi_resilience.ratelimit import (
    Decision,
    GuardedStorage,
    Limit,
    LimitCheck,
    MemoryStorage,
    RedisStorage,
    guarded_storage_from_url,
)
from fastapi_resilience.testing import ManualClock

pytestmark = pytest.mark.anyio

CHECK = [LimitCheck("tier:free:ip:1", Limit(100, 60))]
#: The event kinds docs/rate-limit-storage.md names, once each per outage.
STORAGE_DOWN_EVENT = "rate_limit.storage_down"
STORAGE_RECOVERED_EVENT = "rate_limit.storage_recovered"
#: How long a storage call may take by default (``rate_limit_storage_timeout``, at most 0.25 s).
DEFAULT_STORAGE_TIMEOUT = 0.25


class SwitchableStorage:
    """A real in-memory storage that a test can take down or make hang."""

    def __init__(self, clock: ManualClock) -> None:
        self.inner = MemoryStorage(clock=clock)
        self.mode = "up"
        self.calls = 0
        self._hang = asyncio.Event()

    async def check(self, identity_tag: str, checks: Sequence[LimitCheck]) -> Decision:
        self.calls += 1
        await self._gate()
        return await self.inner.check(identity_tag, checks)

    async def ping(self) -> bool:
        self.calls += 1
        await self._gate()
        return True

    async def _gate(self) -> None:
        if self.mode == "down":
            raise StorageUnavailableError("down")
        if self.mode == "hang":
            await self._hang.wait()

    async def aclose(self) -> None:
        self._hang.set()


@pytest.fixture(name="clock")
def _clock() -> ManualClock:
    return ManualClock()


@pytest.fixture(name="events")
def _events() -> list[Event]:
    return []


@pytest.fixture(name="bus")
def _bus(events: list[Event]) -> EventBus:
    bus = EventBus(log=False)
    bus.subscribe(events.append)
    return bus


@pytest.fixture(name="inner")
def _inner(clock: ManualClock) -> SwitchableStorage:
    return SwitchableStorage(clock)


def _kinds(events: list[Event]) -> list[str]:
    return [e.kind for e in events]


async def test_breaker_opens_after_threshold_and_fails_fast(
    inner: SwitchableStorage, clock: ManualClock, bus: EventBus, events: list[Event]
) -> None:
    """After three failures no call reaches the storage, and "storage down" is published once."""
    guard = GuardedStorage(inner, clock=clock, events=bus)
    inner.mode = "down"
    for _ in range(3):
        with pytest.raises(StorageUnavailableError):
            await guard.check("ip:1", CHECK)
    assert not guard.available
    for _ in range(10):
        with pytest.raises(StorageUnavailableError) as info:
            await guard.check("ip:1", CHECK)
        assert info.value.retry_after == 1.0
    assert inner.calls == 3
    assert _kinds(events) == [STORAGE_DOWN_EVENT]
    assert events[0].attributes["fail_open"] is False


async def test_a_success_resets_the_failure_count(
    inner: SwitchableStorage, clock: ManualClock
) -> None:
    """Failures must be consecutive to open the breaker."""
    guard = GuardedStorage(inner, clock=clock, failure_threshold=2)
    for _ in range(3):
        inner.mode = "down"
        with pytest.raises(StorageUnavailableError):
            await guard.check("ip:1", CHECK)
        inner.mode = "up"
        assert (await guard.check("ip:1", CHECK)).allowed
    assert guard.available


async def test_recovers_through_a_background_probe(
    inner: SwitchableStorage, clock: ManualClock, bus: EventBus, events: list[Event]
) -> None:
    """Once the recovery interval passed, a probe closes the breaker; no request waits for it."""
    guard = GuardedStorage(inner, clock=clock, events=bus, failure_threshold=1)
    inner.mode = "down"
    with pytest.raises(StorageUnavailableError):
        await guard.check("ip:1", CHECK)
    clock.advance(1.0)
    with pytest.raises(StorageUnavailableError):
        await guard.check("ip:1", CHECK)  # starts a probe, which fails
    await asyncio.sleep(0)
    assert not guard.available
    inner.mode = "up"
    clock.advance(1.0)
    with pytest.raises(StorageUnavailableError):
        await guard.check("ip:1", CHECK)  # this request still fails fast; the probe runs aside
    assert await guard.probe_now()
    assert (await guard.check("ip:1", CHECK)).allowed
    assert _kinds(events) == [STORAGE_DOWN_EVENT, STORAGE_RECOVERED_EVENT]
    assert events[1].attributes["down_for"] == 2.0


async def test_fallback_limits_per_instance_while_down(
    inner: SwitchableStorage, clock: ManualClock, bus: EventBus, events: list[Event]
) -> None:
    """With a fallback, requests are counted in memory while the storage is down."""
    guard = GuardedStorage(
        inner, clock=clock, fallback=MemoryStorage(clock=clock), failure_threshold=1, events=bus
    )
    inner.mode = "down"
    checks = [LimitCheck("k", Limit(5, 60))]
    decisions = [await guard.check("id", checks) for _ in range(8)]
    assert [d.allowed for d in decisions] == [True] * 5 + [False] * 3
    assert all(d.degraded for d in decisions)
    assert events[0].attributes["fail_open"] is True


async def test_hanging_storage_is_cut_at_the_timeout(
    inner: SwitchableStorage, clock: ManualClock
) -> None:
    """A storage that never answers holds a call for the timeout, then not at all."""
    guard = GuardedStorage(inner, clock=clock, timeout=0.05, failure_threshold=1)
    inner.mode = "hang"
    start = time.perf_counter()
    with pytest.raises(StorageUnavailableError):
        await guard.check("ip:1", CHECK)
    assert 0.04 < time.perf_counter() - start < 0.2
    start = time.perf_counter()
    with pytest.raises(StorageUnavailableError):
        await guard.check("ip:1", CHECK)
    assert time.perf_counter() - start < 0.005


@pytest.mark.parametrize(("fallback", "down"), [(True, "degraded"), (False, "unhealthy")])
async def test_health_reports_the_storage_down_until_it_is_back(
    inner: SwitchableStorage, clock: ManualClock, fallback: bool, down: str
) -> None:
    """The readiness check says "degraded" while the storage is down and a fallback limiter
    serves, "unhealthy" while none does (its registration's ``critical`` decides what that
    makes the app), and "ok" once the storage is back."""
    spare = MemoryStorage(clock=clock) if fallback else None
    guard = GuardedStorage(inner, clock=clock, failure_threshold=1, fallback=spare)
    assert (await guard.health()).status == "ok"
    inner.mode = "down"
    result = await guard.health()
    assert result.status == down
    assert not guard.available
    assert (await guard.health()).status == down
    assert not await guard.ping()
    inner.mode = "up"
    clock.advance(1.0)
    await guard.probe_now()
    assert (await guard.health()).status == "ok"
    assert await guard.ping()


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("timeout", 0),
        ("timeout", timedelta(0)),
        ("failure_threshold", 0),
        ("recovery_interval", 0.0),
    ],
)
def test_bad_settings_fail_at_start_up(option: str, value: object) -> None:
    """Settings that would disable the guard are configuration errors naming the option."""
    with pytest.raises(ConfigurationError, match=option.split("_")[0]):
        GuardedStorage(MemoryStorage(), **{option: value})  # type: ignore[arg-type]


def test_durations_accept_timedelta() -> None:
    """Durations are seconds, or a timedelta."""
    guard = GuardedStorage(
        MemoryStorage(),
        timeout=timedelta(milliseconds=100),
        recovery_interval=timedelta(seconds=2),
    )
    assert (guard.timeout, guard.recovery_interval) == (0.1, 2.0)


async def test_url_helper_guards_only_remote_storages() -> None:
    """Memory needs no guard; Redis gets one, with the in-memory fallback when failing open."""
    assert isinstance(guarded_storage_from_url("memory://"), MemoryStorage)
    guard = guarded_storage_from_url("redis://127.0.0.1:1/0")
    assert isinstance(guard, GuardedStorage)
    assert isinstance(guard.fallback, MemoryStorage)
    closed = guarded_storage_from_url("redis://127.0.0.1:1/0", fail_open=False)
    assert isinstance(closed, GuardedStorage)
    assert closed.fallback is None
    await guard.aclose()
    await closed.aclose()


# --- with a real redis-server -------------------------------------------------------------


@pytest.fixture(name="guard")
async def _guard(redis_server: RedisServer, bus: EventBus) -> AsyncIterator[GuardedStorage]:
    guard = GuardedStorage(
        RedisStorage.from_url(redis_server.url), recovery_interval=0.1, events=bus
    )
    yield guard
    await guard.aclose()


@pytest.mark.redis
async def test_killed_redis_fails_fast_and_recovers(
    guard: GuardedStorage, redis_server: RedisServer, events: list[Event]
) -> None:
    """Redis killed: errors at once, then the breaker fails fast; restarted: back within 5 s."""
    assert (await guard.check("ip:1", CHECK)).allowed
    redis_server.kill()
    for _ in range(3):
        start = time.perf_counter()
        with pytest.raises(StorageUnavailableError):
            await guard.check("ip:1", CHECK)
        assert time.perf_counter() - start < DEFAULT_STORAGE_TIMEOUT
    assert not guard.available
    for _ in range(100):  # none touches the network: each refuses in its first step
        assert _refuses_without_suspending(guard.check("ip:1", CHECK))
    redis_server.start()
    restarted = time.perf_counter()
    while not guard.available and time.perf_counter() - restarted < 5:
        with pytest.raises(StorageUnavailableError):
            await guard.check("ip:1", CHECK)
        await asyncio.sleep(0.02)
    assert guard.available
    decision = await guard.check("ip:1", CHECK)  # new server, empty script cache: NOSCRIPT path
    assert decision.allowed
    assert decision.states[0].remaining == 99
    assert _kinds(events) == [STORAGE_DOWN_EVENT, STORAGE_RECOVERED_EVENT]


@pytest.mark.redis
async def test_stalled_redis_holds_no_request_past_the_timeout(
    guard: GuardedStorage, redis_server: RedisServer
) -> None:
    """SIGSTOP: concurrent checks end within the 250 ms timeout, then none waits at all."""
    assert (await guard.check("ip:1", CHECK)).allowed
    redis_server.stall()
    try:

        async def timed() -> float:
            start = time.perf_counter()
            with pytest.raises(StorageUnavailableError):
                await guard.check("ip:1", CHECK)
            return time.perf_counter() - start

        waits = await asyncio.gather(*(timed() for _ in range(50)))
        assert max(waits) < DEFAULT_STORAGE_TIMEOUT + 0.05
        assert not guard.available
        # "None waits at all", shown without a clock: with the breaker open, a check refuses
        # in its first step, before it could ever suspend on the network.
        for _ in range(50):
            assert _refuses_without_suspending(guard.check("ip:1", CHECK))
    finally:
        redis_server.resume()


def _refuses_without_suspending(coro: Coroutine[Any, Any, Decision]) -> bool:
    """True when ``coro`` raises StorageUnavailableError on its first step, never suspending."""
    try:
        coro.send(None)
    except StorageUnavailableError:
        return True
    except StopIteration:
        return False
    coro.close()  # it suspended: it would have waited on something
    return False


@pytest.mark.redis
async def test_a_busy_event_loop_is_not_blamed_on_redis(
    guard: GuardedStorage, events: list[Event]
) -> None:
    """Heavy requests that keep the loop busy for 640 ms after their checks trip nothing."""
    assert (await guard.check("ip:0", CHECK)).allowed

    async def heavy_request(n: int) -> Decision:
        decision = await guard.check(f"ip:{n}", CHECK)
        busy_until = time.perf_counter() + 0.02
        while time.perf_counter() < busy_until:  # 20 ms of CPU, like a heavy endpoint
            pass
        return decision

    decisions = await asyncio.gather(*(heavy_request(n) for n in range(32)))
    assert all(d.allowed and not d.degraded for d in decisions)
    assert guard.available
    assert events == []


@pytest.mark.redis
async def test_fail_open_fallback_while_redis_is_down(
    redis_server: RedisServer, bus: EventBus
) -> None:
    """With fail-open and the fallback limiter, a dead Redis still limits each instance."""
    guard = guarded_storage_from_url(redis_server.url, events=bus)
    assert isinstance(guard, GuardedStorage)
    redis_server.kill()
    checks = [LimitCheck("k", Limit(3, 60))]
    decisions = [await guard.check("id", checks) for _ in range(6)]
    assert [d.allowed for d in decisions] == [True] * 3 + [False] * 3
    assert all(d.degraded for d in decisions)
    await guard.aclose()


@pytest.mark.redis
async def test_guard_timeout_applies_when_shorter_than_the_storages(
    redis_server: RedisServer,
) -> None:
    """A guard with a shorter timeout than its storage's still cuts a stalled call at its own."""
    guard = GuardedStorage(RedisStorage.from_url(redis_server.url, timeout=2.0), timeout=0.1)
    await guard.check("ip:1", CHECK)
    redis_server.stall()
    try:
        start = time.perf_counter()
        with pytest.raises(StorageUnavailableError):
            await guard.check("ip:1", CHECK)
        assert time.perf_counter() - start < 0.2
    finally:
        redis_server.resume()
        await guard.aclose()


@pytest.mark.redis
async def test_redis_that_pings_but_refuses_writes_stays_down(
    guard: GuardedStorage, redis_server: RedisServer, events: list[Event]
) -> None:
    """Recovery needs a working check, not just PING: a read-only replica stays "down"."""
    admin = RedisStorage.from_url(redis_server.url).client
    assert (await guard.check("ip:1", CHECK)).allowed
    await admin.replicaof("127.0.0.1", "1")  # as after a failover that demoted this server
    try:
        for _ in range(3):
            with pytest.raises(StorageUnavailableError):
                await guard.check("ip:1", CHECK)
        assert await admin.ping()
        assert not await guard.probe_now()
        await admin.replicaof("NO", "ONE")
        assert await guard.probe_now()
        assert (await guard.check("ip:1", CHECK)).allowed
        assert _kinds(events) == [STORAGE_DOWN_EVENT, STORAGE_RECOVERED_EVENT]
    finally:
        await admin.aclose()
