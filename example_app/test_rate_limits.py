"""The example's rate limits: tiers by API key and the stricter /login limit."""

from __future__ import annotations

import httpx
import pytest
from fastapi import FastAPI

from example_app import rate_limits
from fastapi_resilience import install

pytestmark = pytest.mark.anyio


def make_app() -> FastAPI:
    app = FastAPI()
    install(app, rate_limits.example_settings())
    app.include_router(rate_limits.router)

    @app.get("/ping")
    async def ping() -> dict[str, str]:
        return {"ok": "yes"}

    return app


async def test_demo_keys_select_their_tiers() -> None:
    """Each demo API key is counted in its own tier; no key is anonymous."""
    app = make_app()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        anonymous = await client.get("/ping")
        premium = await client.get("/ping", headers={"X-API-Key": "demo-premium-key"})
    assert anonymous.headers["ratelimit-policy"] == '"anonymous";q=10;w=60'
    assert premium.headers["ratelimit-policy"] == '"premium-60s";q=1000;w=60, "premium-1s";q=50;w=1'


async def test_login_is_limited_to_five_a_minute() -> None:
    """The sixth login attempt in a minute is refused, even for a premium key."""
    app = make_app()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        codes = [
            (await client.post("/login", headers={"X-API-Key": "demo-premium-key"})).status_code
            for _ in range(6)
        ]
    assert codes == [200] * 5 + [429]


def test_environment_tiers_replace_the_demo_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    """RESILIENCE_RATE_LIMIT_TIERS wins, and the demo keys (whose tiers may be gone) go with it."""
    monkeypatch.setenv("RESILIENCE_RATE_LIMIT_TIERS", '{"anonymous": "5/second"}')
    settings = rate_limits.example_settings()
    assert settings.rate_limit_tiers == {"anonymous": "5/second"}
    assert settings.rate_limit_api_keys == {}
