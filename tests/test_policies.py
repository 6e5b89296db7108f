"""Named outbound policies: declared in the environment or a TOML file, used by name in code
(a route dependency, a decorator, ``resilient_client``), changed through the admin API.

Every check is by behaviour: the breaker opens after N failures, the retry makes N attempts
(a counting function, or the loopback upstream's count of the requests that reached it), a
slow function is cut at the timeout.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

import httpx
import pytest
from fastapi import Depends, FastAPI
from loopback import UvicornProcess

from fastapi_resilience import (
    ConfigurationError,
    ResilienceSettings,
    get_breaker,
    install,
    policy,
    resilient_client,
)
from fastapi_resilience.events import Event
from fastapi_resilience.exceptions import UpstreamError
from fastapi_resilience.outbound import Policy
from fastapi_resilience.testing import ManualClock

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "policy-test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
API = "/resilience/api"

#: The inventory policy the environment and the file declare: 4 failures open the breaker,
#: 3 attempts per call; the ``slow`` policy cuts an attempt at 50 ms and never retries.
INVENTORY_ENV = {
    "RESILIENCE_POLICIES__INVENTORY__BREAKER__FAILURE_THRESHOLD": "4",
    "RESILIENCE_POLICIES__INVENTORY__RETRY__ATTEMPTS": "3",
    "RESILIENCE_POLICIES__SLOW__TIMEOUT": "0.05",
    "RESILIENCE_POLICIES__SLOW__RETRY__ATTEMPTS": "1",
    "RESILIENCE_RATE_LIMIT_ENABLED": "false",
}
INVENTORY_TOML = """
[inventory.breaker]
failure_threshold = 4

[inventory.retry]
attempts = 3

[slow]
timeout = 0.05
retry = { attempts = 1 }
"""


@asynccontextmanager
async def started(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """The app after its lifespan start-up (as a server runs it), and a client to it."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            yield client


def inventory_app(settings: ResilienceSettings | None = None) -> tuple[FastAPI, dict[str, int]]:
    """Routes that call a counting function through the ``inventory`` and ``slow`` policies."""
    app = FastAPI()
    install(app, settings, clock=ManualClock())
    calls = {"fail": 0}

    async def failing() -> None:
        calls["fail"] += 1
        raise UpstreamError("inventory answered 500")

    async def hanging() -> None:
        await asyncio.sleep(30)

    @app.get("/fail")
    async def fail(inventory: Annotated[Policy, Depends(policy("inventory"))]) -> None:
        await inventory.call(failing)

    @app.get("/slow")
    async def slow(guarded: Annotated[Policy, Depends(policy("slow"))]) -> None:
        await guarded.call(hanging)

    return app, calls


async def assert_inventory_in_force(app: FastAPI, calls: dict[str, int]) -> None:
    async with started(app) as client:
        first = await client.get("/fail")
        assert (first.status_code, first.json()["code"]) == (502, "retries_exhausted")
        assert calls["fail"] == 3  # the retry's 3 attempts, 3 failures for the breaker
        second = await client.get("/fail")
        # The 4th failure opens it; the open breaker ends the retries at once.
        assert (second.status_code, second.json()["code"]) == (503, "circuit_open")
        assert calls["fail"] == 4
        third = await client.get("/fail")
        assert third.json()["code"] == "circuit_open"
        assert calls["fail"] == 4  # not called while open
        assert get_breaker("inventory").state == "open"

        began = time.perf_counter()
        cut = await client.get("/slow")
        assert (cut.status_code, cut.json()["code"]) == (504, "upstream_timeout")
        assert time.perf_counter() - began < 2.0


async def test_a_policy_from_the_environment_alone_is_in_force(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in INVENTORY_ENV.items():
        monkeypatch.setenv(name, value)
    app, calls = inventory_app()
    await assert_inventory_in_force(app, calls)


async def test_a_policy_from_a_toml_file_is_in_force(tmp_path: Path) -> None:
    path = tmp_path / "policies.toml"
    path.write_text(INVENTORY_TOML)
    app, calls = inventory_app(ResilienceSettings(policies_file=path, rate_limit_enabled=False))
    await assert_inventory_in_force(app, calls)


def test_preset_then_file_then_environment_field_by_field(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "policies.toml"
    path.write_text(
        '[inventory]\ncriticality = "critical"\ntimeout = 3.0\n'
        "[inventory.breaker]\nfailure_threshold = 7\nrecovery_timeout = 20.0\n"
    )
    monkeypatch.setenv("RESILIENCE_POLICIES_FILE", str(path))
    monkeypatch.setenv("RESILIENCE_POLICIES__INVENTORY__BREAKER__FAILURE_THRESHOLD", "9")
    monkeypatch.setenv("RESILIENCE_POLICIES__REPORTS__CRITICALITY", "best_effort")
    found = ResilienceSettings().policies
    inventory = found["inventory"]
    assert inventory.breaker.failure_threshold == 9  # the environment over the file
    assert inventory.breaker.recovery_timeout == 20.0  # the file over the preset
    assert inventory.timeout == 3.0
    assert inventory.breaker.half_open_max_calls == 3  # the critical preset
    assert inventory.bulkhead.max_concurrent == 100
    reports = found["reports"]
    assert (reports.retry.attempts, reports.bulkhead.max_waiting) == (1, 0)  # best_effort


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        (
            "RESILIENCE_POLICIES__INVENTORY__BREAKER__FAILURE_THRESHOLD",
            "0",
            "greater than or equal to 1",
        ),
        ("RESILIENCE_POLICIES__INVENTORY__RETRY__ATTEMPTS", "many", "valid integer"),
        ("RESILIENCE_POLICIES__INVENTORY__BREAKER__FAILURE_TRESHOLD", "5", "Extra inputs"),
        ("RESILIENCE_POLICIES__INVENTORY__CRITICALITY", "vital", "'critical'"),
    ],
    ids=["out-of-range", "not-a-number", "misspelt", "unknown-criticality"],
)
def test_a_bad_variable_names_itself_at_start_up(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, says: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigurationError) as raised:
        install(FastAPI())
    path = ".".join(variable.removeprefix("RESILIENCE_").lower().split("__"))
    assert f"{path} (env {variable}):" in str(raised.value)
    assert says in str(raised.value)


def test_a_bad_line_of_the_file_names_the_file_and_the_line(tmp_path: Path) -> None:
    path = tmp_path / "policies.toml"
    path.write_text("[inventory.breaker]\nfailure_threshold = 5\nrecovery_timeout = \n")
    with pytest.raises(ConfigurationError) as raised:
        install(FastAPI(), ResilienceSettings(policies_file=path))
    message = str(raised.value)
    assert str(path) in message
    assert "line 3" in message


def test_a_bad_value_in_the_file_names_the_file_and_the_key(tmp_path: Path) -> None:
    path = tmp_path / "policies.toml"
    path.write_text("[inventory.retry]\nattempts = 0\n")
    with pytest.raises(ConfigurationError) as raised:
        ResilienceSettings(policies_file=path)
    message = str(raised.value)
    assert str(path) in message
    assert "inventory.retry.attempts: Input should be greater than or equal to 1" in message


async def test_an_unknown_policy_in_a_route_fails_at_start_up() -> None:
    app = FastAPI()
    install(app, ResilienceSettings(policies={"inventory": {}}))

    @app.get("/stock")
    async def stock(guarded: Annotated[Policy, Depends(policy("inventroy"))]) -> None:
        return None

    with pytest.raises(ConfigurationError) as raised:
        async with started(app):
            pass
    message = str(raised.value)
    assert "policy 'inventroy'" in message
    assert "test_policies.py:" in message  # where the route asked for it
    assert "declared: inventory" in message


async def test_the_decorator_runs_through_the_named_policy() -> None:
    app = FastAPI()
    settings = {"retry": {"attempts": 2}, "breaker": {"failure_threshold": 10}}
    install(app, ResilienceSettings(policies={"payments": settings}), clock=ManualClock())
    attempts = []

    @policy("payments")
    async def charge(amount: int) -> int:
        attempts.append(amount)
        if len(attempts) == 1:
            raise UpstreamError("payments answered 503")
        return amount

    async with started(app):
        assert await charge(7) == 7
    assert attempts == [7, 7]
    assert policy("payments").breaker is get_breaker("payments")


# -- the admin API ----------------------------------------------------------------------


def admin_app(declared: dict[str, Any]) -> tuple[FastAPI, list[Event]]:
    app = FastAPI()
    settings = ResilienceSettings(
        admin_token=TOKEN, rate_limit_enabled=False, policies={"inventory": declared}
    )
    resilience = install(app, settings, clock=ManualClock())
    events: list[Event] = []
    resilience.events.subscribe(events.append)
    return app, events


async def test_a_change_under_load_keeps_calls_in_flight_and_the_breakers_state() -> None:
    """100 calls in flight while a PUT lowers the threshold from 5 to 3: none fails, the
    breaker keeps its 2 failures, and the next failure opens it (under 5 it would not)."""
    app, events = admin_app(
        {
            "retry": {"attempts": 1},
            "timeout": 30.0,
            "bulkhead": {"max_concurrent": 200, "max_waiting": 0},
        }
    )
    gate, all_inside = asyncio.Event(), asyncio.Event()
    inside = 0

    async def held() -> str:
        nonlocal inside
        inside += 1
        if inside == 100:
            all_inside.set()
        await gate.wait()
        return "ok"

    async def failing() -> None:
        raise UpstreamError("inventory answered 500")

    @app.get("/held")
    async def held_route(inventory: Annotated[Policy, Depends(policy("inventory"))]) -> str:
        return await inventory.call(held)

    @app.get("/fail")
    async def fail_route(inventory: Annotated[Policy, Depends(policy("inventory"))]) -> None:
        await inventory.call(failing)

    async with started(app) as client:
        in_flight = [asyncio.create_task(client.get("/held")) for _ in range(100)]
        await asyncio.wait_for(all_inside.wait(), 10)
        for _ in range(2):
            assert (await client.get("/fail")).json()["code"] == "upstream_error"

        changed = await client.put(
            f"{API}/policies/inventory", json={"breaker": {"failure_threshold": 3}}, headers=AUTH
        )
        assert changed.status_code == 200
        assert changed.json()["settings"]["breaker"]["failure_threshold"] == 3
        breakers = (await client.get(f"{API}/breakers", headers=AUTH)).json()["breakers"]
        (inventory,) = [b for b in breakers if b["name"] == "inventory"]
        assert (inventory["state"], inventory["failures"]) == ("closed", 2)
        assert inventory["failure_threshold"] == 3

        assert (await client.get("/fail")).json()["code"] == "upstream_error"
        assert (await client.get("/fail")).json()["code"] == "circuit_open"

        gate.set()
        answers = await asyncio.gather(*in_flight)
        assert [a.status_code for a in answers] == [200] * 100
        assert get_breaker("inventory").state == "open"

    (change,) = [e for e in events if e.kind == "policy.changed"]
    assert change.name == "inventory"
    assert change.attributes["client"] == "127.0.0.1"
    assert change.attributes["changes"] == {"breaker.failure_threshold": [5, 3]}


async def test_the_admin_api_lists_policies_and_refuses_a_bad_change() -> None:
    app, events = admin_app({"criticality": "critical", "breaker": {"failure_threshold": 8}})
    async with started(app) as client:
        listed = (await client.get(f"{API}/policies", headers=AUTH)).json()["policies"]
        (inventory,) = [p for p in listed if p["name"] == "inventory"]
        assert inventory["settings"]["criticality"] == "critical"
        assert inventory["settings"]["breaker"]["failure_threshold"] == 8
        assert inventory["settings"]["timeout"] == 5.0

        bad = await client.put(
            f"{API}/policies/inventory",
            json={"breaker": {"failure_threshold": 0}, "retry": {"attempts": "x"}},
            headers=AUTH,
        )
        assert bad.status_code == 422
        assert bad.headers["content-type"] == "application/problem+json"
        fields = {e["field"] for e in bad.json()["errors"]}
        assert fields == {"breaker.failure_threshold", "retry.attempts"}
        unknown = await client.put(f"{API}/policies/nope", json={"timeout": 1}, headers=AUTH)
        assert unknown.status_code == 404
        not_json = await client.put(f"{API}/policies/inventory", content=b"{", headers=AUTH)
        assert not_json.status_code == 422
        anonymous = await client.put(f"{API}/policies/inventory", json={"timeout": 1})
        assert anonymous.status_code == 401

        still = (await client.get(f"{API}/policies", headers=AUTH)).json()["policies"]
        assert still == listed
    assert get_breaker("inventory").failure_threshold == 8
    rejected = [e for e in events if e.kind == "policy.change_rejected"]
    assert [e.name for e in rejected] == ["inventory", "nope", "inventory"]
    assert "breaker.failure_threshold" in rejected[0].attributes["reason"]
    assert not [e for e in events if e.kind == "policy.changed"]


async def test_a_change_of_timeout_applies_to_the_next_call() -> None:
    app, _ = admin_app({"timeout": 10.0, "retry": {"attempts": 1}})

    async def slowish() -> str:
        await asyncio.sleep(0.3)
        return "done"

    @app.get("/slowish")
    async def route(inventory: Annotated[Policy, Depends(policy("inventory"))]) -> str:
        return await inventory.call(slowish)

    async with started(app) as client:
        assert (await client.get("/slowish")).json() == "done"
        body = {"timeout": 0.05}
        assert (
            await client.put(f"{API}/policies/inventory", json=body, headers=AUTH)
        ).status_code == 200
        assert (await client.get("/slowish")).json()["code"] == "upstream_timeout"


# -- resilient_client(policy=...) against the loopback upstream -----------------------------


@pytest.fixture(name="upstream_url", scope="module")
def _upstream_url() -> Iterator[str]:
    server = UvicornProcess("tests._outbound_upstream:app", cwd=ROOT)
    try:
        yield server.url
    finally:
        server.stop()


async def test_resilient_client_retries_and_trips_under_the_named_policy(
    upstream_url: str,
) -> None:
    app = FastAPI()
    declared = {"retry": {"attempts": 3, "budget": 10.0}, "breaker": {"failure_threshold": 5}}
    install(app, ResilienceSettings(policies={"catalog": declared}), clock=ManualClock())
    client = resilient_client(upstream_url, policy="catalog")
    async with httpx.AsyncClient(base_url=upstream_url) as upstream, client, started(app):
        await upstream.post("/reset")
        await upstream.post("/mode/fail")
        codes = []
        for _ in range(3):
            try:
                await client.get("/item")
            except Exception as exc:  # the library's errors, by code
                codes.append(getattr(exc, "code", type(exc).__name__))
        hits = (await upstream.get("/hits")).json()["hits"]
        await upstream.post("/reset")
    # 3 attempts, then 2 more: the 5th failure opens the breaker, and the third call is
    # refused without reaching the upstream.
    assert codes == ["retries_exhausted", "circuit_open", "circuit_open"]
    assert hits == 5
    assert get_breaker("catalog").state == "open"


async def test_a_larger_bulkhead_lets_the_waiting_calls_in_at_once() -> None:
    app, _ = admin_app({"bulkhead": {"max_concurrent": 1, "max_waiting": 5}})
    gate = asyncio.Event()
    inside = 0

    async def held() -> None:
        nonlocal inside
        inside += 1
        await gate.wait()

    @app.get("/held")
    async def route(inventory: Annotated[Policy, Depends(policy("inventory"))]) -> None:
        await inventory.call(held)

    async with started(app) as client:
        calls = [asyncio.create_task(client.get("/held")) for _ in range(3)]
        for _ in range(50):
            await asyncio.sleep(0)
        assert inside == 1
        body = {"bulkhead": {"max_concurrent": 3}}
        changed = await client.put(f"{API}/policies/inventory", json=body, headers=AUTH)
        assert changed.json()["settings"]["bulkhead"] == {"max_concurrent": 3, "max_waiting": 5}
        for _ in range(50):
            await asyncio.sleep(0)
        assert inside == 3
        gate.set()
        assert [(await call).status_code for call in calls] == [200] * 3


async def test_the_policys_cache_serves_fresh_then_stale_answers() -> None:
    clock = ManualClock()
    app = FastAPI()
    declared = {"cache": {"ttl": 10.0, "stale_ttl": 100.0}, "retry": {"attempts": 1}}
    install(app, ResilienceSettings(policies={"catalog": declared}), clock=clock)
    answers: list[Exception | str] = ["fresh", UpstreamError("catalog answered 500")]

    async def fetch() -> str:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    async with started(app):
        catalog = policy("catalog")
        first = await catalog.cached("sku-1", fetch)
        again = await catalog.cached("sku-1", fetch)
        clock.advance(20.0)
        stale = await catalog.cached("sku-1", fetch)
    assert (first.status, again.status, stale.status) == ("miss", "hit", "stale")
    assert stale.value == "fresh"


@pytest.mark.parametrize("criticality", [["critical"], {"a": 1}])
def test_a_criticality_that_is_not_a_name_is_a_named_configuration_error(
    criticality: object,
) -> None:
    with pytest.raises(ConfigurationError, match="criticality"):
        ResilienceSettings(policies={"inv": {"criticality": criticality}})
