"""Client-side adaptive throttling, from Google's SRE book ("Handling Overload").

Each client counts, over a sliding window, the ``requests`` it tried and the ``accepts`` the
upstream answered normally, and drops new requests locally with probability

    max(0, (requests - K * accepts) / (requests + 1))

While the upstream accepts everything, nothing is dropped. When it starts refusing, the client
sends about ``K`` times what the upstream accepts, so a refusing upstream is not hammered and
recovers quickly, and the client notices recovery as soon as accepts come back.
"""

from __future__ import annotations

import logging
import random as _random
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import ParamSpec, TypeVar

from fastapi_resilience._optional import exception_of
from fastapi_resilience.clock import SYSTEM_CLOCK, Clock
from fastapi_resilience.events import EventBus, EventSource
from fastapi_resilience.exceptions import (
    BulkheadFullError,
    ConfigurationError,
    RateLimitedError,
    RetryExhaustedError,
    ServiceUnavailableError,
    ThrottledError,
    UpstreamError,
)
from fastapi_resilience.outbound._deadline import not_the_upstreams_failure
from fastapi_resilience.outbound._retry_budget import SlidingCounter, seconds

__all__ = ["AdaptiveThrottle", "ThrottledError", "is_overload", "refused_here"]

P = ParamSpec("P")
T = TypeVar("T")

THROTTLING_STARTED = "throttle.started"
THROTTLING_STOPPED = "throttle.stopped"

_REQUESTS = 0
_ACCEPTS = 1


def refused_here(exc: BaseException) -> bool:
    """Whether a refusal made in this process ended the call: a full bulkhead, a throttle, or
    retries whose last attempt was one. The upstream said nothing about that attempt."""
    last = exc.__cause__ if isinstance(exc, RetryExhaustedError) else exc
    return isinstance(last, ThrottledError | BulkheadFullError)


def is_overload(exc: BaseException) -> bool:
    """The default "the upstream refused" test: upstream errors, 503s, 429s, transport errors;
    not a refusal made in this process (a full bulkhead, a throttle, retries that ended on
    one) nor a call that the caller's own deadline ended."""
    return (
        isinstance(
            exc,
            (
                UpstreamError,
                ServiceUnavailableError,
                RateLimitedError,
                exception_of("httpx", "TransportError"),
            ),
        )
        and not refused_here(exc)
        and not not_the_upstreams_failure(exc)
    )


class AdaptiveThrottle(EventSource):
    """Drops calls locally in proportion to how often one upstream has been refusing them.

    ``await throttle.call(fn, *args, **kwargs)`` raises :class:`ThrottledError` without
    calling ``fn`` when dropped. Outside :meth:`call`, use :meth:`allow` before a call and
    :meth:`record` after it. Give one throttle to each upstream (the transport does it per
    host). Publishes ``throttle.started`` when it first drops a call and ``throttle.stopped``
    when the drop probability falls back to 0.

    Args:
        k: the SRE book's ``K``: 2 lets through twice what the upstream accepts; lower is
            more aggressive.
        window: seconds of history (the book uses two minutes).
        min_requests: no dropping until this many requests were seen in the window.
        is_rejection: which failures count as the upstream refusing (default
            :func:`is_overload`); any other outcome counts as accepted.
        name: names the upstream in events.
        clock: injectable time. random: a ``() -> float in [0, 1)`` source.
        events: the event bus; ``None``: a shared bus that only logs.

    .. versionadded:: 0.1.0
    """

    __slots__ = (
        "_counter",
        "_is_rejection",
        "_random",
        "_throttling",
        "k",
        "min_requests",
        "name",
        "window",
    )

    def __init__(
        self,
        *,
        k: float = 2.0,
        window: float | timedelta = 120.0,
        min_requests: int = 10,
        is_rejection: Callable[[BaseException], bool] = is_overload,
        name: str = "default",
        clock: Clock = SYSTEM_CLOCK,
        random: Callable[[], float] = _random.random,
        events: EventBus | None = None,
    ) -> None:
        if not k >= 1:
            raise ConfigurationError(f"k must be >= 1, got {k!r}")
        window_s = seconds(window, "window")
        if not window_s:
            raise ConfigurationError("window must be > 0 seconds")
        if min_requests < 0:
            raise ConfigurationError(f"min_requests must be >= 0, got {min_requests!r}")
        self.k = k
        self.window = window_s
        self.min_requests = min_requests
        self.name = name
        self._is_rejection = is_rejection
        self._random = random
        self._events = events
        self._throttling = False
        self._counter = SlidingCounter(window_s, kinds=2, buckets=20, clock=clock)

    def probability(self) -> float:
        """The current chance that a new request is dropped locally."""
        requests = self._counter.total(_REQUESTS)
        if requests < self.min_requests:
            return 0.0
        accepts = self._counter.total(_ACCEPTS)
        return max(0.0, (requests - self.k * accepts) / (requests + 1))

    def allow(self) -> bool:
        """Count a request and decide whether it may go to the upstream."""
        p = self.probability()
        self._counter.add(_REQUESTS)
        if p <= 0.0:
            if self._throttling:
                self._throttling = False
                self.events.emit(THROTTLING_STOPPED, self.name, level=logging.INFO)
            return True
        if self._random() >= p:
            return True
        if not self._throttling:
            self._throttling = True
            self.events.emit(THROTTLING_STARTED, self.name, probability=round(p, 3))
        return False

    def record(self, exc: BaseException | None = None) -> None:
        """Record the outcome of an allowed request: accepted unless ``exc`` is a refusal.

        A call the caller's own deadline ended (it never started, or a deadline the client
        chose cut it) says nothing about the upstream: it is neither accepted nor refused, and
        its request is taken back.
        """
        if exc is None:
            self._counter.add(_ACCEPTS)
        elif not_the_upstreams_failure(exc):
            # Taken from the newest slice: if the request's own slice has left the window
            # meanwhile, the total is one short for the rest of the window, which only ever
            # lowers the drop probability.
            self._counter.add(_REQUESTS, -1)
        elif not self._is_rejection(exc):
            self._counter.add(_ACCEPTS)

    async def call(self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """``await fn(...)`` unless dropped.

        Raises:
            ThrottledError: dropped locally; ``fn`` was not called.
        """
        if not self.allow():
            raise ThrottledError(
                f"Calls to {self.name} are being shed locally: the upstream has been refusing "
                "most requests.",
                extensions={"upstream": self.name},
            )
        try:
            result = await fn(*args, **kwargs)
        except Exception as exc:
            self.record(exc)
            raise
        self._counter.add(_ACCEPTS)
        return result

    def __repr__(self) -> str:
        return f"AdaptiveThrottle(name={self.name!r}, k={self.k}, window={self.window})"
