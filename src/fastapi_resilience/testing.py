"""Helpers for testing apps that use fastapi-resilience.

A manual clock, fault injection for outbound httpx calls (:class:`FaultInjectionTransport`)
and for your own routes (:class:`FaultInjectionMiddleware`), and :func:`force_breaker` to
hold a circuit breaker in a state for a test.
"""

from __future__ import annotations

import asyncio
import json
import math
import random as _random
from collections.abc import Awaitable, Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING

import httpx
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from fastapi_resilience._asgi.paths import route_path
from fastapi_resilience.exceptions import ConfigurationError
from fastapi_resilience.problems._render import problem_response

if TYPE_CHECKING:
    from fastapi_resilience.outbound._breaker import BreakerRegistry, BreakerState, CircuitBreaker

__all__ = [
    "FAULT_CODE",
    "FAULT_DETAIL",
    "FaultInjectionMiddleware",
    "FaultInjectionTransport",
    "FaultRule",
    "ManualClock",
    "force_breaker",
]


class ManualClock:
    """A clock that moves only when told: ``advance(s)``, or ``await sleep(s)``.

    ``sleep`` advances the clock by the amount slept and yields once to the event loop, so
    code that backs off or waits for a window runs at once and exactly.
    """

    def __init__(self, start: float = 1_000.0, *, wall_start: float = 1_700_000_000.0) -> None:
        self._now = start
        self._wall_offset = wall_start - start
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self._now

    def time(self) -> float:
        return self._now + self._wall_offset

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a clock does not go back")
        self._now += seconds

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.advance(max(0.0, seconds))
        await asyncio.sleep(0)

    def __repr__(self) -> str:
        return f"ManualClock(now={self._now})"


# --- fault injection --------------------------------------------------------------------------

#: ``code`` of the problem+json answer the fault-injection middleware writes.
FAULT_CODE = "fault_injected"
#: ``detail`` of injected faults; tests may assert on it.
FAULT_DETAIL = "Fault injected by fastapi_resilience.testing."

Sleep = Callable[[float], Awaitable[None]]


def _rate(value: float, name: str) -> float:
    if not 0.0 <= value <= 1.0:
        raise ConfigurationError(f"{name} must be between 0 and 1, got {value!r}")
    return float(value)


def _latency(value: float, name: str) -> float:
    if value != value or value < 0:
        raise ConfigurationError(f"{name} must be >= 0 seconds, got {value!r}")
    return float(value)


class FaultInjectionTransport(httpx.AsyncBaseTransport):
    """An httpx transport that adds latency, raises transport errors and answers error statuses.

    Wrap the transport your app's client uses (default: a real ``httpx.AsyncHTTPTransport``)
    and test how your code copes with a sick upstream::

        faults = FaultInjectionTransport(error_rate=0.5, hosts={"inventory.internal"})
        client = httpx.AsyncClient(transport=faults)
        faults.error_rate = 1.0   # every attribute can be changed while the test runs

    For each request to a host in ``hosts`` (all hosts when ``None``): sleep ``latency``
    seconds, then with probability ``error_rate`` raise ``exception``, else with probability
    ``status_rate`` answer one of ``status_codes`` (with ``Retry-After: retry_after`` when
    given), else pass the request on. ``random`` and ``sleep`` are injectable so a test is
    exact and instant (``sleep=ManualClock().sleep``). ``injected`` counts faults made and
    ``requests`` the requests seen.

    Raises:
        ConfigurationError: a rate is outside [0, 1], a latency is negative or
            ``status_codes`` is empty.

    .. versionadded:: 0.1.0
    """

    def __init__(
        self,
        transport: httpx.AsyncBaseTransport | None = None,
        *,
        error_rate: float = 0.0,
        latency: float = 0.0,
        status_rate: float = 0.0,
        status_codes: Sequence[int] = (503,),
        retry_after: float | None = None,
        exception: type[Exception] = httpx.ConnectError,
        hosts: Collection[str] | None = None,
        random: Callable[[], float] = _random.random,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        if not status_codes:
            raise ConfigurationError("status_codes must name at least one status")
        self._transport = transport if transport is not None else httpx.AsyncHTTPTransport()
        self.error_rate = _rate(error_rate, "error_rate")
        self.status_rate = _rate(status_rate, "status_rate")
        self.latency = _latency(latency, "latency")
        self.status_codes = tuple(status_codes)
        self.retry_after = retry_after
        self.exception = exception
        self.hosts = None if hosts is None else frozenset(h.lower() for h in hosts)
        self._random = random
        self._sleep = sleep
        self.requests = 0
        self.injected = 0

    def targets(self, request: httpx.Request) -> bool:
        """Whether faults apply to ``request`` (its host is in ``hosts``, or ``hosts`` is None)."""
        return self.hosts is None or request.url.host.lower() in self.hosts

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests += 1
        if not self.targets(request):
            return await self._transport.handle_async_request(request)
        if self.latency > 0:
            await self._sleep(self.latency)
        if self.error_rate > 0 and self._random() < self.error_rate:
            self.injected += 1
            raise self._make_exception(request)
        if self.status_rate > 0 and self._random() < self.status_rate:
            self.injected += 1
            return self._make_response(request)
        return await self._transport.handle_async_request(request)

    def _make_exception(self, request: httpx.Request) -> Exception:
        message = f"{FAULT_DETAIL} ({request.method} {request.url.host})"
        if issubclass(self.exception, httpx.RequestError):
            return self.exception(message, request=request)
        return self.exception(message)

    def _make_response(self, request: httpx.Request) -> httpx.Response:
        status = self.status_codes[
            int(self._random() * len(self.status_codes)) % len(self.status_codes)
        ]
        headers = {"content-type": "application/problem+json"}
        if self.retry_after is not None:
            headers["retry-after"] = str(max(1, math.ceil(self.retry_after)))
        body = json.dumps({"status": status, "code": FAULT_CODE, "detail": FAULT_DETAIL})
        return httpx.Response(status, headers=headers, content=body.encode(), request=request)

    async def aclose(self) -> None:
        await self._transport.aclose()


@dataclass(slots=True)
class FaultRule:
    """Which requests :class:`FaultInjectionMiddleware` disturbs, and how.

    A request matches when its path starts with ``path_prefix`` and (if given) its method is
    in ``methods``. It is delayed by ``latency`` seconds, then with probability
    ``error_rate`` answered with ``status`` as problem+json (code ``fault_injected``), with
    ``Retry-After`` when ``retry_after`` is set. Fields can be changed while the app runs.
    """

    path_prefix: str = "/"
    error_rate: float = 0.0
    latency: float = 0.0
    status: int = 503
    methods: Collection[str] | None = None
    retry_after: float | None = None

    def __post_init__(self) -> None:
        _rate(self.error_rate, "error_rate")
        _latency(self.latency, "latency")
        if not 100 <= self.status <= 599:
            raise ConfigurationError(f"status must be an HTTP status code, got {self.status!r}")
        if self.methods is not None:
            self.methods = frozenset(m.upper() for m in self.methods)

    def matches(self, scope: Scope) -> bool:
        if not route_path(scope).startswith(self.path_prefix):
            return False
        return self.methods is None or scope.get("method", "GET") in self.methods


class FaultInjectionMiddleware:
    """Pure ASGI middleware that slows down or fails chosen routes of *your* app.

    Use it in tests (or a staging chaos run) to check what clients of your app see when it
    is slow or failing. The first rule whose ``path_prefix`` (and ``methods``) match
    applies; other requests pass untouched. The ``rules`` list is kept, not copied, so a
    test can change or append rules while the app runs. Add it innermost
    (``app.add_middleware`` first) so correlation IDs and rate limiting see the injected
    answers like real ones; they are written with the library's problem+json renderer.

    .. versionadded:: 0.1.0
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        rules: list[FaultRule],
        random: Callable[[], float] = _random.random,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        for rule in rules:
            if not isinstance(rule, FaultRule):
                raise ConfigurationError(f"rules must be FaultRule objects, got {rule!r}")
        self.app = app
        self.rules = rules
        self._random = random
        self._sleep = sleep
        self.injected = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rule = next((r for r in self.rules if r.matches(scope)), None)
        if rule is None:
            await self.app(scope, receive, send)
            return
        if rule.latency > 0:
            await self._sleep(rule.latency)
        if rule.error_rate > 0 and self._random() < rule.error_rate:
            self.injected += 1
            await self._fault_response(scope, rule)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _fault_response(self, scope: Scope, rule: FaultRule) -> Response:
        headers = {}
        if rule.retry_after is not None:
            headers["Retry-After"] = str(max(1, math.ceil(rule.retry_after)))
        phrase = HTTPStatus(rule.status).phrase if rule.status in _KNOWN_STATUSES else "Error"
        return problem_response(
            scope,
            status=rule.status,
            code=FAULT_CODE,
            title=phrase,
            detail=FAULT_DETAIL,
            headers=headers,
        )


_KNOWN_STATUSES = {s.value for s in HTTPStatus}


# --- breaker states ---------------------------------------------------------------------------


@contextmanager
def force_breaker(
    breaker: CircuitBreaker | str,
    state: BreakerState,
    *,
    duration: float | None = None,
    registry: BreakerRegistry | None = None,
) -> Iterator[CircuitBreaker]:
    """Hold a breaker in ``state`` (``"open"``, ``"half_open"``, ``"closed"``) for a ``with`` block.

    ``breaker`` is the object or its registered name. ``"open"`` lasts ``duration`` seconds
    (default: the breaker's ``recovery_timeout``, so ``Retry-After`` looks real); on the
    breaker's clock it then turns half-open as usual. On leaving the block the breaker gets
    back the state it had (an open one with the open time it had left).

    Raises:
        LookupError: no breaker of that name is registered.
        ConfigurationError: ``state`` is not a breaker state.

    .. versionadded:: 0.1.0
    """
    from fastapi_resilience.outbound._breaker import get_breaker

    if state not in ("open", "half_open", "closed"):
        raise ConfigurationError(f"state must be 'open', 'half_open' or 'closed', got {state!r}")
    target = get_breaker(breaker, registry) if isinstance(breaker, str) else breaker
    previous = target.state
    left = target.time_left_open()
    _set_breaker_state(target, state, duration)
    try:
        yield target
    finally:
        _set_breaker_state(target, previous, left)


def _set_breaker_state(breaker: CircuitBreaker, state: str, duration: float | None) -> None:
    if state == "closed":
        breaker.force_closed()
    elif state == "open":
        breaker.force_open(duration)
    else:
        # Open for no time at all: the next read of ``state`` finds it half-open.
        breaker.force_open(0.0)
        _ = breaker.state
