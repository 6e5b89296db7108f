"""An orders API that shows what fastapi-resilience gives a service.

Run it with ``make run`` (127.0.0.1:8000, in-memory defaults, no Redis needed), then try:

    curl -i 127.0.0.1:8000/orders/1            # 200, with X-Request-ID
    curl -i 127.0.0.1:8000/orders/999          # 404 problem+json
    curl -i -X POST 127.0.0.1:8000/orders -H 'content-type: application/json' \\
         -d '{"sku": "", "quantity": 0}'         # 422 problem+json with an `errors` list
    curl -i 127.0.0.1:8000/nowhere             # 404 for an unknown route, same shape
    curl -i 127.0.0.1:8000/health/ready
    curl -i 127.0.0.1:8000/orders/1 -H 'X-API-Key: demo-premium-key'   # premium tier headers
    curl -i 127.0.0.1:8000/inventory/tea-earl-grey   # through breaker, retry, bulkhead, cache
    curl -X POST 127.0.0.1:8001/_control -H 'content-type: application/json' \\
         -d '{"failure_rate": 1.0}'                 # make the upstream fail: answers go stale
    curl -i 127.0.0.1:8000/exports/orders.csv  # 503 feature_unavailable when started with
                                               # RESILIENCE_DISABLED_FEATURES='["exports"]'
    curl -i 127.0.0.1:8000/inventory/tea-earl-grey/live   # the inventory feature: 503 while
                                               # the inventory breaker is open
    open http://127.0.0.1:8000/resilience/     # the dashboard (make run prints its token)
"""

from __future__ import annotations

import asyncio
import logging
import os
import tracemalloc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import BackgroundTasks, Depends, FastAPI, Query
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, Field

from example_app import rate_limits
from example_app.outbound import INVENTORY_FEATURE, inventory
from example_app.outbound import router as outbound_router
from fastapi_resilience import (
    ConflictError,
    CorrelationIdFilter,
    NotFoundError,
    ResilienceSettings,
    get_correlation_id,
    install,
    problem_responses,
    requires_feature,
)

#: Set to ``1`` to serve ``GET /_runtime``: the process's id and its count of asyncio tasks,
#: which nothing outside the process can read (the soak run samples it). Off by default: it
#: tells the world about the process. When the process also runs with ``PYTHONTRACEMALLOC``
#: set, the answer adds the memory Python's allocations hold (``traced``, ``traced_peak``, in
#: bytes) and, with ``?top=N``, the ``N`` source lines holding the most of it.
RUNTIME_STATS_ENV = "EXAMPLE_RUNTIME_STATS"

LOG_FORMAT = "%(asctime)s %(levelname)s [%(correlation_id)s] %(name)s: %(message)s"


def configure_logging() -> None:
    """Every record, the library's included, carries the request's correlation ID."""
    handler = logging.StreamHandler()
    handler.addFilter(CorrelationIdFilter())
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


log = logging.getLogger("example_app.orders")


def _traced(top: int) -> dict[str, Any]:
    """What tracemalloc sees, when it traces (``PYTHONTRACEMALLOC``): nothing otherwise."""
    if not tracemalloc.is_tracing():
        return {}
    current, peak = tracemalloc.get_traced_memory()
    result: dict[str, Any] = {"traced": current, "traced_peak": peak}
    if top > 0:
        stats = tracemalloc.take_snapshot().statistics("lineno")[:top]
        result["top"] = [
            {
                "where": f"{s.traceback[0].filename}:{s.traceback[0].lineno}",
                "size": s.size,
                "count": s.count,
            }
            for s in stats
        ]
    return result


class OrderIn(BaseModel):
    sku: Annotated[str, Field(min_length=1, max_length=32)]
    quantity: Annotated[int, Field(gt=0, le=1000)]


class Order(OrderIn):
    id: int
    status: str = "placed"


class OrderStore:
    """A stand-in for a database: enough to show the errors a real one produces."""

    def __init__(self) -> None:
        self._orders: dict[int, Order] = {1: Order(id=1, sku="tea-earl-grey", quantity=2)}
        self.reachable = True

    def get(self, order_id: int) -> Order:
        try:
            return self._orders[order_id]
        except KeyError:
            raise NotFoundError(
                f"order {order_id} does not exist", extensions={"order_id": order_id}
            ) from None

    def all(self) -> list[Order]:
        return [self._orders[key] for key in sorted(self._orders)]

    def add(self, order: OrderIn) -> Order:
        new = Order(id=max(self._orders, default=0) + 1, **order.model_dump())
        self._orders[new.id] = new
        return new

    def ship(self, order_id: int) -> Order:
        order = self.get(order_id)
        if order.status == "shipped":
            raise ConflictError(
                f"order {order_id} has already shipped", extensions={"order_id": order_id}
            )
        order.status = "shipped"
        return order


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    await inventory.aclose()


def create_app(settings: ResilienceSettings | None = None) -> FastAPI:
    configure_logging()
    app = FastAPI(title="Orders (fastapi-resilience example)", lifespan=lifespan)
    resilience = install(app, settings)
    store = OrderStore()
    app.state.store = store

    async def store_check() -> bool:
        return store.reachable

    resilience.health.add("orders_store", store_check, timeout=0.5)

    def confirm(order_id: int) -> None:
        # Runs after the answer is sent; the log line still carries the request's ID.
        log.info("confirmation queued for order %s", order_id)

    # The errors the routes raise themselves, declared so that the schema lists them: the
    # library documents only the answers it adds (ADR 0077).
    @app.get(
        "/orders/{order_id}",
        responses=problem_responses({404: "No order with this ID (`not_found`)."}),
    )
    async def get_order(order_id: int) -> Order:
        return store.get(order_id)

    @app.post("/orders", status_code=201)
    async def place_order(order: OrderIn, background: BackgroundTasks) -> Order:
        created = store.add(order)
        log.info("order %s placed", created.id)
        background.add_task(confirm, created.id)
        return created

    @app.post(
        "/orders/{order_id}/ship",
        responses=problem_responses(
            {
                404: "No order with this ID (`not_found`).",
                409: "The order has already shipped (`conflict`).",
            }
        ),
    )
    async def ship_order(order_id: int) -> Order:
        return store.ship(order_id)

    # Calls to the flaky inventory upstream (example_app/upstream.py, started by `make run`).
    app.include_router(outbound_router)
    # Live stock needs the upstream: off while its breaker is open, on again when it closes.
    resilience.degraded.feature(
        INVENTORY_FEATURE,
        depends_on=[inventory.breaker.name],
        description="live stock from the inventory upstream",
    )
    # The upstream's readiness check, watched in the background when the health monitor runs
    # (the example turns it on): a failing upstream is reported in /health/ready, and new
    # connection pools are tried. The service's clients close after the app's shutdown.
    inventory.catalog.register(resilience, app=app, recover=[inventory.reconnect])
    # Parked reservations, listed and replayed through the admin API and the dashboard.
    resilience.use_dead_letters(inventory.dead_letters, replay=inventory.replay)
    # POST /login: 5 a minute per client, on top of the tier's limit.
    app.include_router(rate_limits.router)

    # Degraded mode: a feature the service can do without, switched off by hand
    # (resilience.degraded.disable("exports")) or from the environment at start-up.
    resilience.degraded.feature("exports", paths=["/exports"])

    @app.get(
        "/exports/orders.csv",
        dependencies=[Depends(requires_feature("exports"))],
        response_class=PlainTextResponse,  # so the schema says text/plain, as the answer is
    )
    async def export_orders() -> PlainTextResponse:
        rows = [f"{o.id},{o.sku},{o.quantity},{o.status}" for o in store.all()]
        return PlainTextResponse("\n".join(["id,sku,quantity,status", *rows]) + "\n")

    @app.get("/whoami")
    async def whoami() -> dict[str, str | None]:
        return {"correlation_id": get_correlation_id()}

    if os.environ.get(RUNTIME_STATS_ENV) == "1":

        @app.get("/_runtime", include_in_schema=False)
        async def runtime(top: Annotated[int, Query(ge=0, le=1000)] = 0) -> dict[str, Any]:
            return {"pid": os.getpid(), "tasks": len(asyncio.all_tasks()), **_traced(top)}

    @app.get("/debug/crash", include_in_schema=False)
    async def crash() -> None:
        # An unhandled error: the client sees a sanitized 500, the log has the traceback.
        raise RuntimeError("secret: the database password is hunter2")

    return app


app = create_app(rate_limits.example_settings())
