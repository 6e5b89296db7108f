"""What a route the request does not want costs it: ``matches`` timed for another path.

Starlette tries routes in order, so every route defined before an app's own routes costs
each of its requests one ``matches`` call. ``install()`` adds health and metrics routes when it
is called, usually before the app's routes (ADR 0045)::

    python -m benchmarks.route_matching

``matches`` is not all of it: the router's loop pays for each entry too (ADR 0046). The whole
cost per request, in instructions, of the app's route behind install()'s three fixed-path
routes, or behind the one entry that holds them::

    python -m benchmarks.instructions --only routes_three_fixed,routes_one_group
"""

from __future__ import annotations

import timeit

from fastapi import APIRouter, FastAPI
from starlette.routing import BaseRoute

from benchmarks.apps import tiny_app
from fastapi_resilience._asgi.fixed_routes import FixedPathRoutes, add_fixed_route

_FIXED_PATHS = ("/health/live", "/health/ready", "/metrics")


async def _live() -> dict[str, str]:  # pragma: no cover - matched, never called
    return {"status": "ok"}


def _first_route(build: str, *, docs: bool) -> BaseRoute:
    # Without docs (``openapi_url=None``, common in production) FastAPI 0.165 never resolves
    # an included router's routes ahead, and resolves them on every ``matches``.
    app = FastAPI() if docs else FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    if build == "included router":
        router = APIRouter(prefix="/health")
        router.add_api_route("/live", _live, methods=["GET"])
        app.include_router(router)
    elif build == "APIRoute":
        app.add_api_route("/health/live", _live, methods=["GET"])
    else:
        add_fixed_route(app.router, "/health/live", _live)
    return app.router.routes[0]


def _three_fixed(app: FastAPI) -> None:
    for path in _FIXED_PATHS:
        add_fixed_route(app.router, path, _live)


def _one_group(app: FastAPI) -> None:
    group = FixedPathRoutes()
    app.router.routes.append(group)
    for path in _FIXED_PATHS:
        add_fixed_route(app.router, path, _live, group=group)


#: Apps for ``benchmarks.instructions`` (in process only): the benchmark's route behind
#: install()'s routes as three entries (``health_in_schema=True``) or as one (the default).
ROUTE_PROBES = {
    "routes_three_fixed": lambda: tiny_app(_three_fixed),
    "routes_one_group": lambda: tiny_app(_one_group),
}


def main() -> int:
    scope = {"type": "http", "path": "/", "root_path": "", "method": "GET", "headers": []}
    print("| route kind | app | µs per request for another path |")
    print("| :--- | :--- | ---: |")
    for docs in (True, False):
        for build in ("included router", "APIRoute", "FixedPathRoute"):
            route = _first_route(build, docs=docs)
            timer = timeit.Timer(lambda r=route: r.matches(scope))  # type: ignore[misc]
            best = min(timer.repeat(number=20_000, repeat=7))
            app = "with docs" if docs else "openapi_url=None"
            print(f"| {build} | {app} | {best / 20_000 * 1e6:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
