"""``install(app, settings)``: the one-line set-up, and the ``Resilience`` object it returns."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from fastapi import FastAPI
from starlette.middleware import Middleware
from starlette.middleware.errors import ServerErrorMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from fastapi_resilience._breaker import default_registry
from fastapi_resilience._clock import SYSTEM_CLOCK, Clock
from fastapi_resilience._correlation import CorrelationIdMiddleware
from fastapi_resilience._degraded import DegradedMode
from fastapi_resilience._events import Event, EventBus
from fastapi_resilience._fixed_routes import FixedPathRoutes
from fastapi_resilience._handlers import install_exception_handlers, unhandled_exception_handler
from fastapi_resilience._health import HealthChecks, add_health_routes
from fastapi_resilience._metrics import (
    PrometheusListener,
    add_metrics_route,
    prometheus_available,
)
from fastapi_resilience._outbound_fastapi import watch_outbound
from fastapi_resilience._rate_limit_guard import STORAGE_DOWN_EVENT, STORAGE_RECOVERED_EVENT
from fastapi_resilience._rate_limit_setup import limiter_from_settings
from fastapi_resilience._rate_limiter import RateLimiter
from fastapi_resilience._settings import ResilienceSettings

__all__ = ["APP_STATE_NAME", "Resilience", "install"]

#: ``app.state.resilience`` holds the ``Resilience`` object after ``install``.
APP_STATE_NAME = "resilience"


class Resilience:
    """What ``install`` set up for one app: settings, the event bus, health checks, the rate
    limiter and the degraded mode (``degraded``, where the app's features are declared)."""

    def __init__(
        self,
        settings: ResilienceSettings,
        *,
        events: EventBus | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.events = events or EventBus()
        self.health = HealthChecks(
            default_timeout=settings.health_check_timeout,
            cache_seconds=settings.health_cache_seconds,
            clock=clock,
        )
        #: The app's rate limiter; ``None`` when ``rate_limit_enabled`` is off.
        self.rate_limiter: RateLimiter | None = None
        #: The app's switchable features; the breakers they name are the default registry's.
        self.degraded = DegradedMode(
            breakers=default_registry,
            events=self.events,
            clock=clock,
            notice_header=settings.degraded_header,
            disabled=settings.disabled_features,
        )
        self.metrics: PrometheusListener | None = None

    def __repr__(self) -> str:
        return f"Resilience(checks={len(self.health._checks)})"


def install(
    app: FastAPI,
    settings: ResilienceSettings | None = None,
    *,
    clock: Clock = SYSTEM_CLOCK,
) -> Resilience:
    """Set up everything on ``app`` and return the :class:`Resilience` object.

    Adds, from the outside in: correlation IDs, rate limiting (if enabled), degraded mode;
    registers the problem-details exception handlers; mounts the health routes. With no
    ``settings``, ``ResilienceSettings()`` reads the environment.

    Raises:
        ConfigurationError: a setting is invalid; the message names it.
    """
    settings = settings if settings is not None else ResilienceSettings()
    resilience = Resilience(settings, clock=clock)
    setattr(app.state, APP_STATE_NAME, resilience)

    install_exception_handlers(
        app,
        type_base=settings.problem_type_base,
        expose_error_details=settings.expose_error_details,
        correlation_header=settings.correlation_header,
    )
    limiter = _install_rate_limiting(resilience) if settings.rate_limit_enabled else None
    # One layer for all three: the correlation middleware runs the rate limiter and degraded
    # mode inside it (ADR 0048, ADR 0049).
    app.add_middleware(
        CorrelationIdMiddleware,
        header_name=settings.correlation_header,
        rate_limiter=limiter,
        degraded_mode=resilience.degraded,
    )
    _idle_error_layer(app, app.user_middleware[0])
    resilience.health.add(
        FEATURES_CHECK, resilience.degraded.health_check, critical=False, cache_seconds=0
    )
    # Straight onto the app's router: routes defined after ``install()`` meet these first on
    # every request (ADR 0045), so by default all of them sit behind one entry (ADR 0046).
    group: FixedPathRoutes | None = None
    if not settings.health_in_schema:
        group = FixedPathRoutes()
        app.router.routes.append(group)
    add_health_routes(app.router, resilience.health, prefix=settings.health_path, group=group)
    # Breakers and bulkheads report on this app's bus, and open breakers degrade readiness.
    watch_outbound(resilience)
    if settings.metrics_enabled and prometheus_available():
        _install_metrics(app, resilience, settings.metrics_path, group)

    def started() -> None:
        # Once the app is built, after the user's own start-up code (which may add routes):
        # what the features name is checked (they are declared after install()), and the
        # group moves back past the routes that cannot serve its paths (ADR 0047).
        resilience.degraded.validate(app.router.routes)
        if group is not None:
            group.settle(app.router.routes)

    _around_lifespan(app, started=started, stopped=limiter.aclose if limiter is not None else None)
    return resilience


#: Name of the degraded mode's readiness check.
FEATURES_CHECK = "features"
#: Name of the rate-limit storage's readiness check.
RATE_LIMIT_CHECK = "rate_limit_storage"


def _install_rate_limiting(resilience: Resilience) -> RateLimiter:
    settings = resilience.settings
    limiter = limiter_from_settings(settings, events=resilience.events, clock=resilience.clock)
    resilience.rate_limiter = limiter
    storage_health = getattr(limiter.storage, "health", None)
    if storage_health is not None:
        # Failing open, a dead storage degrades the service; failing closed, it stops it.
        resilience.health.add(
            RATE_LIMIT_CHECK, storage_health, critical=not settings.rate_limit_fail_open
        )
        # Its result is cached; a change of the storage's state shows at the next call.
        resilience.events.subscribe(_forget_storage_check(resilience.health))
    return limiter


def _forget_storage_check(health: HealthChecks) -> Callable[[Event], None]:
    def forget(event: Event) -> None:
        if event.kind in (STORAGE_DOWN_EVENT, STORAGE_RECOVERED_EVENT):
            health.forget(RATE_LIMIT_CHECK)

    return forget


def _around_lifespan(
    app: FastAPI,
    *,
    started: Callable[[], None] | None = None,
    stopped: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Run ``started`` after the app's own start-up and ``stopped`` after its own shutdown.

    Wrapping the router's lifespan keeps the user's ``lifespan=`` (or on_event handlers)
    running as before; ``stopped`` runs even when they fail.
    """
    original: Callable[[Any], AbstractAsyncContextManager[Any]] = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app_: Any) -> AsyncIterator[Any]:
        try:
            async with original(app_) as state:
                if started is not None:
                    started()
                yield state
        finally:
            if stopped is not None:
                await stopped()

    app.router.lifespan_context = lifespan


class _IdleServerErrorMiddleware(ServerErrorMiddleware):
    """Starlette's outermost layer, where our correlation layer answers every error inside it.

    It passes each call through, without a coroutine or a ``send`` wrapper of its own. A
    subclass with the same handler and debug flag: tools that rebuild the stack around this
    layer (OpenTelemetry's FastAPI instrumentation) still find the one they expect.
    """

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:  # type: ignore[override]
        return self.app(scope, receive, send)


def _idle_error_layer(app: FastAPI, ours: Middleware) -> None:
    """Build ``app``'s stack with Starlette's ``ServerErrorMiddleware`` idle (ADR 0050).

    Our correlation layer catches every exception of the app inside it and answers the 500
    itself, so the layer Starlette puts outside it only costs a coroutine and a ``send`` wrapper
    per request. It is made idle only while the stack is the expected one: its outermost layer
    is that middleware, without debug tracebacks and with our own 500 handler, and our layer is
    the outermost user middleware. Anything else (``app.debug``, a 500 handler of the user's,
    middleware added after ``install()``, another construction order) keeps it as it is.
    """
    build = app.build_middleware_stack

    def build_middleware_stack() -> ASGIApp:
        stack = build()
        if (
            type(stack) is ServerErrorMiddleware
            and not stack.debug
            and stack.handler is unhandled_exception_handler
            and app.user_middleware
            and app.user_middleware[0] is ours
        ):
            return _IdleServerErrorMiddleware(stack.app, handler=stack.handler, debug=False)
        return stack

    # An instance attribute: Starlette builds the stack on the first request by this name.
    app.build_middleware_stack = build_middleware_stack  # type: ignore[method-assign]


def _install_metrics(
    app: FastAPI, resilience: Resilience, path: str, group: FixedPathRoutes | None
) -> None:
    from prometheus_client import CollectorRegistry

    # A registry per app: two apps in one process (tests, mounted sub-apps) never collide.
    registry = CollectorRegistry()
    resilience.metrics = PrometheusListener(registry)
    resilience.events.subscribe(resilience.metrics)
    add_metrics_route(app.router, registry, path=path, group=group)
