"""Reloading ``policies_file`` when it changes: a real file in ``tmp_path``, the app started
with its lifespan, the file edited, and the admin API and the breaker's behaviour read until
the change shows (polled, within seconds).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

import httpx
import pytest
from fastapi import Depends, FastAPI

from fastapi_resilience import ResilienceSettings, install, policy
from fastapi_resilience.events import Event
from fastapi_resilience.exceptions import UpstreamError
from fastapi_resilience.outbound import Policy
from fastapi_resilience.testing import ManualClock

pytestmark = pytest.mark.anyio

TOKEN = "reload-test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
API = "/resilience/api"
#: The name of the watcher's task (see ``asyncio.all_tasks()``).
WATCHER_TASK = "fastapi-resilience-policies-file"
#: How long a change may take to show: the watch's debounce is well under this.
WITHIN = 10.0

INVENTORY = """\
[inventory]
timeout = 2.0
retry = {{ attempts = 1 }}

[inventory.breaker]
failure_threshold = {threshold}
"""


@asynccontextmanager
async def started(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """The app after its lifespan start-up (as a server runs it), and a client to it."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            yield client


def reload_app(path: Path, **settings: Any) -> tuple[FastAPI, list[Event]]:
    """An app whose ``inventory`` policy comes from ``path``; ``/fail`` fails through it."""
    app = FastAPI()
    resilience = install(
        app,
        ResilienceSettings(
            policies_file=path, admin_token=TOKEN, rate_limit_enabled=False, **settings
        ),
        clock=ManualClock(),
    )
    events: list[Event] = []
    resilience.events.subscribe(events.append)

    async def failing() -> None:
        raise UpstreamError("inventory answered 500")

    @app.get("/fail")
    async def fail(inventory: Annotated[Policy, Depends(policy("inventory"))]) -> None:
        await inventory.call(failing)

    return app, events


def replace(path: Path, text: str) -> None:
    """Write ``text`` as editors and config tools do: a new file renamed over the old one."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


async def eventually(check: Callable[[], Awaitable[bool]], within: float = WITHIN) -> None:
    """Wait until ``check()`` holds, failing after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, f"not within {within} s"
        await asyncio.sleep(0.05)


async def policy_settings(client: httpx.AsyncClient, name: str = "inventory") -> dict[str, Any]:
    listed = (await client.get(f"{API}/policies", headers=AUTH)).json()["policies"]
    (found,) = [p for p in listed if p["name"] == name]
    settings: dict[str, Any] = found["settings"]
    return settings


async def threshold(client: httpx.AsyncClient) -> int:
    value: int = (await policy_settings(client))["breaker"]["failure_threshold"]
    return value


def watcher_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name() == WATCHER_TASK]


async def test_an_edit_applies_the_new_threshold_and_the_breaker_keeps_its_state(
    tmp_path: Path,
) -> None:
    """Threshold 5 -> 3 in the file, after 2 failures: the breaker, still closed with its 2
    failures, opens at the next one (under 5 it would not)."""
    path = tmp_path / "policies.toml"
    path.write_text(INVENTORY.format(threshold=5), encoding="utf-8")
    app, events = reload_app(path)
    async with started(app) as client:
        for _ in range(2):
            assert (await client.get("/fail")).json()["code"] == "upstream_error"

        replace(path, INVENTORY.format(threshold=3))

        async def applied() -> bool:
            return await threshold(client) == 3

        await eventually(applied)
        breakers = (await client.get(f"{API}/breakers", headers=AUTH)).json()["breakers"]
        (inventory,) = [b for b in breakers if b["name"] == "inventory"]
        assert (inventory["state"], inventory["failures"]) == ("closed", 2)
        assert (await client.get("/fail")).json()["code"] == "upstream_error"
        assert (await client.get("/fail")).json()["code"] == "circuit_open"

    (change,) = [e for e in events if e.kind == "policy.changed"]
    assert change.name == "inventory"
    assert change.attributes["client"] == "policies_file"
    assert change.attributes["changes"] == {"breaker.failure_threshold": [5, 3]}


async def test_a_bad_edit_keeps_the_policy_and_publishes_the_rejection(tmp_path: Path) -> None:
    """A syntax error names the file and the line; a bad value the key; the policy stays."""
    path = tmp_path / "policies.toml"
    path.write_text(INVENTORY.format(threshold=5), encoding="utf-8")
    app, events = reload_app(path)

    def rejections() -> list[Event]:
        return [e for e in events if e.kind == "policy.change_rejected"]

    async def rejected(count: int) -> bool:
        return len(rejections()) == count

    async with started(app) as client:
        path.write_text(INVENTORY.format(threshold="= 3"), encoding="utf-8")
        await eventually(lambda: rejected(1))
        first = rejections()[0]
        assert first.level == logging.WARNING
        assert first.attributes["client"] == "policies_file"
        assert str(path) in first.attributes["reason"]
        assert "line 6" in first.attributes["reason"]

        path.write_text(INVENTORY.format(threshold=0), encoding="utf-8")
        await eventually(lambda: rejected(2))
        assert "inventory.breaker.failure_threshold" in rejections()[1].attributes["reason"]

        assert await threshold(client) == 5
        assert not [e for e in events if e.kind == "policy.changed"]


async def test_an_environment_override_keeps_winning_after_a_reload(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RESILIENCE_POLICIES__INVENTORY__BREAKER__FAILURE_THRESHOLD", "9")
    path = tmp_path / "policies.toml"
    path.write_text(INVENTORY.format(threshold=5), encoding="utf-8")
    app, _ = reload_app(path)
    async with started(app) as client:
        assert await threshold(client) == 9
        path.write_text(
            INVENTORY.format(threshold=3).replace("timeout = 2.0", "timeout = 4.0"),
            encoding="utf-8",
        )

        async def timeout_applied() -> bool:
            return (await policy_settings(client))["timeout"] == 4.0

        await eventually(timeout_applied)
        assert await threshold(client) == 9


async def test_a_policy_added_or_removed_after_start_up_is_reported_not_applied(
    tmp_path: Path,
) -> None:
    path = tmp_path / "policies.toml"
    path.write_text(INVENTORY.format(threshold=5) + "\n[reports]\ntimeout = 1.0\n", "utf-8")
    app, events = reload_app(path)
    async with started(app) as client:
        path.write_text(INVENTORY.format(threshold=4) + "\n[search]\ntimeout = 1.0\n", "utf-8")

        async def applied() -> bool:
            return await threshold(client) == 4

        await eventually(applied)
        listed = (await client.get(f"{API}/policies", headers=AUTH)).json()["policies"]
        assert [p["name"] for p in listed] == ["inventory", "reports"]
    reported = {e.name: e.attributes["reason"] for e in events if e.kind.endswith("rejected")}
    assert set(reported) == {"reports", "search"}
    assert "restart" in reported["search"]
    assert "kept in force" in reported["reports"]


async def test_policies_reload_off_watches_nothing(tmp_path: Path) -> None:
    path = tmp_path / "policies.toml"
    path.write_text(INVENTORY.format(threshold=5), encoding="utf-8")
    app, events = reload_app(path, policies_reload=False)
    async with started(app) as client:
        assert watcher_tasks() == []
        path.write_text(INVENTORY.format(threshold=3), encoding="utf-8")
        await asyncio.sleep(1.0)
        assert await threshold(client) == 5
    assert not [e for e in events if e.kind.startswith("policy.")]


async def test_shutdown_stops_the_watcher(tmp_path: Path) -> None:
    path = tmp_path / "policies.toml"
    path.write_text(INVENTORY.format(threshold=5), encoding="utf-8")
    app, _ = reload_app(path)
    async with started(app):
        assert len(watcher_tasks()) == 1
    assert watcher_tasks() == []


def test_without_watchfiles_install_warns_once_naming_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "watchfiles", None)  # not installed, as imports see it
    path = tmp_path / "policies.toml"
    path.write_text(INVENTORY.format(threshold=5), encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="fastapi_resilience"):
        reload_app(path)
    (warning,) = [r for r in caplog.records if "watchfiles" in r.getMessage()]
    assert "fastapi-resilience[reload]" in warning.getMessage()
    assert str(path) in warning.getMessage()


HELD = """\
[inventory]
timeout = 30.0
retry = {{ attempts = 1 }}

[inventory.breaker]
failure_threshold = {threshold}

[inventory.bulkhead]
max_concurrent = 200
max_waiting = 0
"""


async def test_calls_in_flight_finish_across_a_reload(tmp_path: Path) -> None:
    """100 calls in flight while the file changes: none fails because of the change, and the
    next calls run under the new policy."""
    path = tmp_path / "policies.toml"
    path.write_text(HELD.format(threshold=5), encoding="utf-8")
    app, events = reload_app(path)
    release = asyncio.Event()

    async def held() -> str:
        await release.wait()
        return "done"

    @app.get("/held")
    async def held_route(inventory: Annotated[Policy, Depends(policy("inventory"))]) -> str:
        return await inventory.call(held)

    async with started(app) as client:
        calls = [asyncio.create_task(client.get("/held")) for _ in range(100)]
        await asyncio.sleep(0.2)  # every call is inside the policy, waiting
        replace(path, HELD.format(threshold=3))

        async def applied() -> bool:
            return await threshold(client) == 3

        await eventually(applied)
        release.set()
        answers = await asyncio.gather(*calls)
        after = await client.get("/held")
    assert [a.status_code for a in answers] == [200] * 100
    assert {a.json() for a in answers} == {"done"}
    assert after.status_code == 200
    assert [e.kind for e in events if e.kind.startswith("policy.")] == ["policy.changed"]
