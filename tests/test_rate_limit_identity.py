"""Identity resolution: API keys, client address, X-Forwarded-For only from trusted proxies."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from fastapi_resilience import ResilienceSettings, install
from fastapi_resilience._rate_limit_identity import (
    ClientAddress,
    DefaultIdentityResolver,
    Identity,
)
from fastapi_resilience.exceptions import ConfigurationError
from fastapi_resilience.testing import ManualClock

pytestmark = pytest.mark.anyio


def scope(peer: str | None, *headers: tuple[str, str]) -> dict[str, Any]:
    return {
        "type": "http",
        "path": "/",
        "client": (peer, 1234) if peer else None,
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers],
    }


@pytest.mark.parametrize(
    ("peer", "forwarded", "expected"),
    [
        # No trusted proxy in the way: the header is ignored.
        ("198.51.100.9", "1.2.3.4", "198.51.100.9"),
        # Trusted peer: right to left, the first untrusted hop is the client.
        ("10.0.0.1", "1.2.3.4", "1.2.3.4"),
        ("10.0.0.1", "6.6.6.6, 1.2.3.4", "1.2.3.4"),
        ("10.0.0.1", "6.6.6.6, 1.2.3.4, 10.0.0.2", "1.2.3.4"),
        # Several headers are one list, in order.
        ("10.0.0.1", ["6.6.6.6", "1.2.3.4, 10.0.0.3"], "1.2.3.4"),
        # Every hop trusted: the left-most one.
        ("10.0.0.1", "10.0.0.7, 10.0.0.2", "10.0.0.7"),
        # Trusted peer without the header: the peer.
        ("10.0.0.1", None, "10.0.0.1"),
        # IPv6 proxies and clients.
        ("fd00::1", "2001:db8::5", "2001:db8::5"),
    ],
)
def test_client_address(peer: str, forwarded: str | list[str] | None, expected: str) -> None:
    """X-Forwarded-For is read right to left, skipping trusted hops, and only from trusted peers."""
    address = ClientAddress(["10.0.0.0/8", "fd00::/8"])
    values = [forwarded] if isinstance(forwarded, str) else (forwarded or [])
    headers = [("X-Forwarded-For", v) for v in values]
    assert address(scope(peer, *headers)) == expected


def test_no_trusted_proxies_never_reads_the_header() -> None:
    """With no trusted proxies configured the peer address is the identity, whatever it sends."""
    address = ClientAddress()
    assert address(scope("10.0.0.1", ("X-Forwarded-For", "1.2.3.4"))) == "10.0.0.1"
    assert address(scope(None)) == "unknown"


def test_bad_trusted_proxy_is_a_configuration_error() -> None:
    """A trusted proxy that is not an address or network fails at start-up, naming it."""
    with pytest.raises(ConfigurationError, match=r"'proxy\.local'"):
        ClientAddress(["proxy.local"])


async def test_api_key_identity_is_hashed_and_tiered() -> None:
    """A known key resolves to its tier under a hash of the key; the key itself is not stored."""
    resolver = DefaultIdentityResolver(api_keys={"secret-key": "premium"}, default_tier="free")
    identity = await resolver(scope("1.2.3.4", ("X-API-Key", "secret-key")))
    assert identity.tier == "premium"
    assert identity.key.startswith("key:")
    assert "secret-key" not in identity.key
    other = await resolver(scope("5.6.7.8", ("x-api-key", "secret-key")))
    assert other == identity


async def test_unknown_key_is_no_key() -> None:
    """An unknown key is counted by address in the default tier."""
    resolver = DefaultIdentityResolver(api_keys={"k": "premium"}, default_tier="free")
    identity = await resolver(scope("1.2.3.4", ("X-API-Key", "guess")))
    assert identity == Identity("ip:1.2.3.4", "free")


async def test_custom_api_key_header() -> None:
    """The API key header's name is configurable."""
    resolver = DefaultIdentityResolver(api_keys={"k": "premium"}, api_key_header="Authorization")
    assert (await resolver(scope("1.2.3.4", ("Authorization", "k")))).tier == "premium"
    assert (await resolver(scope("1.2.3.4", ("X-API-Key", "k")))).tier == "anonymous"


async def test_spoofed_forwarded_for_from_untrusted_peer_does_not_change_identity() -> None:
    """Through the whole stack, a client cannot escape its budget by inventing X-Forwarded-For."""
    app = FastAPI()
    settings = ResilienceSettings(
        rate_limit_tiers={"anonymous": "2/minute"}, trusted_proxies=["10.0.0.0/8"]
    )
    install(app, settings, clock=ManualClock())

    @app.get("/")
    async def root() -> dict[str, str]:
        return {"ok": "yes"}

    transport = httpx.ASGITransport(app=app, client=("198.51.100.20", 999))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        codes = [
            (await c.get("/", headers={"X-Forwarded-For": f"203.0.113.{n}"})).status_code
            for n in range(4)
        ]
    assert codes == [200, 200, 429, 429]

    # Behind a trusted proxy the same header does name distinct clients.
    transport = httpx.ASGITransport(app=app, client=("10.1.2.3", 999))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        codes = [
            (await c.get("/", headers={"X-Forwarded-For": f"203.0.113.{n}"})).status_code
            for n in range(4)
        ]
    assert codes == [200, 200, 200, 200]


def test_api_key_that_no_header_can_carry_fails_at_start_up() -> None:
    """A key with characters outside latin-1 is a configuration error, without echoing the key."""
    with pytest.raises(ConfigurationError, match="rate_limit_api_keys") as info:
        DefaultIdentityResolver(api_keys={"clé-\u2603": "free"})
    assert "\u2603" not in str(info.value)
