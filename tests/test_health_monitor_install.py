"""The health monitor under ``install()``: started and stopped with the app's lifespan,
recovering a failing check, and reported on ``/health/ready`` and ``/metrics``."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from fastapi_resilience import ConfigurationError, ResilienceSettings, install
from tests._metrics import value

FAST = {"health_monitor_interval": 0.05, "health_recovery_backoff": 0.05}


def eventually(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout} s")
        time.sleep(0.02)


def test_a_failing_check_is_recovered_in_the_background() -> None:
    app = FastAPI()
    resilience = install(app, ResilienceSettings(rate_limit_enabled=False, **FAST))
    pool = {"connected": False, "reconnects": 0}

    async def database() -> bool:
        return pool["connected"]

    async def reconnect() -> None:
        pool["reconnects"] += 1
        pool["connected"] = True

    resilience.health.add("monitored-db", database, critical=False, recover=[reconnect])
    monitor = resilience.health_monitor
    assert monitor is not None
    with TestClient(app) as client:
        assert monitor.running

        def recovered() -> bool:
            entry = client.get("/health/ready").json()["checks"]["monitored-db"]
            return (
                entry["status"] == "ok"
                and entry.get("recovery", {}).get("last_outcome") == "recovered"
            )

        eventually(recovered)
        metrics = client.get("/metrics").text
    assert pool["reconnects"] == 1
    recoveries = "fastapi_resilience_health_recoveries_total"
    assert value(metrics, recoveries, check="monitored-db", outcome="recovered") == 1
    assert value(metrics, "fastapi_resilience_health_check_up", check="monitored-db") == 1
    assert not monitor.running  # stopped with the app


def test_an_unknown_dependency_stops_start_up() -> None:
    app = FastAPI()
    resilience = install(app, ResilienceSettings(rate_limit_enabled=False, **FAST))

    async def api() -> bool:
        return True

    resilience.health.add("monitored-api", api, depends_on=["no-such-check"])
    with pytest.raises(ConfigurationError, match="no-such-check"), TestClient(app):
        pass


def test_the_monitor_is_off_by_default() -> None:
    app = FastAPI()
    assert install(app, ResilienceSettings()).health_monitor is None


def test_backoff_settings_in_order() -> None:
    with pytest.raises(ConfigurationError, match="health_recovery_backoff_max"):
        ResilienceSettings(health_recovery_backoff=10, health_recovery_backoff_max=1)
