"""One event bus: components publish state changes once; logging and metrics subscribe.

No component logs or counts an operator-facing state change on its own, so nothing is
reported twice or missed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fastapi_resilience._text import printable
from fastapi_resilience.correlation._ids import get_correlation_id

__all__ = ["FALLBACK_EVENTS", "Event", "EventBus", "EventListener", "EventSource"]

logger = logging.getLogger("fastapi_resilience.events")


@dataclass(frozen=True, slots=True)
class Event:
    """A state change an operator cares about (breaker opened, storage down, ...).

    ``kind`` is a stable dotted name such as ``"breaker.opened"``; ``name`` names the
    component (the breaker, the storage); ``attributes`` carries the figures.
    """

    kind: str
    name: str
    attributes: Mapping[str, Any] = field(default_factory=dict)
    level: int = logging.WARNING
    correlation_id: str | None = field(default_factory=get_correlation_id)
    at: float = field(default_factory=time.time)


EventListener = Callable[[Event], None]


def log_event(event: Event) -> None:
    """The default listener: one log record per event, with the correlation ID."""
    if not logger.isEnabledFor(event.level):
        # Per-request events (a refusal is DEBUG) must not format what nobody will read.
        return
    # Names and figures can come from a request (a path, an identity): escaped for the line.
    attrs = " ".join(f"{k}={printable(v)}" for k, v in event.attributes.items())
    logger.log(
        event.level,
        "%s %s%s",
        event.kind,
        printable(event.name),
        f" {attrs}" if attrs else "",
        extra={"correlation_id": event.correlation_id or "-", "event_kind": event.kind},
    )


class EventBus:
    """Synchronous fan-out; a failing listener is logged and never breaks the publisher."""

    def __init__(self, *, log: bool = True) -> None:
        self._listeners: list[EventListener] = [log_event] if log else []

    def subscribe(self, listener: EventListener) -> Callable[[], None]:
        """Add ``listener``; returns a function that removes it again."""
        self._listeners.append(listener)

        def unsubscribe() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return unsubscribe

    def publish(self, event: Event) -> None:
        for listener in tuple(self._listeners):
            try:
                listener(event)
            except Exception:
                logger.exception("event listener %r failed on %s", listener, event.kind)

    def emit(
        self, kind: str, name: str, *, level: int = logging.WARNING, **attributes: Any
    ) -> Event:
        """Build an event and publish it; returns it."""
        event = Event(kind, name, attributes, level)
        self.publish(event)
        return event


#: Components made without a bus (at import time, before ``install``) publish here until an app
#: or a registry binds them to its own; their events still reach the log.
FALLBACK_EVENTS = EventBus()


class EventSource:
    """Mixin for components that publish events: ``events`` is the bus given, else the fallback.

    The class sets ``self._events`` in ``__init__`` (``None``: not bound to a bus yet).
    """

    __slots__ = ("_events",)
    _events: EventBus | None

    @property
    def events(self) -> EventBus:
        """Where its events go: the bus it was given, else a shared bus that logs them."""
        return self._events if self._events is not None else FALLBACK_EVENTS

    @events.setter
    def events(self, bus: EventBus | None) -> None:
        self._events = bus
