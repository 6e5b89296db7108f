"""Who may share a cached upstream answer: the key of an entry, and which answers are stored.

An answer is stored only under a key that holds every request header it depends on: the
credential headers, always, and the headers the upstream's ``Vary`` names. A ``Vary`` naming a
header the key did not hold is learned for that URL, and that answer is not stored; later
requests for the URL are keyed by it too. An answer meant for one caller (``Cache-Control:
private``, ``no-store`` or ``no-cache``, ``Vary: *``, or one that sets a cookie) is never
stored. When in doubt, an answer is not shared (ADR 0057).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import TYPE_CHECKING, NamedTuple

from cachetools import LRUCache

from fastapi_resilience.correlation._ids import HEADER_NAME
from fastapi_resilience.exceptions import ConfigurationError

if TYPE_CHECKING:
    import httpx

__all__ = ["CREDENTIAL_HEADERS", "CacheKey", "SharingRules", "credential_headers"]

#: Request headers that make an answer someone's own: always part of the cache key.
CREDENTIAL_HEADERS = ("authorization", "cookie", "proxy-authorization", "x-api-key")

#: ``Cache-Control`` directives that keep an answer out of a cache shared by callers
#: (``no-cache`` too: an entry that must be revalidated before use cannot be, here).
_NOT_SHARED = frozenset({"private", "no-store", "no-cache"})
#: Learned for a URL whose answers vary on something no request header shows.
_ANYTHING = ("*",)
#: Hashed into every key: entries that another version keyed otherwise (by the URL alone, or by
#: fewer headers) are missed, never read, also in a Redis level shared during a rolling deploy.
_KEY_VERSION = "fastapi-resilience cache key 2"


class CacheKey(NamedTuple):
    """The entry's key, the URL it belongs to, and the request headers the key holds."""

    key: str
    resource: str
    headers: tuple[str, ...]


def credential_headers(extra: Iterable[str]) -> tuple[str, ...]:
    """The four :data:`CREDENTIAL_HEADERS` and ``extra``, lower-case, each once.

    Raises:
        ConfigurationError: ``extra`` is a string, or holds something that is not a header name.
    """
    if isinstance(extra, str | bytes):
        raise ConfigurationError(
            f"credential_headers must be a list of header names, got the string {extra!r}"
        )
    names = list(CREDENTIAL_HEADERS)
    for name in extra:
        if not isinstance(name, str) or not HEADER_NAME.fullmatch(name):
            raise ConfigurationError(f"credential_headers: {name!r} is not an HTTP header name")
        if name.lower() not in names:
            names.append(name.lower())
    return tuple(names)


def _tokens(values: Iterable[str]) -> set[str]:
    """The comma-separated tokens of a header's values, lower-case, arguments dropped."""
    tokens = set()
    for value in values:
        for part in value.split(","):
            token = part.split("=", 1)[0].strip().lower()
            if token:
                tokens.add(token)
    return tokens


def _digest(values: list[tuple[str, str | None]]) -> str:
    """The digest of a key's headers, names and values (``None``: absent), and the version."""
    return hashlib.blake2b(repr((_KEY_VERSION, values)).encode(), digest_size=16).hexdigest()


class SharingRules:
    """The cache key and the storing rule of one host's cached answers.

    A key is the method, the URL and a digest of the names and values of the headers it holds,
    present or not: clients keyed by other headers never share an entry.

    Remembers, per URL (method and URL), the ``Vary`` names learned beyond the credential
    headers; at most ``max_urls`` of them, the least recently used forgotten first (a
    forgotten URL learns its ``Vary`` again from its next answer, which is not stored).
    """

    __slots__ = ("_bare", "_varied", "credentials", "max_urls")

    def __init__(self, credentials: tuple[str, ...], *, max_urls: int) -> None:
        self.credentials = credentials
        self.max_urls = max_urls
        self._varied: LRUCache[str, tuple[str, ...]] = LRUCache(max_urls)
        # The digest of a request that carries none of the credential headers, worked out
        # once: the common case builds its key with no hashing.
        self._bare = _digest([(name, None) for name in credentials])

    def key(self, request: httpx.Request) -> CacheKey | None:
        """The key for ``request``'s answer; ``None`` when answers for its URL are never shared."""
        resource = f"{request.method} {request.url}"
        varied = self._varied.get(resource)
        if varied == _ANYTHING:
            return None
        names = self.credentials + (varied or ())
        values = [(name, request.headers.get(name)) for name in names]
        if varied or any(value is not None for _, value in values):
            return CacheKey(f"{resource} {_digest(values)}", resource, names)
        return CacheKey(f"{resource} {self._bare}", resource, names)

    def storable(self, key: CacheKey, response: httpx.Response) -> bool:
        """Whether ``response`` may be stored under ``key``; learns the URL's ``Vary``."""
        if not 200 <= response.status_code < 300:
            return False
        headers = response.headers
        if _tokens(headers.get_list("cache-control")) & _NOT_SHARED or "set-cookie" in headers:
            return False
        vary = _tokens(headers.get_list("vary"))
        if "*" in vary:
            self._varied[key.resource] = _ANYTHING
            return False
        missing = vary.difference(key.headers)
        if missing:
            known = self._varied.get(key.resource, ())
            self._varied[key.resource] = tuple(sorted(missing.union(known)))
            return False
        return True
