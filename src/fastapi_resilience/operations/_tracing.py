"""OpenTelemetry tracing: each library event as a span event on the span of the request.

Nothing here imports OpenTelemetry. An app that traces has imported ``opentelemetry.trace``
(its instrumentation did); in one that does not, there is no span to add to, and the listener
returns after one dictionary look-up.
"""

from __future__ import annotations

from typing import Any

from fastapi_resilience._optional import current_span, tracing_installed
from fastapi_resilience.events import FALLBACK_EVENTS, Event, EventBus

__all__ = ["span_events", "subscribe_span_events"]

#: Longest text an attribute carries; a longer value (a path, an error's text) is cut.
MAX_ATTRIBUTE_LENGTH = 256
#: The types OpenTelemetry takes as attribute values as they are (``bool`` is an ``int``).
_PLAIN = (bool, int, float)


def span_events(event: Event) -> None:
    """An event listener: adds ``event`` to the current span when that span is recording.

    The span event is named by the event's kind; its attributes are ``resilience.name``,
    each of the event's figures as ``resilience.<key>`` and ``correlation_id``. Subscribe it
    with ``bus.subscribe(span_events)``; ``install()`` does when ``trace_span_events`` is on.
    """
    span = current_span()
    if span is None or not span.is_recording():
        return
    span.add_event(event.kind, attributes_of(event), timestamp=int(event.at * 1e9))


def attributes_of(event: Event) -> dict[str, Any]:
    """The span event's attributes: numbers and booleans as they are, the rest as text."""
    attributes: dict[str, Any] = {"resilience.name": _value(event.name)}
    for key, value in event.attributes.items():
        # A figure that is not known (a ``retry_after`` of None) is left out, not "None".
        if value is not None:
            attributes[f"resilience.{key}"] = _value(value)
    if event.correlation_id is not None:
        attributes["correlation_id"] = event.correlation_id
    return attributes


def _value(value: Any) -> Any:
    if isinstance(value, _PLAIN):
        return value
    # ``str()`` of a str subclass (an enum) is its text; anything else gets its readable form.
    return str(value)[:MAX_ATTRIBUTE_LENGTH]


#: Whether ``span_events`` listens on the shared fallback bus: at most once per process.
_on_fallback_bus = False


def subscribe_span_events(bus: EventBus) -> bool:
    """Add :func:`span_events` to ``bus`` when OpenTelemetry is installed; ``False`` if not.

    Once per process it also listens on the shared bus that components bound to no app's bus
    publish on (a ``Retry`` or a ``fallback`` made in the app's code), so their events show
    on the request's span too.
    """
    global _on_fallback_bus
    if not tracing_installed():
        return False
    if bus is not FALLBACK_EVENTS:
        bus.subscribe(span_events)
    if not _on_fallback_bus:
        FALLBACK_EVENTS.subscribe(span_events)
        _on_fallback_bus = True
    return True
