"""FastAPI exception handlers: every error answer goes through the one problem renderer.

Each handler is a plain async function, so an app can register or replace any of them.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response

from fastapi_resilience.exceptions import AppError, InvalidInputError
from fastapi_resilience.problems._render import (
    APP_STATE_KEY,
    DEFAULT_TYPE_BASE,
    ProblemConfig,
    app_error_response,
    code_for_status,
    log_unhandled,
    problem_response,
    title_for_status,
    unhandled_response,
)

__all__ = [
    "app_error_handler",
    "http_exception_handler",
    "install_exception_handlers",
    "request_validation_handler",
    "unhandled_exception_handler",
]

VALIDATION_DETAIL = "The request is not valid; see `errors`."


async def app_error_handler(request: Request, exc: Exception) -> Response:
    """``AppError`` and every subclass, the user's own included."""
    assert isinstance(exc, AppError)
    return app_error_response(request.scope, exc)


async def http_exception_handler(request: Request, exc: Exception) -> Response:
    """Starlette's ``HTTPException``: unknown routes (404), wrong methods (405) and the like."""
    assert isinstance(exc, HTTPException)
    status = exc.status_code
    extensions: dict[str, Any] = {}
    if isinstance(exc.detail, str) and exc.detail:
        detail = exc.detail
    else:
        # ``detail`` is always a string in our answers; structured detail moves aside.
        detail = title_for_status(status)
        if exc.detail:
            extensions["details"] = exc.detail
    return problem_response(
        request.scope,
        status=status,
        code=code_for_status(status),
        title=title_for_status(status),
        detail=detail,
        extensions=extensions,
        headers=exc.headers,
    )


def _validation_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    # ``input`` and ``ctx`` are left out: they echo what the client sent (passwords included)
    # and ``ctx`` can hold exception objects.
    return [
        {"loc": list(err.get("loc", ())), "msg": str(err.get("msg", "")), "type": err.get("type")}
        for err in exc.errors()
    ]


async def request_validation_handler(request: Request, exc: Exception) -> Response:
    """FastAPI's ``RequestValidationError``: 422 ``invalid_input`` with an ``errors`` list."""
    assert isinstance(exc, RequestValidationError)
    return problem_response(
        request.scope,
        status=InvalidInputError.status_code,
        code=InvalidInputError.code,
        title=InvalidInputError.title,
        detail=VALIDATION_DETAIL,
        extensions={"errors": _validation_errors(exc)},
    )


async def unhandled_exception_handler(request: Request, exc: Exception) -> Response:
    """Any other exception: a sanitized 500, logged once with traceback and correlation ID.

    Starlette runs this from ``ServerErrorMiddleware``, which re-raises afterwards so the
    server logs it a second time; ``CorrelationIdMiddleware`` catches the exception first and
    avoids that, so this handler only serves apps that use the handlers without it.
    """
    log_unhandled(request.scope, exc)
    return unhandled_response(request.scope, exc)


def install_exception_handlers(
    app: FastAPI,
    *,
    type_base: str = DEFAULT_TYPE_BASE,
    expose_error_details: bool = False,
    correlation_header: str = "X-Request-ID",
) -> None:
    """Register the problem-details handlers on ``app``.

    Args:
        app: the FastAPI app.
        type_base: prefix of each problem's ``type`` URI (the error's ``code`` follows).
        expose_error_details: show an unhandled exception's type and message in the 500 body;
            for development only.
        correlation_header: the header that carries the correlation ID when no
            ``CorrelationIdMiddleware`` is installed.
    """
    setattr(
        app.state,
        APP_STATE_KEY,
        ProblemConfig(
            type_base=type_base,
            expose_error_details=expose_error_details,
            correlation_header=correlation_header,
        ),
    )
    app.add_exception_handler(AppError, app_error_handler)
    app.add_exception_handler(HTTPException, http_exception_handler)
    app.add_exception_handler(RequestValidationError, request_validation_handler)
    app.add_exception_handler(Exception, unhandled_exception_handler)
