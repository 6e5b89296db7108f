"""Libraries the package uses only in some apps: their exceptions, looked up when one is
caught, a Redis client imported when one is built, and OpenTelemetry's current span.

Importing httpx (with its command-line extras) or redis costs every app tens of milliseconds,
even one that never makes an outbound call or uses Redis. Code that only needs to recognise
their exceptions asks here: an exception of a library that was never imported cannot exist.
"""

from __future__ import annotations

import importlib.util
import sys
from typing import TYPE_CHECKING, Any

from fastapi_resilience._text import without_password
from fastapi_resilience.exceptions import ConfigurationError

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.cluster import RedisCluster

#: The URL schemes of a Redis Cluster: plain TCP and TLS (``adr/0073``).
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
#: Where a cluster URL's nodes are listed.
CLUSTER_URL_FORM = "redis+cluster://[user:password@]host:port[,host:port...]"


class _NeverRaised(Exception):
    """Stands for a class of a library that is not imported: nothing raises it, nothing is an
    instance of it."""


def exception_of(module: str, name: str) -> type[BaseException]:
    """``module.name`` if ``module`` is imported, else a class that nothing raises."""
    return _class_of(module, name)


def _class_of(module: str, name: str) -> type[Any]:
    """``module.name`` if ``module`` is imported and it is a class, else a class nothing is
    an instance of."""
    loaded = sys.modules.get(module)
    found = getattr(loaded, name, None) if loaded is not None else None
    return found if isinstance(found, type) else _NeverRaised


def current_span() -> Any | None:
    """The current OpenTelemetry span; ``None`` while ``opentelemetry.trace`` is not imported.

    Nothing is imported here: an app that traces has imported the module (its instrumentation
    did), and one that does not has no span to find, so it pays one dictionary look-up.
    """
    trace = sys.modules.get("opentelemetry.trace")
    return None if trace is None else trace.get_current_span()


def tracing_installed() -> bool:
    """Whether the OpenTelemetry API is installed (found, not imported)."""
    try:
        return importlib.util.find_spec("opentelemetry.trace") is not None
    except (ImportError, ValueError):
        # ``opentelemetry`` itself missing, or blocked with ``sys.modules[...] = None``.
        return False


class ClusterURL:
    """A ``redis+cluster://`` URL taken apart: its seed nodes, and the single-node URL of the
    first one, which carries the credentials, TLS and query options to every node."""

    __slots__ = ("first_url", "nodes")

    def __init__(self, first_url: str, nodes: list[tuple[str, int]]) -> None:
        self.first_url = first_url
        self.nodes = nodes


def is_cluster_url(url: str) -> bool:
    """Whether ``url`` names a Redis Cluster (``redis+cluster://`` or ``rediss+cluster://``)."""
    scheme, sep, _ = url.partition("://")
    return bool(sep) and scheme.lower() in CLUSTER_SCHEMES


def parse_cluster_url(url: str) -> ClusterURL:
    """Take a cluster URL apart, without importing redis (settings validate with it).

    Raises:
        ValueError: not a cluster URL, no node, a node without a host or with a bad port, or
            a database other than 0 (a cluster has one). The message never repeats the
            credentials.
    """
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in CLUSTER_SCHEMES:
        raise ValueError(f"expected {CLUSTER_URL_FORM}")
    rest, _, query = rest.partition("?")
    netloc, slash, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    if "@" in path or ("@" in query and not at) or "#" in userinfo:
        # A '/', '?' or '#' in the password cut the URL there: what follows it is no path,
        # query or node to quote back, since it holds the rest of the password.
        raise ValueError(
            "its user or password holds '/', '?' or '#': percent-encode them (%2F, %3F, %23)"
        )
    if slash and path not in ("", "0"):
        raise ValueError(f"a Redis Cluster has only database 0, not {path!r}")
    nodes = [_cluster_node(entry) for entry in hosts.split(",")]
    first_host, first_port = nodes[0]
    host = f"[{first_host}]" if ":" in first_host else first_host
    first = f"{scheme.partition('+')[0]}://{userinfo}{at}{host}:{first_port}/0"
    return ClusterURL(first + (f"?{query}" if query else ""), nodes)


def _cluster_node(entry: str) -> tuple[str, int]:
    """``host:port`` (``[v6 address]:port``) of one seed node; the port is required, since
    cluster nodes seldom listen on the default one."""
    host, colon, port = entry.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not colon or not host or any(c in host for c in "[]/\\ \t"):
        raise ValueError(f"node {entry!r} is not host:port; expected {CLUSTER_URL_FORM}")
    if not port.isascii() or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"node {entry!r} has no valid port (1-65535)")
    return host, int(port)


def hash_tag(key: str) -> str | None:
    """The part of ``key`` Redis Cluster hashes when it has one: the text between the first
    ``{`` and the next ``}``, if not empty; ``None`` when the whole key is hashed."""
    start = key.find("{")
    if start < 0:
        return None
    end = key.find("}", start + 1)
    return key[start + 1 : end] if end > start + 1 else None


def same_slot_key(key: str, suffix: str) -> str:
    """A key named after ``key`` plus ``suffix`` that lies in ``key``'s cluster hash slot:
    ``key + suffix`` when ``key`` has a hash tag, else ``{key}`` plus ``suffix`` (the tag
    ``{key}`` hashes exactly as the plain ``key`` does).

    Raises:
        ValueError: ``key`` holds braces but no hash tag, so no other key shares its slot
            for certain.
    """
    if hash_tag(key) is not None:
        return key + suffix
    if "{" in key or "}" in key:
        raise ValueError(f"{key!r} holds braces but no hash tag such as '{{name}}'")
    return f"{{{key}}}{suffix}"


def is_cluster_client(client: object) -> bool:
    """Whether ``client`` is a ``redis.asyncio.cluster.RedisCluster`` (nothing is imported:
    a cluster client exists only once its module was)."""
    return isinstance(client, _class_of("redis.asyncio.cluster", "RedisCluster"))


def redis_from_url(url: str, setting: str, **options: Any) -> Redis | RedisCluster:
    """A Redis client for ``url``; ``setting`` names where the URL came from in the errors.

    ``redis://``, ``rediss://`` and ``unix://`` give a ``redis.asyncio.Redis``;
    ``redis+cluster://`` and ``rediss+cluster://`` a ``redis.asyncio.cluster.RedisCluster``
    seeded with every node listed. ``options`` go to the client. Nothing connects yet.

    Raises:
        ConfigurationError: the ``redis`` extra is not installed, or ``url`` is not a Redis URL.
    """
    try:
        from redis.asyncio import Redis
        from redis.exceptions import RedisClusterException, RedisError
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ConfigurationError(
            f"{setting} needs the redis extra: pip install 'fastapi-resilience[redis]'"
        ) from exc
    if not is_cluster_url(url):
        try:
            return Redis.from_url(url, **options)
        except ValueError as exc:
            # redis-py's reason may quote a piece of the password ("could not be cast to
            # integer value as 'pa'"): with a password in the URL, only the redacted URL is said.
            shown = without_password(url)
            reason = exc if shown == url else shown
            raise ConfigurationError(f"{setting} is not a valid Redis URL: {reason}") from None
    from redis.asyncio.cluster import ClusterNode, RedisCluster

    try:
        parsed = parse_cluster_url(url)
        seeds = [ClusterNode(host, port) for host, port in parsed.nodes[1:]]
        return RedisCluster.from_url(parsed.first_url, startup_nodes=seeds, **options)
    except (ValueError, TypeError, RedisError, RedisClusterException) as exc:
        # RedisClusterException: an option the cluster client refuses (``?db=3``).
        raise ConfigurationError(f"{setting} is not a valid Redis Cluster URL: {exc}") from exc
