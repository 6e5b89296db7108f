"""The private fixed-path routes that install() serves health and metrics from (ADR 0046).

A unit test of one private helper, so it imports that helper's module: what users see of it
(one route entry, reachable by name, its place among the app's routes) is tested through
install() in tests/test_install.py.
"""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.routing import Match

from fastapi_resilience._asgi.fixed_routes import FixedPathRoute, FixedPathRoutes, add_fixed_route


def test_fixed_route_refuses_other_paths_and_parameters() -> None:
    """The early refusal only ever answers NONE for a path the route's regex would refuse."""

    async def endpoint() -> None:  # pragma: no cover - only matched, never called
        return None

    route = FixedPathRoute("/health/live", endpoint, methods=["GET"])
    scope = {"type": "http", "method": "GET", "root_path": ""}
    assert route.matches({**scope, "path": "/orders"})[0] is Match.NONE
    assert route.matches({**scope, "path": "/x/health/live"})[0] is Match.NONE
    assert route.matches({**scope, "path": "/health/live"})[0] is Match.FULL
    assert route.matches({**scope, "path": "/health/live", "method": "POST"})[0] is Match.PARTIAL
    app = FastAPI()
    with pytest.raises(ValueError, match="no path parameters"):
        add_fixed_route(app.router, "/items/{item_id}", endpoint)


def test_fixed_path_group_matches_only_its_paths_under_a_root_path() -> None:
    async def endpoint() -> None:  # pragma: no cover - only matched, never called
        return None

    app = FastAPI()
    group = FixedPathRoutes()
    app.router.routes.append(group)
    add_fixed_route(app.router, "/health/live", endpoint, group=group)
    assert app.routes[-1] is group
    scope = {"type": "http", "method": "GET", "root_path": "/api"}
    assert group.matches({**scope, "path": "/api/health/live"})[0] is Match.FULL
    assert group.matches({**scope, "path": "/api/health/live", "method": "POST"})[0] is (
        Match.PARTIAL
    )
    # Starlette takes a root path off only at a "/" boundary: "/apix/..." is not under "/api".
    assert group.matches({**scope, "path": "/apix/health/live"})[0] is Match.NONE
    assert group.matches({**scope, "path": "/api"})[0] is Match.NONE
    assert group.matches({**scope, "path": "/orders", "root_path": ""})[0] is Match.NONE
    assert group.matches({**scope, "path": "/health/live", "root_path": ""})[0] is Match.FULL
    assert "/health/live" in repr(group)
    with pytest.raises(ValueError, match="no path parameters"):
        group.add(APIRoute("/items/{item_id}", endpoint))
