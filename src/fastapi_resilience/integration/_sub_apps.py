"""Mounted sub-apps under ``install()``: served as part of the app they are mounted in.

``app.mount("/v2", sub)`` puts another Starlette or FastAPI app behind a prefix. The app's
layer (correlation ID, rate limiting, degraded mode) serves its requests before routing, but
what happens inside the sub-app is the sub-app's: its exception handlers, what its dependencies
find on ``request.app``. This module makes the two agree (ADR 0052).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from fastapi.exception_handlers import http_exception_handler as fastapi_http_exception_handler
from fastapi.exception_handlers import (
    request_validation_exception_handler as fastapi_validation_handler,
)
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.routing import Host, Mount, Router, WebSocketRoute

from fastapi_resilience._asgi.app_state import APP_STATE_NAME, OUTER_STATE_NAME
from fastapi_resilience._settings import ResilienceSettings
from fastapi_resilience.exceptions import AppError, ConfigurationError
from fastapi_resilience.integration._openapi import document_openapi
from fastapi_resilience.problems._handlers import http_exception_handler as problem_http_handler
from fastapi_resilience.problems._handlers import install_exception_handlers
from fastapi_resilience.problems._render import APP_STATE_KEY as PROBLEM_STATE_KEY
from fastapi_resilience.problems._render import ProblemConfig

__all__ = [
    "MountedApp",
    "mounted_apps",
    "refuse_websocket_route_limits",
    "serve_mounted_apps",
]


@dataclass(frozen=True, slots=True)
class MountedApp:
    """What is mounted somewhere under an app: its full mount template (nested mounts joined,
    ``/tenants/{tenant}/v2``), the Starlette app there (``None`` for routes mounted without an
    app of their own, ``Mount(path, routes=[...])``) and whether that app called ``install()``."""

    app: Starlette | None
    template: str
    installed: bool


#: How many middleware layers around a mounted app are looked through to find it.
_MAX_WRAPPERS = 16


def _unwrapped(target: Any) -> Any:
    """The app inside the middleware a ``Mount(..., middleware=[...])`` wraps it in."""
    for _ in range(_MAX_WRAPPERS):
        if isinstance(target, Starlette | Router):
            return target
        inner = getattr(target, "app", None)
        if inner is None:
            return target
        target = inner
    return target


def mounted_apps(app: Starlette | Router, prefix: str = "") -> Iterator[MountedApp]:
    """Everything mounted under ``app`` (``Mount`` and ``Host`` routes), depth first.

    Below a sub-app with its own ``install()`` nothing is yielded: that one serves its own.
    """
    router = app.router if isinstance(app, Starlette) else app
    for route in router.routes:
        if isinstance(route, Mount):
            template = prefix + route.path
        elif isinstance(route, Host):
            template = prefix
        else:
            continue
        target = _unwrapped(route.app)
        if isinstance(target, Starlette):
            installed = getattr(target.state, APP_STATE_NAME, None) is not None
            yield MountedApp(target, template, installed)
            if not installed:
                yield from mounted_apps(target, template)
        elif isinstance(target, Router):
            yield MountedApp(None, template, False)
            yield from mounted_apps(target, template)


def serve_mounted_apps(app: Starlette, resilience: Any) -> list[MountedApp]:
    """Serve everything mounted under ``app`` as part of it; returns what was found.

    A sub-app without its own ``install()`` gets the app's problem handlers (its 404, 422, 429
    and 500 answer like the app's; handlers it registered itself stay) and finds the app's
    ``resilience`` from its routes (``requires_feature``, ``rate_limit``). A sub-app with its
    own ``install()`` is counted by the app's limiter, which takes over its exempt paths. Every
    mount's template is given to the app's limiter, so routes behind a mount with parameters
    are keyed by template. Called by ``install()`` and again at start-up, for sub-apps mounted
    after it: a sub-app mounted in several apps is served by the last one started.
    """
    found = list(mounted_apps(app))
    limiter = resilience.rate_limiter
    for mounted in found:
        resilience.mounts.add(mounted.template)  # the limiter's mounts too (install())
        sub = mounted.app
        if sub is None:
            continue
        # Its own schema documents what this app's layer answers on its routes.
        document_openapi(sub, resilience, served_by=app, prefix=mounted.template)
        if mounted.installed:
            if limiter is not None:
                limiter.exempt(_exempt_behind(mounted.template, sub.state.resilience))
            continue
        setattr(sub.state, OUTER_STATE_NAME, resilience)
        _add_problem_handlers(sub, resilience.settings)
    return found


def _exempt_behind(template: str, own: Any) -> list[str]:
    """The exempt paths of an app with its own ``install()`` mounted at ``template``, as the
    app around it sees them; none behind a mount with parameters (no literal prefix)."""
    inner = own.rate_limiter
    if inner is None or "{" in template:
        return []
    return [template + path for path in inner.exempt_paths] + [
        f"{template}{prefix}*" for prefix in inner.exempt_prefixes
    ]


def _add_problem_handlers(sub: Starlette, settings: ResilienceSettings) -> None:
    config = ProblemConfig(
        type_base=settings.problem_type_base,
        expose_error_details=settings.expose_error_details,
        correlation_header=settings.correlation_header,
    )
    handlers = sub.exception_handlers
    if handlers.get(HTTPException) is problem_http_handler:
        # Served already, maybe by another app: the handlers render with this app's settings.
        setattr(sub.state, PROBLEM_STATE_KEY, config)
        return
    if AppError in handlers:
        return  # its own
    own = {
        key: handler
        for key, handler in handlers.items()
        if handler not in (fastapi_http_exception_handler, fastapi_validation_handler)
    }
    install_exception_handlers(
        sub,  # type: ignore[arg-type]
        type_base=config.type_base,
        expose_error_details=config.expose_error_details,
        correlation_header=config.correlation_header,
    )
    handlers.update(own)
    # Its stack is built at its first request: rebuilt if it was, to take the handlers in.
    sub.middleware_stack = None


def refuse_websocket_route_limits(routes: Any, where: str = "") -> None:
    """``rate_limit(...)`` is an HTTP dependency: on a WebSocket route it could only fail at
    every connection, so it is refused at start-up, naming the route.

    Raises:
        ConfigurationError: a WebSocket route carries a ``rate_limit`` dependency.
    """
    from fastapi_resilience._asgi.routes import flat_routes
    from fastapi_resilience.ratelimit._routes import route_plan

    for route in flat_routes(routes):
        original = getattr(route, "original_route", route)
        if isinstance(original, WebSocketRoute) and route_plan(route) is not None:
            raise ConfigurationError(
                f"WebSocket route {where}{getattr(route, 'path', '?')}: rate_limit(...) limits "
                "HTTP requests; limit a connection with the limiter's identify() and check() "
                "(docs/rate-limiting.md, 'WebSocket connections and other work')"
            )
