"""FastAPI glue for guarded calls: breaker and bulkhead dependencies, the request deadline.

``breaker_dependency(name)`` and ``bulkhead_dependency(name)`` return the same callable every
time for the same name, so ``app.dependency_overrides[breaker_dependency("inventory")]``
replaces it wherever a route uses it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import TYPE_CHECKING

from starlette.requests import Request

from fastapi_resilience.clock import SYSTEM_CLOCK, Clock
from fastapi_resilience.outbound._breaker import (
    BreakerRegistry,
    CircuitBreaker,
    breaker_health_check,
    default_registry,
)
from fastapi_resilience.outbound._bulkhead import (
    Bulkhead,
    BulkheadRegistry,
    TieredBulkhead,
    default_bulkhead_registry,
)
from fastapi_resilience.outbound._deadline import deadline
from fastapi_resilience.outbound._deadline_step import check_budget

if TYPE_CHECKING:
    from fastapi_resilience.integration._resilience import Resilience

__all__ = [
    "BREAKERS_CHECK_NAME",
    "GUARD_ATTR",
    "breaker_dependency",
    "bulkhead_dependency",
    "deadline_dependency",
    "watch_outbound",
]

#: The readiness check ``watch_outbound`` adds.
BREAKERS_CHECK_NAME = "breakers"
#: Marks each dependency made here with what guards the route: ``(kind, name)``, where kind is
#: ``"circuit breaker"``, ``"bulkhead"`` or ``"deadline"``; the OpenAPI schema reads it.
GUARD_ATTR = "__fastapi_resilience_guard__"


_breaker_deps: dict[tuple[str, int], Callable[[], CircuitBreaker]] = {}
_bulkhead_deps: dict[tuple[str, int], Callable[[Request], Bulkhead]] = {}


def breaker_dependency(
    name: str, *, registry: BreakerRegistry | None = None
) -> Callable[[], CircuitBreaker]:
    """A dependency that hands the breaker registered as ``name`` to a route.

    The name is looked up per request, so a breaker registered (or replaced) after the route
    was declared is found. The same callable is returned for the same name every time.

    .. code-block:: python

        @app.get("/stock/{sku}")
        async def stock(
            sku: str, breaker: CircuitBreaker = Depends(breaker_dependency("inventory"))
        ):
            return await breaker.call(fetch_stock, sku)

    .. versionadded:: 0.1
    """
    target = registry if registry is not None else default_registry
    key = (name, id(target))
    dependency = _breaker_deps.get(key)
    if dependency is None:

        def dependency() -> CircuitBreaker:
            return target.get(name)

        dependency.__name__ = f"breaker_{name}"
        dependency.__qualname__ = dependency.__name__
        setattr(dependency, GUARD_ATTR, ("circuit breaker", name))
        _breaker_deps[key] = dependency
    return dependency


def bulkhead_dependency(
    name: str, *, registry: BulkheadRegistry | None = None
) -> Callable[[Request], Bulkhead]:
    """A dependency that hands the bulkhead registered as ``name`` to a route.

    For a :class:`TieredBulkhead` it hands out the compartment of the request's rate-limit
    tier (read from the scope key the rate limiter sets; the default tier otherwise). The
    same callable is returned for the same name every time.

    .. versionadded:: 0.1
    """
    target = registry if registry is not None else default_bulkhead_registry
    key = (name, id(target))
    dependency = _bulkhead_deps.get(key)
    if dependency is None:

        def dependency(request: Request) -> Bulkhead:
            found = target.get(name)
            if isinstance(found, TieredBulkhead):
                return found.for_scope(request.scope)
            return found

        dependency.__name__ = f"bulkhead_{name}"
        dependency.__qualname__ = dependency.__name__
        setattr(dependency, GUARD_ATTR, ("bulkhead", name))
        _bulkhead_deps[key] = dependency
    return dependency


def deadline_dependency(
    seconds: float | timedelta, *, clock: Clock = SYSTEM_CLOCK
) -> Callable[[], AsyncIterator[None]]:
    """A dependency that gives the route a deadline: guarded calls inside inherit what is left.

    Unlike :class:`RequestDeadlineMiddleware` it does not cut the route off; only the calls
    made through ``timeout`` / ``with_timeout`` (and the library's guarded calls) obey it.
    """
    budget = check_budget(seconds, "deadline_dependency seconds")

    async def set_deadline() -> AsyncIterator[None]:
        with deadline(budget, clock=clock):
            yield

    setattr(set_deadline, GUARD_ATTR, ("deadline", f"{budget}s"))
    return set_deadline


def watch_outbound(
    resilience: Resilience,
    *,
    breakers: BreakerRegistry | None = None,
    bulkheads: BulkheadRegistry | None = None,
) -> None:
    """Wire breakers and bulkheads into an app's ``Resilience`` (what ``install`` returned).

    Adds the ``"breakers"`` readiness check (``"degraded"``, naming every breaker that is not
    closed, so ``/health/ready`` never says ``"ok"`` while one is open), and publishes every
    breaker and bulkhead event, of those registered now and later, on ``resilience.events``.

    .. versionadded:: 0.1
    """
    breaker_registry = breakers if breakers is not None else default_registry
    bulkhead_registry = bulkheads if bulkheads is not None else default_bulkhead_registry
    # Never cached: it reads this process's breakers, and an open one must show at once.
    resilience.health.add(
        BREAKERS_CHECK_NAME,
        breaker_health_check(breaker_registry),
        critical=False,
        cache_seconds=0,
        live=True,
    )
    breaker_registry.use_events(resilience.events)
    bulkhead_registry.use_events(resilience.events)
