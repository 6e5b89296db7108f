"""``install(app, settings)``: the one-line set-up, and the ``Resilience`` object it returns."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import BaseRoute

from fastapi_resilience._asgi.app_state import APP_STATE_NAME
from fastapi_resilience._asgi.fixed_routes import FixedPathRoutes, route_at
from fastapi_resilience._asgi.pipeline import Pipeline
from fastapi_resilience._settings import ENV_PREFIX, ResilienceSettings
from fastapi_resilience.clock import SYSTEM_CLOCK, Clock
from fastapi_resilience.correlation._ids import CorrelationStep
from fastapi_resilience.events import Event
from fastapi_resilience.exceptions import ConfigurationError
from fastapi_resilience.health._checks import HealthChecks, add_health_routes
from fastapi_resilience.integration._dependencies import watch_outbound
from fastapi_resilience.integration._openapi import document_openapi
from fastapi_resilience.integration._resilience import Resilience, install_paths
from fastapi_resilience.integration._sub_apps import (
    refuse_websocket_route_limits,
    serve_mounted_apps,
)
from fastapi_resilience.operations._admin import AdminTokenStep, add_admin_routes
from fastapi_resilience.operations._degraded import DegradedStep
from fastapi_resilience.operations._errors import (
    ErrorAnalytics,
    ProblemRecorder,
    record_outbound_failures,
)
from fastapi_resilience.operations._metrics import (
    MetricsSources,
    RequestMetricsStep,
    add_metrics_route,
    collector_for,
    count_event,
    prometheus_available,
    warn_prometheus_missing,
)
from fastapi_resilience.operations._otel_metrics import (
    bridge_to_opentelemetry,
    configured_meter_provider,
)
from fastapi_resilience.operations._tracing import subscribe_span_events
from fastapi_resilience.outbound._breaker import default_registry
from fastapi_resilience.outbound._bulkhead import default_bulkhead_registry
from fastapi_resilience.outbound._policies import default_policies
from fastapi_resilience.outbound._policy_file import (
    PolicyFileWatcher,
    reload_available,
    warn_reload_missing,
)
from fastapi_resilience.problems._handlers import (
    install_exception_handlers,
)
from fastapi_resilience.problems._render import answer_unhandled
from fastapi_resilience.ratelimit._guard import STORAGE_DOWN_EVENT, STORAGE_RECOVERED_EVENT
from fastapi_resilience.ratelimit._limiter import RateLimiter
from fastapi_resilience.ratelimit._setup import limiter_from_settings
from fastapi_resilience.ratelimit._step import RateLimitStep

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider
    from prometheus_client import CollectorRegistry

__all__ = ["APP_STATE_NAME", "Resilience", "install"]


def install(
    app: FastAPI,
    settings: ResilienceSettings | None = None,
    *,
    clock: Clock = SYSTEM_CLOCK,
    metrics_registry: CollectorRegistry | None = None,
    meter_provider: MeterProvider | None = None,
) -> Resilience:
    """Set up everything on ``app`` and return the :class:`Resilience` object.

    Adds, from the outside in: correlation IDs, request timing (with metrics), rate limiting
    (if enabled), degraded mode; registers the problem-details exception handlers; mounts the
    health and metrics routes. With no ``settings``, ``ResilienceSettings()`` reads the
    environment. ``metrics_registry``: where ``/metrics`` reads from; default
    prometheus-client's own registry, so the app's own metrics and the process collector
    show on it too. ``meter_provider``: report the same instruments through this
    OpenTelemetry meter provider (default: the global one, when the application set one).

    Raises:
        ConfigurationError: a setting is invalid; the message names it.
    """
    if isinstance(getattr(app.state, APP_STATE_NAME, None), Resilience):
        # A second call would stack a second limiter, counting every request twice.
        raise ConfigurationError(
            "install() was already called on this app; call it once, with all the settings"
        )
    settings = settings if settings is not None else ResilienceSettings()
    fixed_paths = install_paths(settings)
    # The app's routes so far; those defined later are checked at start-up.
    _refuse_app_routes_at(app.router.routes, fixed_paths)
    resilience = Resilience(settings, clock=clock)
    setattr(app.state, APP_STATE_NAME, resilience)

    install_exception_handlers(
        app,
        type_base=settings.problem_type_base,
        expose_error_details=settings.expose_error_details,
        correlation_header=settings.correlation_header,
    )
    limiter = _install_rate_limiting(app, resilience) if settings.rate_limit_enabled else None
    if settings.errors_enabled:
        resilience.analytics = _error_analytics(resilience)
        resilience.problem_recorder = ProblemRecorder(resilience.analytics, resilience.mounts)
    if settings.trace_span_events:
        # Only once OpenTelemetry is installed; nothing of it is imported here.
        subscribe_span_events(resilience.events)
    # One layer, its steps in the contract's order: correlation IDs, rate limiting, degraded
    # mode (ADR 0066).
    steps: list[Any] = [
        CorrelationStep(
            header_name=settings.correlation_header,
            from_trace=settings.correlation_id_from_trace,
        )
    ]
    metrics_on = settings.metrics_enabled and prometheus_available()
    if metrics_on and settings.metrics_request_duration:
        steps.append(RequestMetricsStep(resilience.mounts))
    if limiter is not None and settings.admin_token is not None:
        token = settings.admin_token.get_secret_value()
        steps.append(AdminTokenStep(settings.admin_path, token))
    if limiter is not None:
        steps.append(RateLimitStep(limiter))
    steps.append(DegradedStep(resilience.degraded))
    # The library's own routes answer whatever feature is off: readiness must say why, and
    # an operator must be able to switch the feature on again.
    resilience.degraded.keep_serving(
        [settings.health_path, settings.metrics_path]
        + ([settings.admin_path] if settings.admin_token is not None else [])
    )
    app.add_middleware(
        Pipeline,
        steps=steps,
        on_error=answer_unhandled,
        reraise=settings.raise_server_exceptions,
    )
    _cors_outside(app)
    # The schema, built at the first /openapi.json, documents what the layer answers.
    document_openapi(app, resilience)
    serve_mounted_apps(app, resilience)
    resilience.health.add(
        FEATURES_CHECK,
        resilience.degraded.health_check,
        critical=False,
        cache_seconds=0,
        live=True,
    )
    # Straight onto the app's router: routes defined after ``install()`` meet these first on
    # every request (ADR 0045), so by default all of them sit behind one entry (ADR 0045).
    first_of_ours = len(app.router.routes)
    group: FixedPathRoutes | None = None
    if not settings.health_in_schema:
        group = FixedPathRoutes()
        app.router.routes.append(group)
    add_health_routes(app.router, resilience.health, prefix=settings.health_path, group=group)
    if settings.policies:
        # The named policies' guards, registered by name before the admin API and degraded
        # mode look for them. An app that declares none leaves another app's in force.
        default_policies.configure(settings.policies, clock=clock, events=resilience.events)
        resilience.policy_watcher = _policy_watcher(resilience)
    # Breakers and bulkheads report on this app's bus, and open breakers degrade readiness.
    watch_outbound(resilience)
    if settings.admin_token is not None:
        add_admin_routes(
            app.router,
            resilience,
            token=settings.admin_token.get_secret_value(),
            path=settings.admin_path,
            breakers=default_registry,
            bulkheads=default_bulkhead_registry,
            policies=default_policies,
            include_in_schema=settings.admin_in_schema,
        )
    if metrics_on:
        _install_metrics(app, resilience, group, metrics_registry, meter_provider)
    elif settings.metrics_enabled:
        warn_prometheus_missing(settings.metrics_path)
    ours = app.router.routes[first_of_ours:]

    def started() -> None:
        # Once the app is built, after the user's own start-up code (which may add routes):
        # what the features name is checked (they are declared after install()), and the
        # group moves back past the routes that cannot serve its paths (ADR 0045).
        # Every policy code asked for by name (routes, decorators, clients) is declared.
        default_policies.check_used()
        resilience.degraded.validate(app.router.routes)
        refuse_websocket_route_limits(app.router.routes)
        _start_mounted_apps(app, resilience)
        _refuse_app_routes_at(app.router.routes, fixed_paths, ours=ours)
        if group is not None:
            group.settle(app.router.routes)
        if resilience.metrics is not None:
            # Scrapes from another thread read the app's state on this loop.
            with contextlib.suppress(RuntimeError):  # started by hand, outside a loop
                resilience.metrics.loop = asyncio.get_running_loop()

    resilience._on_start = started
    resilience._on_stop = limiter.aclose if limiter is not None else None
    _around_lifespan(app, started=resilience.start, stopped=resilience.stop)
    return resilience


def _error_analytics(resilience: Resilience) -> ErrorAnalytics:
    settings = resilience.settings
    try:
        window, bucket = settings.errors_window_seconds, settings.errors_bucket_seconds
        analytics = ErrorAnalytics(
            window_seconds=window,
            bucket_seconds=bucket,
            # The spike rule's fast average spans half a minute, or what the window allows.
            spike_fast_seconds=min(max(30.0, bucket), window),
            recent_ids=settings.errors_recent_ids,
            clock=resilience.clock,
            events=resilience.events,
        )
    except ValueError as exc:  # the window is not a whole number of buckets, say
        raise ConfigurationError(
            f"errors_window_seconds / errors_bucket_seconds (env {ENV_PREFIX}ERRORS_...): {exc}"
        ) from None
    record_outbound_failures(analytics)
    return analytics


def _policy_watcher(resilience: Resilience) -> PolicyFileWatcher | None:
    """What reloads ``policies_file`` when it changes, started with the app (ADR 0072)."""
    settings = resilience.settings
    path = settings.policies_file
    if path is None or not settings.policies_reload:
        return None
    if not reload_available():
        warn_reload_missing(path)
        return None
    return PolicyFileWatcher(
        path,
        settings.reread_policies,
        loaded=settings.policies,
        table=default_policies,
        events=resilience.events,
    )


def _start_mounted_apps(app: FastAPI, resilience: Resilience) -> None:
    """At start-up: serve the sub-apps mounted so far, check what their routes name, and start
    those with their own ``install()`` (Starlette runs no lifespan of a mounted app)."""
    resilience._mounted = []
    for sub in serve_mounted_apps(app, resilience):
        if sub.app is None:
            continue  # routes mounted without an app: the app's own, checked with it
        if sub.installed:
            own: Resilience = getattr(sub.app.state, APP_STATE_NAME)
            resilience._mounted.append(own)
            own.start()
        else:
            resilience.degraded.validate(sub.app.router.routes)
            refuse_websocket_route_limits(sub.app.router.routes, sub.template)


#: Name of the degraded mode's readiness check.
FEATURES_CHECK = "features"
#: Name of the rate-limit storage's readiness check.
RATE_LIMIT_CHECK = "rate_limit_storage"


#: For each setting that places a fixed-path route: what it serves, and how to move it.
_MOVE_FIXED_PATH = {
    "health_path": ("health routes", "/_health", ""),
    "metrics_path": (
        "Prometheus metrics",
        "/_metrics",
        " or metrics_enabled=False to serve only the app's,",
    ),
}


def _refuse_app_routes_at(
    routes: list[BaseRoute], fixed_paths: dict[str, str], *, ours: Sequence[BaseRoute] = ()
) -> None:
    """Refuse an app route written for one of ``install()``'s paths (ADR 0062).

    The router serves whichever comes first, so the other one would never answer, in silence.
    ``ours``: the entries ``install()`` added to ``routes``.

    Raises:
        ConfigurationError: naming the setting that moves ``install()``'s route.
    """
    apps = [route for route in routes if not any(route is mine for mine in ours)]
    for path, setting in fixed_paths.items():
        route = route_at(apps, path)
        if route is None:
            continue
        what, elsewhere, or_off = _MOVE_FIXED_PATH[setting]
        env = f"{ENV_PREFIX}{setting.upper()}"
        raise ConfigurationError(
            f"{setting} (env {env}): the app has its own route at {path!r} "
            f"({type(route).__name__} {getattr(route, 'name', None)!r}), where install() serves "
            f"its {what}; one would hide the other. Move install()'s with "
            f"{setting}={elsewhere!r} ({env}={elsewhere}),{or_off} or move the app's route."
        )


def _install_rate_limiting(app: FastAPI, resilience: Resilience) -> RateLimiter:
    settings = resilience.settings
    limiter = limiter_from_settings(
        settings,
        events=resilience.events,
        clock=resilience.clock,
        exempt_paths=_docs_paths(app) if settings.rate_limit_exempt_docs else (),
    )
    resilience.rate_limiter = limiter
    limiter.mounts = resilience.mounts  # one list of the app's mounts for every label
    storage_health = getattr(limiter.storage, "health", None)
    if storage_health is not None:
        # Failing open, a dead storage degrades the service; failing closed, it stops it.
        resilience.health.add(
            RATE_LIMIT_CHECK, storage_health, critical=not settings.rate_limit_fail_open
        )
        # Its result is cached; a change of the storage's state shows at the next call.
        resilience.events.subscribe(_forget_storage_check(resilience.health))
    return limiter


def _docs_paths(app: FastAPI) -> list[str]:
    """FastAPI's own documentation routes: the schema, Swagger UI and its OAuth2 redirect,
    ReDoc. A browser loads them with their assets; they are not the API being protected."""
    paths = [app.openapi_url, app.redoc_url]
    if app.docs_url:
        paths += [app.docs_url, app.swagger_ui_oauth2_redirect_url]
    return [path for path in paths if path]


def _cors_outside(app: FastAPI) -> None:
    """Move every ``CORSMiddleware`` added before ``install()`` outside the library's layer.

    The library's layer answers 429, 503 and 500 itself; only a CORS layer outside it adds
    ``Access-Control-Allow-Origin`` to those answers, so a browser shows the page the 429
    rather than a CORS error; and it answers preflights before they are counted.
    """
    stack = app.user_middleware
    cors = [entry for entry in stack[1:] if _is_cors(entry)]
    for entry in cors:
        stack.remove(entry)
    stack[0:0] = cors


def _is_cors(entry: Middleware) -> bool:
    return isinstance(entry.cls, type) and issubclass(entry.cls, CORSMiddleware)


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


def _install_metrics(
    app: FastAPI,
    resilience: Resilience,
    group: FixedPathRoutes | None,
    registry: CollectorRegistry | None,
    meter_provider: MeterProvider | None,
) -> None:
    # One collector per registry, shared by every app of the process that uses it: the names
    # are registered once, and each app adds what is its own (features, analytics).
    target, collector = collector_for(registry, default_registry, default_bulkhead_registry)
    resilience.metrics = MetricsSources(
        resilience.degraded,
        resilience.health,
        analytics=resilience.analytics,
        monitor=resilience.health_monitor,
    )
    collector.add(resilience.metrics)
    resilience.events.subscribe(count_event)
    if resilience.settings.metrics_opentelemetry:
        provider = meter_provider if meter_provider is not None else configured_meter_provider()
        if provider is not None:
            bridge_to_opentelemetry(collector, provider)
    add_metrics_route(app.router, target, path=resilience.settings.metrics_path, group=group)
