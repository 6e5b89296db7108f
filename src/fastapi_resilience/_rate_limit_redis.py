"""The shared rate-limit storage: Redis through ``redis.asyncio``, one round trip per check.

One Lua script decides every limit of a request, counts all of them or none, and returns what
the headers need. It runs by ``EVALSHA``; after ``SCRIPT FLUSH`` or a restart the ``NOSCRIPT``
answer is followed by one ``EVAL`` that reloads it. Time comes from the Redis server's ``TIME``,
so app processes with skewed clocks agree (``adr/0010-rate-limit-algorithm.md``).

Keys: ``<prefix>{<identity>}:<key>:<amount>-<period>s`` holds the bucket log (a list of
``bucket, count`` pairs, newest first) and the same name plus ``:n`` its total. The ``{identity}``
hash tag puts every key of one call in one Redis Cluster slot. Both keys expire when their
newest bucket leaves the window, so idle identities vanish.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError

from fastapi_resilience._rate_limit_core import (
    DEFAULT_STORAGE_TIMEOUT,
    Decision,
    LimitCheck,
    LimitState,
    StorageUnavailableError,
    bucket_width_ms,
)
from fastapi_resilience.exceptions import ConfigurationError

__all__ = ["CHECK_SCRIPT", "CHECK_SCRIPT_SHA", "RedisStorage"]

# KEYS: per check, the log list and its total. ARGV[1]: the number of checks; then per check:
# amount, period_ms, width_ms, cost, shadow (1/0). Returns {allowed, then per check: fits,
# remaining, reset_ms, retry_ms}. All arithmetic is in whole milliseconds, so it is exact.
CHECK_SCRIPT = """
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
CHECK_SCRIPT_SHA = hashlib.sha1(CHECK_SCRIPT.encode()).hexdigest()


def _connection_errors() -> tuple[type[BaseException], ...]:
    return (RedisError, OSError, TimeoutError)


_STORAGE_ERRORS = _connection_errors()


class RedisStorage:
    """Counts in Redis, shared by every app process that uses the same server and prefix.

    Args:
        client: a ``redis.asyncio.Redis``; build one with short timeouts through ``from_url``.
        prefix: the start of every key this storage writes.

    Raises ``StorageUnavailableError`` (from ``check`` and ``ping``) when Redis is unreachable,
    answers with an error, or does not answer within the client's socket timeout.

    .. versionadded:: 0.1.0
    """

    def __init__(self, client: Redis, *, prefix: str = "rl:") -> None:
        self.client = client
        self.prefix = prefix
        self._args: dict[tuple[int, int, int, bool], tuple[bytes, ...]] = {}

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str = "rl:",
        timeout: float = DEFAULT_STORAGE_TIMEOUT,
        **client_options: Any,
    ) -> RedisStorage:
        """A storage on a new client with ``timeout`` seconds to connect and to read.

        A failed command is retried once on a fresh connection only when the connection was
        refused or broken (a pooled connection left over from before a Redis restart), never
        after a timeout, so one call never waits much longer than ``timeout``.
        """
        if timeout <= 0:
            raise ConfigurationError(f"storage timeout must be > 0 seconds, got {timeout!r}")
        options: dict[str, Any] = {
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "retry": Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
            # No CLIENT SETINFO on each new connection: one round trip less, nothing but EVALSHA.
            "driver_info": None,
        }
        options.update(client_options)
        return cls(Redis.from_url(url, **options), prefix=prefix)

    def _check_args(self, check: LimitCheck) -> tuple[bytes, ...]:
        limit = check.limit
        cache_key = (limit.amount, limit.period, check.cost, check.shadow)
        args = self._args.get(cache_key)
        if args is None:
            args = self._args[cache_key] = (
                b"%d" % limit.amount,
                b"%d" % (limit.period * 1000),
                b"%d" % bucket_width_ms(limit),
                b"%d" % check.cost,
                b"1" if check.shadow else b"0",
            )
        return args

    def keys_for(self, identity_tag: str, check: LimitCheck) -> tuple[str, str]:
        """The log and total keys of ``check`` for ``identity_tag`` (for operators and tests)."""
        limit = check.limit
        log = f"{self.prefix}{{{identity_tag}}}:{check.key}:{limit.amount}-{limit.period}s"
        return log, log + ":n"

    async def check(self, identity_tag: str, checks: Sequence[LimitCheck]) -> Decision:
        tag = f"{self.prefix}{{{identity_tag}}}:"
        keys: list[str] = []
        args: list[bytes | int] = [len(checks)]
        for check in checks:
            limit = check.limit
            log = f"{tag}{check.key}:{limit.amount}-{limit.period}s"
            keys.append(log)
            keys.append(log + ":n")
            args.extend(self._check_args(check))
        raw = await self._run(keys, args)
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

    async def _run(self, keys: list[str], args: list[bytes | int]) -> list[int]:
        client = self.client
        try:
            try:
                result = await client.execute_command(  # type: ignore[no-untyped-call]
                    "EVALSHA", CHECK_SCRIPT_SHA, len(keys), *keys, *args
                )
            except NoScriptError:
                # SCRIPT FLUSH or a restart emptied the cache: EVAL runs it and caches it again.
                result = await client.execute_command(  # type: ignore[no-untyped-call]
                    "EVAL", CHECK_SCRIPT, len(keys), *keys, *args
                )
        except _STORAGE_ERRORS as exc:
            raise StorageUnavailableError(
                f"redis rate-limit storage unavailable: {type(exc).__name__}"
            ) from exc
        return result  # type: ignore[no-any-return]

    async def ping(self) -> bool:
        try:
            return bool(await self.client.ping())
        except _STORAGE_ERRORS as exc:
            raise StorageUnavailableError(
                f"redis rate-limit storage unavailable: {type(exc).__name__}"
            ) from exc

    async def aclose(self) -> None:
        await self.client.aclose()

    def __repr__(self) -> str:
        return f"RedisStorage(prefix={self.prefix!r})"
