"""Shared circuit-breaker state in Redis: every instance of an app sees one breaker per name.

One Redis hash per breaker (``state``, ``until`` in Redis milliseconds, ``failures``,
``trials``, ``successes``, ``trips``), changed only by small Lua scripts, so each change is
atomic and timed by Redis' own clock. See ADR 0022 for the consistency this gives.

- Closed: calls never wait for Redis. Failures are sent in the background and counted
  across instances; the script that sees the threshold reached opens the shared breaker.
  Each instance refreshes its view in the background at most every ``refresh_interval``.
- Half-open: trial permits are granted by Redis, so ``half_open_max_calls`` holds across
  all instances together; trial results close or reopen the shared breaker.
- Redis down or slow: the breaker falls back to its local state machine, publishes
  ``breaker.store_unavailable`` once, and ``breaker.store_recovered`` when Redis answers again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any

from fastapi_resilience._optional import redis_from_url
from fastapi_resilience.exceptions import ConfigurationError
from fastapi_resilience.outbound._breaker import (
    CLOSED,
    OPEN,
    BreakerState,
    CircuitBreaker,
    TrialVerdict,
)

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.cluster import RedisCluster

__all__ = ["RedisBreakerStore"]

# Every script answers {state, ms left open, failures[, verdict]} so the caller can adopt.
_PRELUDE = """
local key = KEYS[1]
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local h = redis.call('HMGET', key, 'state', 'until', 'failures', 'trials', 'successes', 'trips')
local state = h[1] or 'closed'
local untl = tonumber(h[2] or '0')
local failures = tonumber(h[3] or '0')
local trials = tonumber(h[4] or '0')
local successes = tonumber(h[5] or '0')
local trips = tonumber(h[6] or '0')
local ttl = tonumber(ARGV[1])
local function left() if state == 'open' then return math.max(0, untl - now) end return 0 end
local function save()
  redis.call('HSET', key, 'state', state, 'until', untl, 'failures', failures,
             'trials', trials, 'successes', successes, 'trips', trips, 'trial_at', now)
  redis.call('PEXPIRE', key, ttl)
end
local function open_for(ms)
  state = 'open'; untl = now + ms; failures = 0; trials = 0; successes = 0
end
"""

_READ = (
    _PRELUDE
    + """
if state == 'open' and now >= untl then state = 'half_open' end
return {state, left(), failures}
"""
)

# ARGV: ttl, threshold (0 = off), open ms
_FAILURE = (
    _PRELUDE
    + """
if state == 'closed' then
  failures = failures + 1
  local threshold = tonumber(ARGV[2])
  if threshold > 0 and failures >= threshold then open_for(tonumber(ARGV[3])); trips = 0 end
  save()
end
if state == 'open' and now >= untl then state = 'half_open' end
return {state, left(), failures}
"""
)

_SUCCESS = (
    _PRELUDE
    + """
if state == 'closed' and failures > 0 then failures = 0; save() end
return {state, left(), failures}
"""
)

# ARGV: ttl, open ms (-1 = close), grow (1 = count a trip)
_SET = (
    _PRELUDE
    + """
local ms = tonumber(ARGV[2])
if ms >= 0 then
  open_for(ms)
  if ARGV[3] == '1' then trips = trips + 1 end
else
  state = 'closed'; failures = 0; trials = 0; successes = 0; trips = 0
end
save()
return {state, left(), failures}
"""
)

# ARGV: ttl, max trials, stale trial ms
_TRIAL = (
    _PRELUDE
    + """
if state == 'closed' then return {state, 0, failures, 'closed'} end
if state == 'open' then
  if now < untl then return {state, left(), failures, 'open'} end
  state = 'half_open'; trials = 0; successes = 0
end
local last = tonumber(redis.call('HGET', key, 'trial_at') or '0')
if trials >= tonumber(ARGV[2]) and now - last > tonumber(ARGV[3]) then
  -- the instance running the trials died mid-call: free their permits
  trials = 0
end
if trials >= tonumber(ARGV[2]) then return {state, 0, failures, 'full'} end
trials = trials + 1
save()
return {state, 0, failures, 'granted'}
"""
)

# ARGV: ttl, outcome ('success' | 'failure' | 'ignored'), success threshold, base ms, max ms
_TRIAL_RESULT = (
    _PRELUDE
    + """
if state ~= 'half_open' and not (state == 'open' and now >= untl) then
  return {state, left(), failures}
end
state = 'half_open'
if trials > 0 then trials = trials - 1 end
local outcome = ARGV[2]
if outcome == 'success' then
  successes = successes + 1
  if successes >= tonumber(ARGV[3]) then
    state = 'closed'; failures = 0; trials = 0; successes = 0; trips = 0
  end
elseif outcome == 'failure' then
  trips = trips + 1
  local ms = tonumber(ARGV[4])
  local cap = tonumber(ARGV[5])
  if cap > 0 then ms = math.min(cap, ms * (2 ^ trips)) end
  open_for(ms)
end
save()
return {state, left(), failures}
"""
)


# When ``_run`` adopts the shared state it read.
_ALWAYS, _IF_UNCHANGED, _NEVER = "always", "if_unchanged", "never"


def _decode(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisBreakerStore:
    """Keeps breakers' state in Redis so that all instances of an app share it.

    One store serves any number of breakers (one hash each, under ``prefix + name``). Every
    script touches that one key, so a Redis Cluster serves it as well (``from_url`` with
    ``redis+cluster://host:port[,host:port...]``, or a ``RedisCluster`` client).

    .. code-block:: python

        store = RedisBreakerStore(redis.asyncio.Redis.from_url(url))
        inventory = CircuitBreaker("inventory", state_store=store)

    Args:
        client: a ``redis.asyncio.Redis`` or ``redis.asyncio.cluster.RedisCluster`` client.
        prefix: key prefix.
        refresh_interval: at most this often (seconds) a closed breaker fetches the shared
            state in the background; its calls never wait for it.
        timeout: the longest any Redis call may take before the breaker decides locally.
        retry_interval: after Redis failed, how long to decide locally before trying again.
        stale_trial: seconds after which trial permits held by a vanished instance are freed.
        key_ttl: seconds a breaker's hash lives after its last change.

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        client: Redis | RedisCluster,
        *,
        prefix: str = "fastapi_resilience:breaker:",
        refresh_interval: float = 0.1,
        timeout: float = 0.25,
        retry_interval: float = 1.0,
        stale_trial: float = 60.0,
        key_ttl: float = 7 * 24 * 3600,
    ) -> None:
        for argument, value in (
            ("refresh_interval", refresh_interval),
            ("retry_interval", retry_interval),
            ("stale_trial", stale_trial),
        ):
            if value < 0:
                raise ConfigurationError(f"RedisBreakerStore {argument} must be >= 0 seconds")
        if timeout <= 0 or key_ttl <= 0:
            raise ConfigurationError("RedisBreakerStore timeout and key_ttl must be > 0 seconds")
        self.client = client
        self.prefix = prefix
        self.refresh_interval = refresh_interval
        self.timeout = timeout
        self.retry_interval = retry_interval
        self.stale_trial_ms = int(stale_trial * 1000)
        self.ttl_ms = int(key_ttl * 1000)
        self._scripts = {
            name: client.register_script(body)
            for name, body in (
                ("read", _READ),
                ("failure", _FAILURE),
                ("success", _SUCCESS),
                ("set", _SET),
                ("trial", _TRIAL),
                ("trial_result", _TRIAL_RESULT),
            )
        }
        self._last_refresh: dict[str, float] = {}
        self._refreshing: set[str] = set()
        self._remote_failures: dict[str, int] = {}
        self._down_since: float | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._orphans: set[asyncio.Future[Any]] = set()
        self._owns_client = False

    @classmethod
    def from_url(cls, url: str, **options: Any) -> RedisBreakerStore:
        """A store on a new client for ``url`` (``redis://``, ``rediss://``, ``unix://``,
        ``redis+cluster://`` or ``rediss+cluster://``), closed by ``aclose``; ``options`` are
        the constructor's.

        Raises:
            ConfigurationError: ``url`` is not a Redis URL, or the ``redis`` extra is missing.

        .. versionadded:: 0.2
        """
        store = cls(redis_from_url(url, "RedisBreakerStore url"), **options)
        store._owns_client = True
        return store

    @property
    def available(self) -> bool:
        """``False`` while Redis is considered down (breakers decide locally)."""
        return self._down_since is None

    # -- the BreakerStateStore protocol ----------------------------------------------------

    def attach(self, breaker: CircuitBreaker) -> None:
        self._last_refresh[breaker.name] = float("-inf")

    def before_call(self, breaker: CircuitBreaker) -> None:
        name = breaker.name
        now = breaker.clock.monotonic()
        if (
            name in self._refreshing
            or now - self._last_refresh.get(name, 0) < self.refresh_interval
        ):
            return
        if not self._may_try(breaker):
            return
        self._last_refresh[name] = now
        self._refreshing.add(name)
        # The read is made now, so its answer is judged against the state as of now.
        self._spawn(self._refresh_task(breaker, self._run(breaker, "read", adopt=_IF_UNCHANGED)))

    def on_local_failure(self, breaker: CircuitBreaker) -> None:
        if not self._may_try(breaker):
            return
        threshold = breaker.failure_threshold or 0
        self._spawn(
            self._run(
                breaker, "failure", threshold, _ms(breaker.recovery_timeout), adopt=_IF_UNCHANGED
            )
        )

    def on_local_success(self, breaker: CircuitBreaker) -> None:
        # Only worth a round trip when Redis counted failures we have seen.
        if self._remote_failures.get(breaker.name, 0) and self._may_try(breaker):
            self._remote_failures[breaker.name] = 0
            self._spawn(self._run(breaker, "success", adopt=_NEVER))

    def on_transition(self, breaker: CircuitBreaker, old: BreakerState, new: BreakerState) -> None:
        # Local decisions made while Redis answers are pushed; half-open needs no push
        # (Redis derives it from ``until``).
        if not self._may_try(breaker):
            return
        if new == OPEN:
            grow = "1" if old != CLOSED and breaker.max_recovery_timeout is not None else "0"
            self._spawn(self._run(breaker, "set", _ms(breaker.open_duration), grow, adopt=_NEVER))
        elif new == CLOSED:
            self._spawn(self._run(breaker, "set", -1, "0", adopt=_NEVER))

    async def acquire_trial(self, breaker: CircuitBreaker) -> TrialVerdict:
        if not self._may_try(breaker):
            return "local"
        reply = await self._run(
            breaker, "trial", breaker.half_open_max_calls, self.stale_trial_ms, adopt=_ALWAYS
        )
        if reply is None:
            return "local"
        verdict = _decode(reply[3])
        if verdict in ("granted", "full", "open", "closed"):
            return verdict  # type: ignore[return-value]
        return "local"  # pragma: no cover - the script answers one of the above

    async def trial_result(self, breaker: CircuitBreaker, failure: bool | None) -> None:
        outcome = "ignored" if failure is None else "failure" if failure else "success"
        await self._run(
            breaker,
            "trial_result",
            outcome,
            breaker.success_threshold,
            _ms(breaker.recovery_timeout),
            _ms(breaker.max_recovery_timeout or 0),
            adopt=_ALWAYS,
        )

    # -- explicit use ------------------------------------------------------------------

    async def refresh(self, breaker: CircuitBreaker) -> None:
        """Fetch the shared state now and adopt it (the background refresh, awaited)."""
        self._last_refresh[breaker.name] = breaker.clock.monotonic()
        await self._run(breaker, "read", adopt=_IF_UNCHANGED)

    async def flush(self) -> None:
        """Wait for every background Redis call started so far (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*tuple(self._tasks), return_exceptions=True)

    # -- plumbing ----------------------------------------------------------------------

    async def _refresh_task(self, breaker: CircuitBreaker, read: Coroutine[Any, Any, Any]) -> None:
        try:
            await read
        finally:
            self._refreshing.discard(breaker.name)

    def _may_try(self, breaker: CircuitBreaker) -> bool:
        if self._down_since is None:
            return True
        return breaker.clock.monotonic() - self._down_since >= self.retry_interval

    def _run(
        self, breaker: CircuitBreaker, script: str, *args: Any, adopt: str
    ) -> Coroutine[Any, Any, Any]:
        """Run one script and maybe adopt its answer; on any Redis failure, fall back to local.

        A background answer is adopted only if the breaker did not change state since the
        call was *made* (not since its task started): an older read must not undo a newer
        local decision (the next refresh reconciles). Trial answers are the shared decision
        itself and are always adopted.
        """
        return self._execute(breaker, script, args, adopt, breaker.generation)

    async def _execute(
        self,
        breaker: CircuitBreaker,
        script: str,
        args: tuple[Any, ...],
        adopt: str,
        generation: int,
    ) -> Any:
        try:
            reply = await self._bounded(
                self._scripts[script](keys=[self.prefix + breaker.name], args=[self.ttl_ms, *args])
            )
        except Exception as exc:  # redis errors, timeouts, closed connections
            self._mark_down(breaker, exc)
            return None
        self._mark_up(breaker)
        state, left_ms, failures = _decode(reply[0]), int(reply[1]), int(reply[2])
        self._remote_failures[breaker.name] = failures
        if adopt == _ALWAYS or (adopt == _IF_UNCHANGED and generation == breaker.generation):
            breaker.adopt(state, left_ms / 1000)
        return reply

    async def _bounded(self, call: Awaitable[Any]) -> Any:
        """Await ``call`` for at most ``timeout`` seconds, whatever the client does.

        ``asyncio.timeout`` alone is not enough: when a stalled server makes redis-py open new
        connections, its own timeouts and retries can swallow the cancellation and hold the
        caller for seconds. The call runs in its own task; on time-out it is cancelled and
        left to finish on its own while the caller moves on.
        """
        task = asyncio.ensure_future(call)
        done, _ = await asyncio.wait((task,), timeout=self.timeout)
        if done:
            return task.result()
        task.cancel()
        self._orphans.add(task)
        task.add_done_callback(_forget(self._orphans))
        raise TimeoutError(f"Redis did not answer within {self.timeout:g}s")

    async def aclose(self) -> None:
        """Wait for background calls, then for abandoned (cancelled) ones to wind down; close
        the client ``from_url`` made."""
        await self.flush()
        if self._orphans:
            await asyncio.wait(tuple(self._orphans))
        if self._owns_client:
            await self.client.aclose()

    def _mark_down(self, breaker: CircuitBreaker, exc: BaseException) -> None:
        first = self._down_since is None
        self._down_since = breaker.clock.monotonic()
        if first:
            breaker.events.emit(
                "breaker.store_unavailable",
                breaker.name,
                level=logging.ERROR,
                error=type(exc).__name__,
                fallback="local state",
            )

    def _mark_up(self, breaker: CircuitBreaker) -> None:
        if self._down_since is not None:
            self._down_since = None
            breaker.events.emit("breaker.store_recovered", breaker.name, level=logging.INFO)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        try:
            task = asyncio.get_running_loop().create_task(coro)
        except RuntimeError:  # no running loop (a sync record_failure at start-up)
            coro.close()
            return
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def __repr__(self) -> str:
        return f"RedisBreakerStore(prefix={self.prefix!r}, available={self.available})"


def _forget(pending: set[asyncio.Future[Any]]) -> Callable[[asyncio.Future[Any]], None]:
    def done(task: asyncio.Future[Any]) -> None:
        pending.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved, so asyncio does not log "never retrieved"

    return done


def _ms(seconds: float) -> int:
    return max(0, round(seconds * 1000))
