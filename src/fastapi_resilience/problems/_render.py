"""One renderer for every error answer: RFC 9457 problem details (``application/problem+json``)."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from starlette.responses import Response
from starlette.types import Message, Scope, Send

from fastapi_resilience._asgi.app_state import resilience_of
from fastapi_resilience._asgi.pipeline import state_of
from fastapi_resilience._tally import PROBLEMS
from fastapi_resilience._text import printable
from fastapi_resilience.correlation._ids import generate_correlation_id, get_correlation_id
from fastapi_resilience.exceptions import AppError

__all__ = [
    "DEFAULT_TYPE_BASE",
    "PROBLEM_CONTENT_TYPE",
    "ProblemConfig",
    "ProblemResponse",
    "answer_unhandled",
    "problem_response",
]

PROBLEM_CONTENT_TYPE = "application/problem+json"
#: A URN: absolute and stable, and nobody's browser fetches it (ADR 0002).
DEFAULT_TYPE_BASE = "urn:fastapi-resilience:problem:"
#: Where ``install_exception_handlers`` leaves the configuration on ``app.state``.
APP_STATE_KEY = "fastapi_resilience_problems"
#: The only text of an unhandled exception's answer unless details are exposed.
INTERNAL_ERROR_DETAIL = "The server failed to answer this request. It has been logged."

_STANDARD_MEMBERS = ("type", "title", "status", "detail", "instance", "code", "correlation_id")
_NO_BODY_STATUSES = frozenset({204, 205, 304})

logger = logging.getLogger("fastapi_resilience.errors")


@dataclass(frozen=True, slots=True)
class ProblemConfig:
    """How problem details are rendered for one app.

    Args:
        type_base: prefix of the ``type`` URI; the error's ``code`` is appended.
        expose_error_details: put an unhandled exception's type and message into the 500
            body (development only).
        correlation_header: the header that carries the ID when no correlation middleware
            echoes it.
    """

    type_base: str = DEFAULT_TYPE_BASE
    expose_error_details: bool = False
    correlation_header: str = "X-Request-ID"

    def type_for(self, code: str, type_uri: str | None = None) -> str:
        return type_uri if type_uri is not None else f"{self.type_base}{code}"


DEFAULT_CONFIG = ProblemConfig()


def config_for(scope: Scope) -> ProblemConfig:
    """The config ``install_exception_handlers`` stored on the app, or the default."""
    state = getattr(scope.get("app"), "state", None)
    config = getattr(state, APP_STATE_KEY, None)
    return config if isinstance(config, ProblemConfig) else DEFAULT_CONFIG


class ProblemResponse(Response):
    """A JSON response with the ``application/problem+json`` media type."""

    media_type = PROBLEM_CONTENT_TYPE

    def render(self, content: Any) -> bytes:
        # ``default=str``: an extension the user filled with a datetime or a UUID must not
        # turn an error answer into a second, unhandled error.
        return json.dumps(
            content, ensure_ascii=False, allow_nan=False, separators=(",", ":"), default=str
        ).encode("utf-8")


def _snake(phrase: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", phrase.lower()).strip("_")


#: Status -> code for errors that do not come from an ``AppError``.
_STATUS_CODES: dict[int, str] = {
    400: "bad_request",
    401: "unauthenticated",
    403: "permission_denied",
    404: "not_found",
    409: "conflict",
    422: "invalid_input",
    429: "rate_limited",
    500: "internal_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "upstream_timeout",
}


def code_for_status(status: int) -> str:
    """A stable snake_case code for an HTTP status (``405`` -> ``method_not_allowed``)."""
    if status in _STATUS_CODES:
        return _STATUS_CODES[status]
    try:
        return _snake(HTTPStatus(status).phrase)
    except ValueError:
        return "client_error" if 400 <= status < 500 else "server_error"


def title_for_status(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Client Error" if 400 <= status < 500 else "Server Error"


def _correlation(scope: Scope) -> tuple[str, bool]:
    """The request's ID and whether this answer must carry the header itself.

    Where a correlation step gave the request its ID, that step renders the header when the
    response starts. Anywhere else (the handlers alone, an answer sent by a layer outside the
    request's pipeline) the answer carries it: the ID of the context if one is set, else a
    new one.
    """
    state = state_of(scope)
    given = state.correlation_id if state is not None else None
    if given is not None:
        return given, False  # its correlation step renders the header
    current = get_correlation_id()
    if current:
        return current, True
    return generate_correlation_id(), True


def _record(errors: Any, scope: Scope, code: str, status: int, correlation_id: str) -> None:
    """Tell the request's error analytics; a failure there never costs the answer."""
    try:
        errors.record_problem(scope, code, status, correlation_id)
    except Exception:
        logger.exception("error analytics failed to record %s", code)


def problem_response(
    scope: Scope,
    *,
    status: int,
    code: str,
    title: str,
    detail: str,
    type_uri: str | None = None,
    extensions: Mapping[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
    raw_headers: Sequence[tuple[bytes, bytes]] = (),
    config: ProblemConfig | None = None,
) -> Response:
    """Build the problem+json answer; every error path in the library ends here.

    ``raw_headers``: header fields as lower-case byte pairs, added as they are (no round
    trip through strings).
    """
    config = config or config_for(scope)
    PROBLEMS.add((code, str(status)))
    out_headers = dict(headers or {})
    if status == 429 and not _has_retry_after(out_headers, raw_headers):
        # Every 429 says when to come back (RFC 6585 leaves it optional; the contract does not).
        out_headers["Retry-After"] = "1"
    correlation_id, add_header = _correlation(scope)
    recorder = getattr(resilience_of(scope.get("app")), "problem_recorder", None)
    if recorder is not None:
        _record(recorder, scope, code, status, correlation_id)
    if add_header:
        out_headers[config.correlation_header] = correlation_id
    response: Response
    if status in _NO_BODY_STATUSES or status < 200:
        response = Response(status_code=status, headers=out_headers)
    else:
        body: dict[str, Any] = {
            k: v for k, v in (extensions or {}).items() if k not in _STANDARD_MEMBERS
        }
        body.update(
            type=config.type_for(code, type_uri),
            title=title,
            status=status,
            detail=detail,
            instance=scope.get("path", ""),
            code=code,
            correlation_id=correlation_id,
        )
        response = ProblemResponse(body, status_code=status, headers=out_headers)
    response.raw_headers += raw_headers
    return response


def _has_retry_after(
    headers: Mapping[str, str], raw_headers: Sequence[tuple[bytes, bytes]]
) -> bool:
    return any(name.lower() == "retry-after" for name in headers) or any(
        name.lower() == b"retry-after" for name, _ in raw_headers
    )


def app_error_response(scope: Scope, exc: AppError) -> Response:
    """The answer for an ``AppError`` (or a user's subclass) raised anywhere in a request."""
    return problem_response(
        scope,
        status=exc.status_code,
        code=exc.code,
        title=exc.title,
        detail=exc.detail,
        type_uri=exc.type_uri,
        extensions=exc.extensions,
        headers=exc.headers,
    )


def unhandled_response(scope: Scope, exc: BaseException) -> Response:
    """The sanitized 500 for an exception nobody handled."""
    config = config_for(scope)
    extensions: dict[str, Any] = {}
    detail = INTERNAL_ERROR_DETAIL
    if config.expose_error_details:
        extensions["exception_type"] = f"{type(exc).__module__}.{type(exc).__qualname__}"
        detail = _exposed_detail(exc)
    return problem_response(
        scope,
        status=500,
        code="internal_error",
        title="Internal Server Error",
        detail=detail,
        extensions=extensions,
        config=config,
    )


def _exposed_detail(exc: BaseException) -> str:
    """The exception's message for a development 500; its class name if ``str()`` fails.

    ``str(exc)`` runs the exception's own code: if it raised here, the 500 itself would fail
    and the client would get a bare answer without problem details or ID.
    """
    try:
        message = str(exc)
    except Exception:
        return f"{type(exc).__qualname__} (its message could not be rendered: str() raised)"
    return message or INTERNAL_ERROR_DETAIL


#: Where the ``id`` of the exception logged for a request is kept in its scope: the layers it
#: passes later in the request (the app's pipeline around a mounted app's handler, Starlette's
#: error layer after a re-raise) may meet it once the request's state is gone. An ``id``, not
#: the exception: nothing of the request stays reachable from its scope (ADR 0044).
LOGGED_KEY = "fastapi_resilience.logged"


def log_unhandled(scope: Scope, exc: BaseException) -> None:
    """Log an unhandled exception once, with its traceback and the correlation ID.

    Once: an exception that passes several of the library's layers (a mounted sub-app's error
    handler, then the app's pipeline, then Starlette's error layer when it is raised again) is
    logged by the first only. The method and path are the client's text: control characters in
    them are escaped.
    """
    if scope.get(LOGGED_KEY) == id(exc):
        return
    state = state_of(scope)
    logger.error(
        "unhandled %s on %s %s",
        type(exc).__name__,
        printable(scope.get("method", "-")),
        printable(scope.get("path", "-")),
        exc_info=(type(exc), exc, exc.__traceback__),
        extra={
            "correlation_id": get_correlation_id()
            or (state.correlation_id if state is not None else None)
            or "-"
        },
    )
    scope[LOGGED_KEY] = id(exc)


async def answer_unhandled(
    scope: Scope, exc: Exception, send: Send, *, response_started: bool, reraise: bool = False
) -> None:
    """Log ``exc`` once and, if nothing was sent yet, answer the sanitized 500.

    When the response had already started (a failing stream or background task) there is
    nothing left to say to the client: the error is logged and the server closes the
    connection on the incomplete response. ``reraise``: the caller raises ``exc`` again, so a
    layer outside (Starlette's error layer) meets it and must find it logged; otherwise the
    mark leaves the scope.
    """
    try:
        log_unhandled(scope, exc)
        if not response_started:
            await unhandled_response(scope, exc)(scope, no_request_body, send)
    finally:
        if not reraise:
            scope.pop(LOGGED_KEY, None)


async def no_request_body() -> Message:  # pragma: no cover - a problem body never reads it
    """The ``receive`` of an answer sent in place of the app: problem bodies read nothing."""
    return {"type": "http.disconnect"}
