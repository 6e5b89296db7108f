from __future__ import annotations

import asyncio
import gc
import random
import tracemalloc
from collections.abc import Sequence

import httpx
import pytest
from fastapi import Depends, FastAPI

from fastapi_resilience import (
    RateLimitMiddleware,
    ResilienceSettings,
    install_exception_handlers,
    rate_limit,
)
from fastapi_resilience.exceptions import ConfigurationError
from fastapi_resilience.ratelimit import (
    Decision,
    Identity,
    Limit,
    LimitCheck,
    MemoryStorage,
    RateLimiter,
)
from fastapi_resilience.testing import ManualClock

pytestmark = pytest.mark.anyio

PER_MINUTE = Limit(100, 60)


def _rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096 / 2**20


@pytest.fixture(name="clock")
def _clock() -> ManualClock:
    # Start on a bucket boundary so the expected figures below are round numbers.
    return ManualClock(start=6_000.0)


@pytest.fixture(name="storage")
def _storage(clock: ManualClock) -> MemoryStorage:
    return MemoryStorage(clock=clock)


async def _admitted(storage: MemoryStorage, checks: Sequence[LimitCheck], times: int) -> int:
    decisions = await asyncio.gather(*(storage.check("id", checks) for _ in range(times)))
    return sum(d.allowed for d in decisions)


async def test_burst_admits_exactly_the_limit(storage: MemoryStorage) -> None:
    """400 concurrent checks on 100/minute admit exactly 100."""
    assert await _admitted(storage, [LimitCheck("k", PER_MINUTE)], 400) == 100


async def test_headers_figures_are_exact(storage: MemoryStorage, clock: ManualClock) -> None:
    """Remaining counts down, reset is when the oldest unit leaves, retry when one can enter."""
    check = LimitCheck("k", Limit(3, 60))
    first = (await storage.check("id", [check])).states[0]
    assert (first.allowed, first.remaining, first.reset_after, first.retry_after) == (
        True,
        2,
        61.0,
        0.0,
    )
    clock.advance(10)
    await storage.check("id", [check])
    third = (await storage.check("id", [check])).states[0]
    assert (third.remaining, third.reset_after) == (0, 51.0)
    refused = await storage.check("id", [check])
    assert not refused.allowed
    assert refused.states[0].retry_after == 51.0
    assert refused.retry_after == 51.0


async def test_no_double_burst_at_window_edges(storage: MemoryStorage, clock: ManualClock) -> None:
    """A full burst at the end of one minute leaves nothing for the start of the next."""
    check = [LimitCheck("k", PER_MINUTE)]
    clock.advance(59.5)
    assert await _admitted(storage, check, 150) == 100
    clock.advance(1.0)  # a fixed window would have reset here and admitted 100 more
    assert await _admitted(storage, check, 150) == 0
    clock.advance(60.0)
    assert await _admitted(storage, check, 150) == 100


@pytest.mark.parametrize("seed", range(5))
async def test_never_more_than_the_limit_in_any_window(seed: int) -> None:
    """Random traffic never gets more than N units into any window of the period, and is
    never refused while fewer than N units were admitted in the last period plus one bucket."""
    rng = random.Random(seed)
    clock = ManualClock(start=rng.uniform(0, 1000))
    storage = MemoryStorage(clock=clock)
    limit = Limit(20, 10)
    width = limit.period / 60
    admitted: list[tuple[float, int]] = []
    for _ in range(3000):
        clock.advance(rng.expovariate(4.0))
        cost = rng.choice([1, 1, 1, 2, 5])
        now = clock.monotonic()
        decision = storage.check_now([LimitCheck("k", limit, cost)])
        held = sum(c for t, c in admitted if t > now - limit.period - width)
        if decision.allowed:
            admitted.append((now, cost))
            in_window = sum(c for t, c in admitted if t > now - limit.period)
            assert in_window <= limit.amount
        else:
            assert held + cost > limit.amount


async def test_cost_is_counted_as_units(storage: MemoryStorage) -> None:
    """A request of cost 3 uses three units; a cheaper one still fits in what is left."""
    heavy = [LimitCheck("k", Limit(10, 60), cost=3)]
    assert await _admitted(storage, heavy, 5) == 3
    light = (await storage.check("id", [LimitCheck("k", Limit(10, 60))])).states[0]
    assert (light.allowed, light.remaining) == (True, 0)


async def test_cost_above_the_limit_is_always_refused(storage: MemoryStorage) -> None:
    """A request that costs more than the whole limit is refused and counts nothing."""
    decision = await storage.check("id", [LimitCheck("k", Limit(5, 60), cost=6)])
    assert not decision.allowed
    assert decision.states[0].retry_after == 60.0
    assert len(storage) == 0


async def test_refused_request_consumes_nothing_from_other_limits(
    storage: MemoryStorage,
) -> None:
    """All limits of a request are counted together or not at all."""
    strict = LimitCheck("route:/login:ip:1", Limit(2, 60))
    loose = LimitCheck("tier:free:ip:1", Limit(100, 60))
    assert await _admitted(storage, [loose, strict], 10) == 2
    state = (await storage.check("id", [loose])).states[0]
    assert state.remaining == 100 - 2 - 1


async def test_shadow_limit_counts_but_never_refuses(storage: MemoryStorage) -> None:
    """A shadow limit over its budget reports refusal but lets the request through."""
    shadow = LimitCheck("k", Limit(2, 60), shadow=True)
    decisions = [await storage.check("id", [shadow]) for _ in range(4)]
    assert all(d.allowed for d in decisions)
    assert [d.states[0].allowed for d in decisions] == [True, True, False, False]
    assert decisions[-1].retry_after == 0.0


async def test_enforced_refusal_does_not_count_the_shadow_limit(storage: MemoryStorage) -> None:
    """When an enforced limit refuses, the shadow limits of the request are not counted."""
    enforced = LimitCheck("a", Limit(1, 60))
    shadow = LimitCheck("b", Limit(10, 60), shadow=True)
    await storage.check("id", [enforced, shadow])
    refused = await storage.check("id", [enforced, shadow])
    assert not refused.allowed
    assert refused.states[1].remaining == 9


async def test_idle_windows_expire(storage: MemoryStorage, clock: ManualClock) -> None:
    """After a period with no traffic every window is dropped."""
    for n in range(1000):
        await storage.check("id", [LimitCheck(f"ip:{n}", PER_MINUTE)])
    assert len(storage) == 1000
    clock.advance(62)
    assert storage.sweep() == 1000
    assert len(storage) == 0


async def test_traffic_sweeps_expired_windows(storage: MemoryStorage, clock: ManualClock) -> None:
    """Ordinary checks drop expired windows as they go, faster than new ones arrive."""
    for n in range(100):
        await storage.check("id", [LimitCheck(f"old:{n}", PER_MINUTE)])
    clock.advance(62)
    for n in range(40):
        await storage.check("id", [LimitCheck(f"new:{n}", PER_MINUTE)])
    assert len(storage) == 40


async def test_cap_refuses_new_windows_while_every_window_is_live(clock: ManualClock) -> None:
    """Beyond ``max_keys`` a flood of new identities is refused while the windows held are live,
    and nothing held is forgotten: the busy identity keeps its count. Once they expire, new
    identities take their place."""
    storage = MemoryStorage(clock=clock, max_keys=100)
    busy = LimitCheck("busy", Limit(1000, 60))
    flood_admitted = 0
    for n in range(10_000):
        decision = await storage.check("id", [LimitCheck(f"flood:{n}", PER_MINUTE)])
        flood_admitted += decision.allowed
        if n % 50 == 0:
            assert (await storage.check("id", [busy])).allowed
    assert len(storage) == 100
    assert flood_admitted == 99  # the busy identity holds the 100th window
    assert storage.full_refusals == 10_000 - 99
    state = (await storage.check("id", [busy])).states[0]
    assert state.remaining == 1000 - 201
    clock.advance(61)
    later = [await storage.check("id", [LimitCheck(f"later:{n}", PER_MINUTE)]) for n in range(100)]
    assert all(decision.allowed for decision in later)
    assert len(storage) == 100


async def test_full_storage_leaves_shadow_limits_uncounted_not_refusing(
    clock: ManualClock,
) -> None:
    """A shadow limit whose new window does not fit is not counted, and refuses nothing."""
    storage = MemoryStorage(clock=clock, max_keys=2)
    enforced = LimitCheck("a", PER_MINUTE)
    assert (await storage.check("id", [enforced])).allowed
    assert (await storage.check("id", [LimitCheck("b", PER_MINUTE)])).allowed
    shadow = LimitCheck("c", Limit(1, 60), shadow=True)
    for _ in range(3):
        decision = await storage.check("id", [enforced, shadow])
        assert decision.allowed
        assert (decision.states[1].allowed, decision.states[1].remaining) == (True, 1)
    assert (await storage.check("id", [shadow])).allowed
    assert len(storage) == 2
    assert (await storage.check("id", [enforced])).states[0].remaining == 100 - 5


def test_million_identities_leave_memory_bounded() -> None:
    """1,000,000 distinct identities keep at most ``max_keys`` windows and bounded memory."""
    clock = ManualClock()
    storage = MemoryStorage(clock=clock)
    assert storage.max_keys == 100_000  # the default docs/rate-limit-storage.md gives
    limit = Limit(10, 60)
    gc.collect()
    before = _rss_mib()
    for n in range(1_000_000):
        storage.check_now((LimitCheck(f"ip:{n}", limit),))
        if n % 1000 == 0:
            clock.advance(0.001)
    grown = _rss_mib() - before
    assert len(storage) == storage.max_keys
    # Measured about 70 MiB at the default cap of 100,000 windows; the bound is generous.
    assert grown < 150, f"memory grew by {grown:.0f} MiB"
    clock.advance(61)
    assert storage.sweep() == storage.max_keys
    assert len(storage) == 0


def test_requests_in_one_bucket_cost_no_memory_of_their_own(clock: ManualClock) -> None:
    """Memory per window grows with time buckets (at most 61), not with requests: 50 more
    requests in each of 200 windows, all in one bucket, take (almost) no memory."""
    storage = MemoryStorage(clock=clock)
    limit = Limit(10_000, 60)
    checks = [(LimitCheck(f"k{n}", limit),) for n in range(200)]
    tracemalloc.start()
    try:
        for check in checks:
            storage.check_now(check)
        first, _ = tracemalloc.get_traced_memory()
        for _ in range(50):
            for check in checks:
                assert storage.check_now(check).allowed
        more, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # One stored entry per request would be 10,000 entries: at least 80 kB of list slots alone.
    assert more - first < 8_000, f"10,000 requests in one bucket took {more - first} bytes"


def test_max_keys_must_be_positive() -> None:
    """A storage that can hold no window is a configuration error."""
    with pytest.raises(ConfigurationError, match="max_keys"):
        MemoryStorage(max_keys=0)


async def test_ping_and_close(storage: MemoryStorage) -> None:
    """The memory storage is always up, and closing it forgets every count."""
    await storage.check("id", [LimitCheck("k", PER_MINUTE)])
    assert await storage.ping()
    await storage.aclose()
    assert len(storage) == 0


def test_decision_is_a_value() -> None:
    """Decisions are immutable values that compare by content."""
    assert Decision(True, ()) == Decision(True, ())


async def test_retry_after_waits_for_enough_old_units(
    storage: MemoryStorage, clock: ManualClock
) -> None:
    """A request of cost 2 waits until the two oldest units have left, walking the buckets."""
    for _ in range(3):
        await storage.check("id", [LimitCheck("k", Limit(3, 60))])
        clock.advance(10)
    state = (await storage.check("id", [LimitCheck("k", Limit(3, 60), cost=2)])).states[0]
    assert not state.allowed
    assert state.retry_after == 41.0  # the second unit (20 s old) leaves at 61 s
    assert state.reset_after == 31.0


@pytest.mark.parametrize("seed", range(3))
def test_lean_path_decides_and_counts_as_the_general_path(seed: int) -> None:
    """One enforced limit goes through ``try_admit``; a shadow limit beside it takes the general
    path. The enforced limit's figures are the same either way, request after request."""
    rng = random.Random(seed)
    clock = ManualClock(start=rng.uniform(0, 1000))
    lean, general = MemoryStorage(clock=clock), MemoryStorage(clock=clock)
    limit = Limit(15, 6)
    never = LimitCheck("other", Limit(10**9, 6), shadow=True)
    for _ in range(2000):
        clock.advance(rng.expovariate(3.0))
        check = LimitCheck("k", limit, rng.choice([1, 1, 2, 4, 16]))
        one = lean.check_now([check])
        both = general.check_now([check, never])
        assert one.allowed == both.allowed
        assert one.states[0] == both.states[0]


class _SteppingClock:
    """A clock that can step back, as a wall clock set by hand might."""

    def __init__(self, start: float) -> None:
        self.now = start

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds

    def step(self, seconds: float) -> None:
        """Move by ``seconds``, forward or back."""
        self.now += seconds

    advance = step


async def test_clock_stepping_back_counts_into_the_newest_bucket() -> None:
    """A clock that steps back never reorders buckets or loses a unit, even past an expiry."""
    clock = _SteppingClock(start=6_000.0)
    storage = MemoryStorage(clock=clock)
    # A long-lived window at the front of the LRU order stops the sweep before ours.
    assert await _admitted(storage, [LimitCheck("other", Limit(3, 86_400))], 1) == 1
    check = [LimitCheck("k", Limit(3, 60))]
    assert await _admitted(storage, check, 1) == 1
    clock.advance(10)
    assert await _admitted(storage, check, 1) == 1
    clock.step(-30)  # before both buckets
    assert await _admitted(storage, check, 2) == 1  # the third unit, then full
    clock.advance(200)  # everything expired
    assert await _admitted(storage, check, 1) == 1
    clock.step(-150)  # back before that bucket's start: counted into it all the same
    assert await _admitted(storage, check, 3) == 2
    clock.step(500)  # everything expired; a request too costly for the limit empties the window
    assert await _admitted(storage, [LimitCheck("k", Limit(3, 60), cost=4)], 1) == 0
    clock.step(-400)  # back inside the emptied window's last bucket
    assert await _admitted(storage, check, 4) == 3


async def test_bucket_end_rounding_never_opens_a_second_entry_for_one_bucket() -> None:
    """At 0.35 s a 7 s limit's bucket 2 has ended by ``bucket_end`` (3 * 7/60 == 0.35) though
    ``0.35 // (7/60)`` is still 2 in floating point: the unit joins bucket 2's entry."""
    clock = _SteppingClock(start=0.3)
    storage = MemoryStorage(clock=clock)
    check = [LimitCheck("k", Limit(5, 7))]
    assert await _admitted(storage, check, 1) == 1
    clock.step(3 * (7 / 60) - 0.3)
    assert clock.monotonic() == 0.35
    assert await _admitted(storage, check, 1) == 1
    assert await _admitted(storage, check, 5) == 3
    clock.step(7)  # both units' bucket has left the window: the whole limit again
    assert await _admitted(storage, check, 6) == 5


# --- limits of different periods in one storage -----------------------------------------------

_SCOPE = {"type": "http", "path": "/", "headers": []}


def _mixed_limiter(storage: MemoryStorage) -> RateLimiter:
    return RateLimiter(storage, tiers={"anonymous": "1/second", "daily": "1/day"})


async def _admits(limiter: RateLimiter, identity: Identity) -> bool:
    return not (await limiter.check(_SCOPE, identity)).refused


async def test_a_daily_window_does_not_keep_idle_second_windows(clock: ManualClock) -> None:
    """A live 1/day window, admitted before everyone else, does not stop idle 1/second windows
    from being dropped as traffic goes on: 1,500 live windows of the second batch and the daily
    one are kept, the 1,500 of the first batch (idle for 2 s) are gone."""
    storage = MemoryStorage(clock=clock)
    limiter = _mixed_limiter(storage)
    daily = Identity("key:daily", "daily")
    assert await _admits(limiter, daily)
    for n in range(1500):
        assert await _admits(limiter, Identity(f"ip:10.0.0.{n}", "anonymous"))
    assert len(storage) == 1 + 1500
    clock.advance(2)
    for n in range(1500):
        assert await _admits(limiter, Identity(f"ip:10.0.1.{n}", "anonymous"))
    assert len(storage) == 1 + 1500
    assert not await _admits(limiter, daily)


async def test_full_storage_never_admits_a_second_daily_request(clock: ManualClock) -> None:
    """With a period's ``max_keys`` reached by live windows, a new identity of that period is
    refused (429 with a Retry-After of when room frees), not admitted by evicting a live window;
    the 1/day identity, in its own period's share, is admitted once in a day of floods of new
    identities, and again the next day."""
    storage = MemoryStorage(clock=clock, max_keys=1000)
    limiter = _mixed_limiter(storage)
    daily = Identity("key:daily", "daily")
    assert await _admits(limiter, daily)
    for n in range(1000):
        assert await _admits(limiter, Identity(f"ip:flood-0-{n}", "anonymous"))
    assert len(storage) == 1 + 1000
    late = await limiter.check(_SCOPE, Identity("ip:late", "anonymous"))
    assert late.refused
    assert dict(late.headers())[b"retry-after"] == b"2"  # the first 1/second window's expiry
    admitted_daily = 0
    for hour in range(1, 24):
        # An hour later, a flood of 2,000 new identities, then the daily identity again.
        clock.advance(3600)
        admitted = [
            await _admits(limiter, Identity(f"ip:flood-{hour}-{n}", "anonymous"))
            for n in range(2000)
        ]
        assert sum(admitted) == 1000  # the 1/second share; the daily window is not in it
        assert len(storage) == 1 + 1000
        admitted_daily += await _admits(limiter, daily)
    assert admitted_daily == 0
    # Held a day after the end of its 1/60-day bucket: 7,200 + 86,400 on this clock.
    clock.advance(93_600 - clock.monotonic())
    assert await _admits(limiter, daily)
    assert storage.full_refusals == 1 + 23 * 1000


async def test_daily_windows_never_lock_new_visitors_out_of_other_limits() -> None:
    """One client with an IPv6 /64 (one identity per address) calls a ``1/day`` route from 100
    new addresses a minute for six minutes. Its daily windows fill the day's share of
    ``max_keys`` but take no room from the per-minute tier's: new visitors are served on the
    app's other routes, the daily route refuses new identities until its windows expire (429
    with Retry-After), and no address gets a second daily request."""
    clock = ManualClock()
    storage = MemoryStorage(clock=clock, max_keys=300)
    app = FastAPI()
    install_exception_handlers(app)
    settings = ResilienceSettings(trusted_proxies=["127.0.0.1"])
    app.add_middleware(RateLimitMiddleware, settings=settings, storage=storage, clock=clock)

    @app.post("/signup", dependencies=[Depends(rate_limit("1/day"))])
    async def signup() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/")
    async def home() -> dict[str, bool]:
        return {"ok": True}

    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 1234))
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:

        async def call(method: str, path: str, address: str) -> httpx.Response:
            return await http.request(method, path, headers={"X-Forwarded-For": address})

        signups = []
        for minute in range(6):
            for n in range(100):
                answer = await call("POST", "/signup", f"2001:db8::{minute + 1:x}:{n + 1:x}")
                signups.append(answer.status_code)
            clock.advance(61)
        visitors = [(await call("GET", "/", f"198.51.100.{n}")).status_code for n in range(100)]
        newcomer = await call("POST", "/signup", "203.0.113.7")
        again = await call("POST", "/signup", "2001:db8::1:1")
        clock.advance(86_400 + 1_440)
        next_day = await call("POST", "/signup", "203.0.113.7")
    assert visitors == [200] * 100
    assert signups.count(200) == 300
    assert newcomer.status_code == 429
    assert int(newcomer.headers["retry-after"]) > 80_000  # the first daily window's expiry
    assert again.status_code == 429
    assert next_day.status_code == 200
