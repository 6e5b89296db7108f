"""The shapes apps take, each built the way users build it, around the same small service.

``build(shape)`` returns the app to serve and where the service's routes are, so that one set of
checks (``tests/test_app_shapes.py``) runs through every shape, under ``TestClient`` and under a
real uvicorn process (``uvicorn tests._shapes:from_environment --factory``, the shape named by
``SHAPE``).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from fastapi import APIRouter, Depends, FastAPI
from pydantic import BaseModel
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fastapi_resilience import (
    ConflictError,
    RequestDeadlineMiddleware,
    ResilienceSettings,
    install,
    rate_limit,
    requires_feature,
)

#: The tier's limit per minute in every shape, and the route limit of ``/login``.
TIER_LIMIT = 5
ROUTE_LIMIT = 2
ORIGIN = "https://ui.example"
#: Where the server's own prefix goes in the ``root_path`` shape (``--root-path``).
ROOT_PATH = "/api"

SHAPES = [
    "plain",
    "router",
    "sub_app",
    "sub_app_installed",
    "sub_app_with_parameter",
    "nested_sub_app",
    "root_path",
    "cors_before",
    "cors_after",
    "asgi_middleware_before",
    "asgi_middleware_after",
    "http_middleware_before",
    "http_middleware_after",
]


@dataclass(frozen=True)
class Built:
    """An app of one shape. ``prefix``: the path of the service's routes as the app sees them
    (a router's prefix, a mount's path); ``root_path``: the server's prefix, ``""`` but in the
    ``root_path`` shape."""

    app: FastAPI
    prefix: str = ""
    root_path: str = ""


class Order(BaseModel):
    sku: str
    quantity: int


def service(router: APIRouter | FastAPI) -> None:
    """The routes every shape serves (on ``router``, wherever the shape puts it)."""

    @router.get("/hello")
    async def hello() -> dict[str, bool]:
        return {"ok": True}

    @router.post("/orders")
    async def create_order(order: Order) -> Order:
        return order

    @router.get("/conflict")
    async def conflict() -> None:
        raise ConflictError("order 7 has already shipped")

    @router.get("/boom")
    async def boom() -> None:
        raise RuntimeError("boom")

    @router.get("/login", dependencies=[Depends(rate_limit(f"{ROUTE_LIMIT}/minute"))])
    async def login() -> dict[str, bool]:
        return {"ok": True}

    @router.get("/exempt/ping", dependencies=[Depends(rate_limit("1/minute"))])
    async def ping() -> dict[str, bool]:
        return {"ok": True}

    @router.get("/exports/orders.csv")
    async def export() -> str:
        return "sku,quantity"

    @router.get("/reports", dependencies=[Depends(requires_feature("reports"))])
    async def reports() -> list[str]:
        return []

    @router.get("/slow")
    async def slow() -> None:
        await asyncio.sleep(30)


def settings(prefix: str, *, features: bool = True) -> ResilienceSettings:
    """The settings of the app that calls ``install()``; ``prefix``: the service's routes as
    that app sees them."""
    return ResilienceSettings(
        rate_limit_tiers={"anonymous": f"{TIER_LIMIT}/minute"},
        rate_limit_exempt_paths=["/health/live", "/health/ready", f"{prefix}/exempt/*"],
        # Under a real server each check comes from its own address, through the loopback.
        trusted_proxies=["127.0.0.1"],
        disabled_features=["exports", "reports"] if features else [],
    )


def install_service(app: FastAPI, prefix: str, *, features: bool = True) -> None:
    """``install()`` with the service's features (both start switched off), and a request
    deadline inside the library's layer (added before ``install()``), as the docs advise."""
    app.add_middleware(RequestDeadlineMiddleware, timeout=30.0)
    resilience = install(app, settings(prefix, features=features))
    if features:
        resilience.degraded.feature("exports", paths=[f"{prefix}/exports"])
        resilience.degraded.feature("reports")


class MarkingMiddleware:
    """A user's pure ASGI middleware: it adds ``X-User-Middleware`` to every answer it sees."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def marked(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), (b"x-user-middleware", b"1")]
            await send(message)

        await self.app(scope, receive, marked)


class MarkingHTTPMiddleware(BaseHTTPMiddleware):
    """The same as a ``BaseHTTPMiddleware``."""

    async def dispatch(
        self, request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        response = await call_next(request)
        response.headers["x-user-middleware"] = "1"
        return response


def _plain() -> FastAPI:
    app = FastAPI()
    service(app)
    return app


def build(shape: str) -> Built:
    """A new app of ``shape`` (fresh limiter state each time)."""
    if shape in ("plain", "root_path"):
        app = _plain()
        install_service(app, "")
        return Built(app, root_path=ROOT_PATH if shape == "root_path" else "")
    if shape == "router":
        app = FastAPI()
        router = APIRouter(prefix="/shop", dependencies=[Depends(_router_dependency)])
        service(router)
        app.include_router(router)
        install_service(app, "/shop")
        return Built(app, "/shop")
    if shape == "sub_app":
        app = FastAPI()
        install_service(app, "/sub")
        app.mount("/sub", _plain())
        return Built(app, "/sub")
    if shape == "sub_app_with_parameter":
        # One tenant's prefix as the client asks for it; the settings name that tenant's paths.
        app = FastAPI()
        install_service(app, "/tenants/acme")
        app.mount("/tenants/{tenant}", _plain())
        return Built(app, "/tenants/acme")
    if shape == "nested_sub_app":
        app = FastAPI()
        install_service(app, "/outer/inner")
        outer = FastAPI()
        outer.mount("/inner", _plain())
        app.mount("/outer", outer)
        return Built(app, "/outer/inner")
    if shape == "sub_app_installed":
        # The app's limiter counts every request, the sub-app's included; the sub-app's own
        # install() serves its features (its paths are its own).
        app = FastAPI()
        install(app, settings("/sub", features=False))
        sub = _plain()
        install_service(sub, "")
        app.mount("/sub", sub)
        return Built(app, "/sub")
    kind, when = shape.rsplit("_", 1)
    app = _plain()
    if when == "before":
        _add_user_middleware(app, kind)
    install_service(app, "")
    if when == "after":
        _add_user_middleware(app, kind)
    return Built(app)


def _add_user_middleware(app: FastAPI, kind: str) -> None:
    if kind == "cors":
        app.add_middleware(CORSMiddleware, allow_origins=[ORIGIN], allow_methods=["*"])
    elif kind == "asgi_middleware":
        app.add_middleware(MarkingMiddleware)
    else:
        app.add_middleware(MarkingHTTPMiddleware)


async def _router_dependency() -> None:
    """A router-level dependency, as routers with shared auth or logging have."""


def from_environment() -> FastAPI:
    """The app of the shape named by ``SHAPE`` (for ``uvicorn --factory``)."""
    return build(os.environ["SHAPE"]).app
