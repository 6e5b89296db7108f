"""Walking an app's routes and their dependencies, for what must be found before a request.

The rate limiter finds the routes that carry ``rate_limit(...)`` (ADR 0013) and ``install``
checks at start-up that every ``requires_feature(...)`` names a declared feature: both look
through the same routes, included routers too, and the same dependency trees.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from starlette.routing import BaseRoute

__all__ = ["dependency_calls", "flat_routes"]


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
