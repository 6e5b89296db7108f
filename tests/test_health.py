from __future__ import annotations

import asyncio

import httpx
import pytest
from fastapi import FastAPI

from fastapi_resilience import CheckResult, HealthChecks, ResilienceSettings, install

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
