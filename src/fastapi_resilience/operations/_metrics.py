"""Metrics: the counts the components keep, turned into Prometheus families when scraped.

Components count as they go (``fastapi_resilience._tally``, a breaker's calls, a bulkhead's
slots); :class:`ResilienceCollector` reads them only when ``/metrics`` is read. The request
path pays for an addition or two, never for a label lookup or a lock. Everything here is
optional: without ``prometheus-client`` (the ``prometheus`` extra) nothing is imported and
``install`` mounts no route; it says so in one warning when metrics are on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from time import perf_counter
from typing import TYPE_CHECKING, Any, Protocol

from fastapi import APIRouter
from starlette.responses import Response

from fastapi_resilience._asgi.fixed_routes import FixedPathRoutes, add_fixed_route
from fastapi_resilience._asgi.paths import MountTemplates
from fastapi_resilience._asgi.pipeline import RequestState
from fastapi_resilience._asgi.routes import UNMATCHED_ROUTE, route_template
from fastapi_resilience._tally import (
    DEAD_LETTERS,
    DURATION_BUCKETS,
    OUTBOUND_DURATIONS,
    PROBLEMS,
    RATE_LIMIT_DECISIONS,
    REQUEST_DURATIONS,
    RESPONSE_CACHE,
    RETRIES,
    Histograms,
    Tally,
    quantile,
)
from fastapi_resilience.events import Event
from fastapi_resilience.health._checks import HealthChecks
from fastapi_resilience.outbound._breaker import CLOSED, HALF_OPEN, OPEN, BreakerRegistry
from fastapi_resilience.outbound._bulkhead import BulkheadRegistry, TieredBulkhead

if TYPE_CHECKING:
    from prometheus_client.registry import Collector, CollectorRegistry

    from fastapi_resilience.operations._degraded import DegradedMode

__all__ = [
    "EVENTS",
    "UNMATCHED_ROUTE",
    "MetricsSources",
    "RequestMetricsStep",
    "ResilienceCollector",
    "add_metrics_route",
    "collector_for",
    "prometheus_available",
    "request_percentiles",
    "warn_prometheus_missing",
]

logger = logging.getLogger("fastapi_resilience.metrics")

#: Events published on an app's bus, by ``(kind, name)``.
EVENTS = Tally()
_BREAKER_STATES = (CLOSED, OPEN, HALF_OPEN)
#: Methods kept as they are in the ``method`` label; any other (a client can send anything)
#: is counted as ``OTHER``.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def prometheus_available() -> bool:
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        return False
    return True


def warn_prometheus_missing(path: str) -> None:
    """Say why ``path`` answers 404: metrics are on, but their extra is not installed."""
    logger.warning(
        "metrics_enabled is on but prometheus-client is not installed, so %s is not served: "
        "pip install 'fastapi-resilience[prometheus]' (or set metrics_enabled=False, "
        "RESILIENCE_METRICS_ENABLED=false, to say you do not want it)",
        path,
    )


def count_event(event: Event) -> None:
    """The bus listener behind ``fastapi_resilience_events_total``."""
    EVENTS.add((event.kind, event.name))


class RequestMetricsStep:
    """Times every HTTP request into ``fastapi_resilience_request_duration_seconds``, by the
    template of the route it matched and its method, from when the pipeline saw it until the
    app was done with it."""

    websocket = False

    def __init__(
        self, mounts: MountTemplates | None = None, histograms: Histograms = REQUEST_DURATIONS
    ) -> None:
        #: The app's mounts as templates (``install()`` fills them at start-up).
        self.mounts = mounts
        self._histograms = histograms

    def enter(self, state: RequestState) -> None:
        if state.timing is None:  # else a pipeline outside this one times the request
            state.timing = (perf_counter(), self)

    def leave(self, state: RequestState) -> None:
        timing = state.timing
        if timing is None or timing[1] is not self:
            return
        scope = state.scope
        method = scope.get("method", "")
        if method not in _METHODS:
            method = "OTHER"
        label = (route_template(scope, self.mounts), method)
        self._histograms.observe(label, perf_counter() - timing[0])


class _Analytics(Protocol):
    @property
    def spiking(self) -> bool: ...


class _Monitor(Protocol):
    def snapshot(self) -> dict[str, dict[str, Any]]: ...


@dataclass(eq=False)
class MetricsSources:
    """What one app contributes besides the process-wide counts: its features, error
    analytics and health checks."""

    degraded: DegradedMode
    health: HealthChecks
    analytics: _Analytics | None = None
    monitor: _Monitor | None = None
    #: The dead-letter queue given to ``resilience.use_dead_letters``.
    dead_letters: Any = None
    #: The app's event loop, once it started: the state above is read on it.
    loop: asyncio.AbstractEventLoop | None = None


class ResilienceCollector:
    """Every ``fastapi_resilience_*`` family, read from the components when scraped.

    One per registry; each ``install()`` adds its app's :class:`MetricsSources` (held weakly:
    an app that is gone stops being reported).
    """

    def __init__(self, breakers: BreakerRegistry, bulkheads: BulkheadRegistry) -> None:
        self._breakers = breakers
        self._bulkheads = bulkheads
        self._sources: weakref.WeakSet[MetricsSources] = weakref.WeakSet()

    def add(self, sources: MetricsSources) -> None:
        self._sources.add(sources)

    def collect(self, *, histograms: bool = True) -> Iterator[Any]:
        """Every family (``histograms=False``: all but the duration histograms, which the
        OpenTelemetry bridge receives as they are observed). Breakers, features and analytics
        change on the app's event loop and reading some of them moves them on (an open breaker
        whose time is up turns half-open): a scrape from another thread
        (``prometheus_client.start_http_server``) reads them on that loop, never beside it."""
        loop = next(
            (s.loop for s in list(self._sources) if s.loop is not None and s.loop.is_running()),
            None,
        )
        yield from _on_loop(loop, lambda: list(self._families(histograms)))

    def _families(self, histograms: bool) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        counter, gauge = CounterMetricFamily, GaugeMetricFamily
        yield from self._breaker_families(counter, gauge)
        yield _counter(
            counter,
            "problems",
            "Problem answers, by code and status.",
            PROBLEMS,
            ["code", "status"],
        )
        yield _counter(
            counter,
            "rate_limit_decisions",
            "Rate-limit decisions, by tier: admitted, refused, and shadow_refused (admitted "
            "requests a shadow limit would have refused).",
            RATE_LIMIT_DECISIONS,
            ["tier", "decision"],
        )
        yield from self._bulkhead_families(counter, gauge)
        yield _counter(
            counter,
            "retries",
            "Retries made (retried), and calls given up (exhausted, budget_exhausted).",
            RETRIES,
            ["outcome"],
        )
        yield _counter(
            counter,
            "cache_lookups",
            "Response-cache lookups, by result: hit, miss, stale.",
            RESPONSE_CACHE,
            ["cache", "result"],
        )
        yield _counter(
            counter, "dead_letters", "Dead letters recorded, by queue.", DEAD_LETTERS, ["queue"]
        )
        yield _counter(
            counter,
            "events",
            "State changes reported by fastapi-resilience (breaker opened, storage down, ...).",
            EVENTS,
            ["kind", "name"],
        )
        yield from self._app_families(gauge)
        if not histograms:
            return
        yield _histogram(
            "request_duration_seconds",
            "Time to answer a request, by route template and method.",
            REQUEST_DURATIONS,
            ["route", "method"],
        )
        yield _histogram(
            "outbound_duration_seconds",
            "Time of a call through the resilient client, by upstream and outcome.",
            OUTBOUND_DURATIONS,
            ["upstream", "outcome"],
        )

    def _breaker_families(self, counter: Any, gauge: Any) -> Iterator[Any]:
        state = gauge(
            "fastapi_resilience_breaker_state",
            "Circuit breaker state: 1 for the current state, 0 for the others.",
            labels=["breaker", "state"],
        )
        calls = counter(
            "fastapi_resilience_breaker_calls",
            "Calls through a breaker, by outcome: success, failure, rejected (not called).",
            labels=["breaker", "outcome"],
        )
        changed = gauge(
            "fastapi_resilience_breaker_last_change_timestamp_seconds",
            "Wall time of the breaker's latest state change.",
            labels=["breaker"],
        )
        for breaker in self._breakers:
            current = breaker.state
            for name in _BREAKER_STATES:
                state.add_metric([breaker.name, name], 1.0 if name == current else 0.0)
            calls.add_metric([breaker.name, "success"], breaker.calls_succeeded)
            calls.add_metric([breaker.name, "failure"], breaker.calls_failed)
            calls.add_metric([breaker.name, "rejected"], breaker.calls_rejected)
            if breaker.changed_at is not None:
                changed.add_metric([breaker.name], breaker.changed_at)
        yield from (state, calls, changed)

    def _bulkhead_families(self, counter: Any, gauge: Any) -> Iterator[Any]:
        in_use = gauge(
            "fastapi_resilience_bulkhead_in_use", "Calls holding a slot.", labels=["bulkhead"]
        )
        waiting = gauge(
            "fastapi_resilience_bulkhead_waiting", "Calls waiting for a slot.", labels=["bulkhead"]
        )
        rejected = counter(
            "fastapi_resilience_bulkhead_rejected", "Calls refused.", labels=["bulkhead"]
        )
        for bulkhead in _bulkheads(self._bulkheads):
            in_use.add_metric([bulkhead.name], bulkhead.active)
            waiting.add_metric([bulkhead.name], bulkhead.waiting)
            rejected.add_metric([bulkhead.name], bulkhead.rejected)
        yield from (in_use, waiting, rejected)

    def _app_families(self, gauge: Any) -> Iterator[Any]:
        available = gauge(
            "fastapi_resilience_feature_available",
            "1 while a feature is available, 0 while it is switched off.",
            labels=["feature"],
        )
        degraded = gauge(
            "fastapi_resilience_degraded",
            "1 while a feature of the app is switched off (degraded mode), else 0.",
        )
        spike = gauge(
            "fastapi_resilience_error_spike",
            "1 while the error analytics see a spike in the rate of problem answers, else 0.",
        )
        # One sample per name even with several apps in the process: off if off in any.
        features: dict[str, bool] = {}
        spiking = False
        for sources in list(self._sources):
            for feature in sources.degraded.features():
                on = sources.degraded.available(feature.name)
                features[feature.name] = features.get(feature.name, True) and on
            if sources.analytics is not None:
                spiking = spiking or sources.analytics.spiking
        for name, on in sorted(features.items()):
            available.add_metric([name], 1.0 if on else 0.0)
        yield self._queued_family(gauge)
        degraded.add_metric([], 0.0 if all(features.values()) else 1.0)
        spike.add_metric([], 1.0 if spiking else 0.0)
        yield from (available, degraded, spike)
        yield from self._health_families(gauge)

    def _queued_family(self, gauge: Any) -> Any:
        queued = gauge(
            "fastapi_resilience_dead_letters_queued",
            "Letters held now by the app's dead-letter queue (memory queues).",
            labels=["queue"],
        )
        seen: set[str] = set()
        for sources in list(self._sources):
            queue = sources.dead_letters
            size = getattr(queue, "queued", None)
            if isinstance(size, int) and queue.label not in seen:
                seen.add(queue.label)
                queued.add_metric([queue.label], size)
        return queued

    def _health_families(self, gauge: Any) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily

        up = gauge(
            "fastapi_resilience_health_check_up",
            "1 while the health monitor last found a readiness check ok, else 0.",
            labels=["check"],
        )
        recoveries = CounterMetricFamily(
            "fastapi_resilience_health_recoveries",
            "Recovery attempts of the health monitor, by check and outcome.",
            labels=["check", "outcome"],
        )
        # One sample per label set even with several apps: down if down in any, counts added.
        checks: dict[str, bool] = {}
        attempts: dict[tuple[str, str], int] = {}
        for sources in list(self._sources):
            if sources.monitor is None:
                continue
            for name, entry in sources.monitor.snapshot().items():
                checks[name] = checks.get(name, True) and bool(entry.get("up"))
                for outcome, count in (entry.get("recoveries") or {}).items():
                    attempts[name, outcome] = attempts.get((name, outcome), 0) + count
        for name, is_up in sorted(checks.items()):
            up.add_metric([name], 1.0 if is_up else 0.0)
        for (name, outcome), count in sorted(attempts.items()):
            recoveries.add_metric([name, outcome], count)
        yield from (up, recoveries)


def _on_loop(loop: asyncio.AbstractEventLoop | None, read: Callable[[], list[Any]]) -> list[Any]:
    """``read()``, on ``loop`` when it runs in another thread than this one."""
    if loop is None:
        return read()
    try:
        if asyncio.get_running_loop() is loop:
            return read()
    except RuntimeError:
        pass  # no loop in this thread: an exporter's own thread
    done: concurrent.futures.Future[list[Any]] = concurrent.futures.Future()

    def run() -> None:
        try:
            done.set_result(read())
        except BaseException as exc:  # handed to the scraping thread
            done.set_exception(exc)

    loop.call_soon_threadsafe(run)
    return done.result(timeout=_READ_TIMEOUT)


#: How long a scrape from another thread waits for the app's loop to read the state.
_READ_TIMEOUT = 5.0


def _bulkheads(registry: BulkheadRegistry) -> Iterable[Any]:
    """Every bulkhead, a tiered one's compartments each under its own name."""
    for found in registry:
        if isinstance(found, TieredBulkhead):
            yield from found  # its compartments, each named after its tier
        else:
            yield found


def _counter(family: Any, name: str, documentation: str, tally: Tally, labels: list[str]) -> Any:
    metric = family(f"fastapi_resilience_{name}", documentation, labels=labels)
    for values, count in tally.items():
        metric.add_metric(list(values), count)
    return metric


def _histogram(name: str, documentation: str, histograms: Histograms, labels: list[str]) -> Any:
    from prometheus_client.core import HistogramMetricFamily

    bounds = [_le(b) for b in histograms.bounds] + ["+Inf"]
    metric = HistogramMetricFamily(f"fastapi_resilience_{name}", documentation, labels=labels)
    for values, cumulative, _count, total in histograms.collect():
        metric.add_metric(list(values), list(zip(bounds, cumulative, strict=True)), total)
    return metric


def _le(bound: float) -> str:
    """A bucket's ``le`` label as prometheus-client writes it (``0.005``, ``1.0``, ``10.0``)."""
    return repr(float(bound))


def request_percentiles(histograms: Histograms = REQUEST_DURATIONS) -> dict[str, float | None]:
    """p50, p95 and p99 of every request since start-up (seconds), and the count, estimated
    from the histogram's buckets: what the dashboard shows."""
    buckets, count = histograms.merged()
    return {
        "count": count,
        "p50": quantile(DURATION_BUCKETS, buckets, 0.5),
        "p95": quantile(DURATION_BUCKETS, buckets, 0.95),
        "p99": quantile(DURATION_BUCKETS, buckets, 0.99),
    }


#: The collector of each registry, by ``id`` (with the registry, so the id stays its own).
_COLLECTORS: dict[int, tuple[Any, ResilienceCollector]] = {}


def collector_for(
    registry: CollectorRegistry | None, breakers: BreakerRegistry, bulkheads: BulkheadRegistry
) -> tuple[CollectorRegistry, ResilienceCollector]:
    """The registry (default: prometheus-client's own) and its one collector, made and
    registered on first use: a second app in the process adds its sources to the same one
    rather than registering the same names twice."""
    from prometheus_client import REGISTRY

    target = registry if registry is not None else REGISTRY
    found = _COLLECTORS.get(id(target))
    if found is not None and found[0] is target:
        return target, found[1]
    collector = ResilienceCollector(breakers, bulkheads)
    target.register(_as_collector(collector))
    _COLLECTORS[id(target)] = (target, collector)
    return target, collector


def _as_collector(collector: ResilienceCollector) -> Collector:
    return collector


def add_metrics_route(
    router: APIRouter,
    registry: CollectorRegistry,
    *,
    path: str,
    group: FixedPathRoutes | None = None,
) -> None:
    """``GET {path}`` in the Prometheus text format, added to ``router`` (the app's own) or
    into ``group``."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    add_fixed_route(router, path, metrics, group=group, include_in_schema=False, tags=["metrics"])
