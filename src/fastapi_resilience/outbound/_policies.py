"""Named outbound policies: ``policy("inventory")``, its guards built from the app's settings.

The settings (``ResilienceSettings.policies``) say what each dependency's breaker, retry,
timeout, bulkhead and cache are; ``install()`` builds the guards and hands them to the one
:class:`Policy` object of each name. Code uses a policy by name, before or after that:

    inventory = policy("inventory")
    await inventory.call(fetch_stock, sku)            # or Depends(policy("inventory"))

A call takes the guards in force when it starts and keeps them to its end. A change (the admin
API's ``PUT .../policies/{name}``) builds the next set and swaps it in one assignment: the
breaker and the bulkhead are changed in place, so their state and counts carry on.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import os
import sys
import sysconfig
from collections.abc import Awaitable, Callable, Generator, Iterator, Mapping
from dataclasses import dataclass
from types import FrameType
from typing import Any, ParamSpec, TypeVar, overload

from pydantic import ValidationError

from fastapi_resilience._policy_settings import (
    PRESETS,
    PolicySettings,
    deep_merge,
    error_path,
)
from fastapi_resilience.clock import SYSTEM_CLOCK, Clock
from fastapi_resilience.events import FALLBACK_EVENTS, EventBus
from fastapi_resilience.exceptions import ConfigurationError, InvalidInputError, NotFoundError
from fastapi_resilience.outbound._breaker import BreakerRegistry, CircuitBreaker, default_registry
from fastapi_resilience.outbound._bulkhead import (
    Bulkhead,
    BulkheadRegistry,
    default_bulkhead_registry,
)
from fastapi_resilience.outbound._deadline import timeout
from fastapi_resilience.outbound._response_cache import CacheResult, ResponseCache
from fastapi_resilience.outbound._retry import Retry
from fastapi_resilience.outbound._retry_budget import RetryBudget

__all__ = [
    "POLICY_CHANGED",
    "POLICY_CHANGE_REJECTED",
    "Policy",
    "PolicyGuards",
    "PolicyTable",
    "default_policies",
    "policy",
]

P = ParamSpec("P")
T = TypeVar("T")

#: Published for every change of a policy: ``client`` (who) and ``changes`` (what).
POLICY_CHANGED = "policy.changed"
#: Published for a change refused: ``client`` and ``reason``; the old policy stays in force.
POLICY_CHANGE_REJECTED = "policy.change_rejected"

#: The use sites remembered per policy, for the start-up error (a call in a loop is one site).
_MAX_SITES = 8


@dataclass(frozen=True, slots=True)
class PolicyGuards:
    """The guards of one policy at one moment; a call keeps the set it started with.

    One attempt goes through, outermost first: retry (under its budget) -> breaker ->
    bulkhead -> timeout -> the function, the order of ``ResilientTransport``. ``cache`` is
    ``None`` while the policy's ``cache.ttl`` is 0.
    """

    settings: PolicySettings
    breaker: CircuitBreaker
    #: ``None`` with ``retry.attempts`` 1: the error of the one attempt is the call's.
    retry: Retry | None
    bulkhead: Bulkhead
    timeout: float
    cache: ResponseCache | None
    #: The retry budget, kept across changes (so is its count of recent calls).
    budget: RetryBudget

    async def run(
        self, fn: Callable[..., Awaitable[T]], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> T:
        """``await fn(*args, **kwargs)`` through every guard."""
        if self.retry is None:
            return await self._attempt(fn, args, kwargs)
        return await self.retry.call(self._attempt, fn, args, kwargs)

    async def _attempt(
        self, fn: Callable[..., Awaitable[T]], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> T:
        return await self.breaker.call(self._held, fn, args, kwargs)

    async def _held(
        self, fn: Callable[..., Awaitable[T]], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> T:
        async with self.bulkhead, timeout(self.timeout):
            return await fn(*args, **kwargs)


class Policy:
    """The named policy ``policy(name)`` returns: one object per name, for the process.

    - ``await inventory.call(fn, *args, **kwargs)`` runs ``fn`` through the policy's guards.
    - ``@policy("inventory")`` on an ``async def`` runs every call of it so.
    - ``Depends(policy("inventory"))`` hands the route this object (annotate it ``Policy``).
    - ``resilient_client(url, policy="inventory")`` guards each request with it.

    Its guards come from the app's settings when ``install()`` runs; a name the settings do
    not declare stops the app's start-up, naming where it was used.
    """

    def __init__(self, name: str, table: PolicyTable) -> None:
        self.name = name
        self._table = table
        self._guards: PolicyGuards | None = None
        #: ``file:line`` -> what used it there (``""``: asked for it by name).
        self._sites: dict[str, str] = {}
        # FastAPI reads a dependency's parameters from its signature: this one takes none
        # (``__call__``'s optional function is for the decorator form).
        self.__signature__ = inspect.Signature()

    # -- reading -----------------------------------------------------------------------

    def guards(self) -> PolicyGuards:
        """The guards in force now.

        Raises:
            ConfigurationError: ``install()`` has not run, or its settings do not declare
                this policy.
        """
        guards = self._guards
        return guards if guards is not None else self._table._guards_of(self)

    @property
    def settings(self) -> PolicySettings:
        """The settings in force."""
        return self.guards().settings

    @property
    def breaker(self) -> CircuitBreaker:
        """The policy's breaker, registered under the policy's name."""
        return self.guards().breaker

    @property
    def bulkhead(self) -> Bulkhead:
        """The policy's bulkhead, registered under the policy's name."""
        return self.guards().bulkhead

    @property
    def used_at(self) -> list[str]:
        """Where code asked for this policy (``file:line``, the first few)."""
        return [f"{site}{what}" for site, what in self._sites.items()]

    # -- calling -----------------------------------------------------------------------

    async def call(self, fn: Callable[..., Awaitable[T]], /, *args: Any, **kwargs: Any) -> T:
        """``await fn(*args, **kwargs)`` through the policy's timeout, bulkhead, breaker and
        retry.

        Raises:
            CircuitOpenError: the breaker is open (``fn`` was not called).
            BulkheadFullError: every slot is taken and the line is full.
            UpstreamTimeoutError: an attempt ran out of time (and retries did not help).
            RetryExhaustedError: every attempt failed; the last error is chained.
        """
        guards = self._guards
        if guards is None:
            guards = self._table._guards_of(self)
        return await guards.run(fn, args, kwargs)

    async def cached(
        self, key: str, fn: Callable[..., Awaitable[T]], /, *args: Any, **kwargs: Any
    ) -> CacheResult[T]:
        """Like :meth:`call`, through the policy's response cache under ``key``: a fresh entry
        answers without a call, a failure is answered from a stale one within ``stale_ttl``.
        With ``cache.ttl`` 0 (the presets' value) every call is made (``status`` ``"miss"``).
        """
        guards = self.guards()
        run = functools.partial(guards.run, fn, args, kwargs)
        if guards.cache is None:
            return CacheResult(await run(), "miss", cache_name=self.name)
        return await guards.cache.call(key, run)

    @overload
    def __call__(self) -> Policy: ...

    @overload
    def __call__(self, fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]: ...

    def __call__(self, fn: Callable[P, Awaitable[T]] | None = None) -> Any:
        """The decorator (given a function), or the dependency (given nothing): then this
        object, which FastAPI awaits (see ``__await__``)."""
        if fn is None:
            return self
        if not inspect.iscoroutinefunction(fn):
            raise ConfigurationError(
                f"@policy({self.name!r}) decorates an async function, got {fn!r}"
            )
        self._used(_site_of(fn), f" (decorating {fn.__qualname__})")

        @functools.wraps(fn)
        async def guarded(*args: P.args, **kwargs: P.kwargs) -> T:
            return await self.call(fn, *args, **kwargs)

        return guarded

    def __await__(self) -> Generator[Any, None, Policy]:
        """Awaiting the policy checks it is in force and gives it back: the dependency form."""
        return self._in_force().__await__()

    async def _in_force(self) -> Policy:
        self.guards()
        return self

    def _used(self, site: str, what: str = "") -> None:
        if (site in self._sites and what) or len(self._sites) < _MAX_SITES:
            self._sites[site] = what or self._sites.get(site, "")

    def __repr__(self) -> str:
        state = "unbuilt" if self._guards is None else self._guards.breaker.state
        return f"Policy({self.name!r}, {state})"


def _mark_awaited(method: Callable[..., Any]) -> None:
    """Mark ``method`` as one whose result is awaited, so FastAPI awaits the dependency on the
    event loop instead of calling it in a worker thread (it returns the awaitable policy)."""
    if hasattr(inspect, "markcoroutinefunction"):  # Python 3.12+
        inspect.markcoroutinefunction(method)
    # asyncio.iscoroutinefunction, which FastAPI reads before Python 3.13, knows this marker.
    marker = getattr(asyncio.coroutines, "_is_coroutine", None)
    if marker is not None:
        method._is_coroutine = marker  # type: ignore[attr-defined]


_mark_awaited(Policy.__call__)


class PolicyTable:
    """The named policies of the process: one :class:`Policy` per name, and the settings
    ``install()`` declared (:meth:`configure`). One app's declarations are in force at a time.

    Args:
        breakers, bulkheads: where each policy's breaker and bulkhead register, under the
            policy's name (default: the registries the admin API and degraded mode read).
    """

    def __init__(
        self,
        *,
        breakers: BreakerRegistry | None = None,
        bulkheads: BulkheadRegistry | None = None,
    ) -> None:
        self._policies: dict[str, Policy] = {}
        #: ``None`` until an app's settings declared policies.
        self._declared: dict[str, PolicySettings] | None = None
        self._clock: Clock = SYSTEM_CLOCK
        self._events: EventBus | None = None
        self._breakers = breakers if breakers is not None else default_registry
        self._bulkheads = bulkheads if bulkheads is not None else default_bulkhead_registry

    def get(self, name: str, *, used_at: str | None = None, used_by: str = "") -> Policy:
        """The policy called ``name``, made on first use; ``used_at`` (``file:line``) and
        ``used_by`` say where and what asked for it, for the start-up error."""
        found = self._policies.get(name)
        if found is None:
            if not isinstance(name, str) or not name:
                raise ConfigurationError(f"a policy's name is a non-empty string, got {name!r}")
            found = self._policies[name] = Policy(name, self)
        if used_at is not None:
            found._used(used_at, used_by)
        return found

    @property
    def events(self) -> EventBus:
        return self._events if self._events is not None else FALLBACK_EVENTS

    def configure(
        self,
        declared: Mapping[str, PolicySettings],
        *,
        clock: Clock = SYSTEM_CLOCK,
        events: EventBus | None = None,
    ) -> None:
        """Build every declared policy's guards afresh (new breakers, closed), replacing the
        declarations before; a policy no longer declared has no guards until it is again."""
        self._declared = dict(declared)
        self._clock = clock
        self._events = events
        for name in declared:
            self.get(name)
        for name, found in self._policies.items():
            settings = self._declared.get(name)
            found._guards = None if settings is None else self._build(name, settings)

    def declared(self) -> dict[str, PolicySettings]:
        """The settings in force of every declared policy, by name."""
        return {name: self._guards_of(self._policies[name]).settings for name in self.names()}

    def names(self) -> list[str]:
        """The declared policies' names, sorted."""
        return sorted(self._declared or {})

    def __iter__(self) -> Iterator[Policy]:
        return iter(tuple(self._policies.values()))

    def __contains__(self, name: object) -> bool:
        return name in self._policies

    def forget(self, name: str) -> None:
        """Drop the policy called ``name`` and its declaration (its guards stay registered)."""
        self._policies.pop(name, None)
        if self._declared is not None:
            self._declared.pop(name, None)

    def check_used(self) -> None:
        """Refuse a policy that code asked for by a name the settings do not declare.

        Raises:
            ConfigurationError: naming each such policy and where it was used.
        """
        declared = self._declared or {}
        missing = [p for p in self._policies.values() if p._sites and p.name not in declared]
        if not missing:
            return
        lines = [
            f"policy {p.name!r} is used at {', '.join(p.used_at)} but not declared: set "
            f"{_env_example(p.name)} or add a [{p.name}] table to policies_file"
            for p in missing
        ]
        known = ", ".join(sorted(declared)) or "none"
        raise ConfigurationError(
            "unknown outbound polic"
            + ("ies" if len(lines) > 1 else "y")
            + ":\n  "
            + "\n  ".join(lines)
            + f"\n  (declared: {known})"
        )

    # -- changing ----------------------------------------------------------------------

    def change(self, name: str, changes: Mapping[str, Any], *, by: str = "code") -> PolicySettings:
        """Lay ``changes`` (a table of the file's shape) over the policy in force and swap the
        result in. A ``criticality`` in ``changes`` starts from that preset instead.

        Calls in flight finish under the guards they started with; the breaker and the
        bulkhead are changed in place, their state and counts kept. Publishes
        ``policy.changed`` (or ``policy.change_rejected``), naming ``by``.

        Raises:
            NotFoundError: no policy of that name is declared.
            InvalidInputError: ``changes`` is not valid; ``errors`` names each field. The
                policy in force is left as it was.
        """
        if name not in (self._declared or {}):
            self.events.emit(POLICY_CHANGE_REJECTED, name, client=by, reason="not declared")
            raise NotFoundError(f"No policy named {name!r} is declared.")
        found = self._policies[name]
        old = self._guards_of(found)
        try:
            settings = _changed_settings(old.settings, changes)
        except InvalidInputError as exc:
            errors = exc.extensions.get("errors", [])
            reason = "; ".join(f"{e['field']}: {e['msg']}" for e in errors) or exc.detail
            self.events.emit(POLICY_CHANGE_REJECTED, name, client=by, reason=reason)
            raise
        guards = self._build(name, settings, previous=old)
        # One assignment: a call reads the guards once, before this or after it.
        found._guards = guards
        assert self._declared is not None
        self._declared[name] = settings
        self.events.emit(
            POLICY_CHANGED,
            name,
            client=by,
            changes=_differences(old.settings, settings),
        )
        return settings

    # -- building ----------------------------------------------------------------------

    def _guards_of(self, found: Policy) -> PolicyGuards:
        guards = found._guards
        if guards is not None:
            return guards
        if self._declared is None:
            raise ConfigurationError(
                f"policy {found.name!r} was used before install() read the settings that "
                "declare it: call install(app, settings) first"
            )
        settings = self._declared.get(found.name)
        if settings is None:
            self.check_used()  # names where it was used
            raise ConfigurationError(
                f"policy {found.name!r} is not declared: set {_env_example(found.name)} or "
                f"add a [{found.name}] table to policies_file"
            )
        guards = found._guards = self._build(found.name, settings)
        return guards

    def _build(
        self, name: str, settings: PolicySettings, *, previous: PolicyGuards | None = None
    ) -> PolicyGuards:
        """The guards of ``settings``; with ``previous``, its breaker, bulkhead, budget and
        cache carry on, changed in place (after everything new was built, so a failure
        leaves ``previous`` as it was)."""
        clock, events = self._clock, self._events
        s = settings
        budget = (
            previous.budget
            if previous is not None
            else RetryBudget(ratio=s.retry.budget, name=name, clock=clock, events=events)
        )
        retry = None
        if s.retry.attempts > 1:
            retry = Retry(
                s.retry.attempts,
                base_delay=s.retry.base_delay,
                max_delay=s.retry.max_delay,
                budget=budget,
                name=name,
                clock=clock,
                events=events,
            )
        cache = previous.cache if previous is not None else None
        if s.cache.ttl <= 0:
            cache = None
        elif cache is None:
            cache = ResponseCache(
                ttl=s.cache.ttl, stale_ttl=s.cache.stale_ttl, name=name, clock=clock, events=events
            )
        if previous is None:
            breaker = CircuitBreaker(
                name,
                failure_threshold=s.breaker.failure_threshold,
                recovery_timeout=s.breaker.recovery_timeout,
                half_open_max_calls=s.breaker.half_open_max_calls,
                success_threshold=s.breaker.success_threshold,
                clock=clock,
                events=events,
                registry=self._breakers,
            )
            bulkhead = Bulkhead(
                name,
                max_concurrent=s.bulkhead.max_concurrent,
                max_waiting=s.bulkhead.max_waiting,
                clock=clock,
                events=events,
                registry=self._bulkheads,
            )
            return PolicyGuards(s, breaker, retry, bulkhead, s.timeout, cache, budget)
        breaker, bulkhead = previous.breaker, previous.bulkhead
        breaker.reconfigure(
            failure_threshold=s.breaker.failure_threshold,
            recovery_timeout=s.breaker.recovery_timeout,
            half_open_max_calls=s.breaker.half_open_max_calls,
            success_threshold=s.breaker.success_threshold,
        )
        bulkhead.resize(
            max_concurrent=s.bulkhead.max_concurrent, max_waiting=s.bulkhead.max_waiting
        )
        budget.ratio = s.retry.budget
        if cache is not None:
            cache.ttl, cache.stale_ttl = s.cache.ttl, s.cache.stale_ttl
        return PolicyGuards(s, breaker, retry, bulkhead, s.timeout, cache, budget)


def _changed_settings(current: PolicySettings, changes: Any) -> PolicySettings:
    """``current`` with ``changes`` laid over it, validated.

    Raises:
        InvalidInputError: with ``errors``: ``[{"field": "breaker.failure_threshold", ...}]``.
    """
    if not isinstance(changes, Mapping) or not changes:
        raise InvalidInputError(
            "The body must be a JSON object of the policy's settings, e.g. "
            '{"breaker": {"failure_threshold": 5}}.',
            extensions={"errors": [{"field": "", "msg": "expected a non-empty JSON object"}]},
        )
    criticality = changes.get("criticality")
    base: dict[str, Any] = (
        {**PRESETS[criticality], "criticality": criticality}
        if isinstance(criticality, str) and criticality in PRESETS
        else current.model_dump()
    )
    try:
        return PolicySettings.model_validate(deep_merge(base, changes))
    except ValidationError as exc:
        errors = [
            {"field": error_path(err), "msg": str(err.get("msg", "")).removeprefix("Value error, ")}
            for err in exc.errors()
        ]
        raise InvalidInputError(
            "The policy change is not valid; see `errors`. The policy in force is unchanged.",
            extensions={"errors": errors},
        ) from None


def _differences(old: PolicySettings, new: PolicySettings) -> dict[str, list[Any]]:
    """``{"breaker.failure_threshold": [5, 3], ...}`` for every field that changed."""
    changed: dict[str, list[Any]] = {}
    _walk(old.model_dump(), new.model_dump(), "", changed)
    return changed


def _walk(old: Any, new: Any, prefix: str, into: dict[str, list[Any]]) -> None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in new:
            _walk(old.get(key), new[key], f"{prefix}{key}.", into)
    elif old != new:
        into[prefix.rstrip(".")] = [old, new]


def _env_example(name: str) -> str:
    return f"RESILIENCE_POLICIES__{name.upper()}__CRITICALITY=standard"


def _site_of(fn: Callable[..., Any]) -> str:
    code = getattr(fn, "__code__", None)
    if code is None:
        return getattr(fn, "__module__", "?")
    return f"{_short(code.co_filename)}:{code.co_firstlineno}"


def _short(filename: str) -> str:
    """A path relative to the working directory when it is under it, as tracebacks read."""
    try:
        relative = os.path.relpath(filename)
    except ValueError:  # another drive
        return filename
    return filename if relative.startswith("..") else relative


#: Where library code lives: frames there are not where the app used a policy.
_LIBRARY_DIRS = tuple(
    {sysconfig.get_paths()[key] for key in ("stdlib", "platstdlib", "purelib", "platlib")}
    | {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
)


def caller_site(depth: int = 1) -> str:
    """``file:line`` of the app's code that called, ``depth`` frames above the caller of this.

    Frames of the standard library, installed packages and this one are passed over, as is
    code without a file: FastAPI evaluates an ``Annotated[..., Depends(policy(...))]`` written
    under ``from __future__ import annotations`` itself, from the route's decorator.
    """
    frame: FrameType | None = sys._getframe(depth + 1)
    first = None
    for _ in range(64):
        if frame is None:
            break
        filename = frame.f_code.co_filename
        if not filename.startswith("<"):
            site = f"{_short(filename)}:{frame.f_lineno}"
            if not filename.startswith(_LIBRARY_DIRS):
                return site
            first = first or site
        frame = frame.f_back
    return first or "?"


#: The policies of the process: ``policy(name)`` and ``install()`` use this table.
default_policies = PolicyTable()


def policy(name: str) -> Policy:
    """The named outbound policy ``name``: the same object for the same name, every time.

    Use it as ``Depends(policy("inventory"))``, as ``@policy("inventory")`` on an
    ``async def``, or call through it: ``await policy("inventory").call(fn, *args)``. Its
    breaker, retry, timeout, bulkhead and cache are declared in the settings (``policies``,
    ``policies_file``); a name they do not declare stops the app's start-up.

    .. versionadded:: 0.2
    """
    return default_policies.get(name, used_at=caller_site())
