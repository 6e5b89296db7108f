"""Walking an app's routes and their dependencies, for what must be found before a request.

The rate limiter finds the routes that carry ``rate_limit(...)`` (ADR 0013) and ``install``
checks at start-up that every ``requires_feature(...)`` names a declared feature: both look
through the same routes, included routers too, and the same dependency trees.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from starlette.routing import BaseRoute
from starlette.types import Scope

from fastapi_resilience._asgi.paths import MountTemplates, mount_prefix

__all__ = ["UNMATCHED_ROUTE", "dependency_calls", "flat_routes", "route_template"]

#: The route label of a request that matched no route, or was answered before routing (a 429
#: of the rate limiter, a 503 of a feature's path): one value for all of them.
UNMATCHED_ROUTE = "(unmatched)"


def flat_routes(routes: Sequence[BaseRoute]) -> list[Any]:
    """The routes in routing order, those of included routers with them.

    FastAPI >= 0.137 keeps ``include_router``'s routes inside one entry of the route list;
    its ``iter_route_contexts`` yields them with their full path and dependencies.
    """
    try:
        from fastapi.routing import iter_route_contexts  # type: ignore[attr-defined,unused-ignore]
    except ImportError:  # pragma: no cover - older FastAPI keeps included routes flat
        return list(routes)
    return list(iter_route_contexts(routes))


def dependency_calls(dependant: Any) -> Iterator[Any]:
    """Every callable of a route's dependency tree (``route.dependant``), depth first, the
    route's own first; nothing for ``None``."""
    if dependant is None:
        return
    call = getattr(dependant, "call", None)
    if call is not None:
        yield call
    for sub in getattr(dependant, "dependencies", ()) or ():
        yield from dependency_calls(sub)


def route_template(scope: Scope, mounts: MountTemplates | None = None) -> str:
    """The template of the route the request matched, behind the templates of the mounts in
    front of it (``/tenants/{tenant}/orders/{order_id}``): a label, never the raw path, so a
    path segment cannot make a new series. :data:`UNMATCHED_ROUTE` without a route."""
    route = scope.get("route")
    path = getattr(route, "path_format", None) or getattr(route, "path", None)
    if not isinstance(path, str):
        return UNMATCHED_ROUTE
    prefix = mount_prefix(scope)
    if not prefix:
        return path
    return (mounts.template(prefix) if mounts is not None else prefix) + path
