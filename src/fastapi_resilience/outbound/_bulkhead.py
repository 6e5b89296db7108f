"""Bulkheads: bound how many calls run at once, and how many may wait for a slot.

A slow upstream then ties up at most ``max_concurrent`` tasks of the app, and callers beyond
the waiting line are refused at once with ``BulkheadFullError`` (503) instead of piling up.
A :class:`TieredBulkhead` gives each rate-limit tier its own compartment, so free-tier load
cannot take the slots premium requests need.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Mapping
from datetime import timedelta
from types import TracebackType
from typing import Any, TypeVar

from fastapi_resilience._asgi.pipeline import UNLIMITED, state_of
from fastapi_resilience.clock import SYSTEM_CLOCK, Clock
from fastapi_resilience.events import EventBus, EventSource
from fastapi_resilience.exceptions import BulkheadFullError, ConfigurationError
from fastapi_resilience.outbound._deadline import to_seconds

__all__ = [
    "BULKHEAD_FULL_DETAIL",
    "BULKHEAD_WAIT_TIMEOUT_DETAIL",
    "TIER_SCOPE_KEY",
    "Bulkhead",
    "BulkheadRegistry",
    "TieredBulkhead",
    "default_bulkhead_registry",
    "get_bulkhead",
    "tier_from_scope",
]

T = TypeVar("T")

#: An ASGI scope key where a custom middleware may put the request's tier; when it is absent
#: the tier comes from the rate limiter's outcome for the request.
TIER_SCOPE_KEY = "fastapi_resilience.rate_limit_tier"

BULKHEAD_FULL_DETAIL = "Bulkhead {name!r} is full: {active} running, {waiting} waiting."
BULKHEAD_WAIT_TIMEOUT_DETAIL = "Bulkhead {name!r}: no slot freed within {timeout:g}s."

_UNSET: Any = object()


class Bulkhead(EventSource):
    """At most ``max_concurrent`` calls at once; ``max_waiting`` more may wait for a slot.

    Slots are handed over first come, first served. A call that finds every slot taken and
    the line full, or whose wait exceeds ``wait_timeout``, gets :class:`BulkheadFullError`.

    Args:
        name: registry key; also in events and errors.
        max_concurrent: calls running at once.
        max_waiting: calls allowed to wait for a slot (0: refuse at once when full).
        wait_timeout: the longest a call waits, in seconds; ``None``: no limit.
        clock: time source for the wait measurements reported in events.
        events: event bus for ``bulkhead.full`` / ``bulkhead.available``.
        registry: where to register by name (replacing a same-named one); ``None``: nowhere.

    Raises:
        ConfigurationError: an argument is out of range.

    .. versionadded:: 0.1
    """

    __slots__ = (
        "_active",
        "_saturated",
        "_waiters",
        "clock",
        "max_concurrent",
        "max_waiting",
        "name",
        "rejected",
        "wait_timeout",
    )

    def __init__(
        self,
        name: str,
        *,
        max_concurrent: int = 10,
        max_waiting: int = 0,
        wait_timeout: float | timedelta | None = None,
        clock: Clock = SYSTEM_CLOCK,
        events: EventBus | None = None,
        registry: BulkheadRegistry | None = _UNSET,
    ) -> None:
        if not name:
            raise ConfigurationError("Bulkhead name must be a non-empty string")
        wait_timeout = to_seconds(wait_timeout)
        if max_concurrent < 1:
            raise ConfigurationError(
                f"Bulkhead {name!r}: max_concurrent must be >= 1, got {max_concurrent!r}"
            )
        if max_waiting < 0:
            raise ConfigurationError(
                f"Bulkhead {name!r}: max_waiting must be >= 0, got {max_waiting!r}"
            )
        if wait_timeout is not None and (math.isnan(wait_timeout) or wait_timeout < 0):
            raise ConfigurationError(
                f"Bulkhead {name!r}: wait_timeout must be >= 0 seconds or None, "
                f"got {wait_timeout!r}"
            )
        self.name = name
        self.max_concurrent = max_concurrent
        self.max_waiting = max_waiting
        self.wait_timeout = wait_timeout
        self.clock = clock
        self._events = events
        self._active = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._saturated = False
        #: Calls refused so far.
        self.rejected = 0
        if registry is _UNSET:
            registry = default_bulkhead_registry
        if registry is not None:
            registry.register(self)

    @property
    def active(self) -> int:
        """Calls holding a slot now."""
        return self._active

    @property
    def waiting(self) -> int:
        """Calls waiting for a slot now."""
        return sum(1 for w in self._waiters if not w.done())

    async def acquire(self) -> None:
        """Take a slot, waiting in line if allowed.

        Raises:
            BulkheadFullError: no slot and the line is full, or the wait timed out.
        """
        if self._active < self.max_concurrent and not self._waiters:
            self._active += 1
            return
        if self.waiting >= self.max_waiting or self.wait_timeout == 0:
            raise self._full_error()
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            if self.wait_timeout is None:
                await waiter
            else:
                async with asyncio.timeout(self.wait_timeout):
                    await waiter
        except BaseException as exc:
            handed_over = waiter.done() and not waiter.cancelled()
            if handed_over:
                # The slot arrived just as the wait ended: give it to the next in line.
                self.release()
            else:
                waiter.cancel()
            self._discard(waiter)
            if isinstance(exc, TimeoutError):
                self.rejected += 1
                self._mark_saturated()
                self._announce_rejection()
                raise BulkheadFullError(
                    BULKHEAD_WAIT_TIMEOUT_DETAIL.format(name=self.name, timeout=self.wait_timeout),
                    extensions={"bulkhead": self.name},
                ) from exc
            raise
        # ``release`` kept ``_active`` up for us: the slot passed straight from its holder.

    def release(self) -> None:
        """Give a slot back; the longest waiter (if any) gets it at once, unless the bulkhead
        was made smaller (:meth:`resize`) and is still over its new size."""
        while self._waiters and self._active <= self.max_concurrent:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._active -= 1
        if self._saturated and self._active < self.max_concurrent:
            self._saturated = False
            self.events.emit(
                "bulkhead.available", self.name, level=logging.INFO, rejected=self.rejected
            )

    def resize(self, *, max_concurrent: int, max_waiting: int) -> None:
        """Change the limits in place; the calls running and waiting keep their places.

        A larger ``max_concurrent`` hands the new slots to the longest waiters at once; a
        smaller one lets the calls running finish and admits no new one until they are
        fewer than it. A smaller ``max_waiting`` refuses no call already waiting.

        Raises:
            ConfigurationError: a value is out of range; nothing is changed.
        """
        if max_concurrent < 1 or max_waiting < 0:
            raise ConfigurationError(
                f"Bulkhead {self.name!r}: max_concurrent must be >= 1 and max_waiting >= 0, "
                f"got {max_concurrent!r} and {max_waiting!r}"
            )
        self.max_concurrent = max_concurrent
        self.max_waiting = max_waiting
        while self._waiters and self._active < self.max_concurrent:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._active += 1
                waiter.set_result(None)

    def _discard(self, waiter: asyncio.Future[None]) -> None:
        with contextlib.suppress(ValueError):
            self._waiters.remove(waiter)

    def _full_error(self) -> BulkheadFullError:
        self.rejected += 1
        self._mark_saturated()
        self._announce_rejection()
        return BulkheadFullError(
            BULKHEAD_FULL_DETAIL.format(name=self.name, active=self._active, waiting=self.waiting),
            extensions={"bulkhead": self.name},
        )

    def _announce_rejection(self) -> None:
        # Per call, at DEBUG (a span event on the caller's span; the log skips it unless
        # asked): ``bulkhead.full`` says the bulkhead is full once.
        self.events.emit(
            "bulkhead.rejected",
            self.name,
            level=logging.DEBUG,
            active=self._active,
            waiting=self.waiting,
        )

    def _mark_saturated(self) -> None:
        if not self._saturated:
            self._saturated = True
            self.events.emit(
                "bulkhead.full",
                self.name,
                max_concurrent=self.max_concurrent,
                max_waiting=self.max_waiting,
            )

    async def __aenter__(self) -> Bulkhead:
        await self.acquire()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    async def call(self, fn: Callable[..., Awaitable[T]], /, *args: Any, **kwargs: Any) -> T:
        """``await fn(*args, **kwargs)`` holding a slot."""
        await self.acquire()
        try:
            return await fn(*args, **kwargs)
        finally:
            self.release()

    def __call__(self, fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
        """Use as a decorator on an ``async def``."""
        import functools

        @functools.wraps(fn)
        async def guarded(*args: Any, **kwargs: Any) -> T:
            return await self.call(fn, *args, **kwargs)

        return guarded

    def __repr__(self) -> str:
        return (
            f"Bulkhead({self.name!r}, active={self._active}/{self.max_concurrent}, "
            f"waiting={self.waiting}/{self.max_waiting})"
        )


def tier_from_scope(scope: Mapping[str, Any], default: str) -> str:
    """The request's rate-limit tier, or ``default``.

    ``TIER_SCOPE_KEY`` when something put a tier there (a custom middleware); otherwise the
    tier of the rate limiter's outcome for this request.
    """
    tier = scope.get(TIER_SCOPE_KEY)
    if tier is None:
        state = state_of(scope)  # type: ignore[arg-type]
        outcome = state.limit if state is not None else None
        tier = outcome.plan.tier if outcome is not None and outcome is not UNLIMITED else None
    return tier if isinstance(tier, str) and tier else default


class TieredBulkhead:
    """One :class:`Bulkhead` compartment per rate-limit tier.

    ``tiers`` maps a tier to ``(max_concurrent, max_waiting)``; a tier not listed uses the
    ``default_tier``'s compartment. Each compartment is a plain ``Bulkhead`` named
    ``"{name}:{tier}"`` (not registered on its own).

    .. code-block:: python

        search = TieredBulkhead("search", {"free": (2, 0), "premium": (20, 10)},
                                default_tier="free")
        async with search.acquire(tier): ...

    Raises:
        ConfigurationError: no tiers, a bad compartment size, or an unknown default tier.

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        name: str,
        tiers: Mapping[str, tuple[int, int]],
        *,
        default_tier: str | None = None,
        wait_timeout: float | timedelta | None = None,
        clock: Clock = SYSTEM_CLOCK,
        events: EventBus | None = None,
        registry: BulkheadRegistry | None = _UNSET,
    ) -> None:
        if not tiers:
            raise ConfigurationError(f"TieredBulkhead {name!r}: give at least one tier")
        default_tier = default_tier if default_tier is not None else next(iter(tiers))
        if default_tier not in tiers:
            raise ConfigurationError(
                f"TieredBulkhead {name!r}: default_tier {default_tier!r} is not one of "
                f"{sorted(tiers)}"
            )
        self.name = name
        self.default_tier = default_tier
        self.compartments: dict[str, Bulkhead] = {}
        for tier, sizes in tiers.items():
            try:
                max_concurrent, max_waiting = sizes
            except (TypeError, ValueError):
                raise ConfigurationError(
                    f"TieredBulkhead {name!r}: tier {tier!r} needs (max_concurrent, max_waiting),"
                    f" got {sizes!r}"
                ) from None
            self.compartments[tier] = Bulkhead(
                f"{name}:{tier}",
                max_concurrent=max_concurrent,
                max_waiting=max_waiting,
                wait_timeout=wait_timeout,
                clock=clock,
                events=events,
                registry=None,
            )
        if registry is _UNSET:
            registry = default_bulkhead_registry
        if registry is not None:
            registry.register(self)

    def for_tier(self, tier: str | None) -> Bulkhead:
        """The compartment of ``tier`` (the default tier's when unknown or ``None``)."""
        if tier is not None and tier in self.compartments:
            return self.compartments[tier]
        return self.compartments[self.default_tier]

    def for_scope(self, scope: Mapping[str, Any]) -> Bulkhead:
        """The compartment of the request's tier, as the rate limiter recorded it."""
        return self.for_tier(tier_from_scope(scope, self.default_tier))

    def acquire(self, tier: str | None) -> Bulkhead:
        """``async with tiered.acquire(tier):`` runs the block in that tier's compartment."""
        return self.for_tier(tier)

    def __iter__(self) -> Iterator[Bulkhead]:
        return iter(self.compartments.values())

    def __repr__(self) -> str:
        parts = ", ".join(
            f"{t}={b.active}/{b.max_concurrent}" for t, b in self.compartments.items()
        )
        return f"TieredBulkhead({self.name!r}, {parts})"


class BulkheadRegistry:
    """Bulkheads (plain or tiered) by name; registering a name again replaces the older one."""

    def __init__(self, *, events: EventBus | None = None) -> None:
        self._items: dict[str, Bulkhead | TieredBulkhead] = {}
        self.events = events

    def register(self, bulkhead: Bulkhead | TieredBulkhead) -> None:
        self._items[bulkhead.name] = bulkhead
        if self.events is not None:
            self._bind(bulkhead, self.events)

    def use_events(self, bus: EventBus) -> None:
        """Publish every registered bulkhead's events (and later ones') on ``bus``."""
        self.events = bus
        for item in self._items.values():
            self._bind(item, bus)

    @staticmethod
    def _bind(item: Bulkhead | TieredBulkhead, bus: EventBus) -> None:
        for compartment in item if isinstance(item, TieredBulkhead) else (item,):
            if compartment._events is None:
                compartment.events = bus

    def unregister(self, name: str) -> None:
        self._items.pop(name, None)

    def get(self, name: str) -> Bulkhead | TieredBulkhead:
        """Raises ``LookupError`` when nothing is registered under ``name``."""
        try:
            return self._items[name]
        except KeyError:
            raise LookupError(
                f"no bulkhead named {name!r} is registered (known: {sorted(self._items) or 'none'})"
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[Bulkhead | TieredBulkhead]:
        return iter(tuple(self._items.values()))

    def clear(self) -> None:
        self._items.clear()


default_bulkhead_registry = BulkheadRegistry()


def get_bulkhead(name: str, registry: BulkheadRegistry | None = None) -> Bulkhead | TieredBulkhead:
    """The registered bulkhead called ``name``.

    Raises:
        LookupError: none is registered under that name.
    """
    return (registry or default_bulkhead_registry).get(name)
