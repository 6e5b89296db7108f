"""Every shared store against a real Redis Cluster (3 masters, 3 replicas) on loopback.

One cluster serves the whole module (creating it takes about two seconds); each test starts on
flushed masters. The failover test kills a master and starts it again as a replica.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import Depends, FastAPI
from loopback import RedisCluster, UvicornProcess, free_port, require_binary

from fastapi_resilience import CircuitBreaker, ResilienceSettings, install, rate_limit
from fastapi_resilience.events import Event, EventBus
from fastapi_resilience.exceptions import CircuitOpenError, ConfigurationError, UpstreamError
from fastapi_resilience.outbound import (
    BreakerRegistry,
    DeadLetter,
    RedisBreakerStore,
    RedisDeadLetterQueue,
    ResponseCache,
    dead_letter_on_failure,
)
from fastapi_resilience.ratelimit import storage_from_url
from fastapi_resilience.testing import ManualClock

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

APP = "tests._rate_limit_app:app"
PROXY = ["127.0.0.1/32"]


@pytest.fixture(name="shared_cluster", scope="module")
def _shared_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    cluster = RedisCluster(
        require_binary("redis-server"),
        require_binary("redis-cli"),
        tmp_path_factory.mktemp("cluster"),
    )
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(name="cluster")
def _cluster(shared_cluster: RedisCluster) -> RedisCluster:
    """The module's cluster, settled and emptied for this test."""
    shared_cluster.wait_ok()
    shared_cluster.flush()
    return shared_cluster


def limited_app(url: str, **settings: Any) -> FastAPI:
    """An app limited through ``url``: a tier of 5/minute and a login route of 3/minute."""
    app = FastAPI()
    options: dict[str, Any] = {
        "rate_limit_storage": url,
        "rate_limit_tiers": {"anonymous": "5/minute"},
        "trusted_proxies": PROXY,
        **settings,
    }
    install(app, ResilienceSettings(**options))

    @app.get("/limited")
    async def limited() -> dict[str, str]:
        return {"ok": "yes"}

    @app.post("/login", dependencies=[Depends(rate_limit("3/minute"))])
    async def login() -> dict[str, str]:
        return {"ok": "yes"}

    return app


@pytest.fixture(name="apps")
async def _apps(cluster: RedisCluster) -> AsyncIterator[list[httpx.AsyncClient]]:
    """Two apps limited through the cluster, each with its own storage: two instances."""
    made = [limited_app(cluster.url) for _ in range(2)]
    clients = [
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=10)
        for app in made
    ]
    try:
        yield clients
    finally:
        for client in clients:
            await client.aclose()
        for app in made:
            await app.state.resilience.rate_limiter.aclose()


def by(address: str) -> dict[str, str]:
    """Headers that make a request come from ``address`` (the trusted proxy forwards it)."""
    return {"X-Forwarded-For": address}


async def test_rate_limits_are_exact_with_their_headers(apps: list[httpx.AsyncClient]) -> None:
    """Many identities (their keys spread over the three masters), each over two instances:
    5 admitted, then 429 with Retry-After; the remaining count falls 4, 3, 2, 1, 0."""
    one, two = apps
    addresses = [f"198.51.100.{n}" for n in range(1, 13)]
    for address in addresses:
        answers = [await (one, two)[i % 2].get("/limited", headers=by(address)) for i in range(7)]
        assert [a.status_code for a in answers] == [200] * 5 + [429] * 2
        assert [a.headers["x-ratelimit-remaining"] for a in answers[:5]] == list("43210")
        assert all(a.headers["x-ratelimit-limit"] == "5" for a in answers)
        refused = answers[-1]
        assert refused.headers["content-type"] == "application/problem+json"
        # Counted until the end of its 1 s bucket plus the period (ADR 0010).
        assert 1 <= int(refused.headers["retry-after"]) <= 61


async def test_a_route_and_its_tier_are_counted_together(apps: list[httpx.AsyncClient]) -> None:
    """A login counts against its route limit and the tier in one script call (four keys of
    one identity, one hash slot): 3 logins pass, and they used 3 of the tier's 5."""
    one, two = apps
    address = by("203.0.113.50")
    logins = [await (one, two)[i % 2].post("/login", headers=address) for i in range(5)]
    assert [a.status_code for a in logins] == [200] * 3 + [429] * 2
    tier = await two.get("/limited", headers=address)
    assert tier.status_code == 200
    assert tier.headers["x-ratelimit-remaining"] == "1"


async def test_one_identitys_state_is_read_and_reset_on_the_cluster(
    cluster: RedisCluster,
) -> None:
    """What the admin API reads and resets: an identity's tier and route counts, peeked in one
    script call (one slot) without counting, then reset, on whichever master holds them."""
    app = limited_app(cluster.url)
    limiter = app.state.resilience.rate_limiter
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            for address in ("203.0.113.60", "203.0.113.61", "203.0.113.62"):
                for _ in range(2):
                    assert (await client.post("/login", headers=by(address))).status_code == 200
                identity = f"ip:{address}"
                state = {p["policy"]: p["used"] for p in await limiter.identity_state(identity)}
                again = {p["policy"]: p["used"] for p in await limiter.identity_state(identity)}
                assert state == again  # a peek counts nothing
                assert state["anonymous"] == 2
                assert list(state.values()).count(2) == 2  # the tier and the login route
                assert await limiter.reset_identity(identity) == 2
                answer = await client.get("/limited", headers=by(address))
                assert answer.headers["x-ratelimit-remaining"] == "4"
    finally:
        await limiter.aclose()


async def test_breaker_state_is_shared_between_two_instances(cluster: RedisCluster) -> None:
    """Instance A's failures open the shared breaker; instance B, which saw no failure, reads
    it open and refuses without calling."""
    clock = ManualClock()
    stores = [RedisBreakerStore.from_url(cluster.url, refresh_interval=0.0) for _ in range(2)]
    bus = EventBus(log=False)
    breakers = [
        CircuitBreaker(
            "payments",
            failure_threshold=3,
            recovery_timeout=30,
            clock=clock,
            events=bus,
            registry=BreakerRegistry(),
            state_store=store,
        )
        for store in stores
    ]

    async def failing() -> None:
        raise UpstreamError("boom")

    async def ok() -> str:
        return "ok"

    try:
        for _ in range(3):
            with pytest.raises(UpstreamError):
                await breakers[0].call(failing)
        await stores[0].flush()
        await stores[1].refresh(breakers[1])
        with pytest.raises(CircuitOpenError):
            await breakers[1].call(ok)
        assert stores[0].available
        assert stores[1].available
    finally:
        for store in stores:
            await store.aclose()


async def test_dead_letter_queue_records_lists_and_replays(cluster: RedisCluster) -> None:
    """Two instances share one stream: a key is stored once, either lists it, a failed replay
    requeues it under the same key, a successful one removes it; the replay lock holds."""
    first = RedisDeadLetterQueue(cluster.url, stream="orders")
    second = RedisDeadLetterQueue(cluster.url, stream="orders")
    try:
        stored = await first.record("capture", UpstreamError("down"), key="capture:42")
        again = await second.record("capture", UpstreamError("down"), key="capture:42")
        await first.record("refund", UpstreamError("down"), key="refund:7")
        assert again.id == stored.id
        assert [letter.key for letter in await second.list()] == ["capture:42", "refund:7"]

        def refuse(letter: DeadLetter) -> None:
            raise UpstreamError("still down")

        report = await second.replay(refuse, ids=[stored.id])
        requeued = report.failed[0]
        assert requeued.attempts == 2
        assert requeued.key == "capture:42"
        held = await first.record("capture", UpstreamError("down"), key="capture:42")
        assert held.id == requeued.id  # the key names the requeued entry

        seen: list[str] = []
        report = await first.replay(lambda letter: seen.append(letter.operation))
        assert seen == ["refund", "capture"]
        assert await second.size() == 0
        fresh = await second.record("capture", UpstreamError("down"), key="capture:42")
        assert fresh.id != stored.id  # gone from the queue: the key stores a new entry
    finally:
        await first.aclose()
        await second.aclose()


async def test_response_cache_level_two_is_shared(cluster: RedisCluster) -> None:
    """What one cache stores, another (its own L1 empty) reads from the cluster."""
    writer = ResponseCache(ttl=60, redis_url=cluster.url)
    reader = ResponseCache(ttl=60, redis_url=cluster.url)
    try:
        for n in range(20):  # keys over every master
            await writer.set(f"stock:{n}", {"sku": n, "body": b"\x00\xff"})
        entries = [await reader.get(f"stock:{n}") for n in range(20)]
        assert reader.l2_available
    finally:
        await writer.aclose()
        await reader.aclose()
    assert [entry.value["sku"] for entry in entries if entry is not None] == list(range(20))


async def test_a_cluster_no_node_answers_is_a_storage_outage() -> None:
    """Every seed node refuses the connection: the rate limit answers as in a single-Redis
    outage (here fail open: 200), the dead-letter queue reports ``dlq.storage_down`` and leaves
    the caller's own error on top, the cache falls back to computing, none raises redis' own
    cluster error (a 500)."""
    url = f"redis+cluster://127.0.0.1:{free_port()},127.0.0.1:{free_port()}"
    app = limited_app(url)
    bus = EventBus(log=False)
    seen: list[str] = []
    bus.subscribe(lambda event: seen.append(event.kind))
    queue = RedisDeadLetterQueue(url, events=bus)
    cache = ResponseCache(ttl=60, redis_url=url)

    @dead_letter_on_failure(queue, "capture")
    async def capture() -> None:
        raise UpstreamError("payments down")

    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            answer = await client.get("/limited", headers=by("198.51.100.7"))
        with pytest.raises(UpstreamError, match="payments down"):
            await capture()
        assert await cache.get("stock:1") is None
        assert not cache.l2_available
    finally:
        await app.state.resilience.rate_limiter.aclose()
        await queue.aclose()
        await cache.aclose()
    assert answer.status_code == 200, answer.text
    assert "dlq.storage_down" in seen
    assert "dlq.record_failed" not in seen


@pytest.mark.parametrize(
    "url",
    [
        "redis+cluster://",
        "redis+cluster://127.0.0.1",
        "redis+cluster://127.0.0.1:7000,:7001",
        "redis+cluster://127.0.0.1:70000",
        "redis+cluster://127.0.0.1:7000/2",
        "redis+cluster://127.0.0.1:7000?db=2",
    ],
)
def test_a_bad_cluster_url_fails_at_start_up_naming_the_setting(url: str) -> None:
    """From code or the environment, before any request and before anything connects."""
    with pytest.raises(ConfigurationError, match="rate_limit_storage"):
        install(FastAPI(), ResilienceSettings(rate_limit_storage=url))
    with pytest.raises(ConfigurationError, match="rate_limit_storage"):
        storage_from_url(url)


@pytest.mark.parametrize(
    "url",
    [
        "redis+cluster://app:Zq9/Xw7@127.0.0.1:7000",
        "redis+cluster://app:Zq9?Xw7@127.0.0.1:7000",
        "redis+cluster://app:Zq9#Xw7@127.0.0.1:7000",
    ],
)
def test_a_bad_url_error_never_quotes_the_password(url: str) -> None:
    """A password with an unescaped '/', '?' or '#' (common in generated ones): start-up fails
    naming the setting, and no part of the password is in the message."""
    errors = []
    for build in (
        lambda: install(FastAPI(), ResilienceSettings(rate_limit_storage=url)),
        lambda: storage_from_url(url),
        lambda: RedisDeadLetterQueue(url),
    ):
        with pytest.raises(ConfigurationError) as caught:
            build()
        errors.append(str(caught.value))
    assert "rate_limit_storage" in errors[0]
    for message in errors:
        assert "Zq9" not in message
        assert "Xw7" not in message


def test_a_prefix_with_braces_is_refused_on_a_cluster() -> None:
    """A brace in the prefix would take the hash tag from the identity."""
    with pytest.raises(ConfigurationError, match="rate_limit_key_prefix"):
        install(
            FastAPI(),
            ResilienceSettings(
                rate_limit_storage="redis+cluster://127.0.0.1:7000",
                rate_limit_key_prefix="rl:{app}:",
            ),
        )


@pytest.mark.slow
async def test_two_processes_admit_exactly_the_limit(cluster: RedisCluster) -> None:
    """Two uvicorn processes on the cluster, 300 concurrent requests of one identity: exactly
    the 100 of the tier are admitted between them."""
    env = {
        "RESILIENCE_RATE_LIMIT_STORAGE": cluster.url,
        "RESILIENCE_RATE_LIMIT_TIERS": json.dumps({"anonymous": "100/minute"}),
        "RESILIENCE_TRUSTED_PROXIES": json.dumps(PROXY),
    }
    servers = [UvicornProcess(APP, env=env) for _ in range(2)]
    limits = httpx.Limits(max_connections=100)
    clients = [httpx.AsyncClient(base_url=s.url, limits=limits, timeout=30) for s in servers]
    try:
        for client in clients:  # warm each process up under another identity
            assert (await client.get("/limited", headers=by("192.0.2.1"))).status_code == 200
        answers = await asyncio.gather(
            *(clients[i % 2].get("/limited", headers=by("192.0.2.99")) for i in range(300))
        )
    finally:
        for client in clients:
            await client.aclose()
        for server in servers:
            server.stop()
    statuses = [a.status_code for a in answers]
    assert statuses.count(200) == 100
    assert statuses.count(429) == 200


def address_on(cluster: RedisCluster, port: int, start: int) -> str:
    """An address whose rate-limit keys (``rl:{ip:<address>}:...``) the master ``port`` holds."""
    for n in range(start, start + 200):
        address = f"10.9.{n // 250}.{n % 250 + 1}"
        if cluster.master_of(f"{{ip:{address}}}") == port:
            return address
    raise LookupError(f"no address of 10.9.0.0/16 maps to {port}")  # pragma: no cover


@pytest.mark.slow
async def test_a_killed_master_fails_open_then_counts_again_after_failover(
    cluster: RedisCluster, tmp_path: Path
) -> None:
    """Load on an identity whose keys a master holds; that master is SIGKILLed. Every request
    is still answered, 200 or 429 and never later than a second (the storage guard's
    fail-open fallback), none is a 500. Once the replica is promoted, a fresh identity on the
    same slot range is counted in the cluster again: exactly 5 admitted over two instances."""
    victim = cluster.master_of("{ip:10.9.0.1}")
    busy = address_on(cluster, victim, 0)
    made = [limited_app(cluster.url) for _ in range(2)]
    storage_events: list[tuple[str, float]] = []

    def note(event: Event) -> None:
        if event.kind.startswith("rate_limit.storage_"):
            storage_events.append((event.kind, time.monotonic()))

    for app in made:
        app.state.resilience.events.subscribe(note)
    clients = [
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=5)
        for app in made
    ]
    answers: list[tuple[int, float]] = []
    stop = asyncio.Event()

    async def load(client: httpx.AsyncClient) -> None:
        while not stop.is_set():
            started = time.monotonic()
            answer = await client.get("/limited", headers=by(busy))
            answers.append((answer.status_code, time.monotonic() - started))
            await asyncio.sleep(0.01)

    try:
        workers = [asyncio.create_task(load(client)) for client in clients for _ in range(2)]
        await asyncio.sleep(0.3)
        killed_at = time.monotonic()
        cluster.kill(victim)
        await asyncio.to_thread(cluster.wait_ok, 30.0)  # a replica serves the slots again
        promoted = time.monotonic() - killed_at
        # Until both instances count in the cluster again: a fresh identity on the failed
        # master's slots is admitted exactly 5 times over both, not 5 per instance.
        deadline = time.monotonic() + 20
        start = 1000
        while True:
            fresh = address_on(cluster, cluster.master_of(f"{{ip:{busy}}}"), start)
            start += 200
            got = [
                (await clients[i % 2].get("/limited", headers=by(fresh))).status_code
                for i in range(12)
            ]
            if got.count(200) == 5 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        counted = time.monotonic() - killed_at
        stop.set()
        await asyncio.gather(*workers)
    finally:
        stop.set()
        for client in clients:
            await client.aclose()
        for app in made:
            await app.state.resilience.rate_limiter.aclose()
        cluster.restart(victim)

    assert got == [200] * 5 + [429] * 7
    statuses = {status for status, _ in answers}
    assert statuses <= {200, 429}, statuses
    assert max(took for _, took in answers) < 1.0
    # The outage was seen and answered as a single Redis outage is: the guard opened.
    kinds = [kind for kind, _ in storage_events]
    assert "rate_limit.storage_down" in kinds
    assert kinds[-1] == "rate_limit.storage_recovered"
    print(
        f"\nreplica promoted {promoted:.2f}s after the kill; shared counting again "
        f"{counted:.2f}s after it; {len(answers)} requests under load; storage events "
        f"{[(kind.rsplit('_', 1)[1], round(at - killed_at, 2)) for kind, at in storage_events]}"
    )
