"""Who is asking: the identity and tier a request is counted against.

Built in: a known API key (``X-API-Key``) counts against that key and its tier, whatever address
it comes from; anything else counts against the client address in the default tier. The address
is the peer's, unless the peer is a trusted proxy: then ``X-Forwarded-For`` is read right to left,
skipping trusted hops, and the first untrusted address is the client (ADR 0015). Every address is
normalised first, so one client written several ways is one identity (ADR 0060).
"""

from __future__ import annotations

import hashlib
import ipaddress
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from starlette.types import Scope

from fastapi_resilience.exceptions import ConfigurationError

__all__ = [
    "ClientAddress",
    "DefaultIdentityResolver",
    "Identity",
    "IdentityResolver",
]

_IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
#: Entries per generation of the per-process caches of parsed addresses and of identities: each
#: holds at most two generations, the current one and the one before it.
_CACHE_GENERATION = 4096


@dataclass(frozen=True, slots=True)
class Identity:
    """What a request is counted against.

    ``key`` is stable and safe to store (``"ip:203.0.113.7"``, ``"key:3f9a..."``: an API key is
    never stored or logged in clear); ``tier`` names one of the configured tiers.
    """

    key: str
    tier: str


@runtime_checkable
class IdentityResolver(Protocol):
    """``async def resolver(scope) -> Identity | None``; ``None`` means "do not limit this request".

    Replace the built-in resolver with one of these to take the identity from a JWT claim or a
    database lookup (keep your own cache: it runs on every limited request).
    """

    async def __call__(self, scope: Scope) -> Identity | None: ...


def _networks(entries: Iterable[str]) -> tuple[_IPNetwork, ...]:
    networks = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError:
            raise ConfigurationError(
                f"trusted_proxies: {entry!r} is not an IP address or network"
            ) from None
    return tuple(networks)


#: The address of a request whose server gave no client (a Unix socket, a test client).
UNKNOWN_PEER = "unknown"


def _parse_address(text: str) -> _IPAddress | None:
    """``text`` as an IP address, in the forms proxies and servers write one; else ``None``.

    Accepted: a port (``1.2.3.4:5555``, ``[2001:db8::1]:443``), brackets, any case and any
    zero compression of IPv6. An IPv4 address mapped into IPv6 (``::ffff:1.2.3.4``, what a
    dual-stack socket reports) is the IPv4 address.
    """
    host = text.strip()
    if host[:1] == "[":
        host, bracket, port = host[1:].partition("]")
        if not bracket or (port and not (port[0] == ":" and _is_port(port[1:]))):
            return None
    elif host.count(":") == 1:
        host, _, port = host.partition(":")
        if not _is_port(port):
            return None
        packed = _plain_ipv4(host)
        if packed is not None:
            return ipaddress.IPv4Address(packed)
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _is_port(text: str) -> bool:
    return text.isascii() and text.isdigit()


def _plain_ipv4(text: str) -> bytes | None:
    """The four bytes of ``text`` when it is an IPv4 address written the one way it is
    normalised to (dotted decimal, no leading zeros, nothing around it), else ``None``. The
    form servers and most proxies write, checked in C: ``ipaddress`` costs several times more."""
    try:
        return socket.inet_pton(socket.AF_INET, text)
    except (OSError, ValueError):
        return None


def normalize_address(text: str) -> str | None:
    """The one spelling of the IP address ``text`` names (IPv6 compressed, in lower case), or
    ``None`` when ``text`` is not an address (see ``_parse_address`` for the forms taken)."""
    if _plain_ipv4(text) is not None:
        return text
    address = _parse_address(text)
    return None if address is None else str(address)


class ClientAddress:
    """The client's address: the peer, or from ``X-Forwarded-For`` behind trusted proxies.

    Every address is normalised (a port dropped, IPv4 mapped into IPv6 made IPv4, IPv6
    compressed in lower case) before it is tested against the trusted proxies and before it
    names the client. A hop that is not an address stops the walk: the client is then the
    trusted hop that handed it over (ADR 0060).

    Args:
        trusted_proxies: addresses or networks (``"10.0.0.0/8"``) whose ``X-Forwarded-For`` is
            believed. Empty (the default): the header is never read.
    """

    __slots__ = ("_cache", "_networks", "_old")

    def __init__(self, trusted_proxies: Iterable[str] = ()) -> None:
        self._networks = _networks(trusted_proxies)
        #: Written address -> (its normal spelling or ``None``, whether it is trusted): this
        #: generation's, and the one before it (see ``_CACHE_GENERATION``).
        self._cache: dict[str, tuple[str | None, bool]] = {}
        self._old: dict[str, tuple[str | None, bool]] = {}

    @property
    def trusts_proxies(self) -> bool:
        """Whether any address or network is trusted (else the peer is always the client)."""
        return bool(self._networks)

    def is_trusted(self, host: str) -> bool:
        """Whether ``host`` (in any spelling) is one of the trusted proxies."""
        return self._hop(host)[1]

    def _hop(self, host: str) -> tuple[str | None, bool]:
        """``host`` normalised (``None``: not an address) and whether it is trusted; cached,
        since peers and proxies repeat."""
        known = self._cache.get(host)
        if known is None:
            known = self._old.get(host)
            if known is None:
                known = self._parse(host)
            if len(self._cache) >= _CACHE_GENERATION:
                # Bounded: a flood of distinct spoofed hops cannot grow it without limit, and
                # what was used in the last generation (a proxy, a busy client) stays.
                self._old, self._cache = self._cache, {}
            self._cache[host] = known
        return known

    def _parse(self, host: str) -> tuple[str | None, bool]:
        packed = _plain_ipv4(host)
        address: _IPAddress | None
        if packed is not None:
            address, spelled = ipaddress.IPv4Address(packed), host
        else:
            address = _parse_address(host)
            if address is None:
                return None, False
            spelled = str(address)
        return spelled, any(address in network for network in self._networks)

    def __call__(self, scope: Scope) -> str:
        client = scope.get("client")
        peer: str = client[0] if client else UNKNOWN_PEER
        nearest, trusted = self._hop(peer)
        if not trusted or nearest is None:
            # The server's own word for the peer stays as it is when it is not an address.
            return nearest or peer
        forwarded = _header_values(scope, b"x-forwarded-for")
        if not forwarded:
            return nearest
        hops = [hop for hop in ",".join(forwarded).split(",") if hop.strip()]
        for hop in reversed(hops):
            address, trusted = self._hop(hop)
            if address is None:
                # Not an address: it names no one, and what is left of it was written by
                # no proxy we trust. The client is the trusted hop that handed it over.
                return nearest
            if not trusted:
                return address
            nearest = address
        # Every hop is a trusted proxy: the left-most one is as close to a client as there is.
        return nearest


def _header_values(scope: Scope, name: bytes) -> list[str]:
    return [value.decode("latin-1") for key, value in scope["headers"] if key == name]


def _header_bytes(api_key: str) -> bytes:
    try:
        return api_key.encode("latin-1")
    except UnicodeEncodeError:
        # Such a key could never arrive in an HTTP header: say so at start-up.
        raise ConfigurationError(
            "rate_limit_api_keys: an API key has characters an HTTP header cannot carry"
        ) from None


def _key_id(api_key: str) -> str:
    # 64 bits of SHA-256: unique among any realistic number of keys, and the key itself never
    # reaches the storage, the logs or the events.
    return "key:" + hashlib.sha256(api_key.encode("utf-8")).hexdigest()[:16]


class DefaultIdentityResolver:
    """API key header -> that key's identity and tier; otherwise the client address.

    An unknown key is treated as no key: the request is counted by address in the default tier.
    Everything is worked out in ``__init__``; a request costs one header scan and a dict lookup.

    Args:
        api_keys: API key -> tier.
        default_tier: the tier of requests without a known key.
        api_key_header: the header carrying the key.
        trusted_proxies: see :class:`ClientAddress`.
    """

    __slots__ = (
        "_address",
        "_by_key",
        "_default_tier",
        "_header",
        "_ip_cache",
        "_ip_old",
        "_proxied",
    )

    def __init__(
        self,
        *,
        api_keys: Mapping[str, str] | None = None,
        default_tier: str = "anonymous",
        api_key_header: str = "X-API-Key",
        trusted_proxies: Iterable[str] = (),
    ) -> None:
        self._header = api_key_header.lower().encode("latin-1")
        self._by_key = {
            _header_bytes(key): Identity(_key_id(key), tier)
            for key, tier in (api_keys or {}).items()
        }
        self._default_tier = default_tier
        self._address = ClientAddress(trusted_proxies)
        #: Whether any proxy is trusted; if not, the address is the peer's.
        self._proxied = self._address.trusts_proxies
        #: Address as written -> its identity: this generation's, and the one before it.
        self._ip_cache: dict[str, Identity] = {}
        self._ip_old: dict[str, Identity] = {}

    async def __call__(self, scope: Scope) -> Identity:
        return self.resolve(scope)

    def resolve(self, scope: Scope) -> Identity:
        """``__call__`` without the coroutine: the middleware calls it directly (it never waits)."""
        if self._by_key:
            header = self._header
            for name, value in scope["headers"]:
                if name == header:
                    known = self._by_key.get(value)
                    if known is not None:
                        return known
                    break
        if self._proxied:
            # ``ClientAddress`` gives the address normalised already: not parsed again.
            address = self._address(scope)
            return self._ip_cache.get(address) or self._identity(address, normalised=True)
        # ``ClientAddress`` without proxies, inlined (the default; every request): the peer.
        client = scope.get("client")
        address = client[0] if client else UNKNOWN_PEER
        # ``for_address``'s cache hit, inlined: this runs on every limited request.
        return self._ip_cache.get(address) or self._identity(address, normalised=False)

    def for_address(self, address: str) -> Identity:
        """The default-tier identity of ``address``, normalised (``1.2.3.4:5555`` and
        ``::ffff:1.2.3.4`` are ``ip:1.2.3.4``); reused, one object per recent address."""
        return self._ip_cache.get(address) or self._identity(address, normalised=False)

    def _identity(self, address: str, *, normalised: bool) -> Identity:
        """The identity of ``address`` on a miss of this generation's cache: the previous
        generation's, else a new one. Normalised here, once per written form, so the hit in
        ``resolve`` stays as cheap as it was; what is not an address (a server's
        "testclient") stays as it is."""
        identity = self._ip_old.get(address)
        if identity is None:
            spelled = address if normalised else normalize_address(address) or address
            identity = Identity(f"ip:{spelled}", self._default_tier)
        if len(self._ip_cache) >= _CACHE_GENERATION:
            # Bounded, and a client seen in the last generation keeps its identity.
            self._ip_old, self._ip_cache = self._ip_cache, {}
        self._ip_cache[address] = identity
        return identity

    def tier_of(self, key: str) -> str | None:
        """The tier of the configured API key whose identity key is ``key``
        (``"key:<16 hex digits>"``); ``None`` when no configured key has it. A scan of the
        keys: for the admin API, never a request."""
        return next((found.tier for found in self._by_key.values() if found.key == key), None)

    @property
    def client_address(self) -> ClientAddress:
        """The address part, for custom resolvers that fall back to it."""
        return self._address
