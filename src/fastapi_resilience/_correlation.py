"""Correlation IDs: one ID per request, in a context variable, on every response and log record."""

from __future__ import annotations

import logging
import os
import re
from collections import deque
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import TYPE_CHECKING

from starlette.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from fastapi_resilience._degraded import DegradedMode, DegradedModeMiddleware
    from fastapi_resilience._rate_limit_middleware import RateLimitMiddleware
    from fastapi_resilience._rate_limiter import RateLimiter

__all__ = [
    "HEADER_NAME",
    "RESPONSE_HEADERS_KEY",
    "SCOPE_KEY",
    "CorrelationIdFilter",
    "CorrelationIdMiddleware",
    "generate_correlation_id",
    "get_correlation_id",
    "is_valid_correlation_id",
]

#: Where the middleware leaves the request's ID in the ASGI scope.
SCOPE_KEY = "fastapi_resilience.correlation_id"
#: Where the error renderer marks the exception it logged for this request.
LOGGED_KEY = "fastapi_resilience.logged"
#: A list of header pairs in the scope that ``CorrelationIdMiddleware`` adds to the response
#: start; code inside it appends to the list rather than wrapping ``send`` again.
RESPONSE_HEADERS_KEY = "fastapi_resilience.response_headers"

_VALID_ID = re.compile(rb"[A-Za-z0-9._:\-]{1,128}")
#: An HTTP header name (an RFC 9110 token): every header name a setting or argument gives.
HEADER_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~\-]+")

_correlation_id: ContextVar[str | None] = ContextVar(
    "fastapi_resilience_correlation_id", default=None
)


def get_correlation_id() -> str | None:
    """The current request's correlation ID, or ``None`` outside a request."""
    return _correlation_id.get()


def set_correlation_id(value: str | None) -> object:
    """Set the ID for the current context (tests, workers); returns a token for ``reset``."""
    return _correlation_id.set(value)


#: IDs made ahead, 256 per ``os.urandom`` call instead of one syscall per request.
#: ``deque.popleft`` is atomic, so threads never share an ID.
_ID_POOL: deque[str] = deque()
# A forked worker (gunicorn, uvicorn --workers) must not hand out its parent's IDs.
os.register_at_fork(after_in_child=_ID_POOL.clear)


def generate_correlation_id() -> str:
    """128 random bits as 32 lower-case hex characters (no dashes: cheaper to type and grep)."""
    try:
        return _ID_POOL.popleft()
    except IndexError:
        # One separator every 16 bytes, split in C: no Python-level loop over the 256 IDs.
        batch = os.urandom(16 * 256).hex(" ", 16).split()
        mine = batch.pop()
        _ID_POOL.extend(batch)
        return mine


def is_valid_correlation_id(value: str | bytes) -> bool:
    """True for 1 to 128 characters of ``[A-Za-z0-9._:-]``; anything else is never reflected."""
    raw = value.encode("utf-8", "replace") if isinstance(value, str) else value
    return _VALID_ID.fullmatch(raw) is not None


class CorrelationIdFilter(logging.Filter):
    """Stamps every log record with ``record.correlation_id`` (``default`` outside a request).

    Attach it to a handler, then use ``%(correlation_id)s`` in the format.
    """

    def __init__(self, name: str = "", *, default: str = "-") -> None:
        super().__init__(name)
        self.default = default

    def filter(self, record: logging.LogRecord) -> bool:
        # An explicit ``extra={"correlation_id": ...}`` wins over the context.
        if not getattr(record, "correlation_id", None):
            record.correlation_id = _correlation_id.get() or self.default
        return True


class CorrelationIdMiddleware:
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

    Inside another ``CorrelationIdMiddleware`` (an app with its own, mounted in an app with
    one) it steps aside: the outer one's ID, response headers and 500s serve the request.

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
        rate_limiter: also rate-limit every request with it, in the same layer: the same as a
            ``RateLimitMiddleware(limiter=rate_limiter)`` placed just inside this middleware,
            which it builds, minus one coroutine per request on the common path (a request the
            in-process storage admits). ``install`` uses it.
        degraded_mode: also run a ``DegradedModeMiddleware`` for it, inside the rate limiter,
            in the same layer: while nothing is off it costs one attribute test, not a
            coroutine (ADR 0049). ``install`` uses it.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        header_name: str = "X-Request-ID",
        generator: Callable[[], str] = generate_correlation_id,
        update_request_header: bool = True,
        raise_server_exceptions: bool | None = None,
        rate_limiter: RateLimiter | None = None,
        degraded_mode: DegradedMode | None = None,
    ) -> None:
        if not HEADER_NAME.fullmatch(header_name):
            raise ValueError(f"header_name: {header_name!r} is not a valid HTTP header name")
        #: The degraded-mode middleware inside this one (and inside the rate limiter).
        self._degraded: DegradedModeMiddleware | None = None
        if degraded_mode is not None:
            from fastapi_resilience._degraded import DegradedModeMiddleware

            app = self._degraded = DegradedModeMiddleware(app, mode=degraded_mode)
        #: The rate-limit middleware inside this one, when ``rate_limiter`` was given.
        self._limits: RateLimitMiddleware | None = None
        self._limit_key = ""
        if rate_limiter is not None:
            # Imported here: the rate limiter's modules import this one.
            from fastapi_resilience._rate_limit_middleware import RateLimitMiddleware
            from fastapi_resilience._rate_limiter import SCOPE_KEY as LIMIT_KEY

            self._limits = RateLimitMiddleware(app, limiter=rate_limiter)
            self._limit_key = LIMIT_KEY
            app = self._limits
        self.app = app
        self.header_name = header_name
        self._header = header_name.lower().encode("latin-1")
        self._generate = generator
        self._update_request_header = update_request_header
        self.raise_server_exceptions = raise_server_exceptions

    def _reraise(self, scope: Scope) -> bool:
        if self.raise_server_exceptions is not None:
            return self.raise_server_exceptions
        # Starlette's TestClient asks every app for its debug messages; servers do not.
        return "http.response.debug" in scope.get("extensions", ())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope_type = scope["type"]
        if (scope_type != "http" and scope_type != "websocket") or RESPONSE_HEADERS_KEY in scope:
            # Not a request; or one that a correlation middleware outside this one (an app
            # mounted inside another that has one) has given its ID, header list and 500s.
            await self.app(scope, receive, send)
            return

        # The incoming header, inlined (this runs on every request): a valid value is kept,
        # anything else is replaced by a new ID, in the request's headers too.
        header = self._header
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        raw: bytes | None = None
        for name, value in headers:
            if name == header:
                raw = value
                break
        if raw is not None and _VALID_ID.fullmatch(raw):
            correlation_id = raw.decode("ascii")
        else:
            generate = self._generate
            try:
                # The default generator's pool, inlined; an empty pool refills in ``generate``.
                correlation_id = (
                    _ID_POOL.popleft() if generate is generate_correlation_id else generate()
                )
            except IndexError:
                correlation_id = generate()
            new_raw = correlation_id.encode("ascii")
            if self._update_request_header:
                if raw is None and type(headers) is list:
                    # The server built this list for this request alone: append in place.
                    headers.append((header, new_raw))
                else:
                    # ASGI allows any iterable of pairs (a tuple, say): build a new list.
                    kept = [(n, v) for n, v in headers if n != header]
                    scope["headers"] = [*kept, (header, new_raw)]
            raw = new_raw
        scope[SCOPE_KEY] = correlation_id
        token = _correlation_id.set(correlation_id)
        if scope_type == "websocket":
            try:
                await self.app(scope, receive, send)
            finally:
                _correlation_id.reset(token)
            return

        # Inner middleware (the rate limiter) appends its response headers here instead of
        # wrapping ``send`` once more: one wrapper and one copy of the header list per response.
        extra = [(header, raw)]
        scope[RESPONSE_HEADERS_KEY] = extra
        response_started = False

        # A plain function that returns ``send``'s awaitable: the caller awaits it, and no
        # coroutine of our own is made for the other messages.
        def send_with_id(message: Message) -> Awaitable[None]:
            nonlocal response_started
            kind = message["type"]
            if kind == "http.response.start":
                response_started = True
                message["headers"] = [*message.get("headers", ()), *extra]
            elif kind == "http.response.body" and not message.get("more_body", False):
                return send_last(message)
            return send(message)

        # The server's handling of the last body message is the connection's, not the
        # request's: uvicorn arms its keep-alive timer there, and the timer keeps a copy of the
        # current context until the connection's next request. Sent with the ID still set, every
        # idle connection would hold this request's context map; with the ID unset (and an
        # otherwise empty context) it holds the shared empty map. In a small app under load
        # those retained maps are what decides how often the collector runs (ADR 0044).
        # The ID is set again afterwards for background tasks, which run after this send.
        async def send_last(message: Message) -> None:
            nonlocal token
            try:
                _correlation_id.reset(token)
            except ValueError:
                # Sent from a copied context (a streaming body's task group): nothing to unset.
                await send(message)
                return
            try:
                await send(message)
            finally:
                token = _correlation_id.set(correlation_id)

        limits = self._limits
        admitted = False
        try:
            admitted = limits is not None and limits.admit(scope)
            # Admitted on the rate limiter's lean path: its middleware's coroutine is skipped.
            inner = limits.app if limits is not None and admitted else self.app
            degraded = self._degraded
            if inner is degraded and not degraded.mode.active:
                # Nothing is off: the degraded-mode middleware's coroutine is skipped too.
                inner = degraded.app
            await inner(scope, receive, send_with_id)
        except Exception as exc:
            # Imported here: the renderer pulls in the error handlers, which need this module.
            from fastapi_resilience._problem import answer_unhandled

            await answer_unhandled(scope, exc, send_with_id, response_started=response_started)
            if self._reraise(scope):
                raise
        finally:
            if admitted:
                # ``pop``: a rate limiter of an app mounted inside may have removed it.
                scope.pop(self._limit_key, None)
            _correlation_id.reset(token)
            del scope[RESPONSE_HEADERS_KEY]
            # An exception a mounted app's handler logged: nothing of it stays (ADR 0044).
            scope.pop(LOGGED_KEY, None)
