"""Routes at fixed paths that cost other requests one string comparison (ADR 0045).

``install()`` adds ``/health/*`` and ``/metrics`` to the app when it is called, which the README
and most apps do before defining their own routes. Starlette matches routes in order, so every
request of the app's own routes is first tried against these. With FastAPI 0.165 and its docs
off, an included router costs each such request 2.43 µs (it resolves its routes in every
``matches``) and a plain ``APIRoute`` 0.75 µs; a ``FixedPathRoute`` turns a request for another
path away after one ``str.endswith``, 0.28 µs (``python -m benchmarks.route_matching``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi.routing import APIRoute, APIRouter
from starlette.routing import Match
from starlette.types import Scope

__all__ = ["FixedPathRoute", "add_fixed_route"]


class FixedPathRoute(APIRoute):
    """An ``APIRoute`` whose path has no parameters: other paths are refused before the regex.

    The route's regex is matched against the request's path with any ``root_path`` removed, a
    suffix of ``scope["path"]``; a path that does not end with the route's path cannot match,
    so refusing it early changes no outcome.
    """

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        path = scope.get("path")
        if path is not None and not path.endswith(self.path_format):
            return Match.NONE, {}
        return super().matches(scope)


def add_fixed_route(
    router: APIRouter, path: str, endpoint: Callable[..., Any], **options: Any
) -> None:
    """``router.add_api_route`` for GET at ``path`` (no parameters) as a :class:`FixedPathRoute`."""
    if "{" in path:
        raise ValueError(f"{path!r}: a fixed route takes no path parameters")
    router.add_api_route(
        path, endpoint, methods=["GET"], route_class_override=FixedPathRoute, **options
    )
