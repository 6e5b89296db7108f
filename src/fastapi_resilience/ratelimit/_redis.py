"""The shared rate-limit storage: Redis through ``redis.asyncio``, one round trip per check.

One Lua script decides every limit of a request, counts all of them or none, and returns what
the headers need. It runs by ``EVALSHA``; after ``SCRIPT FLUSH`` or a restart the ``NOSCRIPT``
answer is followed by one ``EVAL`` that reloads it. Time comes from the Redis server's ``TIME``,
so app processes with skewed clocks agree (``adr/0010-rate-limit-algorithm.md``).

Keys: ``<prefix>{<identity>}:<key>:<amount>-<period>s`` holds the bucket log (a list of
``bucket, count`` pairs, newest first) and the same name plus ``:n`` its total. The ``{identity}``
hash tag puts every key of one call in one Redis Cluster slot. Both keys expire when their
newest bucket leaves the window, so idle identities vanish.

On a Redis Cluster (a ``redis.asyncio.cluster.RedisCluster`` client, ``redis+cluster://``) each
check is one ``EVALSHA`` that the client sends to its identity's slot; the checks are not
coalesced, since one pipelined write goes to one server (``adr/0073``).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from collections.abc import Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

try:
    from redis.asyncio import Redis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import NoScriptError, RedisClusterException, RedisError, ResponseError
except ModuleNotFoundError as exc:  # pragma: no cover - tested in a subprocess without redis
    if exc.name is None or exc.name.partition(".")[0] != "redis":
        raise
    # Still an ImportError, so ``except ImportError`` around an optional import keeps working.
    raise ModuleNotFoundError(
        "RedisStorage needs the redis extra: pip install 'fastapi-resilience[redis]'",
        name=exc.name,
    ) from exc

from fastapi_resilience._optional import is_cluster_client, redis_from_url
from fastapi_resilience.exceptions import ConfigurationError
from fastapi_resilience.ratelimit._storage import (
    DEFAULT_STORAGE_TIMEOUT,
    Decision,
    LimitCheck,
    LimitState,
    StorageUnavailableError,
    bucket_width_ms,
    positive_seconds,
)

if TYPE_CHECKING:
    from redis.asyncio.cluster import RedisCluster

__all__ = ["CHECK_SCRIPT", "CHECK_SCRIPT_SHA", "RedisStorage"]

#: Checks sent in one pipelined write at most, and pipelined writes in flight at most.
MAX_BATCH = 128
MAX_IN_FLIGHT = 4

# The end of both scripts' loop over the checks: one limit's state, as replied.
_STATE_REPLY = """\
  local reset = 0
  if tail then reset = (tail + 1) * width + period - now end
  local remaining = amount - total
  if remaining < 0 then remaining = 0 end
  out[#out + 1] = fits
  out[#out + 1] = remaining
  out[#out + 1] = reset
  out[#out + 1] = retry
end
return out
"""

# KEYS: per check, the log list and its total. ARGV[1]: the number of checks; then per check:
# amount, period_ms, width_ms, cost, shadow (1/0). Returns {allowed, then per check: fits,
# remaining, reset_ms, retry_ms}. All arithmetic is in whole milliseconds, so it is exact.
CHECK_SCRIPT = (
    """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = tonumber(ARGV[1])
local totals, tails, fresh, dirty = {}, {}, {}, {}
local allowed = 1
for i = 1, n do
  local a = 2 + (i - 1) * 5
  local amount, period = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
  local width, cost = tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  local log, tot = KEYS[2 * i - 1], KEYS[2 * i]
  local total = tonumber(redis.call('GET', tot) or 0)
  local tail = false
  if total > 0 then
    tail = redis.call('LINDEX', log, -2)
    while tail and (tonumber(tail) + 1) * width + period <= now do
      local pair = redis.call('RPOP', log, 2)
      total = total - tonumber(pair[1])
      dirty[i] = true
      tail = redis.call('LINDEX', log, -2)
    end
    if tail then tail = tonumber(tail) else total = 0 end
  end
  if not tail then fresh[i] = true end
  totals[i], tails[i] = total, tail
  if total + cost > amount and ARGV[a + 4] ~= '1' then allowed = 0 end
end
local out = {allowed}
for i = 1, n do
  local a = 2 + (i - 1) * 5
  local amount, period = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
  local width, cost = tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  local log, tot = KEYS[2 * i - 1], KEYS[2 * i]
  local before, total, tail = totals[i], totals[i], tails[i]
  if allowed == 1 then
    local bucket = math.floor(now / width)
    local head = false
    if fresh[i] then redis.call('DEL', log) else head = redis.call('LRANGE', log, 0, 1) end
    if head and tonumber(head[1]) >= bucket then
      bucket = tonumber(head[1])
      redis.call('LSET', log, 1, tonumber(head[2]) + cost)
    else
      redis.call('LPUSH', log, cost, bucket)
    end
    total = total + cost
    local ttl = (bucket + 1) * width + period - now
    redis.call('PEXPIRE', log, ttl)
    redis.call('SET', tot, total, 'PX', ttl)
    if not tail then tail = bucket end
  elseif dirty[i] then
    if total > 0 then redis.call('SET', tot, total, 'KEEPTTL') else redis.call('DEL', log, tot) end
  end
  local fits, retry = 1, 0
  if before + cost > amount then
    fits, retry = 0, period
    if cost <= amount and tail then
      local need, freed, idx = before + cost - amount, 0, -1
      while true do
        local pair = redis.call('LRANGE', log, idx - 1, idx)
        if #pair < 2 then break end
        freed = freed + tonumber(pair[2])
        if freed >= need then
          retry = (tonumber(pair[1]) + 1) * width + period - now
          break
        end
        idx = idx - 2
      end
    end
  end
"""
    + _STATE_REPLY
)
CHECK_SCRIPT_SHA = hashlib.sha1(CHECK_SCRIPT.encode()).hexdigest()


# The check script's reading half, with nothing written: expired buckets are skipped, not
# popped. Same KEYS; ARGV[1]: the number of checks, then per check: amount, period_ms, width_ms,
# cost. Returns per check: fits, remaining, reset_ms, retry_ms, as the check script does.
PEEK_SCRIPT = (
    """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = tonumber(ARGV[1])
local out = {}
for i = 1, n do
  local a = 2 + (i - 1) * 4
  local amount, period = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
  local width, cost = tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  local total = tonumber(redis.call('GET', KEYS[2 * i]) or 0)
  local log = {}
  if total > 0 then log = redis.call('LRANGE', KEYS[2 * i - 1], 0, -1) end
  local idx = #log - 1
  while idx >= 1 and (tonumber(log[idx]) + 1) * width + period <= now do
    total = total - tonumber(log[idx + 1])
    idx = idx - 2
  end
  local tail = false
  if idx >= 1 then tail = tonumber(log[idx]) else total = 0 end
  local fits, retry = 1, 0
  if total + cost > amount then
    fits, retry = 0, period
    if cost <= amount and tail then
      local need, freed, j = total + cost - amount, 0, idx
      while j >= 1 do
        freed = freed + tonumber(log[j + 1])
        if freed >= need then
          retry = (tonumber(log[j]) + 1) * width + period - now
          break
        end
        j = j - 2
      end
    end
  end
"""
    + _STATE_REPLY
)
PEEK_SCRIPT_SHA = hashlib.sha1(PEEK_SCRIPT.encode()).hexdigest()

# KEYS: per check, the log list and its total (one identity's: one hash slot). Returns how many
# of the pairs existed. The keys expire with their newest bucket, so one that exists holds units.
RESET_SCRIPT = """
local removed = 0
for i = 1, #KEYS, 2 do
  if redis.call('UNLINK', KEYS[i], KEYS[i + 1]) > 0 then removed = removed + 1 end
end
return removed
"""
RESET_SCRIPT_SHA = hashlib.sha1(RESET_SCRIPT.encode()).hexdigest()


def _connection_errors() -> tuple[type[BaseException], ...]:
    # A cluster client reports a cluster it cannot reach, or a slot no node serves, with a
    # RedisClusterException, which is no RedisError: the storage is down all the same.
    return (RedisError, RedisClusterException, OSError, TimeoutError)


_STORAGE_ERRORS = _connection_errors()
_EVALSHA_HEAD = b"$7\r\nEVALSHA\r\n$40\r\n" + CHECK_SCRIPT_SHA.encode() + b"\r\n"
_EVAL_HEAD = b"$4\r\nEVAL\r\n$%d\r\n%b\r\n" % (len(CHECK_SCRIPT.encode()), CHECK_SCRIPT.encode())


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%b\r\n" % (len(value), value)


def _unavailable(exc: BaseException) -> StorageUnavailableError:
    error = StorageUnavailableError(f"redis rate-limit storage unavailable: {type(exc).__name__}")
    error.__cause__ = exc
    return error


class _Packed:
    """One check call in the Redis protocol, ready for EVALSHA or (after NOSCRIPT) EVAL."""

    __slots__ = ("body", "size")

    def __init__(self, size: int, body: bytes) -> None:
        self.size = size  # protocol elements after the command name and script
        self.body = body

    def evalsha(self) -> bytes:
        return b"*%d\r\n%b%b" % (self.size + 2, _EVALSHA_HEAD, self.body)

    def eval(self) -> bytes:
        return b"*%d\r\n%b%b" % (self.size + 2, _EVAL_HEAD, self.body)


_Pending = tuple[_Packed, "asyncio.Future[list[int]]"]


class _Coalescer:
    """Sends the checks that arrive in one event-loop turn as one pipelined write.

    Each check stays its own ``EVALSHA`` (atomic, one hash slot); only the socket round trip
    and the client's per-command overhead are shared. Checks whose caller gave up (timed out)
    before their batch left are not sent, so a request that failed open is never counted.
    """

    def __init__(self, client: Redis, timeout: float) -> None:
        self._pool = client.connection_pool
        self._timeout = timeout
        self._queue: list[_Pending] = []
        self._in_flight = 0
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()

    async def call(self, packed: _Packed) -> list[int]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[int]] = loop.create_future()
        self._queue.append((packed, future))
        if not self._scheduled and self._in_flight < MAX_IN_FLIGHT:
            self._scheduled = True
            loop.call_soon(self._flush)
        # The deadline fails the future only if no answer was received by then; an answer that
        # was received is used even if the caller resumes a little later. One timer handle per
        # check is also cheaper than a cancelling asyncio.timeout around the call.
        deadline = loop.call_at(loop.time() + self._timeout, self._expire, future)
        try:
            return await future
        finally:
            deadline.cancel()

    def _expire(self, future: asyncio.Future[list[int]]) -> None:
        if not future.done():
            error = StorageUnavailableError(
                f"redis rate-limit storage did not answer within {self._timeout:g}s"
            )
            error.__cause__ = TimeoutError()
            future.set_exception(error)

    def _flush(self) -> None:
        self._scheduled = False
        loop = asyncio.get_running_loop()
        while self._queue and self._in_flight < MAX_IN_FLIGHT:
            batch = [item for item in self._queue[:MAX_BATCH] if not item[1].done()]
            del self._queue[:MAX_BATCH]
            if batch:
                self._in_flight += 1
                task = loop.create_task(self._send(batch))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: list[_Pending]) -> None:
        try:
            replies = await self._round_trip([packed for packed, _ in batch])
        except _STORAGE_ERRORS as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(_unavailable(exc))
        except BaseException:
            # Closed while in flight: no caller may wait for an answer that will not come.
            for _, future in batch:
                future.cancel()
            raise
        else:
            for (_, future), reply in zip(batch, replies, strict=True):
                if future.done():
                    continue
                if isinstance(reply, ResponseError):
                    future.set_exception(_unavailable(reply))
                else:
                    future.set_result(reply)
        finally:
            self._in_flight -= 1
            if self._queue and not self._scheduled:
                self._scheduled = True
                asyncio.get_running_loop().call_soon(self._flush)

    async def _round_trip(self, batch: list[_Packed]) -> list[Any]:
        pool = self._pool
        connection = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            # Frees the connection of a stalled server; callers were released at their deadline.
            async with asyncio.timeout(2 * self._timeout):
                try:
                    replies = await self._exchange(connection, [p.evalsha() for p in batch])
                except RedisConnectionError:
                    # A pooled connection from before a Redis restart: one retry on a fresh one.
                    await connection.disconnect()
                    replies = await self._exchange(connection, [p.evalsha() for p in batch])
                missing = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
                if missing:
                    # SCRIPT FLUSH or a restart emptied the cache: EVAL runs and caches it again.
                    again = await self._exchange(connection, [batch[i].eval() for i in missing])
                    for index, reply in zip(missing, again, strict=True):
                        replies[index] = reply
        except BaseException:
            # A reply may be half read: the connection cannot be reused.
            await connection.disconnect()
            raise
        finally:
            await pool.release(connection)
        return replies

    @staticmethod
    async def _exchange(connection: Any, commands: list[bytes]) -> list[Any]:
        await connection.send_packed_command(commands, False)
        replies: list[Any] = []
        for _ in commands:
            try:
                # One deadline covers the whole batch (above), not one per reply.
                replies.append(await connection.read_response(timeout=math.inf))
            except ResponseError as exc:
                replies.append(exc)
        return replies

    async def aclose(self) -> None:
        for task in tuple(self._tasks):
            task.cancel()
        for _, future in self._queue:
            future.cancel()
        self._queue.clear()


class RedisStorage:
    """Counts in Redis, shared by every app process that uses the same server and prefix.

    Args:
        client: a ``redis.asyncio.Redis`` or a ``redis.asyncio.cluster.RedisCluster``; build
            one with short timeouts through ``from_url``.
        prefix: the start of every key this storage writes; on a cluster it may hold no
            braces, so that ``{identity}`` is the hash tag of every key.
        coalesce: send the checks that arrive in the same event-loop turn as one pipelined
            write (each still its own ``EVALSHA``); measured in ``adr/0010``. Off, each check
            is one ``execute_command`` on its own pooled connection. A cluster client never
            coalesces.
        timeout: seconds one batch may take when coalescing (the socket timeouts apply
            otherwise).

    Raises ``StorageUnavailableError`` (from ``check`` and ``ping``) when Redis is unreachable,
    answers with an error, or does not answer within the timeout.

    .. versionadded:: 0.1.0
    """

    def __init__(
        self,
        client: Redis | RedisCluster,
        *,
        prefix: str = "rl:",
        coalesce: bool = True,
        timeout: float = DEFAULT_STORAGE_TIMEOUT,
    ) -> None:
        if is_cluster_client(client) and ("{" in prefix or "}" in prefix):
            # A brace would make the prefix, not the identity, the hash tag (or none).
            raise ConfigurationError(
                f"rate_limit_key_prefix {prefix!r}: on a Redis Cluster the prefix may "
                "hold no braces ({identity} is the hash tag of every key)"
            )
        self.client = client
        self.prefix = prefix
        # One pipelined write goes to one server: a cluster client sends each check alone.
        self._coalescer = (
            _Coalescer(client, timeout) if coalesce and isinstance(client, Redis) else None
        )
        #: No check waits longer than this, measured as "no answer received" (coalescing only).
        self.call_timeout: float | None = timeout if self._coalescer is not None else None
        self._args: dict[tuple[int, int, int, bool], bytes] = {}
        self._counts: dict[int, bytes] = {}

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str = "rl:",
        timeout: float | timedelta = DEFAULT_STORAGE_TIMEOUT,
        coalesce: bool = True,
        **client_options: Any,
    ) -> RedisStorage:
        """A storage on a new client with ``timeout`` seconds to connect and to read.

        A failed command is retried once on a fresh connection only when the connection was
        refused or broken (a pooled connection left over from before a Redis restart), never
        after a timeout, so one call never waits much longer than ``timeout``.

        ``redis+cluster://host:port[,host:port...]`` (``rediss+cluster://`` for TLS) gives a
        ``RedisCluster`` client seeded with those nodes; it finds the others itself.
        """
        timeout = positive_seconds(timeout, "storage timeout")
        options: dict[str, Any] = {
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "retry": Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
            # No CLIENT SETINFO on each new connection: one round trip less, nothing but EVALSHA.
            "driver_info": None,
        }
        options.update(client_options)
        client = redis_from_url(url, "rate_limit_storage", **options)
        # A cluster client is never coalesced: __init__ turns it off for any other client.
        return cls(client, prefix=prefix, coalesce=coalesce, timeout=timeout)

    def _check_args(self, check: LimitCheck) -> bytes:
        limit = check.limit
        cache_key = (limit.amount, limit.period, check.cost, check.shadow)
        args = self._args.get(cache_key)
        if args is None:
            args = self._args[cache_key] = b"".join(
                _bulk(b"%d" % value)
                for value in (
                    limit.amount,
                    limit.period * 1000,
                    bucket_width_ms(limit),
                    check.cost,
                    int(check.shadow),
                )
            )
        return args

    def keys_for(self, identity_tag: str, check: LimitCheck) -> tuple[str, str]:
        """The log and total keys of ``check`` for ``identity_tag`` (for operators and tests)."""
        limit = check.limit
        log = f"{self.prefix}{{{identity_tag}}}:{check.key}:{limit.amount}-{limit.period}s"
        return log, log + ":n"

    def _pack(self, identity_tag: str, checks: Sequence[LimitCheck]) -> _Packed:
        tag = f"{self.prefix}{{{identity_tag}}}:"
        keys: list[bytes] = []
        args: list[bytes] = []
        for check in checks:
            limit = check.limit
            log = f"{tag}{check.key}:{limit.amount}-{limit.period}s".encode()
            keys.append(b"$%d\r\n%b\r\n$%d\r\n%b:n\r\n" % (len(log), log, len(log) + 2, log))
            args.append(self._check_args(check))
        count = len(checks)
        counts = self._counts.get(count)
        if counts is None:
            counts = self._counts[count] = _bulk(b"%d" % (2 * count))
        return _Packed(
            2 + 2 * count + 5 * count,
            counts + b"".join(keys) + _bulk(b"%d" % count) + b"".join(args),
        )

    async def check(self, identity_tag: str, checks: Sequence[LimitCheck]) -> Decision:
        if self._coalescer is not None:
            raw = await self._coalescer.call(self._pack(identity_tag, checks))
        else:
            raw = await self._run_single(identity_tag, checks)
        states = []
        for index, check in enumerate(checks):
            base = 1 + index * 4
            states.append(
                LimitState(
                    check,
                    raw[base] == 1,
                    raw[base + 1],
                    raw[base + 2] / 1000,
                    raw[base + 3] / 1000,
                )
            )
        return Decision(raw[0] == 1, tuple(states))

    async def _run_single(self, identity_tag: str, checks: Sequence[LimitCheck]) -> list[int]:
        keys: list[str] = []
        args: list[int] = [len(checks)]
        for check in checks:
            log, total = self.keys_for(identity_tag, check)
            keys += (log, total)
            limit = check.limit
            args += (
                limit.amount,
                limit.period * 1000,
                bucket_width_ms(limit),
                check.cost,
                int(check.shadow),
            )
        client = self.client
        try:
            try:
                result = await client.execute_command(
                    "EVALSHA", CHECK_SCRIPT_SHA, len(keys), *keys, *args
                )
            except NoScriptError:
                # SCRIPT FLUSH or a restart emptied the cache: EVAL runs it and caches it again.
                result = await client.execute_command("EVAL", CHECK_SCRIPT, len(keys), *keys, *args)
        except _STORAGE_ERRORS as exc:
            raise _unavailable(exc) from exc
        return result  # type: ignore[no-any-return]

    async def peek(self, identity_tag: str, checks: Sequence[LimitCheck]) -> list[LimitState]:
        """The state of each of ``checks`` now, by the check script's arithmetic on Redis's
        clock, in one script call that writes nothing."""
        if not checks:
            return []
        keys: list[str] = []
        args: list[int] = [len(checks)]
        for check in checks:
            keys += self.keys_for(identity_tag, check)
            limit = check.limit
            args += (limit.amount, limit.period * 1000, bucket_width_ms(limit), check.cost)
        raw = await self._script(PEEK_SCRIPT, PEEK_SCRIPT_SHA, keys, args)
        return [
            LimitState(
                check,
                raw[4 * i] == 1,
                raw[4 * i + 1],
                raw[4 * i + 2] / 1000,
                raw[4 * i + 3] / 1000,
            )
            for i, check in enumerate(checks)
        ]

    async def reset(self, identity_tag: str, checks: Sequence[LimitCheck]) -> int:
        """``UNLINK`` the keys ``keys_for`` names for each of ``checks``, atomically; returns
        how many of those counters existed."""
        if not checks:
            return 0
        keys = [key for check in checks for key in self.keys_for(identity_tag, check)]
        return int(await self._script(RESET_SCRIPT, RESET_SCRIPT_SHA, keys, []))

    async def _script(self, script: str, sha: str, keys: list[str], args: list[int]) -> Any:
        """Run ``script`` by ``EVALSHA`` (``EVAL`` after ``NOSCRIPT``) on the client: the admin
        API's calls, rare, so they take no part in coalescing. Every key is of one identity,
        so a cluster client sends the call to that identity's slot."""
        client = self.client
        try:
            try:
                return await client.execute_command("EVALSHA", sha, len(keys), *keys, *args)
            except NoScriptError:
                return await client.execute_command("EVAL", script, len(keys), *keys, *args)
        except _STORAGE_ERRORS as exc:
            raise _unavailable(exc) from exc

    async def ping(self) -> bool:
        try:
            return bool(await self.client.ping())
        except _STORAGE_ERRORS as exc:
            raise _unavailable(exc) from exc

    async def aclose(self) -> None:
        if self._coalescer is not None:
            await self._coalescer.aclose()
        await self.client.aclose()

    def __repr__(self) -> str:
        return f"RedisStorage(prefix={self.prefix!r})"
