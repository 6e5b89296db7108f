"""Keeping a shared rate-limit storage's faults away from requests.

``GuardedStorage`` bounds every call by a timeout, and opens a small breaker after a few
consecutive failures: while it is open no request touches the storage (none pays a timeout),
requests are answered by an optional per-instance fallback limiter or refused with
``StorageUnavailableError`` at once, and a background probe finds out when the storage is back.
See ``adr/0011-rate-limit-storage-faults.md``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from typing import Any, TypeVar

from fastapi_resilience._limits import Limit
from fastapi_resilience.clock import SYSTEM_CLOCK, Clock
from fastapi_resilience.events import EventBus
from fastapi_resilience.exceptions import ConfigurationError
from fastapi_resilience.health._checks import CheckResult, HealthStatus
from fastapi_resilience.ratelimit._storage import (
    DEFAULT_STORAGE_TIMEOUT,
    Decision,
    IdentityStateStorage,
    LimitCheck,
    LimitState,
    RateLimitStorage,
    StorageUnavailableError,
    positive_seconds,
    supports_identity_state,
)

__all__ = [
    "STORAGE_DOWN_EVENT",
    "STORAGE_RECOVERED_EVENT",
    "GuardedStorage",
]

STORAGE_DOWN_EVENT = "rate_limit.storage_down"
STORAGE_RECOVERED_EVENT = "rate_limit.storage_recovered"
STORAGE_OPEN_MESSAGE = "rate-limit storage is down; not tried again for"
#: The identity the recovery probe counts under (a key that expires within a second).
PROBE_IDENTITY = "fastapi-resilience-probe"
_PROBE_CHECKS = (LimitCheck("probe", Limit(1_000_000_000, 1)),)

_T = TypeVar("_T")


class GuardedStorage:
    """A storage wrapper with a per-call timeout, a breaker and an optional fallback limiter.

    Closed (normal): each call gets at most ``timeout`` seconds. After ``failure_threshold``
    consecutive failures (timeouts, connection errors) the breaker opens and publishes
    ``"rate_limit.storage_down"`` once. While open, calls never reach the storage: the
    ``fallback`` storage answers them (its decisions carry ``degraded=True``), or, with no
    fallback, ``StorageUnavailableError`` is raised at once. Every ``recovery_interval`` seconds
    the first call starts one background probe check (no request waits for it); when it succeeds
    the breaker closes and ``"rate_limit.storage_recovered"`` is published once.

    Args:
        storage: the storage to guard (typically a ``RedisStorage``).
        timeout: seconds (or a ``timedelta``) one call may take (default 0.25; ``None`` is not
            accepted, since a storage that hangs would hold requests).
        failure_threshold: consecutive failures that open the breaker (default 3).
        recovery_interval: seconds between recovery probes while open (default 1.0).
        fallback: answers while the breaker is open, e.g. a ``MemoryStorage`` that limits per
            instance; ``None`` raises ``StorageUnavailableError`` instead.
        events: the bus the state changes are published on.
        clock: time source for the breaker.
        name: the storage's name in events and health checks.

    .. versionadded:: 0.1.0
    """

    def __init__(
        self,
        storage: RateLimitStorage,
        *,
        timeout: float | timedelta = DEFAULT_STORAGE_TIMEOUT,
        failure_threshold: int = 3,
        recovery_interval: float | timedelta = 1.0,
        fallback: RateLimitStorage | None = None,
        events: EventBus | None = None,
        clock: Clock = SYSTEM_CLOCK,
        name: str = "rate_limit_storage",
    ) -> None:
        timeout = positive_seconds(timeout, "storage timeout")
        recovery_interval = positive_seconds(recovery_interval, "recovery_interval")
        if failure_threshold < 1:
            raise ConfigurationError(f"failure_threshold must be >= 1, got {failure_threshold!r}")
        self.storage = storage
        self.timeout = timeout
        self.failure_threshold = failure_threshold
        self.recovery_interval = recovery_interval
        self.fallback = fallback
        self.events = events or EventBus()
        self.name = name
        self._clock = clock
        # A storage that already bounds each call by its deadline (the coalescing RedisStorage)
        # needs no second, cancelling timeout around it.
        own = getattr(storage, "call_timeout", None)
        self._bounded_by_storage = own is not None and own <= timeout
        self._failures = 0
        self._opened_at: float | None = None
        self._next_probe = 0.0
        self._probe_task: asyncio.Task[None] | None = None

    @property
    def available(self) -> bool:
        """False while the breaker is open (the storage is considered down)."""
        return self._opened_at is None

    async def check(self, identity_tag: str, checks: Sequence[LimitCheck]) -> Decision:
        if self._opened_at is not None:
            self._maybe_probe()
            return await self._degraded(identity_tag, checks, None)
        try:
            if self._bounded_by_storage:
                decision = await self.storage.check(identity_tag, checks)
            else:
                async with asyncio.timeout(self.timeout):
                    decision = await self.storage.check(identity_tag, checks)
        except (StorageUnavailableError, TimeoutError) as exc:
            self._record_failure(exc)
            return await self._degraded(identity_tag, checks, exc)
        self._failures = 0
        return decision

    @property
    def supports_identity_state(self) -> bool:
        """Whether the guarded storage can ``peek`` and ``reset`` (see ``IdentityStateStorage``)."""
        return supports_identity_state(self.storage)

    async def peek(self, identity_tag: str, checks: Sequence[LimitCheck]) -> list[LimitState]:
        """The guarded storage's ``peek``; never the fallback's, whose per-instance counts are
        not the shared ones. Raises ``StorageUnavailableError`` while the breaker is open (at
        once) or when the call fails."""
        return await self._admin_call(lambda storage: storage.peek(identity_tag, checks))

    async def reset(self, identity_tag: str, checks: Sequence[LimitCheck]) -> int:
        """The guarded storage's ``reset``, then the fallback's (if it has one) too, so that
        the identity starts afresh in the next outage as well; returns the counters removed
        from both. Raises ``StorageUnavailableError`` as ``peek`` does, with nothing reset."""
        removed = await self._admin_call(lambda storage: storage.reset(identity_tag, checks))
        fallback = self.fallback
        if fallback is not None and supports_identity_state(fallback):
            removed += await _state_of(fallback).reset(identity_tag, checks)
        return removed

    async def _admin_call(self, call: Callable[[IdentityStateStorage], Awaitable[_T]]) -> _T:
        """``call`` on the guarded storage, bounded by the timeout; a failure counts towards
        opening the breaker as a request's does, since it is the same storage failing."""
        if self._opened_at is not None:
            self._maybe_probe()
            wait = max(self._next_probe - self._clock.monotonic(), 0.0) or self.recovery_interval
            raise StorageUnavailableError(f"{STORAGE_OPEN_MESSAGE} {wait:.2f}s", retry_after=wait)
        try:
            async with asyncio.timeout(self.timeout):
                return await call(_state_of(self.storage))
        except (StorageUnavailableError, TimeoutError) as exc:
            self._record_failure(exc)
            raise StorageUnavailableError(
                f"rate-limit storage failed: {type(exc).__name__}",
                retry_after=self.recovery_interval,
            ) from exc

    async def _degraded(
        self, identity_tag: str, checks: Sequence[LimitCheck], cause: BaseException | None
    ) -> Decision:
        if self.fallback is not None:
            decision = await self.fallback.check(identity_tag, checks)
            return Decision(decision.allowed, decision.states, degraded=True)
        wait = max(self._next_probe - self._clock.monotonic(), 0.0) or self.recovery_interval
        error = StorageUnavailableError(
            f"{STORAGE_OPEN_MESSAGE} {wait:.2f}s"
            if cause is None
            else f"rate-limit storage failed: {type(cause).__name__}",
            retry_after=wait,
        )
        raise error from cause

    def _record_failure(self, exc: BaseException) -> None:
        self._failures += 1
        if self._opened_at is None and self._failures >= self.failure_threshold:
            now = self._clock.monotonic()
            self._opened_at = now
            self._next_probe = now + self.recovery_interval
            self.events.emit(
                STORAGE_DOWN_EVENT,
                self.name,
                error=type(exc).__name__,
                failures=self._failures,
                fail_open=self.fallback is not None,
            )

    def _maybe_probe(self) -> None:
        now = self._clock.monotonic()
        if self._probe_task is None and now >= self._next_probe:
            self._next_probe = now + self.recovery_interval
            self._probe_task = asyncio.get_running_loop().create_task(self._probe())

    async def _probe(self) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                # A real check, not PING: a Redis that answers PING but refuses the script
                # (out of memory, read-only replica) is still down for rate limiting.
                await self.storage.check(PROBE_IDENTITY, _PROBE_CHECKS)
            up = True
        except (StorageUnavailableError, TimeoutError):
            up = False
        finally:
            self._probe_task = None
        if up and self._opened_at is not None:
            down_for = self._clock.monotonic() - self._opened_at
            self._opened_at = None
            self._failures = 0
            self.events.emit(
                STORAGE_RECOVERED_EVENT, self.name, level=logging.INFO, down_for=round(down_for, 3)
            )

    async def probe_now(self) -> bool:
        """Probe the storage at once (tests, admin): True when it answered and is closed."""
        if self._probe_task is None:
            self._next_probe = 0.0
            self._maybe_probe()
        task = self._probe_task
        if task is not None:
            await asyncio.shield(task)
        return self.available

    async def health(self) -> CheckResult:
        """A readiness check: ``"ok"`` while the storage answers. While it is down:
        ``"degraded"`` when the fallback limiter serves requests, ``"unhealthy"`` when none
        does. Requests are then refused or let through uncounted, as the limiter's
        ``fail_open`` says: register the check ``critical`` when it fails closed, and not
        when it fails open (``HealthChecks`` reports a non-critical one ``"degraded"``), as
        ``install()`` does."""
        down: HealthStatus = "degraded" if self.fallback is not None else "unhealthy"
        if self._opened_at is not None:
            self._maybe_probe()
            down_for = self._clock.monotonic() - self._opened_at
            mode = "per-instance fallback limiter" if self.fallback is not None else "no fallback"
            return CheckResult(down, f"storage down for {down_for:.1f}s; {mode}")
        try:
            async with asyncio.timeout(self.timeout):
                await self.storage.ping()
        except (StorageUnavailableError, TimeoutError) as exc:
            self._record_failure(exc)
            return CheckResult(down, f"storage did not answer: {type(exc).__name__}")
        return CheckResult("ok")

    async def ping(self) -> bool:
        if self._opened_at is not None:
            return False
        try:
            async with asyncio.timeout(self.timeout):
                return await self.storage.ping()
        except (StorageUnavailableError, TimeoutError):
            return False

    async def aclose(self) -> None:
        task = self._probe_task
        if task is not None:
            task.cancel()
        await self.storage.aclose()
        if self.fallback is not None:
            await self.fallback.aclose()

    def __repr__(self) -> str:
        state = "closed" if self._opened_at is None else "open"
        return f"GuardedStorage({self.storage!r}, state={state!r}, timeout={self.timeout})"


def _state_of(storage: Any) -> IdentityStateStorage:
    """``storage`` as a storage with ``peek`` and ``reset``; ``NotImplementedError`` when it
    has none (callers ask ``supports_identity_state`` first)."""
    if not supports_identity_state(storage):
        raise NotImplementedError(f"{storage!r} cannot peek or reset one identity's counts")
    found: IdentityStateStorage = storage
    return found
