from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from loopback import RedisServer
from redis.asyncio import Redis
from redis.crc import key_slot

from fastapi_resilience.exceptions import StorageUnavailableError
from fastapi_resilience.ratelimit import Limit, LimitCheck, RedisStorage

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

PER_MINUTE = Limit(100, 60)
#: How long a storage call may take by default (``rate_limit_storage_timeout``, at most 0.25 s).
DEFAULT_STORAGE_TIMEOUT = 0.25
# What the script calls inside Redis; commandstats counts these too, but no client sends them.
SCRIPT_COMMANDS = {
    "time",
    "get",
    "lindex",
    "rpop",
    "lrange",
    "lset",
    "lpush",
    "pexpire",
    "set",
    "del",
}
StorageFactory = Callable[..., RedisStorage]


@pytest.fixture(name="make_storage")
async def _make_storage(redis_server: RedisServer) -> AsyncIterator[StorageFactory]:
    made: list[RedisStorage] = []

    def make(**options: Any) -> RedisStorage:
        storage = RedisStorage.from_url(redis_server.url, **options)
        made.append(storage)
        return storage

    yield make
    for storage in made:
        await storage.aclose()


@pytest.fixture(name="observer")
async def _observer(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


async def _commandstats(client: Redis) -> dict[str, int]:
    info = await client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in info.items()}


@pytest.mark.parametrize("coalesce", [True, False])
async def test_one_evalsha_per_check_and_nothing_else(
    make_storage: StorageFactory, observer: Redis, coalesce: bool
) -> None:
    """Each check, with two limits and every header figure, is exactly one EVALSHA."""
    storage = make_storage(coalesce=coalesce)
    checks = [
        LimitCheck("tier:free:ip:1", PER_MINUTE),
        LimitCheck("route:/login:ip:1", Limit(5, 60)),
    ]
    await storage.check("ip:1", checks)  # warm-up: loads the script, opens the connection
    connections = (await observer.info("stats"))["total_connections_received"]
    before = await _commandstats(observer)
    for _ in range(20):
        decision = await storage.check("ip:1", checks)
        assert decision.states[0].reset_after > 0
    after = await _commandstats(observer)
    delta = {name: after[name] - before.get(name, 0) for name in after}
    delta.pop("info")  # the observer's own INFO calls
    sent = {name: n for name, n in delta.items() if n and name not in SCRIPT_COMMANDS}
    assert sent == {"evalsha": 20}
    assert (await observer.info("stats"))["total_connections_received"] == connections


@pytest.mark.parametrize("coalesce", [True, False])
async def test_script_flush_falls_back_to_eval_once(
    make_storage: StorageFactory, observer: Redis, coalesce: bool
) -> None:
    """After SCRIPT FLUSH one EVAL reloads the script into Redis and EVALSHA is used again."""
    storage = make_storage(coalesce=coalesce)
    check = [LimitCheck("k", PER_MINUTE)]
    await storage.check("id", check)
    await observer.script_flush()
    before = await _commandstats(observer)
    await storage.check("id", check)
    await storage.check("id", check)
    after = await _commandstats(observer)
    assert after["eval"] - before.get("eval", 0) == 1
    assert after["evalsha"] - before["evalsha"] == 2  # the refused one, then the next
    # The script stays loaded: later checks are EVALSHA alone, with no EVAL to reload it.
    await storage.check("id", check)
    later = await _commandstats(observer)
    assert (later["eval"], later["evalsha"]) == (after["eval"], after["evalsha"] + 1)


@pytest.mark.parametrize("coalesce", [True, False])
async def test_two_clients_admit_exactly_the_limit(
    make_storage: StorageFactory, coalesce: bool
) -> None:
    """400 concurrent checks from two separate clients on 100/minute admit exactly 100."""
    # Generous timeouts: this test is about counting, on a machine that may be busy.
    first = make_storage(coalesce=coalesce, timeout=5.0, max_connections=400)
    second = make_storage(coalesce=coalesce, timeout=5.0, max_connections=400)
    check = [LimitCheck("tier:free:key:abc", PER_MINUTE)]
    decisions = await asyncio.gather(
        *((first if n % 2 else second).check("key:abc", check) for n in range(400))
    )
    assert sum(d.allowed for d in decisions) == 100
    remaining = sorted(d.states[0].remaining for d in decisions if d.allowed)
    assert remaining == list(range(100))
    refused = [d for d in decisions if not d.allowed]
    assert all(0 < d.retry_after <= 61 for d in refused)


async def test_refused_request_consumes_nothing(
    make_storage: StorageFactory, observer: Redis
) -> None:
    """A request refused by one limit leaves every other limit's count untouched."""
    storage = make_storage()
    strict = LimitCheck("route:/login:ip:1", Limit(2, 60))
    loose = LimitCheck("tier:free:ip:1", Limit(100, 60))
    results = [await storage.check("ip:1", [loose, strict]) for _ in range(10)]
    assert [d.allowed for d in results] == [True, True] + [False] * 8
    _, total_key = storage.keys_for("ip:1", loose)
    assert await observer.get(total_key) == b"2"
    assert results[-1].states[0].allowed
    assert results[-1].states[0].remaining == 98


async def test_header_figures(make_storage: StorageFactory) -> None:
    """Remaining counts down and reset/retry are measured from the server's clock."""
    storage = make_storage()
    check = [LimitCheck("k", Limit(2, 60))]
    first = (await storage.check("id", check)).states[0]
    assert (first.allowed, first.remaining, first.retry_after) == (True, 1, 0.0)
    assert 60.0 < first.reset_after <= 61.0
    await storage.check("id", check)
    refused = await storage.check("id", check)
    assert not refused.allowed
    assert refused.states[0].remaining == 0
    assert refused.retry_after == pytest.approx(first.reset_after, abs=0.05)


async def test_cost_and_shadow(make_storage: StorageFactory) -> None:
    """Costs use several units, a cost above the limit never fits, shadow limits never refuse."""
    storage = make_storage()
    heavy = LimitCheck("heavy", Limit(10, 60), cost=4)
    assert [(await storage.check("id", [heavy])).allowed for _ in range(3)] == [True, True, False]
    too_big = await storage.check("id", [LimitCheck("big", Limit(3, 60), cost=4)])
    assert (too_big.allowed, too_big.retry_after) == (False, 60.0)
    shadow = LimitCheck("shadow", Limit(1, 60), shadow=True)
    decisions = [await storage.check("id", [shadow]) for _ in range(3)]
    assert all(d.allowed for d in decisions)
    assert [d.states[0].allowed for d in decisions] == [True, False, False]


async def test_keys_are_prefixed_hash_tagged_and_expire(
    make_storage: StorageFactory, observer: Redis
) -> None:
    """Every key of one call starts with the prefix, hashes to one slot and carries a TTL."""
    storage = make_storage(prefix="app:")
    checks = [LimitCheck("tier:free:ip:9", PER_MINUTE), LimitCheck("route:/x:ip:9", Limit(5, 1))]
    started = time.monotonic()
    await storage.check("ip:9", checks)
    keys = sorted(k.decode() if isinstance(k, bytes) else k for k in await observer.keys("*"))
    assert len(keys) == 4
    assert all(k.startswith("app:{ip:9}:") for k in keys)
    assert len({key_slot(k.encode()) for k in keys}) == 1
    # One MULTI for all TTLs: read at one instant, so the log and total keys compare exactly
    # (separate round trips drifted apart by a few milliseconds on a loaded machine).
    async with observer.pipeline(transaction=True) as pipe:
        for k in keys:
            pipe.pttl(k)
        ttls = dict(zip(keys, await pipe.execute(), strict=True))
    # Set to more than the period (up to one bucket more); it has run down since by at most
    # the time this test took, which a loaded machine can make a few milliseconds.
    elapsed_ms = (time.monotonic() - started) * 1000
    log, total = storage.keys_for("ip:9", checks[0])
    assert 60_000 - elapsed_ms - 1 < ttls[log] <= 61_000
    # Both are set by one script with the same TTL, yet a CI run read the log's at 60,812 and
    # the total's at 60,813: the server's clock can tick between the script's commands.
    assert abs(ttls[log] - ttls[total]) <= 1
    short_log, _ = storage.keys_for("ip:9", checks[1])
    assert 0 < ttls[short_log] <= 1_016


async def test_expired_buckets_leave_the_window(
    make_storage: StorageFactory, observer: Redis
) -> None:
    """Units older than the period plus one bucket no longer count."""
    storage = make_storage()
    check = LimitCheck("k", Limit(3, 60))
    log, total = storage.keys_for("id", check)
    now_ms = int(time.time() * 1000)
    stale = now_ms // 1000 - 62  # a bucket (1 s wide) that left the window 1 s ago
    await observer.rpush(log, now_ms // 1000 - 5, 1, stale, 2)  # newest first
    await observer.set(total, 3)
    state = (await storage.check("id", [check])).states[0]
    assert (state.allowed, state.remaining) == (True, 1)
    assert await observer.llen(log) == 4


async def test_stalled_redis_fails_within_the_timeout(
    make_storage: StorageFactory, redis_server: RedisServer
) -> None:
    """A stalled Redis (SIGSTOP) raises StorageUnavailableError after the socket timeout,
    which is at most 0.25 s by default."""
    storage = make_storage()
    check = [LimitCheck("k", PER_MINUTE)]
    await storage.check("id", check)
    redis_server.stall()
    try:
        start = time.perf_counter()
        with pytest.raises(StorageUnavailableError):
            await storage.check("id", check)
        assert time.perf_counter() - start < DEFAULT_STORAGE_TIMEOUT + 0.1
    finally:
        redis_server.resume()


async def test_dead_redis_raises_storage_unavailable(
    make_storage: StorageFactory, redis_server: RedisServer
) -> None:
    """A killed Redis raises StorageUnavailableError at once, and ping says the same."""
    storage = make_storage()
    await storage.check("id", [LimitCheck("k", PER_MINUTE)])
    redis_server.kill()
    start = time.perf_counter()
    with pytest.raises(StorageUnavailableError):
        await storage.check("id", [LimitCheck("k", PER_MINUTE)])
    with pytest.raises(StorageUnavailableError):
        await storage.ping()
    assert time.perf_counter() - start < 2 * DEFAULT_STORAGE_TIMEOUT


async def test_closing_mid_flight_releases_waiting_checks(
    redis_server: RedisServer,
) -> None:
    """Closing the storage while a batch waits on a stalled Redis ends the waiting check."""
    storage = RedisStorage.from_url(redis_server.url, timeout=5.0)
    await storage.check("id", [LimitCheck("k", PER_MINUTE)])
    redis_server.stall()
    try:
        task = asyncio.ensure_future(storage.check("id", [LimitCheck("k", PER_MINUTE)]))
        await asyncio.sleep(0.05)  # let the batch leave and wait on the stalled server
        await storage.aclose()
        with pytest.raises((asyncio.CancelledError, StorageUnavailableError)):
            await asyncio.wait_for(task, 1.0)
    finally:
        redis_server.resume()


async def test_retry_after_waits_for_enough_old_units(
    make_storage: StorageFactory, observer: Redis
) -> None:
    """A request of cost 2 waits until the two oldest units have left, walking the buckets."""
    storage = make_storage()
    check = LimitCheck("k", Limit(3, 60), cost=2)
    log, total = storage.keys_for("id", check)
    now_s = int(time.time())
    # One unit in each of three buckets, 30 s, 20 s and 10 s old (newest first).
    await observer.rpush(log, now_s - 10, 1, now_s - 20, 1, now_s - 30, 1)
    await observer.set(total, 3)
    state = (await storage.check("id", [check])).states[0]
    assert not state.allowed
    # The second oldest (20 s old) leaves 61 s after its bucket began: in about 41 s.
    assert 40.0 < state.retry_after <= 41.0
    assert 30.0 < state.reset_after <= 31.0
    assert await observer.get(total) == b"3"


async def test_backlog_beyond_the_in_flight_batches_is_sent_in_turn(
    make_storage: StorageFactory, observer: Redis
) -> None:
    """More concurrent checks than four batches hold are queued, sent later and counted exactly."""
    storage = make_storage(timeout=5.0)
    check = [LimitCheck("k", Limit(500, 60))]
    before = (await _commandstats(observer)).get("evalsha", 0)
    decisions = await asyncio.gather(*(storage.check("id", check) for _ in range(1000)))
    assert sum(d.allowed for d in decisions) == 500
    assert (await _commandstats(observer))["evalsha"] - before == 1000
