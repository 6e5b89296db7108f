"""Dead-letter queue: operations that failed for good, kept with their error for a replay.

An operation "fails for good" when its retries are spent or its error is not retryable. The
queue records what failed (``operation``), why (the error's code from the ``AppError`` tree,
or the exception type), the context needed to try again, the correlation ID and the number
of attempts. ``replay(handler)`` hands each entry to ``handler``: a success removes the entry,
a failure puts it back at the end of the queue with ``attempts + 1`` and the latest error.
Each entry has a ``key``: a record of a key the queue holds stores nothing more, so a record that
raised (the storage did not confirm it, but may have stored it) can be tried again; the error
carries the key it was recorded under. Once an entry leaves the queue (replayed, deleted or
trimmed), a record of its key stores a new one (ADR 0061).

Two storages: :class:`MemoryDeadLetterQueue` (bounded, per process) and
:class:`RedisDeadLetterQueue` (a Redis stream shared by every instance, survives restarts).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import itertools
import json
import logging
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from fastapi_resilience._optional import (
    exception_of,
    is_cluster_client,
    redis_from_url,
    same_slot_key,
)
from fastapi_resilience._tally import DEAD_LETTERS
from fastapi_resilience.clock import SYSTEM_CLOCK, Clock
from fastapi_resilience.correlation._ids import get_correlation_id
from fastapi_resilience.events import EventBus
from fastapi_resilience.exceptions import AppError, ConfigurationError, ConflictError

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.cluster import RedisCluster

__all__ = [
    "DeadLetter",
    "DeadLetterQueue",
    "MemoryDeadLetterQueue",
    "RedisDeadLetterQueue",
    "ReplayReport",
    "dead_letter_on_failure",
    "error_category",
]

T = TypeVar("T")
P = ParamSpec("P")

#: The attribute, on an error ``record()`` raised, that holds the key the entry was recorded under.
KEY_ATTRIBUTE = "dead_letter_key"

#: Raised (as ``ConflictError``) when another replay of the same Redis stream is running.
REPLAY_BUSY_DETAIL = "Another replay of dead-letter stream {stream!r} is running."

ReplayHandler = Callable[["DeadLetter"], Awaitable[Any] | Any]

logger = logging.getLogger("fastapi_resilience.dead_letter")


def error_category(error: BaseException) -> str:
    """The error's ``code`` for an ``AppError``; otherwise its type, e.g. ``httpx.ConnectError``."""
    if isinstance(error, AppError):
        return error.code
    cls = type(error)
    package = cls.__module__.split(".")[0]
    return cls.__qualname__ if package == "builtins" else f"{package}.{cls.__qualname__}"


def _attempts_of(error: BaseException) -> int:
    # Retry puts the attempt count it spent on RetryExhaustedError's extensions.
    extensions = getattr(error, "extensions", None)
    attempts = extensions.get("attempts") if isinstance(extensions, Mapping) else None
    return attempts if isinstance(attempts, int) and attempts >= 1 else 1


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One operation that failed for good.

    ``error_code`` is the category (``retries_exhausted``, ``circuit_open``,
    ``httpx.ConnectError``...); ``cause_code`` the category of the chained cause, if any
    (what made the retries fail). ``recorded_at`` is wall-clock seconds of the first failure,
    ``last_failed_at`` of the latest failed replay, whose entry had ``previous_id``. ``key`` is
    the idempotency key it was recorded under (``None`` for entries of older versions).
    """

    id: str
    operation: str
    error_code: str
    message: str
    context: Mapping[str, Any] = field(default_factory=dict)
    correlation_id: str | None = None
    recorded_at: float = 0.0
    attempts: int = 1
    cause_code: str | None = None
    last_failed_at: float | None = None
    previous_id: str | None = None
    key: str | None = None

    def to_json(self) -> str:
        data = asdict(self)
        del data["id"]  # the storage gives the id
        # repr() keeps a non-JSON context value readable rather than losing the letter.
        return json.dumps(data, default=repr, separators=(",", ":"))

    @classmethod
    def from_json(cls, letter_id: str, raw: str | bytes) -> DeadLetter:
        data = json.loads(raw)
        # Ignore fields a newer version may have written, rather than fail to list the queue.
        known = {k: v for k, v in data.items() if k in _LETTER_FIELDS}
        return cls(id=letter_id, **known)


_LETTER_FIELDS = frozenset(DeadLetter.__dataclass_fields__) - {"id"}


@dataclass(slots=True)
class ReplayReport:
    """What a replay did: ids that succeeded (removed), and entries that failed again."""

    succeeded: list[str] = field(default_factory=list)
    failed: list[DeadLetter] = field(default_factory=list)

    @property
    def requeued_ids(self) -> dict[str, str]:
        """Old id -> new id of each entry that failed again (it moved to the end)."""
        return {letter.previous_id or "": letter.id for letter in self.failed}


class DeadLetterQueue:
    """The storage-independent part: building entries and replaying them."""

    def __init__(self, *, clock: Clock = SYSTEM_CLOCK, events: EventBus | None = None) -> None:
        self._clock = clock
        #: Where ``dlq.*`` events go; rebind to the app's bus.
        self.events = events or EventBus()

    async def record(
        self,
        operation: str,
        error: BaseException,
        *,
        context: Mapping[str, Any] | None = None,
        attempts: int | None = None,
        correlation_id: str | None = None,
        key: str | None = None,
    ) -> DeadLetter:
        """Record that ``operation`` failed for good with ``error``; returns the entry the
        queue holds for it: the new one, or the one already held under ``key``.

        ``attempts`` defaults to the count a ``RetryExhaustedError`` carries, else 1;
        ``correlation_id`` to the current request's. ``key`` is the entry's idempotency key
        (default: a new random one): while the queue holds an entry of that key, nothing is
        stored and that entry is returned. Once that entry has left the queue (replayed,
        deleted, trimmed), a record of the key stores a new one.

        Raises:
            the storage's error when it could not confirm the entry (Redis down or stalled),
            with the key the entry was recorded under as its ``dead_letter_key`` attribute
            (unless its type takes no attributes: pass ``key`` to know it then).
            The entry may still have been stored: a stalled Redis runs the command when it
            resumes. Call ``record`` again with that ``key`` to be sure: it is stored once.
            :func:`dead_letter_on_failure` catches and reports the error.
        """
        cause = error.__cause__
        letter = DeadLetter(
            id="",
            operation=operation,
            error_code=error_category(error),
            message=str(error) or type(error).__name__,
            context=dict(context or {}),
            correlation_id=correlation_id if correlation_id is not None else get_correlation_id(),
            recorded_at=self._clock.time(),
            attempts=attempts if attempts is not None else _attempts_of(error),
            cause_code=error_category(cause) if cause is not None else None,
            key=key if key is not None else uuid.uuid4().hex,
        )
        try:
            stored = await self._add(letter)
        except Exception as failure:
            # It may be stored all the same: the key lets the caller record it again, once.
            # An error type that takes no attributes (frozen, or a C type) goes up without it:
            # the storage's error matters more than the key.
            with contextlib.suppress(Exception):
                setattr(failure, KEY_ATTRIBUTE, letter.key)
            raise
        if replace(stored, id="") == letter:
            # Stored now; not when the key's entry was already held (a record repeated
            # after a stalled storage, which stores nothing).
            DEAD_LETTERS.add((self.label,))
        return stored

    @property
    def queued(self) -> int | None:
        """The letters held now when known without awaiting (for metrics); ``None`` for a
        shared storage, which ``size()`` asks."""
        return None

    @property
    def label(self) -> str:
        """The queue's name in metrics and the admin API."""
        return str(getattr(self, "name", None) or getattr(self, "stream", None) or "dlq")

    async def replay(
        self, handler: ReplayHandler, ids: Iterable[str] | None = None, *, limit: int = 1000
    ) -> ReplayReport:
        """Hand entries (oldest first, or just ``ids``) to ``handler`` one at a time.

        ``handler(letter)`` may be sync or async. When it returns, the entry is removed; when it
        raises, the entry goes back to the end of the queue under a new id, with
        ``attempts + 1`` and the new error as its error. Cancellation stops the replay and
        leaves the current entry in place.
        """
        report = ReplayReport()
        async with self._replay_guard():
            letters = await self._select(ids, limit)
            for letter in letters:
                try:
                    result = handler(letter)
                    if inspect.isawaitable(result):
                        await result
                except Exception as error:
                    report.failed.append(await self._requeue(letter, error))
                else:
                    await self.delete(letter.id)
                    report.succeeded.append(letter.id)
        return report

    async def _requeue(self, letter: DeadLetter, error: BaseException) -> DeadLetter:
        cause = error.__cause__
        again = replace(
            letter,
            id="",
            error_code=error_category(error),
            message=str(error) or type(error).__name__,
            attempts=letter.attempts + 1,
            cause_code=error_category(cause) if cause is not None else None,
            last_failed_at=self._clock.time(),
            previous_id=letter.id,
        )
        return await self._replace(letter.id, again)

    async def _select(self, ids: Iterable[str] | None, limit: int) -> list[DeadLetter]:
        if ids is None:
            return await self.list(limit)
        found = [await self.get(i) for i in ids]
        return [letter for letter in found if letter is not None]

    def _replay_guard(self) -> Any:
        return _NullGuard()

    # -- storage ---------------------------------------------------------------------------

    async def _add(self, letter: DeadLetter) -> DeadLetter:
        raise NotImplementedError

    async def _replace(self, old_id: str, letter: DeadLetter) -> DeadLetter:
        raise NotImplementedError

    async def list(self, limit: int = 100) -> list[DeadLetter]:
        """Up to ``limit`` entries, oldest first."""
        raise NotImplementedError

    async def get(self, letter_id: str) -> DeadLetter | None:
        """The entry with ``letter_id``, or ``None``."""
        raise NotImplementedError

    async def delete(self, letter_id: str) -> bool:
        """Remove an entry; ``True`` if it was there."""
        raise NotImplementedError

    async def size(self) -> int:
        """How many entries the queue holds."""
        raise NotImplementedError


class _NullGuard:
    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc_info: object) -> None:
        return None


class MemoryDeadLetterQueue(DeadLetterQueue):
    """A bounded in-process queue; beyond ``max_entries`` the oldest entry is dropped.

    The first drop publishes ``dlq.full`` (once, until the queue has room again).

    .. versionadded:: 0.1.0
    """

    def __init__(
        self,
        max_entries: int = 1000,
        *,
        name: str = "dlq",
        clock: Clock = SYSTEM_CLOCK,
        events: EventBus | None = None,
    ) -> None:
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise ConfigurationError(f"max_entries must be an int >= 1, got {max_entries!r}")
        super().__init__(clock=clock, events=events)
        self.max_entries = max_entries
        self.name = name
        self._entries: OrderedDict[str, DeadLetter] = OrderedDict()
        #: The id of the entry held under each key.
        self._by_key: dict[str, str] = {}
        self._ids = itertools.count(1)
        self._full = False

    def __repr__(self) -> str:
        return f"MemoryDeadLetterQueue(size={len(self._entries)}, max_entries={self.max_entries})"

    def _new_id(self) -> str:
        # Same shape as a Redis stream id: milliseconds, then a sequence number.
        return f"{int(self._clock.time() * 1000)}-{next(self._ids)}"

    async def _add(self, letter: DeadLetter) -> DeadLetter:
        held = self._by_key.get(letter.key) if letter.key is not None else None
        if held is not None:
            return self._entries[held]
        stored = replace(letter, id=self._new_id())
        self._entries[stored.id] = stored
        if stored.key is not None:
            self._by_key[stored.key] = stored.id
        if len(self._entries) > self.max_entries:
            _, dropped = self._entries.popitem(last=False)
            self._forget_key(dropped)
            if not self._full:
                self._full = True
                self.events.emit("dlq.full", self.name, max_entries=self.max_entries)
        elif self._full and len(self._entries) < self.max_entries:
            self._full = False
        return stored

    async def _replace(self, old_id: str, letter: DeadLetter) -> DeadLetter:
        old = self._entries.pop(old_id, None)
        if old is not None:
            self._forget_key(old)
        return await self._add(letter)

    def _forget_key(self, letter: DeadLetter) -> None:
        if letter.key is not None and self._by_key.get(letter.key) == letter.id:
            del self._by_key[letter.key]

    async def list(self, limit: int = 100) -> list[DeadLetter]:
        return list(itertools.islice(self._entries.values(), max(0, limit)))

    async def get(self, letter_id: str) -> DeadLetter | None:
        return self._entries.get(letter_id)

    async def delete(self, letter_id: str) -> bool:
        letter = self._entries.pop(letter_id, None)
        if letter is None:
            return False
        self._forget_key(letter)
        return True

    async def size(self) -> int:
        return len(self._entries)

    @property
    def queued(self) -> int | None:
        """The letters held now, read without awaiting (for metrics)."""
        return len(self._entries)


class RedisDeadLetterQueue(DeadLetterQueue):
    """A Redis stream (``XADD``/``XRANGE``/``XDEL``), shared by every instance of the app.

    The stream is capped at ``maxlen`` entries (oldest trimmed). Only one replay of a stream
    runs at a time across instances (a lock key with a TTL); a second one raises
    ``ConflictError``. Every Redis call is bounded by ``timeout`` seconds. The id of each
    key's entry is kept beside the stream (the hash ``<stream>:keys``) exactly as long as the
    entry is in it: adding, requeueing, deleting and trimming change both in one script.

    On a Redis Cluster the script's two keys must lie in one hash slot: the hash is
    ``{<stream>}:keys`` and the lock ``{<stream>}:replay-lock`` (``{dlq}`` hashes as ``dlq``
    does), or ``<stream>:keys`` when the stream's name has a hash tag of its own.

    Args:
        url: ``redis://`` URL, or ``redis+cluster://host:port[,host:port...]`` for a Redis
            Cluster; or pass ``client=`` an existing ``redis.asyncio.Redis`` or
            ``redis.asyncio.cluster.RedisCluster``.
        stream: the stream key.
        maxlen: the cap on entries.
        timeout: the longest one Redis call may take.
        replay_lock_ttl: how long a crashed replay keeps the lock.

    .. versionadded:: 0.1.0
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        client: Redis | RedisCluster | None = None,
        stream: str = "dlq",
        maxlen: int = 10_000,
        timeout: float = 1.0,
        replay_lock_ttl: float = 60.0,
        clock: Clock = SYSTEM_CLOCK,
        events: EventBus | None = None,
    ) -> None:
        if (url is None) == (client is None):
            raise ConfigurationError("RedisDeadLetterQueue needs exactly one of url or client")
        if isinstance(maxlen, bool) or not isinstance(maxlen, int) or maxlen < 1:
            raise ConfigurationError(f"maxlen must be an int >= 1, got {maxlen!r}")
        if not timeout > 0:
            raise ConfigurationError(f"timeout must be > 0 seconds, got {timeout!r}")
        super().__init__(clock=clock, events=events)
        self._owns_client = client is None
        self._redis: Redis | RedisCluster = (
            client if client is not None else redis_from_url(url or "", "RedisDeadLetterQueue url")
        )
        self.stream = stream
        #: The hash of key -> entry id, and the replay lock (in the stream's slot on a cluster).
        self._keys_hash, self._lock_key = _companion_keys(stream, is_cluster_client(self._redis))
        self.maxlen = maxlen
        self.timeout = timeout
        self.replay_lock_ttl = replay_lock_ttl
        self._down = False
        self._add_script = self._redis.register_script(_ADD_ONCE)
        self._replace_script = self._redis.register_script(_REPLACE)
        self._delete_script = self._redis.register_script(_DELETE)

    def __repr__(self) -> str:
        return f"RedisDeadLetterQueue(stream={self.stream!r}, maxlen={self.maxlen})"

    async def aclose(self) -> None:
        if self._owns_client:
            await self._redis.aclose()

    async def _run(self, awaitable: Awaitable[T]) -> T:
        try:
            async with asyncio.timeout(self.timeout):
                result = await awaitable
        except _down_errors() as error:
            if not self._down:
                self._down = True
                self.events.emit(
                    "dlq.storage_down", self.stream, level=logging.ERROR, error=type(error).__name__
                )
            raise
        if self._down:
            self._down = False
            self.events.emit("dlq.storage_recovered", self.stream, level=logging.INFO)
        return result

    @property
    def _keys(self) -> list[str]:
        """The stream, and the hash that holds the id of each key's entry."""
        return [self.stream, self._keys_hash]

    def _script_args(self, letter: DeadLetter) -> list[str | int]:
        return [letter.to_json(), self.maxlen, letter.key or ""]

    async def _add(self, letter: DeadLetter) -> DeadLetter:
        # One script: the key's entry, if the stream holds it, or a new one and the key, with
        # nothing between.
        found: Any = await self._run(
            self._add_script(keys=self._keys, args=self._script_args(letter))
        )
        if len(found) > 1:
            return DeadLetter.from_json(_text(found[0]), found[1])
        return replace(letter, id=_text(found[0]))

    async def _replace(self, old_id: str, letter: DeadLetter) -> DeadLetter:
        # One script: the entry is never lost nor doubled, and its key names the new one.
        new_id = await self._run(
            self._replace_script(keys=self._keys, args=[*self._script_args(letter), old_id])
        )
        return replace(letter, id=_text(new_id))

    async def list(self, limit: int = 100) -> list[DeadLetter]:
        if limit <= 0:
            return []
        rows: Any = await self._run(self._redis.xrange(self.stream, count=limit))
        return [_decode(letter_id, fields) for letter_id, fields in rows]

    async def get(self, letter_id: str) -> DeadLetter | None:
        try:
            rows: Any = await self._run(
                self._redis.xrange(self.stream, letter_id, letter_id, count=1)
            )
        except exception_of("redis.exceptions", "RedisError") as error:
            if "Invalid stream ID" in str(error):
                return None
            raise
        return _decode(*rows[0]) if rows else None

    async def delete(self, letter_id: str) -> bool:
        try:
            removed = await self._run(self._delete_script(keys=self._keys, args=[letter_id]))
        except exception_of("redis.exceptions", "RedisError") as error:
            if "Invalid stream ID" in str(error):
                return False
            raise
        return bool(removed)

    async def size(self) -> int:
        return int(await self._run(self._redis.xlen(self.stream)))

    def _replay_guard(self) -> Any:
        return _RedisReplayLock(self)


class _RedisReplayLock:
    def __init__(self, queue: RedisDeadLetterQueue) -> None:
        self._queue = queue
        self._key = queue._lock_key
        self._token = uuid.uuid4().hex

    async def __aenter__(self) -> None:
        queue = self._queue
        ttl_ms = max(1, int(queue.replay_lock_ttl * 1000))
        got = await queue._run(queue._redis.set(self._key, self._token, nx=True, px=ttl_ms))
        if not got:
            raise ConflictError(REPLAY_BUSY_DETAIL.format(stream=queue.stream))

    async def __aexit__(self, *exc_info: object) -> None:
        # Delete the lock only if it is still ours (it may have expired and been retaken).
        queue = self._queue
        await queue._run(queue._redis.eval(_RELEASE_LOCK, 1, self._key, self._token))


def _companion_keys(stream: str, cluster: bool) -> tuple[str, str]:
    """The names of the keys-hash and the replay lock of ``stream``; on a cluster, in its slot.

    The single-Redis names stay as they always were, so a queue keeps its keys on upgrade.
    """
    if not cluster:
        return f"{stream}:keys", f"{stream}:replay-lock"
    try:
        return same_slot_key(stream, ":keys"), same_slot_key(stream, ":replay-lock")
    except ValueError as exc:
        raise ConfigurationError(f"RedisDeadLetterQueue stream on a Redis Cluster: {exc}") from None


#: Lua shared by the scripts below. KEYS[1] is the stream, KEYS[2] the hash of key -> entry id.
#: An entry is stored as ``data`` (its JSON) and, when it has one, ``key``.
_LUA_HELPERS = """
local function forget(row)
  local fields = row[2]
  for i = 1, #fields, 2 do
    if fields[i] == 'key' and redis.call('hget', KEYS[2], fields[i + 1]) == row[1] then
      redis.call('hdel', KEYS[2], fields[i + 1])
    end
  end
end
local function make_room(maxlen)
  local over = redis.call('xlen', KEYS[1]) - maxlen + 1
  if over > 0 then
    for _, row in ipairs(redis.call('xrange', KEYS[1], '-', '+', 'COUNT', over)) do
      forget(row)
      redis.call('xdel', KEYS[1], row[1])
    end
  end
end
local function add(data, maxlen, key)
  make_room(maxlen)
  if key == '' then return redis.call('xadd', KEYS[1], '*', 'data', data) end
  local id = redis.call('xadd', KEYS[1], '*', 'data', data, 'key', key)
  redis.call('hset', KEYS[2], key, id)
  return id
end
"""

#: ARGV: the entry, maxlen, its key ('' for none). Returns {id, data} of the entry the stream
#: holds for the key, else {id} of a new entry.
_ADD_ONCE = (
    _LUA_HELPERS
    + """
if ARGV[3] ~= '' then
  local held = redis.call('hget', KEYS[2], ARGV[3])
  if held then
    local rows = redis.call('xrange', KEYS[1], held, held)
    if rows[1] then return {held, rows[1][2][2]} end
  end
end
return {add(ARGV[1], tonumber(ARGV[2]), ARGV[3])}
"""
)

#: As ``_ADD_ONCE``'s arguments, with the id of the entry to replace as ARGV[4]; returns the
#: new id.
_REPLACE = (
    _LUA_HELPERS
    + """
local rows = redis.call('xrange', KEYS[1], ARGV[4], ARGV[4])
if rows[1] then
  forget(rows[1])
  redis.call('xdel', KEYS[1], ARGV[4])
end
return add(ARGV[1], tonumber(ARGV[2]), ARGV[3])
"""
)

#: ARGV: the id of the entry to delete; returns how many entries were deleted.
_DELETE = (
    _LUA_HELPERS
    + """
local rows = redis.call('xrange', KEYS[1], ARGV[1], ARGV[1])
if not rows[1] then return 0 end
forget(rows[1])
return redis.call('xdel', KEYS[1], ARGV[1])
"""
)

_RELEASE_LOCK = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _decode(letter_id: Any, fields: Any) -> DeadLetter:
    raw = fields.get(b"data", fields.get("data"))
    return DeadLetter.from_json(_text(letter_id), raw)


def _down_errors() -> tuple[type[BaseException], ...]:
    """A storage that cannot be reached; a command error (bad id) says nothing of its health."""
    return (
        OSError,
        TimeoutError,
        exception_of("redis.exceptions", "ConnectionError"),
        exception_of("redis.exceptions", "TimeoutError"),
        # A cluster it cannot reach, or a slot no node serves (no RedisError).
        exception_of("redis.exceptions", "RedisClusterException"),
    )


# --- routing failed calls ---------------------------------------------------------------------


def _default_context(*args: Any, **kwargs: Any) -> dict[str, Any]:
    return {"args": list(args), "kwargs": kwargs}


def dead_letter_on_failure(
    queue: DeadLetterQueue,
    operation: str,
    *,
    when: Callable[[BaseException], bool] | None = None,
    context: Callable[..., Mapping[str, Any]] | None = None,
    key: Callable[..., str] | None = None,
) -> Callable[[Callable[P, Awaitable[T]]], Callable[P, Awaitable[T]]]:
    """Decorate an async function so a failure is recorded in ``queue``, then re-raised.

    Put it outside the retry and breaker decorators: what reaches it has failed for good.
    The call's arguments go into the entry's context (``{"args": [...], "kwargs": {...}}``)
    unless ``context(*args, **kwargs)`` builds it. The decorated function gets a
    ``replay_handler`` attribute that calls the undecorated function again with those
    arguments, for ``queue.replay(fn.replay_handler)``. A queue that cannot store the entry
    (Redis down) never hides the original error: it is reported through the event bus
    (``dlq.storage_down``) and the original error is raised; the entry may still have been
    stored (a stalled Redis runs the command when it resumes). With ``key``, a later failure
    of the same call that finds its entry still queued stores nothing more, so calling the
    function again after such an error never queues it twice; without it each failure gets a
    random key.

    Args:
        when: which failures to record (default: every ``Exception``).
        context: builds the context from the call's arguments; it must be JSON-able for Redis.
        key: builds the entry's idempotency key from the call's arguments, e.g.
            ``key=lambda order_id: f"capture:{order_id}"``.

    .. versionadded:: 0.1.0
    """
    build = context or _default_context

    def decorate(fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
        @functools.wraps(fn)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
            try:
                return await fn(*args, **kwargs)
            except Exception as error:
                if when is None or when(error):
                    await _record_quietly(queue, operation, error, (build, key), args, kwargs)
                raise

        async def replay_handler(letter: DeadLetter) -> T:
            ctx = letter.context
            return await fn(*ctx.get("args", ()), **ctx.get("kwargs", {}))

        wrapper.replay_handler = replay_handler  # type: ignore[attr-defined]
        return wrapper

    return decorate


async def _record_quietly(
    queue: DeadLetterQueue,
    operation: str,
    error: BaseException,
    builders: tuple[Callable[..., Mapping[str, Any]], Callable[..., str] | None],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> None:
    build, key_of = builders
    try:
        key = None if key_of is None else key_of(*args, **kwargs)
        await queue.record(operation, error, context=build(*args, **kwargs), key=key)
    except _down_errors():
        # Already published once as dlq.storage_down; the caller's own error stays on top.
        logger.debug("dead letter for %s not stored", operation, exc_info=True)
    except Exception as failure:
        # A bug (a builder that raises): say so every time, never hide the caller's error.
        queue.events.emit("dlq.record_failed", operation, level=logging.ERROR, error=repr(failure))
