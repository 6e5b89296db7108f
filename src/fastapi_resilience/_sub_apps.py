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
from starlette.routing import Mount, WebSocketRoute

from fastapi_resilience._app_state import APP_STATE_NAME, OUTER_STATE_NAME
from fastapi_resilience._handlers import http_exception_handler as problem_http_handler
from fastapi_resilience._handlers import install_exception_handlers
from fastapi_resilience._settings import ResilienceSettings
from fastapi_resilience.exceptions import AppError, ConfigurationError

__all__ = [
    "MountedApp",
    "mounted_apps",
    "refuse_websocket_route_limits",
    "serve_mounted_apps",
]


@dataclass(frozen=True, slots=True)
class MountedApp:
    """A Starlette app mounted somewhere under an app: its full mount template (nested mounts
    joined, ``/tenants/{tenant}/v2``) and whether it called ``install()`` itself."""

    app: Starlette
    template: str
    installed: bool


def mounted_apps(app: Starlette, prefix: str = "") -> Iterator[MountedApp]:
    """Every Starlette app mounted under ``app``, depth first.

    Below a sub-app with its own ``install()`` nothing is yielded: that one serves its own.
    """
    for route in getattr(app.router, "routes", ()):
        sub = getattr(route, "app", None)
        if not isinstance(route, Mount) or not isinstance(sub, Starlette):
            continue
        installed = getattr(sub.state, APP_STATE_NAME, None) is not None
        template = prefix + route.path
        yield MountedApp(sub, template, installed)
        if not installed:
            yield from mounted_apps(sub, template)


def serve_mounted_apps(app: Starlette, resilience: Any) -> list[MountedApp]:
    """Serve every sub-app mounted under ``app`` as part of it; returns them.

    A sub-app without its own ``install()`` gets the app's problem handlers (its 404, 422, 429
    and 500 answer like the app's; handlers it registered itself stay) and finds the app's
    ``resilience`` from its routes (``requires_feature``, ``rate_limit``). Every mount's
    template is given to the app's limiter, so routes behind a mount with parameters are
    keyed by template. Called by ``install()`` and again at start-up, for sub-apps mounted
    after it.

    Raises:
        ConfigurationError: a sub-app is already served by another app's ``install()``.
    """
    found = list(mounted_apps(app))
    limiter = resilience.rate_limiter
    for mounted in found:
        if limiter is not None:
            limiter.mounts.add(mounted.template)
        if mounted.installed:
            continue
        sub = mounted.app
        outer = getattr(sub.state, OUTER_STATE_NAME, None)
        if outer is not None and outer is not resilience:
            raise ConfigurationError(
                f"the app mounted at {mounted.template!r} is already mounted in another app "
                "that called install(); mount one instance in one app, or call install() on "
                "it so that it serves itself"
            )
        setattr(sub.state, OUTER_STATE_NAME, resilience)
        _add_problem_handlers(sub, resilience.settings)
    return found


def _add_problem_handlers(sub: Starlette, settings: ResilienceSettings) -> None:
    handlers = sub.exception_handlers
    if AppError in handlers or handlers.get(HTTPException) is problem_http_handler:
        return  # its own, or served already
    own = {
        key: handler
        for key, handler in handlers.items()
        if handler not in (fastapi_http_exception_handler, fastapi_validation_handler)
    }
    install_exception_handlers(
        sub,  # type: ignore[arg-type]
        type_base=settings.problem_type_base,
        expose_error_details=settings.expose_error_details,
        correlation_header=settings.correlation_header,
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
    from fastapi_resilience._rate_limit_routes import route_plan
    from fastapi_resilience._route_walk import flat_routes

    for route in flat_routes(routes):
        original = getattr(route, "original_route", route)
        if isinstance(original, WebSocketRoute) and route_plan(route) is not None:
            raise ConfigurationError(
                f"WebSocket route {where}{getattr(route, 'path', '?')}: rate_limit(...) limits "
                "HTTP requests; limit a connection with the limiter's identify() and check() "
                "(docs/rate-limiting.md, 'WebSocket connections and other work')"
            )
