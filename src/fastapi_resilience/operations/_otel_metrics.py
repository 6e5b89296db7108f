"""The same instruments through the OpenTelemetry metrics API, when a meter provider is set.

Counters and gauges are observable instruments whose callbacks read the families the
Prometheus collector builds (one read serves every callback of a collection); the two
duration histograms record each observation as it is made, since the API has no observable
histogram. Nothing here is imported unless OpenTelemetry's metrics are in use.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from fastapi_resilience._tally import OUTBOUND_DURATIONS, REQUEST_DURATIONS, Histograms

if TYPE_CHECKING:
    from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation

    from fastapi_resilience.operations._metrics import ResilienceCollector

__all__ = ["bridge_to_opentelemetry", "configured_meter_provider"]

#: A collection reads the collector once for all its callbacks: a read this recent is reused.
_SNAPSHOT_SECONDS = 1.0
#: The providers bridged already (held weakly: a provider dropped is forgotten).
_BRIDGED: weakref.WeakKeyDictionary[Any, _Bridge] = weakref.WeakKeyDictionary()


def configured_meter_provider() -> MeterProvider | None:
    """The global meter provider when an application set one; ``None`` for the API's default,
    which records nothing (and when the metrics API is not installed)."""
    try:
        from opentelemetry import metrics
    except ImportError:
        return None
    provider = metrics.get_meter_provider()
    if type(provider).__name__ in ("_ProxyMeterProvider", "NoOpMeterProvider"):
        return None
    return provider


def bridge_to_opentelemetry(collector: ResilienceCollector, provider: MeterProvider) -> None:
    """Report every family of ``collector`` through ``provider``'s meter, once per provider."""
    if provider not in _BRIDGED:
        _BRIDGED[provider] = _Bridge(collector, provider)


class _Bridge:
    def __init__(self, collector: ResilienceCollector, provider: MeterProvider) -> None:
        meter = provider.get_meter("fastapi_resilience")
        self._collector = collector
        self._taken = float("-inf")
        self._families: dict[str, Any] = {}
        for family in collector.collect():
            if family.type == "counter":
                meter.create_observable_counter(
                    family.name, [self._callback(family.name)], description=family.documentation
                )
            elif family.type == "gauge":
                meter.create_observable_gauge(
                    family.name, [self._callback(family.name)], description=family.documentation
                )
            elif family.type == "histogram":
                histogram = meter.create_histogram(
                    family.name, unit="s", description=family.documentation
                )
                _record_into(histogram, _DURATIONS[family.name])

    def _callback(self, name: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            from opentelemetry.metrics import Observation

            family = self._read().get(name)
            if family is None:
                return []
            return [
                Observation(sample.value, dict(sample.labels))
                for sample in family.samples
                if sample.name in (name, f"{name}_total")
            ]

        return observe

    def _read(self) -> dict[str, Any]:
        now = time.monotonic()
        if now - self._taken > _SNAPSHOT_SECONDS:
            # Counters and gauges only: building the histograms' samples here, on the app's
            # loop, would be thrown away (they reach the meter as they are observed).
            families = self._collector.collect(histograms=False)
            self._families = {family.name: family for family in families}
            self._taken = now
        return self._families


#: Each histogram family and the histograms it reads.
_DURATIONS: dict[str, Histograms] = {
    "fastapi_resilience_request_duration_seconds": REQUEST_DURATIONS,
    "fastapi_resilience_outbound_duration_seconds": OUTBOUND_DURATIONS,
}
_LABELS: dict[int, tuple[str, str]] = {
    id(REQUEST_DURATIONS): ("route", "method"),
    id(OUTBOUND_DURATIONS): ("upstream", "outcome"),
}


def _record_into(histogram: Any, source: Histograms) -> None:
    """Record each of ``source``'s observations into ``histogram``, for as long as the meter
    provider that made it lives (held weakly: a provider dropped takes the sink with it)."""
    first, second = _LABELS[id(source)]
    target = weakref.ref(histogram)

    def record(labels: tuple[str, ...], seconds: float) -> None:
        found = target()
        if found is None:
            source.sinks.remove(record)
            return
        found.record(seconds, {first: labels[0], second: labels[1]})

    source.sinks.append(record)
