"""Metrics: a Prometheus listener on the event bus, and the ``/metrics`` route.

Everything is optional: without ``prometheus-client`` (the ``prometheus`` extra) nothing here
is used and ``install`` mounts no route; it says so in one warning when metrics are on.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter
from starlette.responses import Response

from fastapi_resilience._asgi.fixed_routes import FixedPathRoutes, add_fixed_route
from fastapi_resilience.events import Event
from fastapi_resilience.operations._degraded import DEGRADED_ENTERED, DEGRADED_LEFT

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

__all__ = [
    "PrometheusListener",
    "add_metrics_route",
    "prometheus_available",
    "warn_prometheus_missing",
]

logger = logging.getLogger("fastapi_resilience.metrics")


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


class PrometheusListener:
    """Counts every event as ``fastapi_resilience_events_total{kind, name}``, and keeps
    ``fastapi_resilience_degraded`` at 1 while the app is in degraded mode (0 otherwise), so an
    alert can read the state rather than count changes.

    One listener per registry: pass a fresh ``CollectorRegistry`` in tests.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        from prometheus_client import REGISTRY, Counter, Gauge

        self.registry = registry if registry is not None else REGISTRY
        self.events = Counter(
            "fastapi_resilience_events",
            "State changes reported by fastapi-resilience (breaker opened, storage down, ...).",
            ["kind", "name"],
            registry=self.registry,
        )
        self._children: dict[tuple[str, str], Any] = {}
        self.degraded = Gauge(
            "fastapi_resilience_degraded",
            "1 while a feature of the app is switched off (degraded mode), else 0.",
            registry=self.registry,
        )

    def __call__(self, event: Event) -> None:
        # ``labels`` validates, locks and looks up on every call; a refusal under a flood
        # comes here once per request, so each (kind, name) child is looked up once.
        key = (event.kind, event.name)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.events.labels(*key)
        child.inc()
        if event.kind == DEGRADED_ENTERED:
            self.degraded.set(1)
        elif event.kind == DEGRADED_LEFT:
            self.degraded.set(0)


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
