from __future__ import annotations

import asyncio

import httpx
import pytest
import redis.asyncio
from fastapi import FastAPI
from loopback import RedisServer

from fastapi_resilience import ResilienceSettings, install
from fastapi_resilience.exceptions import ConfigurationError
from fastapi_resilience.health import CheckResult, HealthChecks
from fastapi_resilience.outbound import BreakerRegistry
from fastapi_resilience.testing import ManualClock

pytestmark = pytest.mark.anyio


def _app() -> tuple[FastAPI, HealthChecks]:
    app = FastAPI()
    resilience = install(app, ResilienceSettings())
    return app, resilience.health


async def _get(app: FastAPI, path: str) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        return await client.get(path)


async def test_live_and_ready_with_no_checks() -> None:
    """Live answers 200 while serving; ready with only the built-in checks is ok."""
    app, _ = _app()
    assert (await _get(app, "/health/live")).json() == {"status": "ok"}
    ready = await _get(app, "/health/ready")
    assert ready.status_code == 200
    body = ready.json()
    assert body["status"] == "ok"
    assert body["checks"].keys() == {"breakers", "features"}
    assert body["checks"]["breakers"]["status"] == "ok"
    assert ready.headers["cache-control"] == "no-store"


async def test_failing_critical_check_makes_ready_unhealthy() -> None:
    """A critical check that fails answers 503 unhealthy and names the check."""
    app, health = _app()

    async def db() -> bool:
        return False

    async def cache() -> bool:
        return True

    health.add("db", db)
    health.add("cache", cache)
    ready = await _get(app, "/health/ready")
    assert ready.status_code == 503
    body = ready.json()
    assert body["status"] == "unhealthy"
    assert body["checks"]["db"]["status"] == "unhealthy"
    assert body["checks"]["cache"]["status"] == "ok"


async def test_non_critical_failure_and_degraded_result_are_degraded() -> None:
    """A non-critical failure or a check reporting 'degraded' gives 200 degraded, never ok."""
    app, health = _app()

    async def search() -> bool:
        raise ConnectionError("host db.internal:5432 password=x")

    async def breaker() -> CheckResult:
        return CheckResult("degraded", "breaker inventory is open")

    health.add("search", search, critical=False)
    ready = await _get(app, "/health/ready")
    assert (ready.status_code, ready.json()["status"]) == (200, "degraded")
    assert ready.json()["checks"]["search"]["detail"] == "raised ConnectionError"
    assert "password" not in ready.text

    health.remove("search")
    health.add("breakers", breaker)
    ready = await _get(app, "/health/ready")
    assert ready.json()["status"] == "degraded"
    assert ready.json()["checks"]["breakers"]["detail"] == "breaker inventory is open"


async def test_a_hanging_check_is_cut_at_its_own_timeout() -> None:
    """A check that never answers is reported failed after its timeout; others still run."""
    app, health = _app()
    never = asyncio.Event()

    async def hangs() -> bool:
        await never.wait()
        return True  # pragma: no cover

    async def fine() -> bool:
        return True

    health.add("hangs", hangs, timeout=0.05)
    health.add("fine", fine)
    loop = asyncio.get_running_loop()
    start = loop.time()
    ready = await _get(app, "/health/ready")
    elapsed = loop.time() - start
    assert ready.status_code == 503
    assert ready.json()["checks"]["hangs"]["detail"] == "timed out after 0.05s"
    assert ready.json()["checks"]["fine"]["status"] == "ok"
    assert elapsed < 1.0


async def test_non_critical_check_cannot_make_the_app_unhealthy() -> None:
    """A non-critical check that reports 'unhealthy' only degrades the app."""
    checks = HealthChecks()

    async def bad() -> CheckResult:
        return CheckResult("unhealthy")

    checks.add("optional", bad, critical=False)
    status, results = await checks.run()
    assert status == "degraded"
    assert results["optional"]["status"] == "degraded"
    assert "optional" in checks


def test_bad_timeouts_are_refused() -> None:
    """A zero or negative timeout is a configuration error."""
    with pytest.raises(ValueError, match="default_timeout"):
        HealthChecks(default_timeout=0)

    async def check() -> bool:
        return True  # pragma: no cover

    with pytest.raises(ValueError, match="'x': timeout"):
        HealthChecks().add("x", check, timeout=-1)


class _Database:
    """A readiness check that counts its runs; it answers when ``answer`` is set."""

    def __init__(self) -> None:
        self.runs = 0
        self.answer = asyncio.Event()
        self.answer.set()

    async def __call__(self) -> bool:
        self.runs += 1
        await self.answer.wait()
        return True


async def test_ready_runs_a_check_once_per_cache_period_and_shares_a_run() -> None:
    """Readiness callers share a check's run: 50 concurrent calls while it runs, then 200 more
    within ``health_cache_seconds``, run it once; once the period is over it runs again. The
    liveness route runs no check."""
    clock = ManualClock()
    app = FastAPI()
    health = install(app, ResilienceSettings(health_cache_seconds=5), clock=clock).health
    database = _Database()
    health.add("database", database)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        database.answer.clear()
        waiting = [asyncio.ensure_future(client.get("/health/ready")) for _ in range(50)]
        for _ in range(50):  # let every call reach the check
            await asyncio.sleep(0)
        database.answer.set()
        concurrent = await asyncio.gather(*waiting)
        later = [await client.get("/health/ready") for _ in range(200)]
        clock.advance(4.9)
        assert (await client.get("/health/ready")).status_code == 200
        assert database.runs == 1
        clock.advance(0.1)
        after = await client.get("/health/ready")
        live = [await client.get("/health/live") for _ in range(100)]
    assert {(r.status_code, r.json()["status"]) for r in concurrent + later} == {(200, "ok")}
    assert {r.json()["checks"]["database"]["status"] for r in concurrent + later} == {"ok"}
    assert after.json()["checks"]["database"]["status"] == "ok"
    assert database.runs == 2
    assert {r.status_code for r in live} == {200}
    assert database.runs == 2


async def test_a_failure_is_cached_too_and_the_built_in_checks_never_are(
    default_breakers: BreakerRegistry,
) -> None:
    """A failed check is served from the cache like a passing one (a slow dependency is not
    asked again by every caller), while the built-in checks, which only read this process's
    state, answer fresh: a breaker opened in between shows at once."""
    from fastapi_resilience import CircuitBreaker

    clock = ManualClock()
    app = FastAPI()
    health = install(app, ResilienceSettings(health_cache_seconds=5), clock=clock).health
    runs: list[float] = []

    async def search() -> bool:
        runs.append(clock.monotonic())
        return False

    health.add("search", search, critical=False)
    breaker = CircuitBreaker("health-cache-test")
    try:
        first = (await _get(app, "/health/ready")).json()
        breaker.force_open()
        second = (await _get(app, "/health/ready")).json()
    finally:
        default_breakers.unregister("health-cache-test")
    assert first["checks"]["search"]["status"] == second["checks"]["search"]["status"] == "degraded"
    assert len(runs) == 1
    assert first["checks"]["breakers"]["status"] == "ok"
    assert second["checks"]["breakers"]["status"] == "degraded"


async def test_the_breaker_check_registered_as_its_docstring_says_is_never_cached(
    default_breakers: BreakerRegistry,
) -> None:
    """``resilience.health.add("breakers", breaker_health_check(), critical=False)``, as the
    docstring says to, with ``health_cache_seconds=5``: a breaker opened right after an "ok"
    shows at the next call (it was served "ok" from the cache for up to 5 s)."""
    from fastapi_resilience import CircuitBreaker
    from fastapi_resilience.outbound import breaker_health_check

    clock = ManualClock()
    app = FastAPI()
    health = install(app, ResilienceSettings(health_cache_seconds=5), clock=clock).health
    health.add("breakers", breaker_health_check(), critical=False)
    breaker = CircuitBreaker("health-docstring-test")
    try:
        before = (await _get(app, "/health/ready")).json()
        breaker.force_open()
        after = (await _get(app, "/health/ready")).json()
    finally:
        default_breakers.unregister("health-docstring-test")
    assert before["checks"]["breakers"]["status"] == "ok"
    assert after["status"] == "degraded"
    assert "health-docstring-test open" in after["checks"]["breakers"]["detail"]


async def test_a_check_can_have_its_own_cache_period() -> None:
    """``add(..., cache_seconds=0)`` runs that check on every call; others keep the default."""
    clock = ManualClock()
    checks = HealthChecks(cache_seconds=10, clock=clock)
    always, cached = _Database(), _Database()
    checks.add("always", always, cache_seconds=0)
    checks.add("cached", cached)
    for _ in range(3):
        status, _ = await checks.run()
        assert status == "ok"
    assert (always.runs, cached.runs) == (3, 1)
    with pytest.raises(ValueError, match="cache_seconds"):
        HealthChecks(cache_seconds=-1)
    with pytest.raises(ValueError, match="'x': cache_seconds"):
        checks.add("x", always, cache_seconds=-0.5)


async def test_a_run_under_way_when_the_check_is_forgotten_serves_no_later_caller() -> None:
    """The storage check has read "up" and waits for its reply when the storage goes down and
    ``forget()`` is called (what ``install()`` does on ``rate_limit.storage_down``). That run
    answers the caller who started it, but stores nothing: a probe arriving after ``forget()``
    gets a run of its own ("degraded"), and that is what is served for the cache period."""
    clock = ManualClock()
    health = HealthChecks(cache_seconds=60, clock=clock)
    storage_up = True
    reply = asyncio.Event()

    async def storage() -> CheckResult:
        up = storage_up
        await reply.wait()
        return CheckResult("ok") if up else CheckResult("degraded", "down")

    health.add("rate_limit_storage", storage, critical=False)
    before = asyncio.ensure_future(health.run())
    for _ in range(10):  # the check reads the storage as up
        await asyncio.sleep(0)
    storage_up = False
    health.forget("rate_limit_storage")
    after = asyncio.ensure_future(health.run())
    await asyncio.sleep(0)
    reply.set()
    assert (await before)[0] == "ok"
    assert (await after)[0] == "degraded"
    clock.advance(30)
    assert (await health.run())[0] == "degraded"


def test_health_cache_seconds_setting_is_checked() -> None:
    """A negative cache period fails at start-up, naming the setting."""
    with pytest.raises(ConfigurationError, match="health_cache_seconds"):
        ResilienceSettings(health_cache_seconds=-1)


@pytest.mark.redis
async def test_ready_pings_redis_once_per_cache_period(redis_server: RedisServer) -> None:
    """2,000 readiness calls within ``health_cache_seconds`` ping the rate-limit storage's
    Redis once (``INFO commandstats``)."""
    clock = ManualClock()
    app = FastAPI()
    settings = ResilienceSettings(rate_limit_storage=redis_server.url, health_cache_seconds=1)
    install(app, settings, clock=clock)
    observer = redis.asyncio.Redis.from_url(redis_server.url)
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            answers = [await client.get("/health/ready") for _ in range(2000)]
            clock.advance(1)
            await client.get("/health/ready")
        stats = await observer.info("commandstats")
    finally:
        await observer.aclose()
        await app.state.resilience.rate_limiter.aclose()
    storage = {(a.status_code, a.json()["checks"]["rate_limit_storage"]["status"]) for a in answers}
    assert storage == {(200, "ok")}
    assert stats["cmdstat_ping"]["calls"] == 2


@pytest.mark.redis
async def test_a_storage_going_down_shows_at_once_despite_the_cache(
    redis_server: RedisServer,
) -> None:
    """The storage check's cached "ok" is dropped when the storage is declared down (and
    its "degraded" when it is back), so readiness never says ok while it is known down."""
    clock = ManualClock()
    app = FastAPI()
    settings = ResilienceSettings(rate_limit_storage=redis_server.url, health_cache_seconds=60)
    install(app, settings, clock=clock)
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            before = await client.get("/health/ready")
            redis_server.kill()
            for _ in range(3):  # failing open: served, until the storage breaker opens
                assert (await client.get("/anything")).status_code == 404
            down = await client.get("/health/ready")
    finally:
        await app.state.resilience.rate_limiter.aclose()
    assert before.json()["checks"]["rate_limit_storage"]["status"] == "ok"
    assert down.json()["status"] == "degraded"
    assert down.json()["checks"]["rate_limit_storage"]["status"] == "degraded"
