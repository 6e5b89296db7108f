"""End to end, against real uvicorn processes started by ``make run``'s launcher: the upstream
fails, the breaker opens, the feature goes off and everything an operator reads says so; the
upstream recovers and all of it clears with no operator's hand."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from loopback import free_port, wait_for_port

from example_app.run import DEMO_ADMIN_TOKEN
from tests._metrics import value

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

LAUNCHER = (sys.executable, "-m", "example_app.run")
#: The example's premium tier: this test's traffic stays well under its limits.
PREMIUM = {"X-API-Key": "demo-premium-key"}
ADMIN = {"Authorization": f"Bearer {DEMO_ADMIN_TOKEN}"}
#: Seconds the example's inventory breaker stays open here (10 in ``make run``).
RECOVERY = 1.0


class Example:
    """The launched example: the app's and the upstream's clients."""

    def __init__(self, app: httpx.Client, upstream: httpx.Client) -> None:
        self.app = app
        self.upstream = upstream

    def fail_upstream(self, rate: float) -> None:
        self.upstream.post("/_control", json={"failure_rate": rate}).raise_for_status()

    def metrics(self) -> str:
        return self.app.get("/metrics").text


@pytest.fixture(name="example")
def _example() -> Iterator[Example]:
    port, upstream_port = free_port(), free_port()
    env = {
        "EXAMPLE_INVENTORY_RECOVERY_SECONDS": str(RECOVERY),
        "RESILIENCE_HEALTH_MONITOR_INTERVAL": "0.5",
        "RESILIENCE_HEALTH_RECOVERY_BACKOFF": "0.5",
    }
    launcher = subprocess.Popen(
        [*LAUNCHER, "--port", str(port), "--upstream-port", str(upstream_port)],
        cwd=ROOT,
        env={**_environ(), **env},
    )
    try:
        wait_for_port(port, timeout=30, proc=launcher)
        with (
            httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=PREMIUM, timeout=10) as app,
            httpx.Client(base_url=f"http://127.0.0.1:{upstream_port}", timeout=10) as upstream,
        ):
            yield Example(app, upstream)
    finally:
        launcher.terminate()
        launcher.wait(timeout=30)


def _environ() -> dict[str, str]:
    """This environment without settings of its own: the example's defaults apply."""
    return {k: v for k, v in os.environ.items() if not k.startswith("RESILIENCE_")}


def eventually(check: Callable[[], Any], timeout: float = 15.0) -> Any:
    """``check()``'s first truthy answer, asked every 0.1 s, before ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        answer = check()
        if answer:
            return answer
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout} s: {check}")
        time.sleep(0.1)


def test_upstream_down_then_back_with_no_hand(example: Example) -> None:
    live = "/inventory/tea-earl-grey/live"
    assert example.app.get(live).status_code == 200
    before = example.metrics()

    # The upstream fails: each call fails after its retries until the breaker opens (3).
    example.fail_upstream(1.0)
    failures = [example.app.get(live).status_code for _ in range(3)]
    assert failures == [502, 502, 502]
    off = example.app.get(live)
    assert off.status_code == 503
    assert off.headers["content-type"] == "application/problem+json"
    assert off.json()["code"] == "feature_unavailable"
    assert off.headers["x-degraded"] == "inventory"
    assert "retry-after" in off.headers
    # Every answer carries the notice while the feature is off, the app's other routes too.
    assert example.app.get("/orders/1").headers["x-degraded"] == "inventory"

    ready = example.app.get("/health/ready").json()
    assert ready["status"] == "degraded"
    assert "inventory" in ready["checks"]["breakers"]["detail"]
    # The monitor finds the upstream down in the background and tries its recovery action.
    upstream_check = eventually(
        lambda: (
            example.app.get("/health/ready").json()["checks"]["inventory_upstream"].get("recovery")
        )
    )
    assert upstream_check["attempts"] >= 1

    during = example.metrics()
    breaker = {"breaker": "inventory"}
    assert value(during, "fastapi_resilience_breaker_state", state="open", **breaker) == 1
    assert value(during, "fastapi_resilience_feature_available", feature="inventory") == 0
    problems = "fastapi_resilience_problems_total"
    assert (
        value(during, problems, code="retries_exhausted", status="502")
        - value(before, problems, code="retries_exhausted", status="502")
        == 3
    )
    assert value(during, problems, code="feature_unavailable", status="503") >= 1
    assert value(during, "fastapi_resilience_health_check_up", check="inventory_upstream") == 0
    errors = example.app.get("/resilience/api/errors", headers=ADMIN).json()
    codes = {entry["code"]: entry["count"] for entry in errors["codes"]}
    assert codes["retries_exhausted"] == 3
    assert codes["feature_unavailable"] >= 1

    # The upstream recovers; traffic goes on; no operator does anything.
    example.fail_upstream(0.0)
    recovered = eventually(lambda: (r := example.app.get(live)).status_code == 200 and r)
    assert "x-degraded" not in recovered.headers
    eventually(lambda: example.app.get("/health/ready").json()["status"] == "ok")
    after = example.metrics()
    assert value(after, "fastapi_resilience_breaker_state", state="closed", **breaker) == 1
    assert value(after, "fastapi_resilience_feature_available", feature="inventory") == 1
    assert value(after, "fastapi_resilience_health_check_up", check="inventory_upstream") == 1
    assert value(after, "fastapi_resilience_degraded") == 0
