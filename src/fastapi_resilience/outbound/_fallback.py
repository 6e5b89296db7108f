"""Fallbacks: when a guarded call fails, answer with something else instead of an error.

The fallback is the outermost layer: it sees what the breaker, retry, bulkhead and timeout
finally raised (``CircuitOpenError``, ``RetryExhaustedError``, ``BulkheadFullError``,
``UpstreamTimeoutError``...) and receives that error so it can choose what to answer.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any, ParamSpec, TypeVar, cast

from fastapi_resilience.events import FALLBACK_EVENTS, EventBus
from fastapi_resilience.exceptions import ClientError, ConfigurationError

__all__ = ["FALLBACK_SERVED", "FallbackOn", "default_fallback_on", "fallback", "with_fallback"]

#: Published (DEBUG) each time a fallback answers in place of a failed call.
FALLBACK_SERVED = "fallback.served"

T = TypeVar("T")
P = ParamSpec("P")

#: Which failures take the fallback: exception types, or a predicate on the error.
FallbackOn = type[BaseException] | tuple[type[BaseException], ...] | Callable[[BaseException], bool]


def default_fallback_on(error: BaseException) -> bool:
    """Any failure except a ``ClientError``: a bad request must not be answered with a default.

    ``CancelledError`` and other ``BaseException`` that are not ``Exception`` never qualify.
    """
    return isinstance(error, Exception) and not isinstance(error, ClientError)


def _predicate(on: FallbackOn | None) -> Callable[[BaseException], bool]:
    if on is None:
        return default_fallback_on
    types: tuple[Any, ...] | None = None
    if isinstance(on, type):
        types = (on,)
    elif isinstance(on, tuple):
        types = on
    elif callable(on):
        return on
    if not types or not all(isinstance(t, type) and issubclass(t, BaseException) for t in types):
        raise ConfigurationError(f"on must be exception types or a predicate, got {on!r}")
    chosen = types

    def matches(error: BaseException) -> bool:
        return isinstance(error, chosen)

    return matches


async def _run_fallback(
    handler: Callable[..., Any],
    error: BaseException,
    args: Any,
    kwargs: Any,
    fn: Callable[..., Any],
    events: EventBus,
) -> Any:
    # Only on a failure: a call that succeeds pays nothing for it.
    name = getattr(fn, "__qualname__", None) or repr(fn)
    events.emit(FALLBACK_SERVED, name, level=logging.DEBUG, error=type(error).__name__)
    result = handler(error, *args, **kwargs)
    if inspect.isawaitable(result):
        result = await result
    return result


async def with_fallback(
    fn: Callable[..., Awaitable[T]],
    handler: Callable[..., T | Awaitable[T]],
    /,
    *args: Any,
    on: FallbackOn | None = None,
    **kwargs: Any,
) -> T:
    """``await fn(*args, **kwargs)``; on a failure, ``handler(error, *args, **kwargs)`` instead.

    ``handler`` may be sync or async and receives the error first, then the call's own
    arguments. ``on`` (exception types or a predicate) chooses which failures take the
    fallback; by default every ``Exception`` except a ``ClientError``. A failure inside the
    handler propagates with the original error chained as its context. Each answer of the
    handler publishes ``fallback.served`` (DEBUG) on the shared bus that logs it.

    Returns:
        What ``fn`` or, on failure, ``handler`` returned.

    .. versionadded:: 0.1.0
    """
    applies = _predicate(on)
    try:
        return await fn(*args, **kwargs)
    except BaseException as error:
        if not applies(error):
            raise
        return cast(T, await _run_fallback(handler, error, args, kwargs, fn, FALLBACK_EVENTS))


def fallback(
    handler: Callable[..., Any],
    *,
    on: FallbackOn | None = None,
    events: EventBus | None = None,
) -> Callable[[Callable[P, Awaitable[T]]], Callable[P, Awaitable[T]]]:
    """Decorate an async function so a failure answers with ``handler(error, *args, **kwargs)``.

    Put it outside the breaker and retry decorators so the handler sees their final error::

        @fallback(lambda error, sku: {"sku": sku, "stock": None, "degraded": True})
        @breaker
        @retry
        async def fetch_stock(sku: str) -> dict: ...

    Args:
        handler: sync or async; gets the error, then the call's arguments.
        on: exception types or a predicate choosing which failures take the fallback;
            default: any ``Exception`` except a ``ClientError``.
        events: where ``fallback.served`` goes (DEBUG, each time the handler answers); by
            default the shared bus that logs it.

    Raises:
        ConfigurationError: ``on`` is neither exception types nor a callable.

    .. versionadded:: 0.1.0
    """
    if not callable(handler):
        raise ConfigurationError(f"handler must be callable, got {handler!r}")
    applies = _predicate(on)
    bus = events if events is not None else FALLBACK_EVENTS

    def decorate(fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
        @functools.wraps(fn)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
            try:
                return await fn(*args, **kwargs)
            except BaseException as error:
                if not applies(error):
                    raise
                return cast(T, await _run_fallback(handler, error, args, kwargs, fn, bus))

        return wrapper

    return decorate
