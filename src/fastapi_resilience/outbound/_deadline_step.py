"""The request deadline as a step of the request pipeline: ``RequestDeadlineMiddleware``'s."""

from __future__ import annotations

import asyncio
import math
from datetime import timedelta
from typing import Any

from starlette.types import Message, Scope, Send

from fastapi_resilience._asgi.app_state import resilience_of
from fastapi_resilience._asgi.pipeline import Inner, RequestState
from fastapi_resilience._settings import ResilienceSettings
from fastapi_resilience.clock import SYSTEM_CLOCK, Clock
from fastapi_resilience.correlation._ids import HEADER_NAME
from fastapi_resilience.exceptions import ConfigurationError, UpstreamTimeoutError
from fastapi_resilience.outbound._deadline import (
    DEADLINE_EXCEEDED_DETAIL,
    DeadlineScope,
    deadline,
    to_seconds,
)
from fastapi_resilience.problems._render import no_request_body, problem_response

__all__ = ["FROM_SETTINGS", "DeadlineStep", "check_budget"]

#: Default of the arguments that come from ``ResilienceSettings`` unless given.
FROM_SETTINGS: Any = object()


def check_budget(value: float | timedelta | None, argument: str) -> float | None:
    seconds = to_seconds(value)
    if seconds is not None and (math.isnan(seconds) or seconds <= 0):
        raise ConfigurationError(f"{argument} must be > 0 seconds or None, got {value!r}")
    return seconds


def _floor(value: float) -> float:
    floor = check_budget(value, "RequestDeadlineMiddleware header_floor")
    if floor is None or not math.isfinite(floor):
        raise ConfigurationError(
            f"RequestDeadlineMiddleware header_floor must be a finite number of seconds > 0, "
            f"got {value!r}"
        )
    return floor


def _header_name(header: str | None) -> bytes | None:
    if header and not HEADER_NAME.fullmatch(header):
        raise ConfigurationError(
            f"RequestDeadlineMiddleware header: {header!r} is not a valid HTTP header name"
        )
    return header.lower().encode("latin-1") if header else None


class DeadlineStep:
    """One time budget per HTTP request, which outbound calls inherit; a client may shorten it.

    ``enter`` opens the request's deadline (and, with ``enforce``, runs the app in ``around``
    under a cut-off); ``leave`` closes it. The arguments are ``RequestDeadlineMiddleware``'s.
    """

    def __init__(
        self,
        *,
        timeout: float | timedelta | None = 30.0,
        header: str | None = FROM_SETTINGS,
        header_floor: float = FROM_SETTINGS,
        enforce: bool = True,
        grace: float = 0.0,
        clock: Clock = SYSTEM_CLOCK,
        settings: ResilienceSettings | None = None,
    ) -> None:
        budget = check_budget(timeout, "RequestDeadlineMiddleware timeout")
        if grace < 0:
            raise ConfigurationError(f"RequestDeadlineMiddleware grace must be >= 0, got {grace}")
        self.timeout = budget
        self.enforce = enforce
        self.grace = grace
        self.clock = clock
        self._given: tuple[bytes | Any | None, float | Any] = (
            header if header is FROM_SETTINGS else _header_name(header),
            header_floor if header_floor is FROM_SETTINGS else _floor(header_floor),
        )
        self.header: bytes | None = None
        self.header_floor = 0.0
        # Without settings, the app's own are only known once it runs: ``_settle`` then.
        self._unsettled = settings is None and FROM_SETTINGS in self._given
        if not self._unsettled:
            self._configure(settings)

    def _configure(self, settings: ResilienceSettings | None) -> None:
        """Take ``header`` and ``header_floor`` from the arguments, else from ``settings``
        (``None`` only when both were given)."""
        header, floor = self._given
        if header is FROM_SETTINGS and settings is not None:
            header = _header_name(settings.request_deadline_header)
        if floor is FROM_SETTINGS and settings is not None:
            floor = _floor(settings.request_deadline_header_floor)
        self.header = header
        self.header_floor = floor

    def startup(self, scope: Scope) -> None:
        """At the lifespan's start-up: read the settings (``settle``)."""
        if self._unsettled:
            self.settle(scope)

    def settle(self, scope: Scope) -> None:
        """Read the settings once, from the app serving ``scope`` (the lifespan's or the
        first request's): those ``install()`` was given, else the environment's."""
        resilience = resilience_of(scope.get("app"))
        self._configure(resilience.settings if resilience is not None else ResilienceSettings())
        self._unsettled = False

    def _asked(self, scope: Scope) -> float | None:
        """The budget the client asks for, raised to the floor; ``None`` when it asks for none
        or sends something that is not a number of seconds."""
        for key, value in scope.get("headers", ()):
            if key == self.header:
                try:
                    asked = float(value.decode("latin-1"))
                except ValueError:
                    return None
                if not math.isfinite(asked) or asked < 0:
                    return None
                return max(asked, self.header_floor)
        return None

    def _budget(self, scope: Scope) -> tuple[float | None, bool]:
        """The request's budget, and whether the client chose it (shorter than the server's)."""
        budget = self.timeout
        asked = self._asked(scope) if self.header is not None else None
        if asked is not None and (budget is None or asked < budget):
            return asked, True
        return budget, False

    websocket = False

    def enter(self, state: RequestState) -> None:
        if self._unsettled:
            self.settle(state.scope)  # the first request, unless the lifespan came first
        budget, from_client = self._budget(state.scope)
        if budget is None:
            return
        scope_ = deadline(budget, clock=self.clock, from_client=from_client)
        scope_.__enter__()
        # One entry per deadline step: two ``RequestDeadlineMiddleware`` on one request (an
        # app's and a mounted app's) each exit their own.
        entry = (self, budget, scope_)
        if state.deadlines is None:
            state.deadlines = [entry]
        else:
            state.deadlines.append(entry)
        if self.enforce:
            if state.arounds is None:
                state.arounds = [self]
            else:
                state.arounds.append(self)

    def leave(self, state: RequestState) -> None:
        entry = self._entry(state)
        if entry is not None:
            assert state.deadlines is not None
            state.deadlines.remove(entry)
            entry[2].__exit__(None, None, None)

    def _entry(self, state: RequestState) -> tuple[DeadlineStep, float, DeadlineScope] | None:
        """This step's deadline of the request, the latest if it entered twice."""
        entries: list[tuple[DeadlineStep, float, DeadlineScope]] = state.deadlines or []
        for entry in reversed(entries):
            if entry[0] is self:
                return entry
        return None

    async def around(self, state: RequestState, inner: Inner, send: Send) -> None:
        """Run the app, cut off when the budget (plus ``grace``) is spent before it answers."""
        started = False
        entry = self._entry(state)
        budget = entry[1] if entry is not None else 0.0
        cutoff = asyncio.timeout(budget + self.grace)

        async def watch_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start" and not started:
                started = True
                # The answer is on its way: cutting it off now would only break it.
                cutoff.reschedule(None)
            await send(message)

        try:
            async with cutoff:
                await inner(watch_send)
        except TimeoutError:
            if not cutoff.expired() or started:
                raise
            scope = state.scope
            error = UpstreamTimeoutError(
                DEADLINE_EXCEEDED_DETAIL, extensions={"deadline": round(budget, 3)}
            )
            response = problem_response(
                scope,
                status=error.status_code,
                code=error.code,
                title=error.title,
                detail=error.detail,
                extensions=error.extensions,
            )
            await response(scope, no_request_body, send)
