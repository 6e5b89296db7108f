"""Correlation IDs: one ID per request, in a context variable, on every response and log record."""

from __future__ import annotations

import logging
import os
import re
import sys
from collections import deque
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

from fastapi_resilience._asgi.pipeline import RequestState

__all__ = [
    "HEADER_NAME",
    "CorrelationIdFilter",
    "CorrelationStep",
    "generate_correlation_id",
    "get_correlation_id",
    "is_valid_correlation_id",
]

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


#: Bound once: the step looks for ``opentelemetry.trace`` here on every request.
_modules = sys.modules
_OTEL_TRACE = "opentelemetry.trace"


def _trace_id(span: Any) -> str | None:
    """The span's trace ID as 32 lower-case hex characters; ``None`` for an invalid span."""
    context = span.get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else None


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


class CorrelationStep:
    """The correlation ID of a request: from the incoming header when valid, else a new one;
    in a context variable while the request runs, and echoed on the response.

    A request that already has an ID (a correlation step outside this one gave it) is left as
    it is: the outer ID serves, once.

    With OpenTelemetry tracing the request, ``span_attribute`` names the attribute of the
    current span that gets the ID (``None``: none), and ``from_trace`` makes a request without
    a valid ID of its own take its trace's ID (32 hex characters) instead of a new one.
    """

    websocket = True

    def __init__(
        self,
        *,
        header_name: str = "X-Request-ID",
        generator: Callable[[], str] = generate_correlation_id,
        update_request_header: bool = True,
        span_attribute: str | None = "correlation_id",
        from_trace: bool = False,
    ) -> None:
        if not HEADER_NAME.fullmatch(header_name):
            raise ValueError(f"header_name: {header_name!r} is not a valid HTTP header name")
        self.header_name = header_name
        self._header = header_name.lower().encode("latin-1")
        self._generate = generator
        self._update_request_header = update_request_header
        self._span_attribute = span_attribute or None
        self._from_trace = from_trace
        # Look for a span at all: one check per request when neither option is used.
        self._traced = bool(span_attribute) or from_trace

    def enter(self, state: RequestState) -> None:
        if state.correlation_id is not None:
            return
        # The incoming header, inlined (this runs on every request): a valid value is kept,
        # anything else is replaced by a new ID, in the request's headers too.
        scope = state.scope
        header = self._header
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        raw: bytes | None = None
        for name, value in headers:
            if name == header:
                raw = value
                break
        span = None
        if self._traced and _OTEL_TRACE in _modules:
            # Never imported here: without ``opentelemetry.trace`` loaded there is no span.
            span = _modules[_OTEL_TRACE].get_current_span()
        if raw is not None and _VALID_ID.fullmatch(raw):
            correlation_id = raw.decode("ascii")
            echoed = raw
        else:
            trace_id = None if span is None or not self._from_trace else _trace_id(span)
            if trace_id is None:
                generate = self._generate
                try:
                    # The default generator's pool, inlined; an empty pool refills in
                    # ``generate``.
                    correlation_id = (
                        _ID_POOL.popleft() if generate is generate_correlation_id else generate()
                    )
                except IndexError:
                    correlation_id = generate()
            else:
                correlation_id = trace_id
            echoed = correlation_id.encode("ascii")
            if self._update_request_header:
                new_raw = echoed
                if raw is None and type(headers) is list:
                    # The server built this list for this request alone: append in place.
                    headers.append((header, new_raw))
                else:
                    # ASGI allows any iterable of pairs (a tuple, say): build a new list.
                    kept = [(n, v) for n, v in headers if n != header]
                    scope["headers"] = [*kept, (header, new_raw)]
        state.correlation_id = correlation_id
        state.fields.append(((header, echoed),))
        if span is not None and self._span_attribute is not None and span.is_recording():
            span.set_attribute(self._span_attribute, correlation_id)
        token = _correlation_id.set(correlation_id)
        context = state.context
        if context is None:
            state.context = [_correlation_id, correlation_id, token]
        else:
            context += (_correlation_id, correlation_id, token)
