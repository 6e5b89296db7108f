"""FastAPI glue for guarded calls: breaker and bulkhead dependencies, the request deadline.

``breaker_dependency(name)`` and ``bulkhead_dependency(name)`` return the same callable every
time for the same name, so ``app.dependency_overrides[breaker_dependency("inventory")]``
replaces it wherever a route uses it.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fastapi_resilience._asgi.app_state import resilience_of
from fastapi_resilience._asgi.pipeline import Inner, Pipeline, RequestState
from fastapi_resilience._settings import ResilienceSettings
from fastapi_resilience.clock import SYSTEM_CLOCK, Clock
from fastapi_resilience.correlation._ids import HEADER_NAME
from fastapi_resilience.exceptions import ConfigurationError, UpstreamTimeoutError
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
from fastapi_resilience.outbound._deadline import DEADLINE_EXCEEDED_DETAIL, deadline, to_seconds
from fastapi_resilience.problems._render import problem_response

if TYPE_CHECKING:
    from fastapi_resilience.integration._resilience import Resilience

__all__ = [
    "BREAKERS_CHECK_NAME",
    "RequestDeadlineMiddleware",
    "breaker_dependency",
    "bulkhead_dependency",
    "deadline_dependency",
    "watch_outbound",
]

#: The readiness check ``watch_outbound`` adds.
BREAKERS_CHECK_NAME = "breakers"

#: Default of the arguments that come from ``ResilienceSettings`` unless given.
_FROM_SETTINGS: Any = object()

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
        _bulkhead_deps[key] = dependency
    return dependency


def deadline_dependency(
    seconds: float | timedelta, *, clock: Clock = SYSTEM_CLOCK
) -> Callable[[], AsyncIterator[None]]:
    """A dependency that gives the route a deadline: guarded calls inside inherit what is left.

    Unlike :class:`RequestDeadlineMiddleware` it does not cut the route off; only the calls
    made through ``timeout`` / ``with_timeout`` (and the library's guarded calls) obey it.
    """
    budget = _check_budget(seconds, "deadline_dependency seconds")

    async def set_deadline() -> AsyncIterator[None]:
        with deadline(budget, clock=clock):
            yield

    return set_deadline


def _check_budget(value: float | timedelta | None, argument: str) -> float | None:
    seconds = to_seconds(value)
    if seconds is not None and (math.isnan(seconds) or seconds <= 0):
        raise ConfigurationError(f"{argument} must be > 0 seconds or None, got {value!r}")
    return seconds


def _floor(value: float) -> float:
    floor = _check_budget(value, "RequestDeadlineMiddleware header_floor")
    if floor is None or not math.isfinite(floor):
        raise ConfigurationError(
            f"RequestDeadlineMiddleware header_floor must be a finite number of seconds > 0, "
            f"got {value!r}"
        )
    return floor


def _header_name(header: str | None) -> bytes | None:
    if header and not HEADER_NAME.fullmatch(header):
        raise ConfigurationError(
            f"RequestDeadlineMiddleware header: {header!r} is not a valid HTTP header name"
        )
    return header.lower().encode("latin-1") if header else None


class RequestDeadlineMiddleware:
    """Gives every HTTP request a time budget that outbound calls inherit.

    Sets the request's deadline (a context variable read by ``remaining()``, ``timeout()``
    and every guarded call), so a chain of upstream calls never gets more than the request
    has left. A client may ask for less with ``header`` (seconds, e.g. ``X-Request-Timeout:
    1.5``), never for more than ``timeout`` and never for less than ``header_floor`` (a
    smaller value is raised to it); a value that is not a number of seconds is ignored. A
    call that a deadline the client chose cuts is not counted against the upstream by any
    breaker (ADR 0056).

    With ``enforce=True`` (the default) a request still running when the budget is spent,
    and that has not started its answer, is cancelled and answered 504 ``upstream_timeout``
    (problem+json) that carries the correlation ID, inside or outside the correlation
    middleware; an answer already started is left to finish.

    Args:
        app: the ASGI app.
        timeout: the budget in seconds; ``None`` sets no deadline (a header may still).
        header: request header a client may use to shorten the budget; ``None`` or ``""``:
            ignored. Default: the ``request_deadline_header`` setting.
        header_floor: the least budget a client may ask for, seconds (> 0). Default: the
            ``request_deadline_header_floor`` setting.
        enforce: cut off requests that overrun the budget (plus ``grace`` seconds).
        grace: extra seconds before cutting off, for the route to answer its own 504.
        clock: time source for the deadline.
        settings: where ``header`` and ``header_floor`` come from when not given. ``None``:
            the settings ``install()`` was given for the app (a mounted app: the app around
            it), else ``ResilienceSettings()`` (the environment); read once, at start-up (the
            lifespan) or on the first request.

    Raises:
        ConfigurationError: an argument or setting is out of range; the message names it.

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        timeout: float | timedelta | None = 30.0,
        header: str | None = _FROM_SETTINGS,
        header_floor: float = _FROM_SETTINGS,
        enforce: bool = True,
        grace: float = 0.0,
        clock: Clock = SYSTEM_CLOCK,
        settings: ResilienceSettings | None = None,
    ) -> None:
        budget = _check_budget(timeout, "RequestDeadlineMiddleware timeout")
        if grace < 0:
            raise ConfigurationError(f"RequestDeadlineMiddleware grace must be >= 0, got {grace}")
        self.app = app
        self.timeout = budget
        self.enforce = enforce
        self.grace = grace
        self.clock = clock
        self._given: tuple[bytes | Any | None, float | Any] = (
            header if header is _FROM_SETTINGS else _header_name(header),
            header_floor if header_floor is _FROM_SETTINGS else _floor(header_floor),
        )
        self.header: bytes | None = None
        self.header_floor = 0.0
        # Without settings, the app's own are only known once it runs: ``_settle`` then.
        self._unsettled = settings is None and _FROM_SETTINGS in self._given
        if not self._unsettled:
            self._configure(settings)
        # The middleware is a pipeline of itself, as a step.
        self._pipeline = Pipeline(app, [self])

    def _configure(self, settings: ResilienceSettings | None) -> None:
        """Take ``header`` and ``header_floor`` from the arguments, else from ``settings``
        (``None`` only when both were given)."""
        header, floor = self._given
        if header is _FROM_SETTINGS and settings is not None:
            header = _header_name(settings.request_deadline_header)
        if floor is _FROM_SETTINGS and settings is not None:
            floor = _floor(settings.request_deadline_header_floor)
        self.header = header
        self.header_floor = floor

    def _settle(self, scope: Scope) -> None:
        """Read the settings once, from the app serving ``scope``: those ``install()`` was
        given, else the environment's."""
        resilience = resilience_of(scope.get("app"))
        self._configure(resilience.settings if resilience is not None else ResilienceSettings())
        self._unsettled = False

    def _asked(self, scope: Scope) -> float | None:
        """The budget the client asks for, raised to the floor; ``None`` when it asks for none
        or sends something that is not a number of seconds."""
        for key, value in scope.get("headers", ()):
            if key == self.header:
                try:
                    asked = float(value.decode("latin-1"))
                except ValueError:
                    return None
                if not math.isfinite(asked) or asked < 0:
                    return None
                return max(asked, self.header_floor)
        return None

    def _budget(self, scope: Scope) -> tuple[float | None, bool]:
        """The request's budget, and whether the client chose it (shorter than the server's)."""
        budget = self.timeout
        asked = self._asked(scope) if self.header is not None else None
        if asked is not None and (budget is None or asked < budget):
            return asked, True
        return budget, False

    # -- the step ---------------------------------------------------------------------

    websocket = False

    def enter(self, state: RequestState) -> None:
        if self._unsettled:
            self._settle(state.scope)  # the first request (or the lifespan's start-up)
        budget, from_client = self._budget(state.scope)
        if budget is None:
            return
        scope_ = deadline(budget, clock=self.clock, from_client=from_client)
        scope_.__enter__()
        state.deadline = budget
        state.deadline_token = scope_
        if self.enforce:
            if state.arounds is None:
                state.arounds = [self]
            else:
                state.arounds.append(self)

    def leave(self, state: RequestState) -> None:
        scope_ = state.deadline_token
        if scope_ is not None:
            state.deadline_token = None
            scope_.__exit__(None, None, None)

    async def around(self, state: RequestState, inner: Inner, send: Send) -> None:
        """Run the app, cut off when the budget (plus ``grace``) is spent before it answers."""
        started = False
        budget = state.deadline or 0.0
        cutoff = asyncio.timeout(budget + self.grace)

        async def watch_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start" and not started:
                started = True
                # The answer is on its way: cutting it off now would only break it.
                cutoff.reschedule(None)
            await send(message)

        try:
            async with cutoff:
                await inner(watch_send)
        except TimeoutError:
            if not cutoff.expired() or started:
                raise
            scope = state.scope
            error = UpstreamTimeoutError(
                DEADLINE_EXCEEDED_DETAIL, extensions={"deadline": round(budget, 3)}
            )
            response = problem_response(
                scope,
                status=error.status_code,
                code=error.code,
                title=error.title,
                detail=error.detail,
                extensions=error.extensions,
            )
            await response(scope, _no_body, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._unsettled and scope["type"] == "lifespan":
            self._settle(scope)
        await self._pipeline(scope, receive, send)


async def _no_body() -> Message:  # pragma: no cover - a problem body never reads the request
    return {"type": "http.disconnect"}


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
    )
    breaker_registry.use_events(resilience.events)
    bulkhead_registry.use_events(resilience.events)
