"""The admin API under ``admin_path``: absent without a token, 401 without the right one,
and each action doing what it says, logged once with the request's correlation ID."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from fastapi_resilience import (
    Bulkhead,
    CircuitBreaker,
    ConfigurationError,
    ResilienceSettings,
    install,
)
from fastapi_resilience.events import Event
from fastapi_resilience.exceptions import UpstreamError
from fastapi_resilience.outbound import BreakerRegistry, DeadLetter, MemoryDeadLetterQueue
from fastapi_resilience.testing import ManualClock

pytestmark = pytest.mark.anyio

TOKEN = "admin-test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
API = "/resilience/api"


@asynccontextmanager
async def serve(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        yield client


def admin_app(**settings: Any) -> tuple[FastAPI, Any, list[Event]]:
    settings.setdefault("admin_token", TOKEN)
    app = FastAPI()
    resilience = install(app, ResilienceSettings(**settings), clock=ManualClock())
    events: list[Event] = []
    resilience.events.subscribe(events.append)
    return app, resilience, events


async def test_no_token_no_routes() -> None:
    """Without admin_token nothing is served under admin_path: it answers like any unknown
    route, whatever is sent."""
    app = FastAPI()
    install(app, ResilienceSettings())
    async with serve(app) as client:
        for path in (f"{API}/breakers", f"{API}/overview", "/resilience/"):
            plain = await client.get(path)
            with_token = await client.get(path, headers=AUTH)
            assert plain.status_code == with_token.status_code == 404
            assert plain.json()["code"] == "not_found"
        assert (await client.post(f"{API}/breakers/x/open", headers=AUTH)).status_code == 404


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-token-0123456789abcdef"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer \u00e9\u00e9".encode("latin-1")},
    ],
    ids=["missing", "wrong", "other-scheme", "longer", "empty", "non-ascii"],
)
async def test_a_missing_or_wrong_token_is_401_problem(headers: dict[str, Any]) -> None:
    app, _, _ = admin_app()
    async with serve(app) as client:
        for method, path in [
            ("GET", f"{API}/breakers"),
            ("GET", f"{API}/overview"),
            ("GET", f"{API}/errors"),
            ("POST", f"{API}/features/anything/off"),
            ("DELETE", f"{API}/rate-limits/ip:1.2.3.4"),
        ]:
            answer = await client.request(method, path, headers=headers)
            assert answer.status_code == 401, path
            assert answer.headers["content-type"] == "application/problem+json"
            assert answer.headers["www-authenticate"].startswith("Bearer")
            body = answer.json()
            assert body["code"] == "unauthenticated"
            assert TOKEN not in answer.text


async def test_the_page_needs_no_token_and_holds_no_data() -> None:
    app, _, _ = admin_app()
    async with serve(app) as client:
        page = await client.get("/resilience/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "content-security-policy" in page.headers


async def test_breakers_list_open_close_reset() -> None:
    app, _, events = admin_app()
    CircuitBreaker("admin-b", failure_threshold=2, recovery_timeout=30, clock=ManualClock())
    async with serve(app) as client:
        listed = (await client.get(f"{API}/breakers", headers=AUTH)).json()["breakers"]
        found = next(b for b in listed if b["name"] == "admin-b")
        assert found["state"] == "closed"
        assert found["calls"] == {"success": 0, "failure": 0, "rejected": 0}

        opened = await client.post(f"{API}/breakers/admin-b/open", headers=AUTH)
        assert opened.status_code == 200
        assert opened.json()["state"] == "open"
        assert opened.json()["time_left_open"] == 30
        ready = (await client.get("/health/ready")).json()
        assert ready["status"] == "degraded"

        closed = (await client.post(f"{API}/breakers/admin-b/close", headers=AUTH)).json()
        assert closed["state"] == "closed"
        reset = (await client.post(f"{API}/breakers/admin-b/reset", headers=AUTH)).json()
        assert reset["state"] == "closed"
    actions = [e for e in events if e.kind == "admin.action"]
    assert [e.attributes["action"] for e in actions] == [
        "breaker.open",
        "breaker.close",
        "breaker.reset",
    ]
    assert all(e.name == "admin-b" and e.correlation_id for e in actions)


async def test_unknown_names_are_404_and_create_nothing() -> None:
    app, resilience, _ = admin_app()
    async with serve(app) as client:
        for path in (
            f"{API}/breakers/no-such-breaker/open",
            f"{API}/breakers/no-such-breaker/reset",
            f"{API}/features/no-such-feature/off",
            f"{API}/features/no-such-feature/on",
        ):
            answer = await client.post(path, headers=AUTH)
            assert answer.status_code == 404, path
            assert answer.headers["content-type"] == "application/problem+json"
        listed = (await client.get(f"{API}/breakers", headers=AUTH)).json()["breakers"]
        features = (await client.get(f"{API}/features", headers=AUTH)).json()["features"]
    assert "no-such-breaker" not in {b["name"] for b in listed}
    assert features == []
    assert resilience.degraded.features() == []


async def test_features_off_for_a_while_and_on() -> None:
    clock = ManualClock()
    app = FastAPI()
    resilience = install(app, ResilienceSettings(admin_token=TOKEN), clock=clock)
    resilience.degraded.feature("admin-f")
    async with serve(app) as client:
        off = await client.post(f"{API}/features/admin-f/off", headers=AUTH, json={"seconds": 60})
        assert off.status_code == 200
        assert off.json()["available"] is False
        assert off.json()["retry_after"] == 60
        assert (await client.get("/health/ready")).json()["status"] == "degraded"
        clock.advance(61)
        listed = (await client.get(f"{API}/features", headers=AUTH)).json()["features"]
        assert listed[0]["available"] is True  # the duration ran out on its own

        await client.post(f"{API}/features/admin-f/off", headers=AUTH)  # no body: until on
        clock.advance(3600)
        assert not resilience.degraded.available("admin-f")
        on = await client.post(f"{API}/features/admin-f/on", headers=AUTH)
        assert on.json()["available"] is True


@pytest.mark.parametrize(
    "body",
    [
        b"{",
        b'{"seconds": -1}',
        b'{"seconds": "soon"}',
        b'{"seconds": true}',
        b"[1]",
        b'{"seconds": 1e308}',
    ],
)
async def test_a_bad_switch_off_body_is_422_and_changes_nothing(body: bytes) -> None:
    app, resilience, _ = admin_app()
    resilience.degraded.feature("admin-g")
    async with serve(app) as client:
        answer = await client.post(f"{API}/features/admin-g/off", headers=AUTH, content=body)
    assert answer.status_code == 422
    assert answer.json()["code"] == "invalid_input"
    assert resilience.degraded.available("admin-g")


async def test_dead_letters_are_listed_and_replayed() -> None:
    app, resilience, events = admin_app()
    queue = MemoryDeadLetterQueue(name="admin-letters")
    replayed: list[str] = []

    async def replay(letter: DeadLetter) -> None:
        replayed.append(letter.context["order"])

    async with serve(app) as client:
        missing = await client.get(f"{API}/dead-letters", headers=AUTH)
        assert missing.status_code == 404  # nothing attached yet: said, not a 500
        resilience.use_dead_letters(queue, replay=replay)
        await queue.record("charge", UpstreamError("down"), context={"order": "o-1"})
        listed = (await client.get(f"{API}/dead-letters", headers=AUTH)).json()
        assert listed["queue"] == "admin-letters"
        assert [x["context"] for x in listed["letters"]] == [{"order": "o-1"}]
        report = (await client.post(f"{API}/dead-letters/replay", headers=AUTH)).json()
        assert report["succeeded"] == [listed["letters"][0]["id"]]
        assert (await client.get(f"{API}/dead-letters", headers=AUTH)).json()["letters"] == []
    assert replayed == ["o-1"]
    assert any(e.attributes.get("action") == "dead_letters.replay" for e in events)


async def test_overview_has_every_panel() -> None:
    app, resilience, _ = admin_app()
    Bulkhead("admin-bulkhead", max_concurrent=3)
    resilience.degraded.feature("admin-o")
    async with serve(app) as client:
        await client.get("/nowhere")
        overview = (await client.get(f"{API}/overview", headers=AUTH)).json()
    assert set(overview) >= {
        "generated_at",
        "degraded",
        "health",
        "breakers",
        "features",
        "bulkheads",
        "rate_limits",
        "requests",
        "errors",
    }
    assert overview["health"]["status"] == "ok"
    bulkhead = next(b for b in overview["bulkheads"] if b["name"] == "admin-bulkhead")
    assert bulkhead == {
        "name": "admin-bulkhead",
        "max_concurrent": 3,
        "in_use": 0,
        "waiting": 0,
        "rejected": 0,
    }
    assert overview["requests"]["count"] >= 1


async def test_admin_routes_stay_out_of_the_schema_unless_asked() -> None:
    hidden, _, _ = admin_app()
    shown, _, _ = admin_app(admin_in_schema=True)
    async with serve(hidden) as client:
        assert "/resilience" not in (await client.get("/openapi.json")).text
    async with serve(shown) as client:
        paths = (await client.get("/openapi.json")).json()["paths"]
    assert f"{API}/breakers" in paths
    assert "/resilience/" not in paths  # the page never is


async def test_the_token_lets_operators_past_the_rate_limit() -> None:
    """An operator's dashboard polls: a tight anonymous tier must not lock it out."""
    app, _, _ = admin_app(rate_limit_tiers={"anonymous": "2/minute"})
    async with serve(app) as client:
        answers = [await client.get(f"{API}/breakers", headers=AUTH) for _ in range(5)]
        others = [(await client.get("/nowhere")).status_code for _ in range(3)]
    assert others == [404, 404, 429]  # the tier still applies to everything else
    assert [a.status_code for a in answers] == [200] * 5


async def test_guessing_the_token_costs_the_guessers_quota() -> None:
    app, _, _ = admin_app(rate_limit_tiers={"anonymous": "3/minute"})
    wrong = {"Authorization": "Bearer not-the-token-0123456789"}
    async with serve(app) as client:
        guesses = [
            (await client.get(f"{API}/breakers", headers=wrong)).status_code for _ in range(5)
        ]
        with_token = await client.get(f"{API}/breakers", headers=AUTH)
    assert guesses == [401, 401, 401, 429, 429]
    assert with_token.status_code == 200


async def test_a_feature_switched_off_on_every_path_spares_the_operators_routes() -> None:
    """A feature that owns "/" sheds the app, not the admin API, readiness or metrics: the
    operator can still see why and switch it on again."""
    app, resilience, _ = admin_app()
    resilience.degraded.feature("everything", paths=["/"])

    @app.get("/orders")
    async def orders() -> list[int]:
        return []

    async with serve(app) as client:
        await client.post(f"{API}/features/everything/off", headers=AUTH)
        assert (await client.get("/orders")).status_code == 503
        assert (await client.get("/health/ready")).json()["status"] == "degraded"
        assert (await client.get("/metrics")).status_code == 200
        assert (await client.get("/resilience/")).status_code == 200
        on = await client.post(f"{API}/features/everything/on", headers=AUTH)
        assert on.json()["available"] is True
        assert (await client.get("/orders")).status_code == 200


async def test_admin_path_moves_the_routes() -> None:
    app, _, _ = admin_app(admin_path="/ops/admin")
    async with serve(app) as client:
        assert (await client.get("/ops/admin/api/breakers", headers=AUTH)).status_code == 200
        assert (await client.get("/ops/admin/")).status_code == 200
        assert (await client.get(f"{API}/breakers", headers=AUTH)).status_code == 404


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"admin_token": "short"}, "admin_token"),
        ({"admin_token": "has a space in it 0123456789"}, "admin_token"),
        ({"admin_token": TOKEN, "admin_path": "resilience"}, "admin_path"),
        ({"admin_token": TOKEN, "admin_path": "/ops/"}, "admin_path"),
        ({"admin_token": TOKEN, "admin_path": "/{x}"}, "admin_path"),
    ],
)
def test_bad_admin_settings_stop_start_up_naming_the_setting(
    values: dict[str, str], named: str
) -> None:
    with pytest.raises(ConfigurationError) as raised:
        ResilienceSettings(**values)
    message = str(raised.value)
    assert f"{named} (env RESILIENCE_{named.upper()})" in message
    assert values["admin_token"] not in message or named != "admin_token"


async def test_the_token_is_never_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    app, _, _ = admin_app()
    CircuitBreaker("admin-logged", registry=BreakerRegistry())
    async with serve(app) as client:
        await client.get(f"{API}/breakers", headers={"Authorization": f"Bearer {TOKEN}-no"})
        await client.get(f"{API}/breakers", headers=AUTH)
    assert TOKEN not in caplog.text
    assert TOKEN not in repr(ResilienceSettings(admin_token=TOKEN))


async def test_rate_limits_of_one_identity_read_and_reset() -> None:
    """One client's counts per policy, and a reset that lets it in again."""
    app, _, events = admin_app(rate_limit_tiers={"anonymous": "3/minute"})

    @app.get("/limited")
    async def limited() -> dict[str, bool]:
        return {"ok": True}

    async with serve(app) as client:
        statuses = [(await client.get("/limited")).status_code for _ in range(4)]
        assert statuses == [200, 200, 200, 429]
        # httpx's ASGI transport reports the client as 127.0.0.1.
        state = await client.get(f"{API}/rate-limits/ip:127.0.0.1", headers=AUTH)
        assert state.status_code == 200
        tier = next(p for p in state.json()["policies"] if p["scope"] == "tier")
        assert (tier["tier"], tier["limit"], tier["used"], tier["remaining"]) == (
            "anonymous",
            "3/minute",
            3,
            0,
        )
        reset = await client.delete(f"{API}/rate-limits/ip:127.0.0.1", headers=AUTH)
        assert reset.status_code == 200
        assert reset.json()["reset"] >= 1
        assert (await client.get("/limited")).status_code == 200
        bad = await client.get(f"{API}/rate-limits/user:someone", headers=AUTH)
        assert bad.status_code == 422
    assert any(e.attributes.get("action") == "rate_limits.reset" for e in events)


async def test_errors_lists_problems_by_code_with_their_correlation_ids() -> None:
    app, _, _ = admin_app()
    async with serve(app) as client:
        missing = await client.get("/no-such-route", headers={"X-Request-ID": "req-errors-1"})
        assert missing.status_code == 404
        errors = (await client.get(f"{API}/errors", headers=AUTH)).json()
    assert {"code": "not_found", "status": 404} in [
        {"code": c["code"], "status": c["status"]} for c in errors["codes"]
    ]
    recent = {r["correlation_id"]: r["problems"] for r in errors["recent"]}
    assert [p["code"] for p in recent["req-errors-1"]] == ["not_found"]
    assert recent["req-errors-1"][0]["route"] == "(unmatched)"


async def test_errors_can_be_switched_off() -> None:
    app, resilience, _ = admin_app(errors_enabled=False)
    async with serve(app) as client:
        await client.get("/no-such-route")
        answer = await client.get(f"{API}/errors", headers=AUTH)
    assert answer.status_code == 200
    assert answer.json() == {}
    assert resilience.analytics is None


async def test_unknown_admin_routes_and_methods_need_the_token_too() -> None:
    """Without the token nothing under the API says which routes exist: a wrong method or
    path is a 401 like the rest; with it, a 404 problem."""
    app, _, _ = admin_app()
    async with serve(app) as client:
        for method, path in [
            ("GET", f"{API}/breakers/x/open"),
            ("DELETE", f"{API}/breakers"),
            ("GET", f"{API}/no-such-thing"),
        ]:
            without = await client.request(method, path)
            assert without.status_code == 401, (method, path)
            with_token = await client.request(method, path, headers=AUTH)
            assert with_token.status_code == 404, (method, path)
            assert with_token.json()["code"] == "not_found"
