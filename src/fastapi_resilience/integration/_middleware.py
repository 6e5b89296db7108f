"""The public middlewares: each a pipeline of one step, for apps that do not use ``install()``.

``install()`` runs the same steps in one layer. Stacked by hand, or mounted inside an app that
has them, these join the outer request: one ID, one set of fields, one 500 per request.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

from starlette.types import ASGIApp

from fastapi_resilience._asgi.pipeline import Pipeline
from fastapi_resilience._settings import ResilienceSettings
from fastapi_resilience.clock import SYSTEM_CLOCK, Clock
from fastapi_resilience.correlation._ids import CorrelationStep, generate_correlation_id
from fastapi_resilience.events import EventBus
from fastapi_resilience.operations._degraded import DegradedMode, DegradedStep
from fastapi_resilience.outbound._deadline_step import FROM_SETTINGS, DeadlineStep
from fastapi_resilience.problems._render import answer_unhandled
from fastapi_resilience.ratelimit._identity import IdentityResolver
from fastapi_resilience.ratelimit._limiter import RateLimiter
from fastapi_resilience.ratelimit._step import RateLimitStep
from fastapi_resilience.ratelimit._storage import RateLimitStorage

__all__ = [
    "CorrelationIdMiddleware",
    "DegradedModeMiddleware",
    "RateLimitMiddleware",
    "RequestDeadlineMiddleware",
]


class CorrelationIdMiddleware(Pipeline):
    """Pure ASGI middleware that gives every request a correlation ID.

    The ID comes from ``header_name`` when it is valid (1 to 128 characters of
    ``[A-Za-z0-9._:-]``); otherwise a new one is generated, so a malformed, oversized or
    injected header is never reflected. The ID is echoed on every response and is returned by
    :func:`get_correlation_id` in routes, dependencies, background tasks and log records.

    Place it outermost among user middleware (``install`` does). Starlette's
    ``ServerErrorMiddleware`` sits outside every user middleware and sends its 500 through the
    server's ``send``, past any header-adding wrapper; so this middleware catches an unhandled
    exception itself while the response has not started, logs it once with its traceback and
    the ID, and answers the 500 problem+json carrying the ID in header and body.

    Inside another correlation layer (an app with its own, mounted in an app with one) it steps
    aside: the outer one's ID, response headers and 500s serve the request.

    Args:
        app: the ASGI app to wrap.
        header_name: the header read and echoed.
        generator: makes a new ID; must return a valid one.
        update_request_header: also put a generated ID into the request's headers, so code
            reading the header directly sees the same ID.
        raise_server_exceptions: after answering an unhandled exception's 500, raise it again
            to the server, as Starlette's own error middleware does. ``None`` (the default):
            only for Starlette's ``TestClient``, so a failing route fails the test that calls
            it (``TestClient(app, raise_server_exceptions=False)`` gets the 500 instead); a
            real server is not handed the exception, which it would log a second time.
        span_attribute: the attribute of the current OpenTelemetry span that gets the ID
            (``None``: none).
        from_trace: a request without a valid ID of its own takes its trace's ID (32 hex
            characters) when a span is current, instead of a new one.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        header_name: str = "X-Request-ID",
        generator: Callable[[], str] = generate_correlation_id,
        update_request_header: bool = True,
        raise_server_exceptions: bool | None = None,
        span_attribute: str | None = "correlation_id",
        from_trace: bool = False,
    ) -> None:
        self.step = CorrelationStep(
            header_name=header_name,
            generator=generator,
            update_request_header=update_request_header,
            span_attribute=span_attribute,
            from_trace=from_trace,
        )
        self.header_name = header_name
        super().__init__(
            app, [self.step], on_error=answer_unhandled, reraise=raise_server_exceptions
        )


class RateLimitMiddleware(Pipeline):
    """Pure ASGI middleware: :class:`RateLimitStep` in front of an app.

    Place it inside ``CorrelationIdMiddleware`` (``install`` runs the step in its own layer),
    so that its 429 and 503 answers carry the correlation ID. Non-HTTP scopes pass through.

    Args:
        app: the ASGI app to wrap.
        limiter: the :class:`RateLimiter` to use; built from ``settings`` when not given.
        settings: a ``ResilienceSettings``; ``ResilienceSettings()`` (the environment) when
            neither this nor ``limiter`` is given.
        storage: overrides the storage the settings name.
        resolver: overrides the built-in identity resolver.
        events: the event bus for storage state changes and shadow refusals.
        clock: the clock of the storage and its breaker.

    .. versionadded:: 0.1.0
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        limiter: RateLimiter | None = None,
        settings: Any = None,
        storage: RateLimitStorage | None = None,
        resolver: IdentityResolver | None = None,
        events: EventBus | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        owns_limiter = limiter is None
        if limiter is None:
            from fastapi_resilience.ratelimit._setup import limiter_from_settings

            limiter = limiter_from_settings(
                settings, storage=storage, resolver=resolver, events=events, clock=clock
            )
        self.limiter = limiter
        # The middleware built this limiter, so it closes its storage at shutdown.
        super().__init__(app, [RateLimitStep(limiter, close_limiter=owns_limiter)])


class DegradedModeMiddleware(Pipeline):
    """Pure ASGI middleware: :class:`DegradedStep` for ``mode`` in front of an app.

    ``install`` runs the step in its own layer, inside the rate limiter (contract order:
    correlation IDs, rate limiting, degraded mode; ADR 0049).
    """

    def __init__(self, app: ASGIApp, *, mode: DegradedMode) -> None:
        self.mode = mode
        super().__init__(app, [DegradedStep(mode)])


class RequestDeadlineMiddleware(Pipeline):
    """Gives every HTTP request a time budget that outbound calls inherit.

    Sets the request's deadline (a context variable read by ``remaining()``, ``timeout()``
    and every guarded call), so a chain of upstream calls never gets more than the request
    has left. A client may ask for less with ``header`` (seconds, e.g. ``X-Request-Timeout:
    1.5``), never for more than ``timeout`` and never for less than ``header_floor`` (a
    smaller value is raised to it); a value that is not a number of seconds is ignored. A
    call that a deadline the client chose cuts is not counted against the upstream by any
    breaker (ADR 0056).

    With ``enforce=True`` (the default) a request still running when the budget is spent,
    and that has not started its answer, is cancelled and answered 504 ``upstream_timeout``
    (problem+json) that carries the correlation ID, inside or outside the correlation
    middleware; an answer already started is left to finish.

    Args:
        app: the ASGI app.
        timeout: the budget in seconds; ``None`` sets no deadline (a header may still).
        header: request header a client may use to shorten the budget; ``None`` or ``""``:
            ignored. Default: the ``request_deadline_header`` setting.
        header_floor: the least budget a client may ask for, seconds (> 0). Default: the
            ``request_deadline_header_floor`` setting.
        enforce: cut off requests that overrun the budget (plus ``grace`` seconds).
        grace: extra seconds before cutting off, for the route to answer its own 504.
        clock: time source for the deadline.
        settings: where ``header`` and ``header_floor`` come from when not given. ``None``:
            the settings ``install()`` was given for the app (a mounted app: the app around
            it), else ``ResilienceSettings()`` (the environment); read once, at start-up (the
            lifespan) or on the first request.

    Raises:
        ConfigurationError: an argument or setting is out of range; the message names it.

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        timeout: float | timedelta | None = 30.0,
        header: str | None = FROM_SETTINGS,
        header_floor: float = FROM_SETTINGS,
        enforce: bool = True,
        grace: float = 0.0,
        clock: Clock = SYSTEM_CLOCK,
        settings: ResilienceSettings | None = None,
    ) -> None:
        self.step = DeadlineStep(
            timeout=timeout,
            header=header,
            header_floor=header_floor,
            enforce=enforce,
            grace=grace,
            clock=clock,
            settings=settings,
        )
        self.timeout = self.step.timeout
        super().__init__(app, [self.step])
