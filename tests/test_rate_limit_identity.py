"""Identity resolution: API keys, client address, X-Forwarded-For only from trusted proxies."""

from __future__ import annotations

import ipaddress
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from fastapi_resilience import ResilienceSettings, install
from fastapi_resilience.exceptions import ConfigurationError
from fastapi_resilience.ratelimit import DefaultIdentityResolver, Identity
from fastapi_resilience.testing import ManualClock

pytestmark = pytest.mark.anyio


def client_address(trusted_proxies: list[str] | None = None) -> Any:
    """The client-address part of the default resolver, as custom resolvers reach it."""
    return DefaultIdentityResolver(trusted_proxies=trusted_proxies or ()).client_address


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
    address = client_address(["10.0.0.0/8", "fd00::/8"])
    values = [forwarded] if isinstance(forwarded, str) else (forwarded or [])
    headers = [("X-Forwarded-For", v) for v in values]
    assert address(scope(peer, *headers)) == expected


def test_no_trusted_proxies_never_reads_the_header() -> None:
    """With no trusted proxies configured the peer address is the identity, whatever it sends."""
    address = client_address()
    assert address(scope("10.0.0.1", ("X-Forwarded-For", "1.2.3.4"))) == "10.0.0.1"
    assert address(scope(None)) == "unknown"


def test_bad_trusted_proxy_is_a_configuration_error() -> None:
    """A trusted proxy that is not an address or network fails at start-up, naming it."""
    with pytest.raises(ConfigurationError, match=r"'proxy\.local'"):
        client_address(["proxy.local"])


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


async def _codes(app: FastAPI, peer: str, forwarded: list[str | None]) -> list[int]:
    transport = httpx.ASGITransport(app=app, client=(peer, 999))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        return [
            (await c.get("/", headers={"X-Forwarded-For": hop} if hop else {})).status_code
            for hop in forwarded
        ]


def _two_a_minute_app(*trusted: str) -> FastAPI:
    app = FastAPI()
    settings = ResilienceSettings(
        rate_limit_tiers={"anonymous": "2/minute"}, trusted_proxies=list(trusted)
    )
    install(app, settings, clock=ManualClock())

    @app.get("/")
    async def root() -> dict[str, str]:
        return {"ok": "yes"}

    return app


@pytest.mark.parametrize(
    "spellings",
    [
        ["1.2.3.4", "1.2.3.4:5555", "::ffff:1.2.3.4", "[::ffff:1.2.3.4]:6666"],
        ["2001:db8::1", "[2001:db8::1]:443", "2001:DB8:0:0::1", "[2001:0db8::0001]"],
        # Not addresses: the client is the trusted proxy that handed them over.
        ["unknown", "_hidden", "1.2.3.4:http", "not an address"],
    ],
)
async def test_spellings_of_one_forwarded_client_share_its_budget(spellings: list[str]) -> None:
    """Behind a trusted proxy, every way of writing one client's address (with a port, IPv4
    mapped into IPv6, upper case, zeros written out) is one client; so is every hop that is
    not an address at all, under the proxy's address: 2/minute admits two of the four."""
    app = _two_a_minute_app("10.0.0.0/8")
    assert await _codes(app, "10.1.2.3", list(spellings)) == [200, 200, 429, 429]


@pytest.mark.parametrize(
    ("peer", "forwarded", "expected"),
    [
        # A trusted hop written with a port is still trusted, and skipped.
        ("10.0.0.1", "1.2.3.4, 10.0.0.2:8080", "ip:1.2.3.4"),
        # A trusted peer that the server reports IPv4-mapped.
        ("::ffff:10.0.0.1", "1.2.3.4", "ip:1.2.3.4"),
        # A hop that is not an address stops the walk at the trusted hop to its right.
        ("10.0.0.1", "1.2.3.4, garbage, 10.0.0.2", "ip:10.0.0.2"),
        ("10.0.0.1", "1.2.3.4, unknown", "ip:10.0.0.1"),
        ("10.0.0.1", "[2001:db8::1", "ip:10.0.0.1"),
        # Every hop trusted: the left-most one, normalised.
        ("10.0.0.1", "10.0.0.7:1, 10.0.0.2", "ip:10.0.0.7"),
        # No trusted proxy in the way: the peer, normalised; the header is not read.
        ("::FFFF:198.51.100.9", "1.2.3.4", "ip:198.51.100.9"),
    ],
)
def test_forwarded_hops_are_normalised_before_trust_and_identity(
    peer: str, forwarded: str, expected: str
) -> None:
    """Hops are normalised before the trusted-proxy test and before they name the client."""
    resolver = DefaultIdentityResolver(trusted_proxies=["10.0.0.0/8"])
    identity = resolver.resolve(scope(peer, ("X-Forwarded-For", forwarded)))
    assert identity == Identity(expected, "anonymous")


async def test_spellings_of_one_peer_share_its_budget() -> None:
    """With no proxy trusted, the server's client address is normalised too: a peer reported
    IPv4-mapped and plain (a dual-stack socket, then an IPv4 one) is one client."""
    app = _two_a_minute_app()
    assert await _codes(app, "::ffff:198.51.100.7", [None, None]) == [200, 200]
    assert await _codes(app, "198.51.100.7", [None]) == [429]
    assert await _codes(app, "2001:DB8::7", [None, None]) == [200, 200]
    assert await _codes(app, "2001:db8:0::7", [None]) == [429]
    assert await _codes(app, "testclient", [None, None, None]) == [200, 200, 429]


def test_a_busy_client_keeps_its_identity_among_thousands_of_new_ones() -> None:
    """The resolver reuses one identity per recent address: a client that calls every tenth
    request keeps its identity while 20,000 new clients pass (the cache was emptied each time
    it held 4,096 addresses, so every busy client was worked out again)."""
    resolver = DefaultIdentityResolver(trusted_proxies=["192.0.2.0/24"])
    busy = scope("192.0.2.1", ("X-Forwarded-For", "198.51.100.7"))
    first = resolver.resolve(busy)
    for n in range(20_000):
        resolver.resolve(scope("192.0.2.1", ("X-Forwarded-For", f"10.{n >> 8 & 255}.{n & 255}.1")))
        if n % 10 == 0:
            assert resolver.resolve(busy) is first, n


def test_each_forwarded_client_is_parsed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Behind a trusted proxy, 20,000 IPv6 clients and one busy one cost one address parse each
    (it was two: once to test the hop, once again to name the client)."""
    parsed: list[str] = []
    parse = ipaddress.ip_address

    def counted(text: str) -> Any:
        parsed.append(text)
        return parse(text)

    monkeypatch.setattr(ipaddress, "ip_address", counted)
    resolver = DefaultIdentityResolver(trusted_proxies=["192.0.2.0/24"])
    busy = scope("192.0.2.1", ("X-Forwarded-For", "2001:db8::7"))
    for n in range(20_000):
        resolver.resolve(scope("192.0.2.1", ("X-Forwarded-For", f"2001:db8:1::{n:x}")))
        if n % 10 == 0:
            assert resolver.resolve(busy) == Identity("ip:2001:db8::7", "anonymous")
    assert len(parsed) == 20_001
