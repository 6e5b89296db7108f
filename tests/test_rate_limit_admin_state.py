"""One identity's rate-limit state and its reset, as the admin API reads them: the limiter's
``identity_state`` / ``reset_identity`` and the storages' ``peek`` / ``reset`` underneath, in
memory, behind the guard and in a real Redis."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx
import pytest
from fastapi import Depends, FastAPI
from loopback import RedisServer
from redis.asyncio import Redis
from redis.crc import key_slot

from fastapi_resilience import ResilienceSettings, install, rate_limit
from fastapi_resilience.exceptions import ServiceUnavailableError, StorageUnavailableError
from fastapi_resilience.ratelimit import (
    Decision,
    DefaultIdentityResolver,
    GuardedStorage,
    Identity,
    IdentityStateUnsupportedError,
    Limit,
    LimitCheck,
    LimitState,
    MemoryStorage,
    RateLimiter,
    RateLimitStorage,
    RedisStorage,
)
from fastapi_resilience.testing import ManualClock

pytestmark = pytest.mark.anyio

TIERS = {"anonymous": "10/minute", "premium": "100/minute"}
ADDRESS = "203.0.113.7"
IDENTITY = Identity(f"ip:{ADDRESS}", "anonymous")
SCOPE: dict[str, Any] = {"type": "http", "path": "/", "headers": []}
#: What a script may write; a peek must call none of them.
#: The test apps' route that answers what the admin route answers.
STATE = "/limiter-state"
WRITE_COMMANDS = {"set", "lpush", "lset", "rpop", "pexpire", "del", "unlink", "expire"}


@pytest.fixture(name="clock")
def _clock() -> ManualClock:
    return ManualClock()


@pytest.fixture(name="storage")
def _storage(clock: ManualClock) -> MemoryStorage:
    return MemoryStorage(clock=clock)


@pytest.fixture(name="limiter")
def _limiter(storage: MemoryStorage) -> RateLimiter:
    return RateLimiter(storage, tiers=TIERS)


async def _requests(limiter: RateLimiter, identity: Identity, times: int) -> list[int]:
    """Send ``times`` requests of ``identity``: the first limit's ``remaining`` after each,
    -1 for a refusal."""
    out = []
    for _ in range(times):
        outcome = await limiter.check(SCOPE, identity)
        decision = outcome.decision
        assert decision is not None
        out.append(decision.states[0].remaining if decision.allowed else -1)
    return out


def _by_policy(state: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {entry["policy"]: entry for entry in state}


# --- memory ----------------------------------------------------------------------------------


async def test_state_after_three_requests(limiter: RateLimiter, clock: ManualClock) -> None:
    """Three requests: used 3, 7 left, and the oldest unit leaves at the end of its one-second
    bucket plus the minute; only the identity's own tier is reported (premium has no count)."""
    await _requests(limiter, IDENTITY, 3)
    clock.advance(10)
    assert await limiter.identity_state(IDENTITY.key) == [
        {
            "policy": "anonymous",
            "scope": "tier",
            "tier": "anonymous",
            "route": None,
            "limit": "10/minute",
            "used": 3,
            "remaining": 7,
            "reset_in": 51.0,
        }
    ]


async def test_peek_counts_nothing(limiter: RateLimiter, storage: MemoryStorage) -> None:
    """Ten reads change no count: the next request gets what it would have got without them."""
    await _requests(limiter, IDENTITY, 3)
    windows = len(storage)
    for _ in range(10):
        assert _by_policy(await limiter.identity_state(IDENTITY.key))["anonymous"]["used"] == 3
    assert len(storage) == windows
    assert await _requests(limiter, IDENTITY, 1) == [6]


async def test_reset_gives_the_full_limit_back(limiter: RateLimiter) -> None:
    """A refused identity, reset: the whole limit is left and its next request is admitted."""
    assert await _requests(limiter, IDENTITY, 11) == [*range(9, -1, -1), -1]
    assert await limiter.reset_identity(IDENTITY.key) == 1
    state = _by_policy(await limiter.identity_state(IDENTITY.key))["anonymous"]
    assert (state["used"], state["remaining"], state["reset_in"]) == (0, 10, 0.0)
    assert await _requests(limiter, IDENTITY, 1) == [9]


async def test_unknown_identity_reads_empty_and_creates_nothing(
    limiter: RateLimiter, storage: MemoryStorage
) -> None:
    """An identity never seen: used 0, the whole limit left; no window is made by the read or
    by the reset, which removes nothing."""
    state = await limiter.identity_state("ip:198.51.100.9")
    assert [(s["policy"], s["used"], s["remaining"], s["reset_in"]) for s in state] == [
        ("anonymous", 0, 10, 0.0)
    ]
    assert await limiter.reset_identity("ip:198.51.100.9") == 0
    assert len(storage) == 0


async def test_expired_units_are_read_as_gone(limiter: RateLimiter, clock: ManualClock) -> None:
    """Past the period plus a bucket, the counts have left the window: used 0, none reset."""
    await _requests(limiter, IDENTITY, 3)
    clock.advance(61)
    assert _by_policy(await limiter.identity_state(IDENTITY.key))["anonymous"]["used"] == 0
    assert await limiter.reset_identity(IDENTITY.key) == 0


async def test_api_key_identity_in_its_tier_and_any_tier_it_has_counts_in(
    storage: MemoryStorage,
) -> None:
    """A key is reported in its configured tier, and in another tier it was counted in (its
    tier changed); the hex digits are taken in any case. Reset removes both."""
    key_id = "key:" + hashlib.sha256(b"secret").hexdigest()[:16]
    resolver = DefaultIdentityResolver(api_keys={"secret": "premium"})
    limiter = RateLimiter(storage, tiers=TIERS, resolver=resolver)
    await _requests(limiter, Identity(key_id, "premium"), 4)
    await _requests(limiter, Identity(key_id, "anonymous"), 2)  # before its key was premium
    state = _by_policy(await limiter.identity_state(key_id.upper().replace("KEY:", "key:")))
    assert {name: s["used"] for name, s in state.items()} == {"anonymous": 2, "premium": 4}
    assert state["premium"]["remaining"] == 96
    other = _by_policy(await limiter.identity_state("key:" + "0" * 16))
    assert list(other) == ["anonymous"]  # an unknown key: the default tier
    assert await limiter.reset_identity(key_id) == 2


async def test_address_is_read_in_any_spelling(storage: MemoryStorage) -> None:
    """``ip:2001:DB8:0::1`` names the client the resolver calls ``ip:2001:db8::1``."""
    limiter = RateLimiter(storage, tiers=TIERS)
    resolver = DefaultIdentityResolver()
    await _requests(limiter, resolver.for_address("2001:db8::1"), 2)
    state = await limiter.identity_state("ip:2001:DB8:0::1")
    assert _by_policy(state)["anonymous"]["used"] == 2


async def test_several_limits_per_tier_are_named_as_in_the_header(storage: MemoryStorage) -> None:
    limiter = RateLimiter(storage, tiers={"anonymous": "2/second; 10/minute"})
    await _requests(limiter, IDENTITY, 2)
    state = _by_policy(await limiter.identity_state(IDENTITY.key))
    assert {name: (s["limit"], s["remaining"]) for name, s in state.items()} == {
        "anonymous-1s": ("2/second", 0),
        "anonymous-60s": ("10/minute", 8),
    }


# --- through install() and HTTP ----------------------------------------------------------------


def _app(settings: ResilienceSettings, clock: ManualClock) -> tuple[FastAPI, RateLimiter]:
    app = FastAPI()
    limiter = install(app, settings, clock=clock).rate_limiter
    assert limiter is not None

    @app.post("/login", dependencies=[Depends(rate_limit("5/minute"))])
    async def login() -> dict[str, bool]:
        return {"ok": True}

    @app.get(STATE + "/{identity}")
    async def state(identity: str) -> dict[str, Any]:
        # What the admin route does (its path exempt, as admin paths are).
        assert limiter is not None
        return {"policies": await limiter.identity_state(identity)}

    return app, limiter


@pytest.fixture(name="http")
async def _http() -> AsyncIterator[Any]:
    clients: list[httpx.AsyncClient] = []

    def make(app: FastAPI) -> httpx.AsyncClient:
        transport = httpx.ASGITransport(app=app, client=(ADDRESS, 1234))
        client = httpx.AsyncClient(transport=transport, base_url="http://app")
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.aclose()


async def test_route_limits_are_reported_and_reset_over_http(clock: ManualClock, http: Any) -> None:
    """After three logins the tier and the ``/login`` route limit each show 3 used, with the
    figures the response headers gave; the reset removes both counters and the next login
    sees both limits whole again."""
    settings = ResilienceSettings(
        rate_limit_tiers={"anonymous": "10/minute"}, rate_limit_exempt_paths=[f"{STATE}/*"]
    )
    app, limiter = _app(settings, clock)
    client = http(app)
    for _ in range(3):
        assert (await client.post("/login")).status_code == 200
    state = _by_policy(await limiter.identity_state(f"ip:{ADDRESS}"))
    assert {name: (s["scope"], s["tier"], s["route"]) for name, s in state.items()} == {
        "anonymous": ("tier", "anonymous", None),
        "/login": ("route", None, "/login"),
    }
    assert [(s["used"], s["remaining"], s["reset_in"]) for s in state.values()] == [
        (3, 7, 61.0),
        (3, 2, 61.0),
    ]
    over_http = (await client.get(f"{STATE}/ip:{ADDRESS}")).json()["policies"]
    assert over_http == list(state.values())
    assert await limiter.reset_identity(f"ip:{ADDRESS}") == 2
    after = await client.post("/login")
    assert after.status_code == 200
    assert after.headers["x-ratelimit-remaining"] == "4"  # the route's 5/minute, the tightest


async def test_a_storage_without_peek_answers_501_not_500(clock: ManualClock, http: Any) -> None:
    """A custom storage without ``peek``/``reset`` still limits; reading its state is a 501
    problem naming the storage, never a 500."""

    class CountOnly:
        def __init__(self) -> None:
            self.memory = MemoryStorage(clock=clock)

        async def check(self, identity_tag: str, checks: Sequence[LimitCheck]) -> Decision:
            return self.memory.check_many(checks)

        async def ping(self) -> bool:
            return True

        async def aclose(self) -> None:
            return None

    storage: RateLimitStorage = CountOnly()
    limiter = RateLimiter(storage, tiers=TIERS)
    assert await _requests(limiter, IDENTITY, 1) == [9]
    with pytest.raises(IdentityStateUnsupportedError) as info:
        await limiter.reset_identity(IDENTITY.key)
    assert info.value.status_code == 501
    assert "CountOnly" in info.value.detail

    app = FastAPI()
    install(app, ResilienceSettings(rate_limit_enabled=False), clock=clock)

    @app.get("/state")
    async def state() -> list[dict[str, Any]]:
        return await limiter.identity_state(IDENTITY.key)

    answer = await http(app).get("/state")
    assert answer.status_code == 501
    assert answer.headers["content-type"] == "application/problem+json"
    assert answer.json()["code"] == "not_implemented"


# --- behind the guard ----------------------------------------------------------------------------


class _Breakable(MemoryStorage):
    """A memory storage whose every call fails while ``down``."""

    down = False

    def _fail(self) -> None:
        if self.down:
            raise StorageUnavailableError("down")

    async def peek(self, identity_tag: str, checks: Sequence[LimitCheck]) -> list[LimitState]:
        self._fail()
        return await super().peek(identity_tag, checks)

    async def reset(self, identity_tag: str, checks: Sequence[LimitCheck]) -> int:
        self._fail()
        return await super().reset(identity_tag, checks)


async def test_guard_passes_through_and_resets_its_fallback_too(clock: ManualClock) -> None:
    """Behind the guard the shared storage is read; a reset clears the fallback's counts of an
    earlier outage as well."""
    fallback = MemoryStorage(clock=clock)
    guard = GuardedStorage(_Breakable(clock=clock), fallback=fallback, clock=clock)
    limiter = RateLimiter(guard, tiers=TIERS)
    await _requests(limiter, IDENTITY, 3)
    outage = LimitCheck(f"tier:anonymous:{IDENTITY.key}", Limit(10, 60))
    await fallback.check(IDENTITY.key, [outage])  # counted in an earlier outage
    assert _by_policy(await limiter.identity_state(IDENTITY.key))["anonymous"]["used"] == 3
    assert await limiter.reset_identity(IDENTITY.key) == 2
    assert len(fallback) == 0


async def test_guard_down_answers_503_and_resets_nothing(clock: ManualClock) -> None:
    """A failing storage: 503 with Retry-After, counted as a failure; once the breaker is open
    the storage is not asked at all, and the fallback's counts are not shown instead."""
    inner = _Breakable(clock=clock)
    guard = GuardedStorage(
        inner, fallback=MemoryStorage(clock=clock), failure_threshold=2, clock=clock
    )
    limiter = RateLimiter(guard, tiers=TIERS)
    await _requests(limiter, IDENTITY, 3)
    inner.down = True
    for call in (limiter.identity_state, limiter.reset_identity):
        with pytest.raises(ServiceUnavailableError) as info:
            await call(IDENTITY.key)
        assert info.value.status_code == 503
        assert "Retry-After" in info.value.headers
    assert not guard.available
    inner.down = False  # back, but the breaker is open until a probe says so
    with pytest.raises(ServiceUnavailableError):
        await limiter.reset_identity(IDENTITY.key)
    assert await guard.probe_now()
    assert _by_policy(await limiter.identity_state(IDENTITY.key))["anonymous"]["used"] == 3


# --- Redis -----------------------------------------------------------------------------------


@pytest.fixture(name="observer")
async def _observer(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


@pytest.fixture(name="redis_storage", params=["plain", "guarded"])
async def _redis_storage(
    request: pytest.FixtureRequest, redis_server: RedisServer
) -> AsyncIterator[RateLimitStorage]:
    storage: RateLimitStorage = RedisStorage.from_url(redis_server.url, prefix="t:")
    if request.param == "guarded":
        storage = GuardedStorage(storage, fallback=MemoryStorage())
    yield storage
    await storage.aclose()


async def _keys(client: Redis) -> list[str]:
    return sorted(k.decode() if isinstance(k, bytes) else k for k in await client.keys("*"))


async def _commandstats(client: Redis) -> dict[str, int]:
    info = await client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in info.items()}


@pytest.mark.redis
async def test_redis_state_peek_and_reset(redis_storage: RateLimitStorage, observer: Redis) -> None:
    """The same in Redis, on its clock: used 3, 7 left, a reset within the minute and its
    bucket; ten reads write nothing and change nothing; the reset removes the counter."""
    limiter = RateLimiter(redis_storage, tiers=TIERS)
    assert await _requests(limiter, IDENTITY, 3) == [9, 8, 7]
    state = _by_policy(await limiter.identity_state(IDENTITY.key))
    assert list(state) == ["anonymous"]
    assert (state["anonymous"]["used"], state["anonymous"]["remaining"]) == (3, 7)
    assert 59.0 < state["anonymous"]["reset_in"] <= 61.0
    before = await _commandstats(observer)
    for _ in range(10):
        assert _by_policy(await limiter.identity_state(IDENTITY.key))["anonymous"]["used"] == 3
    after = await _commandstats(observer)
    assert not {name for name in WRITE_COMMANDS if after.get(name, 0) != before.get(name, 0)}
    assert await _requests(limiter, IDENTITY, 1) == [6]
    assert await limiter.reset_identity(IDENTITY.key) == 1
    assert await observer.dbsize() == 0
    assert await _requests(limiter, IDENTITY, 1) == [9]


@pytest.mark.redis
async def test_redis_unknown_identity_creates_no_key(
    redis_storage: RateLimitStorage, observer: Redis
) -> None:
    limiter = RateLimiter(redis_storage, tiers=TIERS)
    state = await limiter.identity_state("ip:198.51.100.9")
    assert [(s["used"], s["remaining"], s["reset_in"]) for s in state] == [(0, 10, 0.0)]
    assert await limiter.reset_identity("ip:198.51.100.9") == 0
    assert await observer.dbsize() == 0


@pytest.mark.redis
async def test_redis_refused_identity_is_read_as_the_check_reads_it(
    redis_server: RedisServer,
) -> None:
    """At the limit, the peek agrees with the refusal the check script gives: nothing left,
    and the same reset."""
    storage = RedisStorage.from_url(redis_server.url)
    try:
        check = LimitCheck(f"tier:anonymous:{IDENTITY.key}", Limit(2, 60))
        for _ in range(2):
            assert (await storage.check(IDENTITY.key, [check])).allowed
        refused = await storage.check(IDENTITY.key, [check])
        (peeked,) = await storage.peek(IDENTITY.key, [check])
        assert not refused.allowed
        assert not peeked.allowed
        assert peeked.remaining == refused.states[0].remaining == 0
        assert abs(peeked.reset_after - refused.states[0].reset_after) < 0.05
        assert abs(peeked.retry_after - refused.states[0].retry_after) < 0.05
    finally:
        await storage.aclose()


@pytest.mark.redis
async def test_redis_reset_removes_exactly_one_identitys_keys_in_one_slot(
    redis_server: RedisServer, observer: Redis, clock: ManualClock, http: Any
) -> None:
    """Every key of one identity (its tier and route limits) shares the identity's hash tag,
    so one slot: the reset is one cluster-safe call. Another identity's keys stay."""
    settings = ResilienceSettings(
        rate_limit_tiers={"anonymous": "10/minute"},
        rate_limit_storage=redis_server.url,
        rate_limit_key_prefix="t:",
    )
    app, limiter = _app(settings, clock)
    assert (await http(app).post("/login")).status_code == 200
    other = Identity("ip:198.51.100.9", "anonymous")
    await _requests(limiter, other, 1)
    keys = await _keys(observer)
    own = [k for k in keys if f"{{ip:{ADDRESS}}}" in k]
    assert len(own) == 4  # tier and route: a log and a total each
    assert len({key_slot(k.encode()) for k in own}) == 1
    assert await limiter.reset_identity(f"ip:{ADDRESS}") == 2
    left = await _keys(observer)
    assert left == [k for k in keys if k not in own]
    assert all("{ip:198.51.100.9}" in k for k in left)
    await limiter.aclose()
