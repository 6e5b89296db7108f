"""Libraries the package uses only in some apps: their exceptions, looked up when one is
caught, a Redis client imported when one is built, and OpenTelemetry's current span.

Importing httpx (with its command-line extras) or redis costs every app tens of milliseconds,
even one that never makes an outbound call or uses Redis. Code that only needs to recognise
their exceptions asks here: an exception of a library that was never imported cannot exist.
"""

from __future__ import annotations

import importlib.util
import sys
from typing import TYPE_CHECKING, Any

from fastapi_resilience.exceptions import ConfigurationError

if TYPE_CHECKING:
    from redis.asyncio import Redis


class _NeverRaised(Exception):
    """Stands for an exception class of a library that is not imported: nothing raises it."""


def exception_of(module: str, name: str) -> type[BaseException]:
    """``module.name`` if ``module`` is imported, else a class that nothing raises."""
    loaded = sys.modules.get(module)
    found = getattr(loaded, name, None) if loaded is not None else None
    return found if isinstance(found, type) else _NeverRaised


def current_span() -> Any | None:
    """The current OpenTelemetry span; ``None`` while ``opentelemetry.trace`` is not imported.

    Nothing is imported here: an app that traces has imported the module (its instrumentation
    did), and one that does not has no span to find, so it pays one dictionary look-up.
    """
    trace = sys.modules.get("opentelemetry.trace")
    return None if trace is None else trace.get_current_span()


def tracing_installed() -> bool:
    """Whether the OpenTelemetry API is installed (found, not imported)."""
    try:
        return importlib.util.find_spec("opentelemetry.trace") is not None
    except (ImportError, ValueError):
        # ``opentelemetry`` itself missing, or blocked with ``sys.modules[...] = None``.
        return False


def redis_from_url(url: str, setting: str) -> Redis:
    """A Redis client for ``url``; ``setting`` names where the URL came from in the errors.

    Raises:
        ConfigurationError: the ``redis`` extra is not installed, or ``url`` is not a Redis URL.
    """
    try:
        from redis.asyncio import Redis
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ConfigurationError(
            f"{setting} needs the redis extra: pip install 'fastapi-resilience[redis]'"
        ) from exc
    try:
        return Redis.from_url(url)
    except ValueError as exc:
        raise ConfigurationError(f"{setting} is not a valid Redis URL: {exc}") from exc
