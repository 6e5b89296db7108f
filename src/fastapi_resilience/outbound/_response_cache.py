"""Outbound response cache: a bounded in-process L1, an optional Redis L2, and stale-if-error.

An entry is *fresh* for ``ttl`` seconds, then *stale* for ``stale_ttl`` more seconds, then gone.
A fresh entry answers without a call. A stale entry is only served when the call that should
replace it fails (breaker open, retries spent, upstream down): the answer is then marked stale
with an RFC 9211 ``Cache-Status`` header (``ttl`` negative) so callers can tell.

Redis is a second level shared by every instance; when it is down the cache keeps answering
from L1, publishes ``cache.storage_down`` once and stops asking Redis for a while.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import logging
import re
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import timedelta
from hashlib import blake2b as _blake2b
from typing import TYPE_CHECKING, Any, Generic, Literal, ParamSpec, Protocol, TypeVar

from cachetools import TLRUCache
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fastapi_resilience._optional import exception_of, redis_from_url
from fastapi_resilience._tally import RESPONSE_CACHE
from fastapi_resilience.clock import SYSTEM_CLOCK, Clock
from fastapi_resilience.events import FALLBACK_EVENTS, EventBus
from fastapi_resilience.exceptions import (
    AppError,
    BulkheadFullError,
    CircuitOpenError,
    ClientError,
    ConfigurationError,
    ThrottledError,
)
from fastapi_resilience.health._checks import CheckResult
from fastapi_resilience.outbound._deadline import not_the_upstreams_failure

if TYPE_CHECKING:
    import httpx
    from redis.asyncio import Redis
    from redis.asyncio.cluster import RedisCluster

__all__ = [
    "CACHE_STALE_SERVED",
    "CACHE_STATUS_HEADER",
    "CacheEntry",
    "CacheResult",
    "CacheStatusMiddleware",
    "JsonSerializer",
    "ResponseCache",
    "Serializer",
    "cached",
    "cached_call",
    "current_cache_status",
    "record_cache_status",
    "restore_response",
    "should_serve_stale",
    "snapshot_response",
]

T = TypeVar("T")
P = ParamSpec("P")

#: RFC 9211 response header that says how the cache handled the answer.
CACHE_STATUS_HEADER = "Cache-Status"
#: The cache's name in ``Cache-Status`` unless told otherwise.
DEFAULT_CACHE_NAME = "fastapi-resilience"
#: Published (DEBUG) each time a stale entry answers for a call that failed.
CACHE_STALE_SERVED = "cache.stale_served"
#: Scope key where :class:`CacheStatusMiddleware` leaves the request's cache status.
SCOPE_KEY = "fastapi_resilience.cache_status"

CacheStatus = Literal["hit", "miss", "refresh", "stale"]
_MAX_LOCAL_KEY = 256
_SF_TOKEN = re.compile(r"[A-Za-z*][A-Za-z0-9!#$%&'*+.^_`|~:/-]*")
# Worse statuses win when one request makes several cached calls.
#: Each status as the metrics count it: a refresh is a miss that found an expired entry.
_COUNTED_AS: dict[str, str] = {"hit": "hit", "miss": "miss", "refresh": "miss", "stale": "stale"}
_SEVERITY = {"hit": 0, "miss": 1, "refresh": 1, "stale": 2}


def _seconds(value: float | timedelta, name: str, *, positive: bool) -> float:
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if seconds != seconds or seconds < 0 or (positive and seconds == 0):
        bound = "> 0" if positive else ">= 0"
        raise ConfigurationError(f"{name} must be {bound} seconds, got {value!r}")
    return seconds


class Serializer(Protocol):
    """Turns cached values into bytes for Redis and back (L1 keeps the objects themselves)."""

    def dumps(self, value: Any) -> bytes: ...

    def loads(self, data: bytes) -> Any: ...


class JsonSerializer:
    """JSON, with ``bytes`` kept as tagged base64 so snapshotted HTTP bodies survive.

    JSON rather than pickle: a value read back from a shared Redis must never run code.
    """

    _TAG = "__bytes__"

    def dumps(self, value: Any) -> bytes:
        return json.dumps(value, default=self._default, separators=(",", ":")).encode()

    def loads(self, data: bytes) -> Any:
        return json.loads(data, object_hook=self._hook)

    def _default(self, obj: object) -> Any:
        if isinstance(obj, bytes | bytearray):
            return {self._TAG: base64.b64encode(obj).decode("ascii")}
        raise TypeError(f"{type(obj).__name__} is not JSON serializable; pass a serializer=")

    def _hook(self, obj: dict[str, Any]) -> Any:
        if len(obj) == 1 and self._TAG in obj:
            return base64.b64decode(obj[self._TAG])
        return obj


@dataclass(frozen=True, slots=True)
class CacheEntry(Generic[T]):
    """A cached value as read: when it was stored (wall seconds), its TTLs and its age now."""

    value: T
    stored_at: float
    ttl: float
    stale_ttl: float
    age: float

    @property
    def fresh(self) -> bool:
        return self.age < self.ttl

    @property
    def stale(self) -> bool:
        return not self.fresh

    @property
    def ttl_left(self) -> float:
        """Seconds of freshness left; negative once stale (as RFC 9211 ``ttl``)."""
        return self.ttl - self.age


@dataclass(slots=True)
class CacheResult(Generic[T]):
    """What a cached call returned and how: ``hit``, ``miss``, ``refresh`` or ``stale``.

    ``stale`` means the call failed and an expired entry was served; ``error`` is that failure.
    """

    value: T
    status: CacheStatus
    age: float = 0.0
    ttl_left: float | None = None
    error: BaseException | None = None
    cache_name: str = DEFAULT_CACHE_NAME

    @property
    def stale(self) -> bool:
        return self.status == "stale"

    def cache_status(self) -> str:
        """The RFC 9211 ``Cache-Status`` member for this result."""
        return _cache_status_value(self)

    @property
    def headers(self) -> dict[str, str]:
        """``{"Cache-Status": ...}`` for a route that sets its response headers itself."""
        return {CACHE_STATUS_HEADER: self.cache_status()}


def _forwarded(error: BaseException) -> bool:
    # An open breaker, a full bulkhead, a throttle or a quota gate refuses locally: the request
    # never left this process.
    return not isinstance(error, CircuitOpenError | BulkheadFullError | ThrottledError)


def _upstream_status(error: BaseException) -> int | None:
    # The error itself, else its cause: RetryExhaustedError chains the last upstream answer.
    for candidate in (error, error.__cause__):
        status = getattr(candidate, "upstream_status", None)
        if status is None:
            status = getattr(getattr(candidate, "response", None), "status_code", None)
        if isinstance(status, int):
            return status
    return None


def _error_token(error: BaseException) -> str:
    if isinstance(error, AppError):
        return error.code
    return type(error).__name__


def _cache_status_value(result: CacheResult[Any]) -> str:
    name = result.cache_name
    if result.status == "hit":
        return f"{name}; hit; ttl={_ttl(result.ttl_left)}"
    if result.status == "miss":
        return f"{name}; fwd=miss; stored"
    if result.status == "refresh":
        return f"{name}; fwd=stale; stored"
    parts = [name]
    error = result.error
    if error is not None and _forwarded(error):
        parts.append("fwd=stale")
        status = _upstream_status(error)
        if status is not None:
            parts.append(f"fwd-status={status}")
    else:
        parts.append("hit")
    parts.append(f"ttl={_ttl(result.ttl_left)}")
    if error is not None:
        parts.append(f"detail={_error_token(error)}")
    return "; ".join(parts)


def _ttl(value: float | None) -> int:
    # RFC 9211 ttl is an integer; round towards "more stale" so a stale answer is never ttl=0.
    if value is None:
        return 0
    return int(value) if value >= 0 else -max(1, int(-value + 0.999))


def should_serve_stale(error: BaseException) -> bool:
    """Default rule: serve stale on any failure except a ``ClientError`` (the request is wrong).

    ``CircuitOpenError``, ``RetryExhaustedError``, ``UpstreamError``, ``BulkheadFullError``,
    httpx transport errors and timeouts all qualify.
    """
    return isinstance(error, Exception) and not isinstance(error, ClientError)


# --- request-level marker ---------------------------------------------------------------------


class _StatusHolder:
    """Mutable per-request slot; shared by reference so thread-pool routes can write it too."""

    __slots__ = ("result",)

    def __init__(self) -> None:
        self.result: CacheResult[Any] | None = None

    def record(self, result: CacheResult[Any]) -> None:
        current = self.result
        if current is None or _SEVERITY[result.status] >= _SEVERITY[current.status]:
            self.result = result


_request_status: ContextVar[_StatusHolder | None] = ContextVar(
    "fastapi_resilience_cache_status", default=None
)


def record_cache_status(result: CacheResult[Any]) -> None:
    """Tell :class:`CacheStatusMiddleware` how this request's data was obtained.

    The cached helpers call it for you; call it yourself for a value you cached by hand.
    Outside a request served through the middleware it does nothing. When several calls
    are recorded, the worst wins (stale over miss over hit).
    """
    holder = _request_status.get()
    if holder is not None:
        holder.record(result)


def current_cache_status() -> CacheResult[Any] | None:
    """The worst cache result recorded so far in this request (``None`` if none)."""
    holder = _request_status.get()
    return None if holder is None else holder.result


class CacheStatusMiddleware:
    """Adds ``Cache-Status`` to answers whose data came from a :class:`ResponseCache`.

    Pure ASGI; put it anywhere outside the routes. A route that served stale data
    (``stale-if-error``) gets ``Cache-Status: <name>; fwd=stale; ttl=-N; detail=<error code>``,
    so a client knows the answer is stale exactly when ``ttl`` is negative. A header the
    route set itself is left alone.
    """

    def __init__(self, app: ASGIApp, *, header_name: str = CACHE_STATUS_HEADER) -> None:
        self.app = app
        self.header_name = header_name

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        holder = _StatusHolder()
        scope[SCOPE_KEY] = holder
        token = _request_status.set(holder)

        async def send_with_status(message: Message) -> None:
            if message["type"] == "http.response.start" and holder.result is not None:
                headers = MutableHeaders(scope=message)
                if self.header_name not in headers:
                    headers.append(self.header_name, holder.result.cache_status())
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            _request_status.reset(token)


# --- the cache --------------------------------------------------------------------------------


@dataclass(slots=True)
class _Slot:
    value: Any
    stored_at: float  # wall seconds, comparable across instances
    stored_mono: float  # monotonic seconds, for ages in this process
    ttl: float
    stale_ttl: float


def _slot_expiry(_key: str, slot: _Slot, _now: float) -> float:
    """When an L1 entry leaves: at the end of its stale window (monotonic seconds)."""
    return slot.stored_mono + slot.ttl + slot.stale_ttl


class ResponseCache:
    """A TTL cache for outbound answers with stale-if-error; L1 in memory, optional Redis L2.

    Args:
        ttl: seconds an entry is fresh (a ``timedelta`` is accepted).
        stale_ttl: seconds an entry stays available as stale after ``ttl``, for
            stale-if-error; ``0`` turns stale serving off.
        max_entries: L1 bound; to make room, entries past their stale window go first, then
            the least recently used.
        redis_url: optional ``redis://`` URL of the L2, or ``redis+cluster://host:port,...`` for a
            Redis Cluster (or pass ``redis=`` a client). Each L2 call touches one key.
        prefix: Redis key prefix; keys are hashed, so any string is a valid key.
        name: the cache's name in events and in ``Cache-Status``.
        l2_timeout: the longest a Redis call may hold a request (seconds).
        l2_retry_interval: after Redis fails, how long to answer from L1 alone.
        coalesce: concurrent misses for one key share a single call. When that call ends for
            its own caller's reasons (cancelled, or cut by that caller's deadline), the others
            are not handed its error: they make one call of their own, shared again.

    Raises:
        ConfigurationError: an argument is out of range; the message names it.

    .. versionadded:: 0.1.0
    """

    def __init__(
        self,
        *,
        ttl: float | timedelta,
        stale_ttl: float | timedelta = 0.0,
        max_entries: int = 1024,
        redis_url: str | None = None,
        redis: Redis | RedisCluster | None = None,
        prefix: str = "rc:",
        name: str = DEFAULT_CACHE_NAME,
        clock: Clock = SYSTEM_CLOCK,
        serializer: Serializer | None = None,
        events: EventBus | None = None,
        l2_timeout: float = 0.25,
        l2_retry_interval: float = 5.0,
        coalesce: bool = True,
    ) -> None:
        self.ttl = _seconds(ttl, "ttl", positive=True)
        self.stale_ttl = _seconds(stale_ttl, "stale_ttl", positive=False)
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise ConfigurationError(f"max_entries must be an int >= 1, got {max_entries!r}")
        self.l2_timeout = _seconds(l2_timeout, "l2_timeout", positive=True)
        self.l2_retry_interval = _seconds(l2_retry_interval, "l2_retry_interval", positive=False)
        if redis_url is not None and redis is not None:
            raise ConfigurationError("pass redis_url or redis, not both")
        if not _SF_TOKEN.fullmatch(name):
            # The name leads every Cache-Status member, where it must be a structured-field token.
            raise ConfigurationError(f"name must be a token such as 'inventory', got {name!r}")
        self.max_entries = max_entries
        self.prefix = prefix
        self.name = name
        self.coalesce = coalesce
        self._clock = clock
        self._serializer: Serializer = serializer or JsonSerializer()
        #: Where ``cache.storage_down`` / ``cache.storage_recovered`` and ``cache.stale_served``
        #: go; by default the shared bus that logs them (and traces them, once ``install()``
        #: subscribed it). Rebind to the app's bus.
        self.events = events if events is not None else FALLBACK_EVENTS
        # An entry leaves at the end of its stale window; a full level drops such entries
        # before it drops the least recently used live one.
        self._l1: TLRUCache[str, _Slot] = TLRUCache(
            max_entries, _slot_expiry, timer=clock.monotonic
        )
        self._inflight: dict[str, asyncio.Future[Any]] = {}
        self._redis: Redis | RedisCluster | None = redis
        if redis is None and redis_url is not None:
            self._redis = redis_from_url(redis_url, "redis_url")
        self._owns_redis = redis is None
        self._l2_down_until: float | None = None

    def __repr__(self) -> str:
        l2 = "redis" if self._redis is not None else "none"
        return (
            f"ResponseCache(name={self.name!r}, ttl={self.ttl}, "
            f"stale_ttl={self.stale_ttl}, l2={l2})"
        )

    def __len__(self) -> int:
        """The entries L1 holds now, fresh or stale."""
        return len(self._l1)

    @property
    def l2_available(self) -> bool:
        """False while Redis is configured but treated as down."""
        return self._redis is not None and self._l2_down_until is None

    def _local_key(self, key: str) -> str:
        # L1 keeps short keys as they are (hashing costs more than the lookup) and hashes
        # long ones, so no entry holds more than _MAX_LOCAL_KEY characters of key.
        return key if len(key) <= _MAX_LOCAL_KEY else self.key_for(key)

    async def health_check(self) -> CheckResult:
        """A readiness check: ``"degraded"`` while the Redis level is treated as down.

        ``resilience.health.add("cache", cache.health_check, critical=False)``.
        """
        if self._redis is not None and self._l2_down_until is not None:
            return CheckResult("degraded", f"cache {self.name!r}: Redis unreachable, L1 only")
        return CheckResult("ok")

    def key_for(self, key: str) -> str:
        """The bounded storage key: prefix plus a 128-bit BLAKE2 digest of ``key``."""
        return self.prefix + _blake2b(key.encode(), digest_size=16).hexdigest()

    # -- reads and writes ----------------------------------------------------------------------

    async def get(self, key: str) -> CacheEntry[Any] | None:
        """The entry for ``key``, fresh or stale, or ``None`` when absent or fully expired."""
        local_key = self._local_key(key)
        slot = self._l1_get(local_key)
        if slot is not None and self._age(slot) < slot.ttl:
            return self._entry(slot)
        if self._redis is not None:
            remote = await self._l2_get(self.key_for(key))
            if remote is not None and (slot is None or remote.stored_at > slot.stored_at):
                self._l1_put(local_key, remote)
                slot = remote
        return None if slot is None else self._entry(slot)

    async def set(
        self,
        key: str,
        value: Any,
        *,
        ttl: float | timedelta | None = None,
        stale_ttl: float | timedelta | None = None,
    ) -> None:
        """Store ``value``; the TTLs default to the cache's own. A Redis failure is not raised."""
        slot = _Slot(
            value,
            self._clock.time(),
            self._clock.monotonic(),
            self.ttl if ttl is None else _seconds(ttl, "ttl", positive=True),
            self.stale_ttl
            if stale_ttl is None
            else _seconds(stale_ttl, "stale_ttl", positive=False),
        )
        self._l1_put(self._local_key(key), slot)
        if self._redis is not None:
            await self._l2_set(self.key_for(key), slot)

    async def delete(self, key: str) -> None:
        """Forget ``key`` in both levels."""
        self._l1.pop(self._local_key(key), None)
        if self._redis is not None and self._l2_usable():
            await self._l2_op(self._redis.delete(self.key_for(key)))

    def clear_local(self) -> None:
        """Empty L1 (Redis is left alone: other instances share it)."""
        self._l1.clear()

    async def aclose(self) -> None:
        """Close the Redis client this cache created."""
        if self._redis is not None and self._owns_redis:
            await self._redis.aclose()

    # -- the cached call -----------------------------------------------------------------------

    async def call(
        self,
        key: str,
        fn: Callable[..., Awaitable[T]],
        *args: Any,
        stale_if_error: bool = True,
        serve_stale_on: Callable[[BaseException], bool] = should_serve_stale,
        ttl: float | timedelta | None = None,
        **kwargs: Any,
    ) -> CacheResult[T]:
        """A fresh cached value, or ``await fn(*args, **kwargs)`` stored; stale if that fails.

        On a failure that ``serve_stale_on`` accepts and with a stale entry still within
        ``stale_ttl``, the stale value is returned with ``status="stale"`` and the error;
        otherwise the error propagates. The result is recorded for
        :class:`CacheStatusMiddleware`.
        """
        # Fast path, inlined because a hit is the common case.
        slot = self._l1_get(key if len(key) <= _MAX_LOCAL_KEY else self.key_for(key))
        if slot is not None:
            age = self._clock.monotonic() - slot.stored_mono
            if 0.0 <= age < slot.ttl:
                result: CacheResult[T] = CacheResult(
                    slot.value, "hit", age, slot.ttl - age, None, self.name
                )
                RESPONSE_CACHE.add((self.name, "hit"))
                holder = _request_status.get()
                if holder is not None:
                    holder.record(result)
                return result
        entry = await self.get(key)
        if entry is not None and entry.fresh:
            result = CacheResult(
                entry.value, "hit", entry.age, entry.ttl_left, cache_name=self.name
            )
        else:
            try:
                value, leader = await self._load(key, fn, args, kwargs)
            except Exception as exc:
                if not (stale_if_error and entry is not None and serve_stale_on(exc)):
                    raise
                self.events.emit(
                    CACHE_STALE_SERVED,
                    self.name,
                    level=logging.DEBUG,
                    age=round(entry.age, 3),
                    error=_error_token(exc),
                )
                result = CacheResult(
                    entry.value, "stale", entry.age, entry.ttl_left, exc, cache_name=self.name
                )
            else:
                if leader:
                    await self.set(key, value, ttl=ttl)
                status: CacheStatus = "miss" if entry is None else "refresh"
                result = CacheResult(value, status, cache_name=self.name)
        RESPONSE_CACHE.add((self.name, _COUNTED_AS[result.status]))
        record_cache_status(result)
        return result

    async def _load(
        self,
        key: str,
        fn: Callable[..., Awaitable[T]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> tuple[T, bool]:
        if not self.coalesce:
            return await fn(*args, **kwargs), True
        pending = self._inflight.get(key)
        if pending is not None:
            try:
                return await asyncio.shield(pending), False
            except asyncio.CancelledError:
                if not pending.cancelled():
                    raise  # we were cancelled ourselves
                # The leader's call ended for the leader's own reasons (cancelled, or its
                # deadline): the followers make one call of their own, shared again.
                return await self._load(key, fn, args, kwargs)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            value = await fn(*args, **kwargs)
        except asyncio.CancelledError:
            future.cancel()
            raise
        except BaseException as exc:
            if not_the_upstreams_failure(exc):
                # Judged here, in the leader's context: its deadline, not the followers'.
                future.cancel()
                raise
            future.set_exception(exc)
            future.exception()  # followers may be none; never warn "exception never retrieved"
            raise
        else:
            future.set_result(value)
            return value, True
        finally:
            if self._inflight.get(key) is future:
                del self._inflight[key]

    # -- L1 ------------------------------------------------------------------------------------

    def _age(self, slot: _Slot) -> float:
        return max(0.0, self._clock.monotonic() - slot.stored_mono)

    def _entry(self, slot: _Slot) -> CacheEntry[Any]:
        return CacheEntry(slot.value, slot.stored_at, slot.ttl, slot.stale_ttl, self._age(slot))

    def _l1_get(self, local_key: str) -> _Slot | None:
        """The entry, marked as used, while it is fresh or stale; else ``None``."""
        try:
            return self._l1[local_key]
        except KeyError:
            return None

    def _l1_put(self, local_key: str, slot: _Slot) -> None:
        self._l1[local_key] = slot

    # -- L2 ------------------------------------------------------------------------------------

    def _l2_usable(self) -> bool:
        if self._l2_down_until is None:
            return True
        return self._clock.monotonic() >= self._l2_down_until

    async def _l2_op(self, awaitable: Awaitable[Any]) -> tuple[bool, Any]:
        try:
            async with asyncio.timeout(self.l2_timeout):
                value = await awaitable
        except (
            OSError,
            TimeoutError,
            exception_of("redis.exceptions", "RedisError"),
            # A cluster it cannot reach, or a slot no node serves (no RedisError).
            exception_of("redis.exceptions", "RedisClusterException"),
        ) as exc:
            self._l2_failed(exc)
            return False, None
        if self._l2_down_until is not None:
            self._l2_down_until = None
            self.events.emit("cache.storage_recovered", self.name, level=logging.INFO)
        return True, value

    def _l2_failed(self, exc: BaseException) -> None:
        first = self._l2_down_until is None
        self._l2_down_until = self._clock.monotonic() + self.l2_retry_interval
        if first:
            self.events.emit(
                "cache.storage_down",
                self.name,
                error=type(exc).__name__,
                retry_in=self.l2_retry_interval,
            )

    async def _l2_get(self, storage_key: str) -> _Slot | None:
        assert self._redis is not None
        if not self._l2_usable():
            return None
        ok, raw = await self._l2_op(self._redis.get(storage_key))
        if not ok or raw is None:
            return None
        return self._decode(raw)

    async def _l2_set(self, storage_key: str, slot: _Slot) -> None:
        assert self._redis is not None
        if not self._l2_usable():
            return
        try:
            payload = self._encode(slot)
        except (TypeError, ValueError):
            return  # not serializable: it stays in L1 only
        lifetime_ms = max(1, int((slot.ttl + slot.stale_ttl) * 1000))
        await self._l2_op(self._redis.set(storage_key, payload, px=lifetime_ms))

    def _encode(self, slot: _Slot) -> bytes:
        header = f"{slot.stored_at!r}:{slot.ttl!r}:{slot.stale_ttl!r}:".encode()
        return header + self._serializer.dumps(slot.value)

    def _decode(self, raw: bytes) -> _Slot | None:
        try:
            stored_at, ttl, stale_ttl, payload = raw.split(b":", 3)
            value = self._serializer.loads(payload)
            stored = float(stored_at)
        except (ValueError, TypeError):
            return None  # written by something else, or corrupt: a miss
        age = max(0.0, self._clock.time() - stored)
        return _Slot(value, stored, self._clock.monotonic() - age, float(ttl), float(stale_ttl))


# --- httpx answers ---------------------------------------------------------------------------


def snapshot_response(response: httpx.Response) -> dict[str, Any]:
    """A JSON-able copy of a *read* httpx response (status, headers, body) for the cache."""
    return {
        "status": response.status_code,
        "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in response.headers.raw],
        "content": response.content,
        "http_version": response.http_version,
    }


def restore_response(snapshot: dict[str, Any], request: httpx.Request) -> httpx.Response:
    """An httpx response rebuilt from :func:`snapshot_response` for ``request``."""
    import httpx

    headers = [
        (k, v)
        for k, v in snapshot["headers"]
        # The body is stored decoded, so its old framing and encoding no longer apply.
        if k.lower() not in ("content-encoding", "transfer-encoding", "content-length")
    ]
    return httpx.Response(
        snapshot["status"],
        headers=headers,
        content=snapshot["content"],
        request=request,
        extensions={"http_version": snapshot.get("http_version", "HTTP/1.1").encode()},
    )


# --- functional forms -------------------------------------------------------------------------


async def cached_call(
    cache: ResponseCache,
    key: str,
    fn: Callable[..., Awaitable[T]],
    *args: Any,
    stale_if_error: bool = True,
    **kwargs: Any,
) -> CacheResult[T]:
    """``cache.call(key, fn, *args, **kwargs)``: see :meth:`ResponseCache.call`."""
    return await cache.call(key, fn, *args, stale_if_error=stale_if_error, **kwargs)


def cached(
    cache: ResponseCache,
    *,
    key: Callable[..., str],
    stale_if_error: bool = True,
    serve_stale_on: Callable[[BaseException], bool] = should_serve_stale,
) -> Callable[[Callable[P, Awaitable[T]]], Callable[P, Awaitable[T]]]:
    """Decorate an async function so its results are cached under ``key(*args, **kwargs)``.

    The decorated function returns the plain value; whether it was stale is recorded for
    :class:`CacheStatusMiddleware` and readable with :func:`current_cache_status`.
    """

    def decorate(fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
        @functools.wraps(fn)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
            result = await cache.call(
                key(*args, **kwargs),
                functools.partial(fn, *args, **kwargs),
                stale_if_error=stale_if_error,
                serve_stale_on=serve_stale_on,
            )
            return result.value

        return wrapper

    return decorate
