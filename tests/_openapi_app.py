"""A small app with every answer the library adds, for the OpenAPI schema's tests.

Tier and route limits, a breaker (held open), a bulkhead, a named policy, features (off, by
path and by dependency), a request deadline, a deadline dependency, a router with a prefix, a
mounted sub-app and routes with their own ``responses=``. ``tests/test_openapi.py`` reads its
schema; schemathesis runs against it under uvicorn
(``uvicorn tests._openapi_app:create_app --factory``).
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Query
from pydantic import BaseModel, Field

from fastapi_resilience import (
    Bulkhead,
    CircuitBreaker,
    NotFoundError,
    RequestDeadlineMiddleware,
    ResilienceSettings,
    breaker_dependency,
    bulkhead_dependency,
    deadline_dependency,
    install,
    policy,
    rate_limit,
    requires_feature,
    timeout,
)
from fastapi_resilience.outbound import BreakerRegistry, BulkheadRegistry, Policy

#: The tier's limit: high enough that a schemathesis run reaches the routes (`/login` and
#: `/shop/items/{item_id}` meet their own limits' 429).
TIER_LIMIT = "1000/minute"
#: The route limit of ``/login``.
LOGIN_LIMIT = "3/minute"
#: The request deadline ``RequestDeadlineMiddleware`` gives every request, seconds.
REQUEST_DEADLINE = 0.5


class OrderIn(BaseModel):
    sku: str = Field(min_length=1, max_length=32)
    quantity: int = Field(ge=1, le=100)


class Order(OrderIn):
    id: int


def settings(**overrides: Any) -> ResilienceSettings:
    values: dict[str, Any] = {
        "rate_limit_tiers": {"anonymous": TIER_LIMIT},
        "rate_limit_exempt_paths": ["/health/live", "/health/ready", "/metrics", "/public/*"],
        "disabled_features": ["exports"],
        "policies": {"catalog": {"criticality": "standard"}},
        "admin_token": "an-admin-token-of-32-characters!",
        # Under TestClient an unhandled error would be raised again into the test.
        "raise_server_exceptions": False,
    }
    values.update(overrides)
    return ResilienceSettings(**values)


def create_app(**overrides: Any) -> FastAPI:
    """A new app with its own breaker and bulkhead registries (tests build many)."""
    breakers = BreakerRegistry()
    bulkheads = BulkheadRegistry()
    stock_breaker = CircuitBreaker("stock", registry=breakers)
    stock_breaker.force_open(3600)  # held open: every call to /stock answers 503 circuit_open
    Bulkhead("reserve", max_concurrent=1, registry=bulkheads)

    app = FastAPI(title="openapi-schema test app")
    app.add_middleware(RequestDeadlineMiddleware, timeout=REQUEST_DEADLINE)
    resilience = install(app, settings(**overrides))
    resilience.degraded.feature("exports", paths=["/exports"])
    resilience.degraded.feature("reports")
    orders: dict[int, Order] = {}

    @app.get("/plain/{item}")
    async def plain(item: int) -> dict[str, int]:
        return {"item": item}

    @app.get("/public/ping")
    async def public_ping() -> dict[str, bool]:
        return {"ok": True}

    @app.post("/orders", status_code=201)
    async def place_order(order: OrderIn) -> Order:
        new = Order(id=len(orders) + 1, **order.model_dump())
        orders[new.id] = new
        return new

    @app.get(
        "/orders/{order_id}",
        responses={404: {"description": "No such order."}},
    )
    async def get_order(order_id: int) -> Order:
        if order_id not in orders:
            raise NotFoundError(f"order {order_id} does not exist")
        return orders[order_id]

    @app.post("/login", dependencies=[Depends(rate_limit(LOGIN_LIMIT))])
    async def login() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/stock/{sku}")
    async def stock(
        sku: str,
        breaker: CircuitBreaker = Depends(breaker_dependency("stock", registry=breakers)),  # noqa: B008
    ) -> dict[str, Any]:
        async def fetch() -> dict[str, Any]:
            return {"sku": sku, "stock": 3}

        result: dict[str, Any] = await breaker.call(fetch)
        return result

    @app.post("/reserve/{sku}")
    async def reserve(
        sku: str,
        bulkhead: Bulkhead = Depends(bulkhead_dependency("reserve", registry=bulkheads)),  # noqa: B008
    ) -> dict[str, str]:
        async with bulkhead:
            return {"sku": sku}

    @app.get("/catalog/{sku}")
    async def catalog(sku: str, guards: Policy = Depends(policy("catalog"))) -> dict[str, str]:  # noqa: B008
        async def fetch() -> dict[str, str]:
            return {"sku": sku}

        result: dict[str, str] = await guards.call(fetch)
        return result

    @app.get("/exports/orders.csv")
    async def export_orders() -> dict[str, int]:
        return {"orders": len(orders)}

    @app.get("/reports", dependencies=[Depends(requires_feature("reports"))])
    async def reports() -> list[str]:
        return []

    @app.get("/slow")
    async def slow(delay: float = Query(0.0, ge=0, le=1.0)) -> dict[str, float]:
        await asyncio.sleep(delay)
        return {"slept": delay}

    @app.get("/budget", dependencies=[Depends(deadline_dependency(0.2))])
    async def budget(delay: float = Query(0.0, ge=0, le=0.5)) -> dict[str, float]:
        async with timeout(None):  # inherits what is left of the route's deadline
            await asyncio.sleep(delay)
        return {"slept": delay}

    @app.get(
        "/custom",
        responses={
            429: {"description": "Slow down: the app's own words."},
            503: {"description": "Closed for maintenance."},
        },
        dependencies=[Depends(requires_feature("reports"))],
    )
    async def custom() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/hidden", include_in_schema=False)
    async def hidden() -> dict[str, bool]:
        return {"ok": True}

    shop = APIRouter(prefix="/shop", tags=["shop"])

    @shop.get("/items/{item_id}", dependencies=[Depends(rate_limit("30/minute"))])
    async def shop_item(item_id: int) -> dict[str, int]:
        return {"item": item_id}

    app.include_router(shop)
    app.mount("/v2", _sub_app())
    return app


def _sub_app() -> FastAPI:
    sub = FastAPI(title="v2")

    @sub.get("/hello/{name}")
    async def hello(name: str) -> dict[str, str]:
        return {"hello": name}

    @sub.get("/search", dependencies=[Depends(rate_limit("20/minute"))])
    async def search(q: str = "") -> list[str]:
        return [q] if q else []

    return sub
