"""``/metrics``: every name of the contract, read with prometheus-client's own parser, moving
with the state it reports; the default registry, shared with the app's own metrics."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import httpx
import pytest
from fastapi import APIRouter, Depends, FastAPI
from loopback import UvicornProcess
from prometheus_client import REGISTRY, CollectorRegistry, Counter

from fastapi_resilience import (
    Bulkhead,
    CircuitBreaker,
    ResilienceSettings,
    Retry,
    RetryBudget,
    install,
    rate_limit,
    requires_feature,
    resilient_client,
)
from fastapi_resilience.exceptions import UpstreamError
from fastapi_resilience.outbound import MemoryDeadLetterQueue, ResponseCache
from fastapi_resilience.testing import ManualClock
from tests._metrics import family_names, value

pytestmark = pytest.mark.anyio

#: Every family CONTRACT section 8 names (a counter's family name drops ``_total``).
CONTRACT_FAMILIES = {
    "fastapi_resilience_breaker_state",
    "fastapi_resilience_breaker_calls",
    "fastapi_resilience_problems",
    "fastapi_resilience_rate_limit_decisions",
    "fastapi_resilience_bulkhead_in_use",
    "fastapi_resilience_bulkhead_waiting",
    "fastapi_resilience_bulkhead_rejected",
    "fastapi_resilience_retries",
    "fastapi_resilience_feature_available",
    "fastapi_resilience_request_duration_seconds",
    "fastapi_resilience_outbound_duration_seconds",
}


@pytest.fixture(name="upstream", scope="module")
def _upstream() -> Iterator[UvicornProcess]:
    """The example's flaky inventory service on a free loopback port."""
    server = UvicornProcess("example_app.upstream:app")
    try:
        yield server
    finally:
        server.stop()


@asynccontextmanager
async def serve(app: FastAPI, root_path: str = "") -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app, root_path=root_path)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        yield client


async def scrape(client: httpx.AsyncClient) -> str:
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return response.text


class Failing(Exception):
    pass


def guarded_app(upstream_url: str) -> tuple[FastAPI, dict[str, object]]:
    """An app with one of each guarded thing, named for this test alone."""
    clock = ManualClock()
    breaker = CircuitBreaker("m-breaker", failure_threshold=2, recovery_timeout=30, clock=clock)
    bulkhead = Bulkhead("m-bulkhead", max_concurrent=1, max_waiting=1, wait_timeout=5)
    retry = Retry(attempts=2, base_delay=0.0, jitter=False, clock=clock)
    spent = RetryBudget(ratio=0.0, min_retries_per_second=0.0, name="m-spent", clock=clock)
    no_budget = Retry(attempts=3, base_delay=0.0, jitter=False, budget=spent, clock=clock)
    cache = ResponseCache(ttl=60, name="m-cache", clock=clock)
    letters = MemoryDeadLetterQueue(name="m-letters")
    release = asyncio.Event()
    client = resilient_client(upstream_url, attempts=1)
    app = FastAPI()
    resilience = install(
        app, ResilienceSettings(rate_limit_tiers={"anonymous": "100/minute"}), clock=clock
    )
    resilience.degraded.feature("m-feature", depends_on=["m-breaker"])
    api = APIRouter(prefix="/api")

    async def fail() -> None:
        raise UpstreamError("down")

    @api.get("/guarded/{ok}")
    async def guarded(ok: bool) -> dict[str, bool]:
        async def call() -> bool:
            if not ok:
                raise Failing
            return True

        try:
            return {"ok": await breaker.call(call)}
        except Failing:
            return {"ok": False}

    @api.get("/held")
    async def held() -> dict[str, bool]:
        async with bulkhead:
            await release.wait()
        return {"held": True}

    @api.get("/retried")
    async def retried() -> None:
        await retry.call(fail)

    @api.get("/budget")
    async def budget() -> None:
        await no_budget.call(fail)

    @api.get("/cached")
    async def cached() -> dict[str, str]:
        async def load() -> str:
            return "v"

        return {"status": (await cache.call("k", load)).status}

    @api.post("/letter")
    async def letter() -> dict[str, str]:
        return {"id": (await letters.record("m-op", UpstreamError("x"))).id}

    @api.get("/feature", dependencies=[Depends(requires_feature("m-feature"))])
    async def feature() -> dict[str, bool]:
        return {"on": True}

    @api.get("/shadowed", dependencies=[Depends(rate_limit("1/minute", shadow=True))])
    async def shadowed() -> dict[str, bool]:
        return {"ok": True}

    @api.get("/outbound")
    async def outbound() -> dict[str, int]:
        return {"status": (await client.get("/stock/tea")).status_code}

    app.include_router(api)
    return app, {"breaker": breaker, "release": release, "client": client}


async def test_every_contract_name_is_there_and_moves(upstream: UvicornProcess) -> None:
    """Each family of the contract is on /metrics, parsed by prometheus-client's parser, and
    each one moves when the state it reports changes."""
    app, parts = guarded_app(upstream.url)
    host = upstream.url.removeprefix("http://")
    async with serve(app) as client:
        before = await scrape(client)
        assert family_names(before) >= CONTRACT_FAMILIES

        await client.get("/api/guarded/true")
        await client.get("/api/guarded/false")
        await client.get("/api/guarded/false")  # the second failure opens it
        refused = await client.get("/api/guarded/true")
        assert refused.status_code == 503
        off = await client.get("/api/feature")
        assert off.json()["code"] == "feature_unavailable"
        await client.get("/api/retried")
        await client.get("/api/budget")
        await client.get("/api/cached")
        await client.get("/api/cached")
        await client.post("/api/letter")
        await client.get("/api/shadowed")
        await client.get("/api/shadowed")
        await client.get("/nowhere")
        assert (await client.get("/api/outbound")).json() == {"status": 200}

        pool = {"bulkhead": "m-bulkhead"}
        holder = asyncio.create_task(client.get("/api/held"))
        waiter = asyncio.create_task(client.get("/api/held"))
        for _ in range(500):  # until the second one waits for the slot
            waiting = value(await scrape(client), "fastapi_resilience_bulkhead_waiting", **pool)
            if waiting >= 1:
                break
            await asyncio.sleep(0.01)
        third = await client.get("/api/held")  # one in use, one waiting: refused
        during = await scrape(client)
        parts["release"].set()  # type: ignore[attr-defined]
        await asyncio.gather(holder, waiter)
        after = await scrape(client)
        await parts["client"].aclose()  # type: ignore[attr-defined]

    def moved(metric: str, **labels: str) -> float:
        return value(after, metric, **labels) - value(before, metric, **labels)

    breaker = {"breaker": "m-breaker"}
    assert value(after, "fastapi_resilience_breaker_state", state="open", **breaker) == 1
    assert value(after, "fastapi_resilience_breaker_state", state="closed", **breaker) == 0
    calls = "fastapi_resilience_breaker_calls_total"
    assert moved(calls, outcome="success", **breaker) == 1
    assert moved(calls, outcome="failure", **breaker) == 2
    assert moved(calls, outcome="rejected", **breaker) == 1
    assert value(after, "fastapi_resilience_breaker_last_change_timestamp_seconds", **breaker) > 0

    problems = "fastapi_resilience_problems_total"
    assert moved(problems, code="circuit_open", status="503") == 1
    assert moved(problems, code="feature_unavailable", status="503") == 1
    assert moved(problems, code="not_found", status="404") == 1
    assert moved(problems, code="bulkhead_full", status="503") == 1
    assert third.status_code == 503

    assert value(after, "fastapi_resilience_feature_available", feature="m-feature") == 0
    assert value(after, "fastapi_resilience_degraded") == 1

    decisions = "fastapi_resilience_rate_limit_decisions_total"
    assert moved(decisions, tier="anonymous", decision="admitted") >= 15
    assert moved(decisions, tier="anonymous", decision="shadow_refused") == 1

    retries = "fastapi_resilience_retries_total"
    assert moved(retries, outcome="retried") == 1
    assert moved(retries, outcome="exhausted") == 1
    assert moved(retries, outcome="budget_exhausted") == 1

    cache = "fastapi_resilience_cache_lookups_total"
    assert moved(cache, cache="m-cache", result="miss") == 1
    assert moved(cache, cache="m-cache", result="hit") == 1
    assert moved("fastapi_resilience_dead_letters_total", queue="m-letters") == 1

    bulkhead = {"bulkhead": "m-bulkhead"}
    assert value(during, "fastapi_resilience_bulkhead_in_use", **bulkhead) == 1
    assert value(during, "fastapi_resilience_bulkhead_waiting", **bulkhead) == 1
    assert value(after, "fastapi_resilience_bulkhead_in_use", **bulkhead) == 0
    assert moved("fastapi_resilience_bulkhead_rejected_total", **bulkhead) == 1

    seconds = "fastapi_resilience_request_duration_seconds_count"
    assert moved(seconds, route="/api/guarded/{ok}", method="GET") == 4
    assert moved(seconds, route="(unmatched)", method="GET") >= 1
    assert moved(seconds, route="/api/held", method="GET") == 3
    outbound = "fastapi_resilience_outbound_duration_seconds_count"
    assert moved(outbound, upstream=host, outcome="success") == 1


async def test_route_templates_under_mounts_and_a_root_path() -> None:
    """The route label is the template the request matched, with a mount's prefix, and never
    the raw path (which would make one series per item)."""
    app = FastAPI()
    install(app, ResilienceSettings(rate_limit_enabled=False))
    sub = FastAPI()

    @sub.get("/things/{thing_id}")
    async def thing(thing_id: int) -> dict[str, int]:
        return {"id": thing_id}

    app.mount("/mounted-m", sub)
    seconds = "fastapi_resilience_request_duration_seconds_count"
    labels = {"route": "/mounted-m/things/{thing_id}", "method": "GET"}
    async with serve(app, root_path="/behind-proxy") as client:
        before = await scrape(client)
        for n in range(3):
            assert (await client.get(f"/behind-proxy/mounted-m/things/{n}")).status_code == 200
        after = await scrape(client)
    assert value(after, seconds, **labels) - value(before, seconds, **labels) == 3
    assert "/mounted-m/things/1" not in after


async def test_odd_methods_share_one_label() -> None:
    """A client can send any method: the label keeps the standard ones and folds the rest."""
    app = FastAPI()
    install(app, ResilienceSettings(rate_limit_enabled=False))

    @app.api_route("/odd-method-m", methods=["GET", "BREW"])
    async def odd() -> dict[str, bool]:
        return {"ok": True}

    labels = {"route": "/odd-method-m", "method": "OTHER"}
    seconds = "fastapi_resilience_request_duration_seconds_count"
    async with serve(app) as client:
        before = await scrape(client)
        await client.request("BREW", "/odd-method-m")
        after = await scrape(client)
    assert value(after, seconds, **labels) - value(before, seconds, **labels) == 1


async def test_the_request_histogram_can_be_turned_off() -> None:
    app = FastAPI()
    install(app, ResilienceSettings(rate_limit_enabled=False, metrics_request_duration=False))

    @app.get("/untimed-m")
    async def untimed() -> dict[str, bool]:
        return {"ok": True}

    async with serve(app) as client:
        await client.get("/untimed-m")
        text = await scrape(client)
    seconds = "fastapi_resilience_request_duration_seconds_count"
    assert value(text, seconds, route="/untimed-m", method="GET") == 0
    assert "fastapi_resilience_breaker_state" in text  # the rest is still there


async def test_the_apps_own_metrics_and_the_process_collector_share_the_page() -> None:
    """The default registry: a user's own counter and prometheus-client's process and GC
    collectors show on the same /metrics."""
    app = FastAPI()
    install(app, ResilienceSettings(rate_limit_enabled=False))
    mine = Counter("m_orders_placed", "Orders placed (a user's own metric).")
    mine.inc(3)
    try:
        async with serve(app) as client:
            text = await scrape(client)
    finally:
        REGISTRY.unregister(mine)
    names = family_names(text)
    assert "m_orders_placed" in names
    assert "python_gc_objects_collected" in names
    assert "fastapi_resilience_breaker_state" in names


async def test_install_can_be_given_its_own_registry() -> None:
    """With ``metrics_registry``, /metrics reads that registry (and only it)."""
    registry = CollectorRegistry()
    Counter("m_private_only", "On the private registry.", registry=registry).inc()
    app = FastAPI()
    install(app, ResilienceSettings(rate_limit_enabled=False), metrics_registry=registry)
    async with serve(app) as client:
        names = family_names(await scrape(client))
    assert "m_private_only" in names
    assert "python_gc_objects_collected" not in names
    assert names >= CONTRACT_FAMILIES


async def test_two_apps_in_one_process_share_one_set_of_names() -> None:
    """A second install() on the same registry adds its features, and never registers the
    same names twice (prometheus-client would refuse)."""
    first, second = FastAPI(), FastAPI()
    one = install(first, ResilienceSettings(rate_limit_enabled=False))
    two = install(second, ResilienceSettings(rate_limit_enabled=False))
    one.degraded.feature("m-first")
    two.degraded.feature("m-second")
    two.degraded.disable("m-second")
    async with serve(first) as client:
        text = await scrape(client)
    assert value(text, "fastapi_resilience_feature_available", feature="m-first") == 1
    assert value(text, "fastapi_resilience_feature_available", feature="m-second") == 0


async def test_a_dead_letter_recorded_again_under_its_key_counts_once() -> None:
    """Recording again with the same key (after a storage stall) stores nothing new."""
    app = FastAPI()
    install(app, ResilienceSettings(rate_limit_enabled=False))
    letters = MemoryDeadLetterQueue(name="m-once")
    async with serve(app) as client:
        before = await scrape(client)
        for _ in range(3):
            await letters.record("m-op", UpstreamError("x"), key="same-key")
        after = await scrape(client)
    counted = "fastapi_resilience_dead_letters_total"
    assert value(after, counted, queue="m-once") - value(before, counted, queue="m-once") == 1
    assert len(await letters.list()) == 1


async def test_a_route_limit_refusal_after_the_tier_counts_once() -> None:
    """A request the tier admits and its route's own limit refuses is one refusal."""
    app = FastAPI()
    install(app, ResilienceSettings(rate_limit_tiers={"anonymous": "100/minute"}))
    sub = FastAPI()  # a mounted app without install(): its route limit is a dependency

    @sub.get("/b", dependencies=[Depends(rate_limit("1/minute"))])
    async def limited() -> dict[str, bool]:
        return {"ok": True}

    app.mount("/m-once-sub", sub)
    decisions = "fastapi_resilience_rate_limit_decisions_total"
    async with serve(app) as client:
        before = await scrape(client)
        statuses = [(await client.get("/m-once-sub/b")).status_code for _ in range(3)]
        after = await scrape(client)

    def moved(decision: str) -> float:
        labels = {"tier": "anonymous", "decision": decision}
        return value(after, decisions, **labels) - value(before, decisions, **labels)

    assert statuses == [200, 429, 429]
    assert (moved("admitted"), moved("refused")) == (1, 2)


def test_a_scrape_from_another_thread_reads_on_the_apps_loop() -> None:
    """prometheus-client's own exporter scrapes from a thread of its own: the app's state is
    read on the app's loop, and the page is the same."""
    import threading

    from fastapi.testclient import TestClient
    from prometheus_client import generate_latest

    registry = CollectorRegistry()
    app = FastAPI()
    resilience = install(
        app, ResilienceSettings(rate_limit_enabled=False), metrics_registry=registry
    )
    resilience.degraded.feature("m-threaded")
    with TestClient(app) as client:
        resilience.degraded.disable("m-threaded")
        pages: list[str] = []
        exporter = threading.Thread(target=lambda: pages.append(generate_latest(registry).decode()))
        exporter.start()
        exporter.join(timeout=10)
        served = client.get("/metrics").text
    assert value(pages[0], "fastapi_resilience_feature_available", feature="m-threaded") == 0
    assert value(served, "fastapi_resilience_feature_available", feature="m-threaded") == 0


def test_a_mount_with_a_parameter_is_one_series() -> None:
    """``/tenants/{tenant}``: every tenant's requests share one route label, in the metrics
    and in the error analytics."""
    from fastapi.testclient import TestClient

    app = FastAPI()
    resilience = install(app, ResilienceSettings(rate_limit_enabled=False))
    sub = FastAPI()

    @sub.get("/orders/{order_id}")
    async def order(order_id: int) -> dict[str, int]:
        return {"id": order_id}

    app.mount("/m-tenants/{tenant}", sub)
    template = "/m-tenants/{tenant}/orders/{order_id}"
    seconds = "fastapi_resilience_request_duration_seconds_count"
    with TestClient(app) as client:  # the mounts are known from start-up
        before = client.get("/metrics").text
        for tenant in ("acme", "globex", "initech"):
            assert client.get(f"/m-tenants/{tenant}/orders/1").status_code == 200
            assert client.get(f"/m-tenants/{tenant}/orders/x").status_code == 422
        after = client.get("/metrics").text
    labels = {"route": template, "method": "GET"}
    assert value(after, seconds, **labels) - value(before, seconds, **labels) == 6
    assert "acme" not in after
    assert resilience.analytics is not None
    routes = {entry["route"] for entry in resilience.analytics.snapshot()["routes"]}
    assert template in routes
    assert not any("acme" in route for route in routes)


async def test_the_attached_dead_letter_queue_shows_what_it_holds() -> None:
    app = FastAPI()
    resilience = install(
        app, ResilienceSettings(rate_limit_enabled=False), metrics_registry=CollectorRegistry()
    )
    queue = MemoryDeadLetterQueue(name="m-held")
    resilience.use_dead_letters(queue)
    async with serve(app) as client:
        empty = await scrape(client)
        await queue.record("m-op", UpstreamError("x"))
        await queue.record("m-op", UpstreamError("y"))
        held = await scrape(client)
    queued = "fastapi_resilience_dead_letters_queued"
    assert value(empty, queued, queue="m-held") == 0
    assert value(held, queued, queue="m-held") == 2
