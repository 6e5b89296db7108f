"""Routes that call a flaky upstream through breaker, retry, bulkhead, cache and fallback.

The upstream is ``example_app.upstream`` (start it with ``python -m example_app.upstream``;
its URL comes from ``EXAMPLE_INVENTORY_URL``, default ``http://127.0.0.1:8001``).

One read, from the outside in::

    cache (fresh? answer; failed? serve stale, marked) -> breaker -> retry -> bulkhead -> httpx

- ``GET /inventory/{sku}``: the stock level. When the upstream fails and a stale copy is at
  hand, the answer is that copy with ``"stale": true`` and a ``Cache-Status`` header whose
  ``ttl`` is negative. With nothing cached, the error is the answer (503 ``circuit_open``
  with ``Retry-After``, or 502 ``retries_exhausted``).
- ``GET /inventory/{sku}/availability``: never fails because of the upstream: a fallback
  answers ``"available": null, "degraded": true`` when there is nothing better.
- ``GET /catalog/{sku}``: the same read through :class:`InventoryService`, an
  ``ExternalService`` whose client applies the named policy ``catalog`` (cache, retry, breaker,
  bulkhead and timeout, declared in the settings: ``example_app.rate_limits.POLICIES``); the
  upstream's JSON is passed on with the transport's ``Cache-Status`` header. The service also
  brings the ``inventory_upstream`` readiness check, with its recovery action.
- ``GET /inventory/{sku}/live``: the stock straight from the upstream, no cache: the
  ``inventory`` feature, off (503 ``feature_unavailable``, ``X-Degraded: inventory``) while the
  inventory breaker is open, back on by itself once the upstream answers again.
- ``POST /inventory/{sku}/reserve``: not idempotent, so never retried; a failure is parked in
  the dead-letter queue (202), which an operator lists and replays through the admin API
  (``GET /resilience/api/dead-letters``, ``POST /resilience/api/dead-letters/replay``).

Every value forwarded into an upstream URL is validated first (:data:`Sku`, :data:`Quantity`):
one that could not be forwarded as it is (a control character, a slash, a dot segment, too
long) is answered 422 problem+json, like any other invalid input, before a URL is built.
"""

from __future__ import annotations

import asyncio
import os
from typing import Annotated, Any, NamedTuple

import httpx
from fastapi import APIRouter, Depends, Path, Query, Response
from fastapi.responses import JSONResponse

from fastapi_resilience import (
    Bulkhead,
    CircuitBreaker,
    ExternalService,
    Retry,
    RetryBudget,
    problem_responses,
    requires_feature,
)
from fastapi_resilience.clock import SYSTEM_CLOCK, Clock
from fastapi_resilience.exceptions import (
    NotFoundError,
    ServerError,
    UpstreamError,
    UpstreamTimeoutError,
)
from fastapi_resilience.outbound import (
    CACHE_STATUS_HEADER,
    CacheResult,
    CorrelationIdTransport,
    DeadLetter,
    MemoryDeadLetterQueue,
    ResponseCache,
    with_fallback,
)

__all__ = [
    "INVENTORY_FEATURE",
    "INVENTORY_URL_ENV",
    "RECOVERY_ENV",
    "SKU_PATTERN",
    "CatalogEntry",
    "Inventory",
    "InventoryService",
    "Quantity",
    "Sku",
    "build_router",
    "inventory",
    "router",
]

INVENTORY_URL_ENV = "EXAMPLE_INVENTORY_URL"
#: Seconds the inventory breaker stays open before it tries the upstream again (default 10).
RECOVERY_ENV = "EXAMPLE_INVENTORY_RECOVERY_SECONDS"
#: The feature that needs the inventory upstream (and its breaker, of the same name).
INVENTORY_FEATURE = "inventory"

#: A SKU the example forwards into the upstream's URL path as it is: ASCII letters, digits,
#: ``.``, ``_`` and ``-``, starting with a letter or digit (so never ``.`` or ``..``), at most
#: 64 characters. Nothing in it needs escaping, so the upstream sees the SKU the caller sent.
SKU_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
#: The ``{sku}`` path parameter of every inventory route: anything else is a 422.
Sku = Annotated[
    str,
    Path(
        pattern=SKU_PATTERN,
        max_length=64,
        description="Letters, digits, '.', '_' and '-'; starts with a letter or digit.",
        examples=["tea-earl-grey"],
    ),
]
#: Units to reserve, forwarded as the upstream's ``qty`` query parameter.
Quantity = Annotated[int, Query(ge=1, le=1000)]


class InventoryError(UpstreamError):
    """The inventory answered 5xx; ``upstream_status`` is its status code."""

    def __init__(self, status: int) -> None:
        super().__init__(f"Inventory answered {status}.", extensions={"upstream_status": status})
        self.upstream_status = status


class CatalogEntry(NamedTuple):
    """A stock answer and the ``Cache-Status`` it came with (``None``: not through a cache)."""

    body: dict[str, Any]
    cache_status: str | None


class InventoryService(ExternalService):
    """The inventory upstream declared once: its policy, its health route, how it answers.

    The policy is ``catalog``: the hand-built guards of :class:`Inventory` already own the
    name ``inventory`` in the breaker and bulkhead registries.
    """

    policy = "catalog"
    name = "inventory_upstream"
    health_path = "/health"
    health_critical = False  # without it, orders still work: the app is degraded, not down
    health_timeout = 1.0

    def parse(self, response: httpx.Response) -> CatalogEntry:
        status = response.headers.get(CACHE_STATUS_HEADER)
        return CatalogEntry({**response.json(), "stale": "ttl=-" in (status or "")}, status)

    async def stock(self, sku: str) -> CatalogEntry:
        entry: CatalogEntry = await self.get(f"/stock/{sku}")
        return entry


class Inventory:
    """Every guard for the inventory upstream, in one object so a test can build its own."""

    def __init__(
        self,
        base_url: str,
        *,
        clock: Clock = SYSTEM_CLOCK,
        transport: httpx.AsyncBaseTransport | None = None,
        recovery_timeout: float = 10.0,
    ) -> None:
        self._base_url = base_url
        self._transport = transport
        self.client = self._new_client()
        #: Clients replaced by :meth:`reconnect`, closed once their calls are done.
        self._retired: set[asyncio.Task[None]] = set()
        self.breaker = CircuitBreaker(
            "inventory", failure_threshold=3, recovery_timeout=recovery_timeout, clock=clock
        )
        self.retry = Retry(
            attempts=3,
            base_delay=0.05,
            max_delay=0.5,
            budget=RetryBudget(clock=clock),
            clock=clock,
        )
        self.bulkhead = Bulkhead(
            "inventory", max_concurrent=20, max_waiting=20, wait_timeout=1.0, clock=clock
        )
        self.cache = ResponseCache(ttl=5.0, stale_ttl=600.0, name="inventory", clock=clock)
        self.dead_letters = MemoryDeadLetterQueue(1000, clock=clock)
        # The declarative way: the guards are the named policy's, declared in the settings.
        self.catalog = InventoryService(base_url, transport=transport, clock=clock)

    def _new_client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self._base_url, transport=CorrelationIdTransport(self._transport), timeout=2.0
        )

    async def reconnect(self) -> None:
        """A recovery action of the upstream's check (after the service's own): a new
        connection pool (the old one may hold connections to a server that went away); calls
        in flight finish on the old one."""
        old, self.client = self.client, self._new_client()
        task = asyncio.get_running_loop().create_task(_close_later(old))
        self._retired.add(task)
        task.add_done_callback(self._retired.discard)

    async def aclose(self) -> None:
        await self.client.aclose()
        await self.catalog.aclose()

    async def _request(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        """One attempt, inside the bulkhead; upstream failures become the library's errors."""
        async with self.bulkhead:
            try:
                response = await self.client.request(method, path, **kwargs)
            except httpx.TimeoutException as exc:
                raise UpstreamTimeoutError("Inventory did not answer in time.") from exc
            except httpx.TransportError as exc:
                raise UpstreamError("Inventory could not be reached.") from exc
        if response.status_code == 404:
            raise NotFoundError(response.json().get("detail", "Not found"))
        if response.status_code >= 500:
            raise InventoryError(response.status_code)
        result: dict[str, Any] = response.json()
        return result

    async def fetch_stock(self, sku: str) -> dict[str, Any]:
        """Breaker outside retry: an open breaker refuses at once, with no retries at all."""
        return await self.breaker.call(self.retry.call, self._request, "GET", f"/stock/{sku}")

    async def stock(self, sku: str) -> CacheResult[dict[str, Any]]:
        return await self.cache.call(f"stock:{sku}", self.fetch_stock, sku)

    async def replay(self, letter: DeadLetter) -> None:
        """Try a parked reservation again (what the admin API's replay runs per letter)."""
        await self.reserve(letter.context["sku"], letter.context["qty"])

    async def reserve(self, sku: str, qty: int) -> dict[str, Any]:
        """Not idempotent: breaker and bulkhead, but no retry."""
        return await self.breaker.call(
            self._request, "POST", f"/reserve/{sku}", params={"qty": qty}
        )


async def _close_later(client: httpx.AsyncClient, after: float = 5.0) -> None:
    await asyncio.sleep(after)
    await client.aclose()


def _stock_body(result: CacheResult[dict[str, Any]]) -> dict[str, Any]:
    body = {**result.value, "cache": result.status, "stale": result.stale}
    if result.stale:
        body["age"] = round(result.age, 3)
        body["stale_because"] = getattr(result.error, "code", type(result.error).__name__)
    return body


#: The answers of a route that calls the inventory in its body, through guards the library
#: cannot see from the route (``Inventory``'s breaker, retry and bulkhead, the ``catalog``
#: policy of :class:`InventoryService`): declared, so that the schema lists them (ADR 0077).
UPSTREAM_ANSWERS = problem_responses(
    {
        404: "The inventory has no such SKU (`not_found`).",
        502: "The inventory failed, after retries where the call is retried "
        "(`retries_exhausted`, `upstream_error`).",
        503: "The inventory's breaker is open or its bulkhead full (`circuit_open`, "
        "`bulkhead_full`); `Retry-After` when the wait is known.",
        504: "The inventory did not answer in time (`upstream_timeout`).",
    }
)
#: ``/inventory/{sku}/live``: the upstream's answers, and the ``inventory`` feature's 503.
LIVE_ANSWERS = {
    **UPSTREAM_ANSWERS,
    **problem_responses(
        {
            503: "The `inventory` feature is off while the inventory's breaker is open "
            "(`feature_unavailable`), or the breaker or bulkhead refused the call "
            "(`circuit_open`, `bulkhead_full`); `Retry-After` when the wait is known."
        }
    ),
}
#: ``/inventory/{sku}/reserve``: a reservation the inventory could not take is parked.
RESERVE_ANSWERS: dict[int | str, dict[str, Any]] = {
    202: {
        "description": "The inventory could not take the reservation now: it is parked in the "
        "dead-letter queue, to be replayed (`dead_letter` is its ID).",
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "status": {"const": "queued"},
                        "dead_letter": {"type": "string"},
                        "reason": {"type": "string"},
                    },
                    "required": ["status", "dead_letter", "reason"],
                }
            }
        },
    },
}


def build_router(inv: Inventory) -> APIRouter:
    """The example's outbound routes, bound to one :class:`Inventory`."""
    api = APIRouter(tags=["outbound"])

    @api.get("/inventory/{sku}", responses=UPSTREAM_ANSWERS)
    async def get_stock(sku: Sku, response: Response) -> dict[str, Any]:
        result = await inv.stock(sku)
        response.headers.update(result.headers)
        return _stock_body(result)

    @api.get("/catalog/{sku}", responses=UPSTREAM_ANSWERS)
    async def catalog(sku: Sku, response: Response) -> Any:
        entry = await inv.catalog.stock(sku)  # a 404 is NotFoundError, a 5xx an UpstreamError
        if entry.cache_status:
            response.headers[CACHE_STATUS_HEADER] = entry.cache_status
        return entry.body

    @api.get(
        "/inventory/{sku}/availability",
        responses=problem_responses({404: "The inventory has no such SKU (`not_found`)."}),
    )
    async def availability(sku: Sku, response: Response) -> dict[str, Any]:
        result = await with_fallback(inv.stock, lambda error, sku: None, sku)
        if result is None:  # nothing cached and the upstream is down: a degraded answer
            return {"sku": sku, "available": None, "degraded": True, "stale": False}
        response.headers.update(result.headers)
        return {
            "sku": sku,
            "available": result.value["stock"] > 0,
            "degraded": False,
            "stale": result.stale,
        }

    @api.get(
        "/inventory/{sku}/live",
        dependencies=[Depends(requires_feature(INVENTORY_FEATURE))],
        responses=LIVE_ANSWERS,
    )
    async def live_stock(sku: Sku) -> dict[str, Any]:
        return await inv.fetch_stock(sku)

    @api.post("/inventory/{sku}/reserve", responses=RESERVE_ANSWERS)
    async def reserve(sku: Sku, qty: Quantity = 1) -> Any:
        try:
            return await inv.reserve(sku, qty)
        except ServerError as error:
            letter = await inv.dead_letters.record(
                "inventory.reserve", error, context={"sku": sku, "qty": qty}
            )
            return JSONResponse(
                {"status": "queued", "dead_letter": letter.id, "reason": letter.error_code},
                status_code=202,
            )

    return api


inventory = Inventory(
    os.environ.get(INVENTORY_URL_ENV, "http://127.0.0.1:8001"),
    recovery_timeout=float(os.environ.get(RECOVERY_ENV, "10")),
)
router = build_router(inventory)
