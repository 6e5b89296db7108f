"""Routes at fixed paths that cost other requests as little as possible (ADR 0045).

``install()`` adds ``/health/*`` and ``/metrics`` to the app when it is called, which the README
and most apps do before defining their own routes. Starlette matches routes in order, so every
request of the app's own routes is first tried against these. An included router resolves its
routes in every ``matches``, and a plain ``APIRoute`` runs its regular expression; a
``FixedPathRoute`` turns a request for another path away after one ``str.endswith``
(``python -m benchmarks.route_matching`` measures the three).

Each entry in the route list also costs the router's own loop: in Python 3.11 it reads
``Match.FULL`` and ``Match.PARTIAL`` through ``EnumType.__getattr__`` for every route it tries,
whatever that route's ``matches`` does. :class:`FixedPathRoutes` puts several fixed-path routes
behind one entry, so the app's other requests pay for one (``python -m benchmarks.instructions
--only routes_three_fixed,routes_one_group`` compares it with three ``FixedPathRoute``s).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextvars import ContextVar
from typing import Any

from fastapi.routing import APIRoute, APIRouter, APIWebSocketRoute
from starlette.routing import BaseRoute, Match, Mount, NoMatchFound, Route, WebSocketRoute
from starlette.types import Receive, Scope, Send

from fastapi_resilience._asgi.paths import route_path
from fastapi_resilience._asgi.routes import flat_routes

__all__ = ["FixedPathRoute", "FixedPathRoutes", "add_fixed_route", "route_at"]

# Made once: ``Match.NONE`` is an ``EnumType.__getattr__`` lookup in Python 3.11, and the router
# never reads (or changes) the scope of a route that did not match.
_NONE = Match.NONE
_NO_MATCH: tuple[Match, Scope] = (_NONE, {})
#: The group and route that matched the current request, for the group's ``path``.
_MATCHED: ContextVar[tuple[FixedPathRoutes, APIRoute] | None] = ContextVar(
    "fastapi_resilience_fixed_route", default=None
)


class FixedPathRoute(APIRoute):
    """An ``APIRoute`` whose path has no parameters: other paths are refused before the regex.

    The route's regex is matched against the request's path with any ``root_path`` removed, a
    suffix of ``scope["path"]``; a path that does not end with the route's path cannot match,
    so refusing it early changes no outcome.
    """

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        path = scope.get("path")
        if path is not None and not path.endswith(self.path_format):
            return _NO_MATCH
        return super().matches(scope)


class FixedPathRoutes(BaseRoute):
    """Several fixed-path ``APIRoute``s behind one entry of the app's route list.

    A request for another path costs one dictionary lookup here and one turn of the router's
    loop, however many routes it holds. A request for one of its paths is matched and handled
    by that path's own ``APIRoute``, so methods (405), dependencies and responses are the
    route's. The routes are not in the OpenAPI schema: FastAPI builds it from the app's route
    list, where only this object is.
    """

    def __init__(self) -> None:
        self._by_path: dict[str, APIRoute] = {}

    @property
    def path(self) -> str | None:
        """The template of the route this group matched for the current request, else ``None``.

        Instrumentation reads it as the request's ``http.route`` right after ``matches``
        answered: the match is kept in a context variable, so concurrent requests (each its
        own task and context) never see each other's.
        """
        route = self._matched()
        return None if route is None else route.path

    @property
    def path_format(self) -> str | None:
        route = self._matched()
        return None if route is None else route.path_format

    def _matched(self) -> APIRoute | None:
        matched = _MATCHED.get()
        return matched[1] if matched is not None and matched[0] is self else None

    @property
    def routes(self) -> list[APIRoute]:
        """The routes held, in the order they were added."""
        return list(self._by_path.values())

    def add(self, route: APIRoute) -> None:
        self._by_path[_fixed(route.path_format)] = route

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        # ``route_path`` only when there is a root path to take off: this runs on every request.
        path = route_path(scope) if scope.get("root_path") else scope["path"]
        route = self._by_path.get(path)
        if route is None:
            return _NO_MATCH
        # The route's own match sets ``scope["route"]`` (FULL or PARTIAL), which ``handle`` uses.
        found = route.matches(scope)
        if found[0] is not _NONE:
            # Only the group's own paths (health, metrics) get here: the app's requests pay
            # nothing for the label.
            _MATCHED.set((self, route))
        return found

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        route: APIRoute = scope["route"]
        await route.handle(scope, receive, send)

    def settle(self, routes: list[BaseRoute]) -> None:
        """Move this group back in ``routes`` past every later route that cannot serve its paths.

        Called at start-up, when the app's routes are known (ADR 0045). The router tries routes
        in order, so a request for one of the group's paths meets the same routes before it as
        before (none of those it moved past can match that path, nor answers ``url_path_for``
        for one of its route names), while every request for the app's other routes no longer
        pays a turn of the router's loop for the group. It stops at the first route that might
        serve one of its paths or names, and at any route whose matching it cannot judge from
        the path alone (a ``Host``, a class with its own ``matches``).
        """
        start = next((i for i, route in enumerate(routes) if route is self), None)
        if start is None:
            return
        end = start + 1
        while end < len(routes) and self._cannot_serve(routes[end]):
            end += 1
        if end > start + 1:  # otherwise it stays where it is, and the list is left alone
            routes.insert(end, self)
            del routes[start]

    def _cannot_serve(self, route: BaseRoute) -> bool:
        if type(route).matches not in _PATH_ONLY_MATCHES:
            return False
        # ``url_path_for`` tries routes in order: one that answers a name must stay behind.
        if any(_answers(route, held.name) for held in self._by_path.values()):
            return False
        return all(
            route.matches(
                {"type": "http", "path": path, "root_path": "", "method": "GET", "headers": []}
            )[0]
            is Match.NONE
            for path in self._by_path
        )

    def url_path_for(self, name: str, /, **path_params: Any) -> Any:
        for route in self._by_path.values():
            try:
                return route.url_path_for(name, **path_params)
            except NoMatchFound:
                continue
        raise NoMatchFound(name, path_params)

    def __repr__(self) -> str:
        return f"FixedPathRoutes({list(self._by_path)})"


def _answers(route: BaseRoute, name: str) -> bool:
    """Whether ``route.url_path_for(name)`` gives a path (or fails other than "no match")."""
    try:
        route.url_path_for(name)
    except NoMatchFound:
        return False
    except Exception:  # a route that cannot even answer that: do not judge it
        return True
    return True


#: ``matches`` of the route classes whose answer depends only on the request's type, path and
#: method: ``FixedPathRoutes.settle`` can tell from a probe that one serves none of its paths.
_PATH_ONLY_MATCHES = frozenset(
    {
        Route.matches,
        APIRoute.matches,
        Mount.matches,
        FixedPathRoute.matches,
        WebSocketRoute.matches,
        APIWebSocketRoute.matches,
    }
)


def route_at(routes: Iterable[BaseRoute], path: str) -> BaseRoute | None:
    """The first of ``routes`` written for a GET of exactly ``path``: a route with that path
    that answers GET, or a ``Mount`` there (``/metrics`` then redirects into it).

    Routes with parameters (a catch-all) and ``Mount``s elsewhere do not count: they serve
    what no route was written for, and the router keeps the fixed paths ahead of the
    catch-alls defined after ``install()`` (ADR 0045).
    """
    # Included routers' routes too, with their prefixes (one entry of the list in FastAPI).
    for context in flat_routes(list(routes)):
        route = getattr(context, "original_route", context)
        if getattr(context, "path", None) != path:
            continue
        if isinstance(route, Mount):
            return route
        methods = getattr(context, "methods", None)
        if isinstance(route, Route) and (methods is None or "GET" in methods):
            return route
    return None


def _fixed(path: str) -> str:
    if "{" in path:
        raise ValueError(f"{path!r}: a fixed route takes no path parameters")
    return path


def add_fixed_route(
    router: APIRouter,
    path: str,
    endpoint: Callable[..., Any],
    *,
    group: FixedPathRoutes | None = None,
    **options: Any,
) -> None:
    """``router.add_api_route`` for GET at ``path`` (no parameters).

    With ``group``, the route goes into that :class:`FixedPathRoutes` (which must already be in
    the router's list where the routes should rank) and stays out of the OpenAPI schema;
    otherwise it is added to the router as a :class:`FixedPathRoute`.
    """
    # In a group a plain ``APIRoute``: the group has found the exact path before it is asked.
    router.add_api_route(
        _fixed(path),
        endpoint,
        methods=["GET"],
        route_class_override=FixedPathRoute if group is None else APIRoute,
        **options,
    )
    if group is not None:
        # Built by the router, so the route has the router's settings (dependency overrides,
        # response class); then moved from the router's list into the group.
        route = router.routes[-1]
        if not isinstance(route, APIRoute) or route.endpoint is not endpoint:  # pragma: no cover
            # Every FastAPI appends the route it adds; anything else would move the wrong one.
            raise TypeError(f"expected the route just added for {path!r}, got {route!r}")
        router.routes.pop()
        group.add(route)
