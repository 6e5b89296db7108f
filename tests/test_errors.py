from __future__ import annotations

import datetime as dt
import logging
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

import fastapi_resilience as fr
from fastapi_resilience import (
    AppError,
    AuthenticationError,
    ClientError,
    CorrelationIdMiddleware,
    NotFoundError,
    RateLimitedError,
    ServiceUnavailableError,
    install,
    install_exception_handlers,
)

pytestmark = pytest.mark.anyio

#: RFC 9457's media type, the Content-Type of every problem answer.
PROBLEM_CONTENT_TYPE = "application/problem+json"
#: The detail a client reads for an unhandled exception (expose_error_details off).
INTERNAL_ERROR_DETAIL = "The server failed to answer this request. It has been logged."

PROBLEM_MEMBERS = {"type", "title", "status", "detail", "instance", "code", "correlation_id"}

HIERARCHY = [
    ("AppError", None, 500, "internal_error", False),
    ("ClientError", "AppError", 400, "bad_request", False),
    ("BadRequestError", "ClientError", 400, "bad_request", False),
    ("InvalidInputError", "ClientError", 422, "invalid_input", False),
    ("AuthenticationError", "ClientError", 401, "unauthenticated", False),
    ("PermissionDeniedError", "ClientError", 403, "permission_denied", False),
    ("NotFoundError", "ClientError", 404, "not_found", False),
    ("ConflictError", "ClientError", 409, "conflict", False),
    ("RateLimitedError", "ClientError", 429, "rate_limited", True),
    ("ServerError", "AppError", 500, "internal_error", False),
    ("InternalError", "ServerError", 500, "internal_error", False),
    ("UpstreamError", "ServerError", 502, "upstream_error", True),
    ("UpstreamTimeoutError", "UpstreamError", 504, "upstream_timeout", True),
    ("RetryExhaustedError", "UpstreamError", 502, "retries_exhausted", False),
    ("ServiceUnavailableError", "ServerError", 503, "service_unavailable", True),
    ("CircuitOpenError", "ServiceUnavailableError", 503, "circuit_open", True),
    ("BulkheadFullError", "ServiceUnavailableError", 503, "bulkhead_full", False),
    ("FeatureUnavailableError", "ServiceUnavailableError", 503, "feature_unavailable", True),
]


@pytest.mark.parametrize(("name", "parent", "status", "code", "retryable"), HIERARCHY)
def test_hierarchy_matches_the_contract(
    name: str, parent: str | None, status: int, code: str, retryable: bool
) -> None:
    """Each class has the contract's parent, status, code and retryable flag."""
    cls = getattr(fr, name)
    if parent:
        assert cls.__mro__[1] is getattr(fr, parent)
    assert (cls.status_code, cls.code, cls.retryable) == (status, code, retryable)
    assert isinstance(cls.title, str)
    assert cls.title


def test_upstream_timeout_is_also_a_timeout_error() -> None:
    """Code that catches TimeoutError catches the library's timeout too."""
    assert isinstance(fr.UpstreamTimeoutError(), TimeoutError)


@pytest.mark.parametrize(
    ("seconds", "header"), [(0, "1"), (0.2, "1"), (1, "1"), (1.01, "2"), (30, "30"), (59.5, "60")]
)
def test_retry_after_is_whole_seconds_at_least_one(seconds: float, header: str) -> None:
    """retry_after becomes Retry-After: its ceiling, at least 1."""
    for cls in (RateLimitedError, ServiceUnavailableError, fr.CircuitOpenError):
        assert cls(retry_after=seconds).headers["Retry-After"] == header


def test_negative_retry_after_is_refused() -> None:
    """A negative wait is a programming error, caught where it is made."""
    with pytest.raises(ValueError, match="retry_after"):
        RateLimitedError(retry_after=-1)


def test_detail_defaults_to_title_and_is_a_string() -> None:
    """detail is always a string; without one the title is used."""
    assert NotFoundError().detail == "Not Found"
    assert NotFoundError(42).detail == "42"  # type: ignore[arg-type]
    assert repr(NotFoundError("x")) == "NotFoundError('x', status_code=404)"


def test_authentication_error_sets_www_authenticate() -> None:
    """401 answers carry a challenge, overridable."""
    assert AuthenticationError().headers["WWW-Authenticate"] == "Bearer"
    assert AuthenticationError(www_authenticate="Basic").headers["WWW-Authenticate"] == "Basic"


class PaymentRequiredError(fr.ClientError):
    status_code = 402
    code = "payment_required"
    title = "Payment Required"


class Item(BaseModel):
    name: str
    quantity: int


def _app(**kwargs: Any) -> FastAPI:
    app = FastAPI()
    install_exception_handlers(app, **kwargs)

    @app.get("/orders/{order_id}")
    async def order(order_id: int) -> None:
        raise NotFoundError(f"order {order_id} does not exist", extensions={"order_id": order_id})

    @app.get("/pay")
    async def pay() -> None:
        raise PaymentRequiredError("top up first", extensions={"balance": 0})

    @app.get("/busy")
    async def busy() -> None:
        raise ServiceUnavailableError("try later", retry_after=2.5)

    @app.get("/login")
    async def login() -> None:
        raise AuthenticationError("token expired")

    @app.get("/odd")
    async def odd() -> None:
        raise fr.ConflictError(
            "odd", extensions={"status": 999, "when": dt.date(2026, 1, 2), "type": "x"}
        )

    @app.get("/http/{status}")
    async def http(status: int) -> None:
        raise HTTPException(status, detail={"why": "structured"} if status == 418 else None)

    @app.post("/items")
    async def items(item: Item) -> Item:
        return item

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("secret password hunter2")

    return app


def _client(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


def _problem(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status
    assert response.headers["content-type"] == PROBLEM_CONTENT_TYPE
    body: dict[str, Any] = response.json()
    assert body.keys() >= PROBLEM_MEMBERS
    assert (body["status"], body["code"]) == (status, code)
    assert body["type"] == f"urn:fastapi-resilience:problem:{code}" or code == "rate_limited"
    assert isinstance(body["detail"], str)
    return body


async def test_app_error_renders_problem_details() -> None:
    """A raised AppError becomes problem+json with its detail, instance and extensions."""
    async with _client(_app()) as client:
        body = _problem(await client.get("/orders/7"), 404, "not_found")
    assert body["detail"] == "order 7 does not exist"
    assert body["instance"] == "/orders/7"
    assert body["order_id"] == 7
    assert body["title"] == "Not Found"


async def test_user_subclass_needs_no_registration() -> None:
    """A user's own AppError subclass is rendered with its own status and code."""
    async with _client(_app()) as client:
        body = _problem(await client.get("/pay"), 402, "payment_required")
    assert body["balance"] == 0


async def test_503_with_retry_after_and_401_with_challenge() -> None:
    """Headers the error carries reach the client."""
    async with _client(_app()) as client:
        busy = await client.get("/busy")
        login = await client.get("/login")
    _problem(busy, 503, "service_unavailable")
    assert busy.headers["retry-after"] == "3"
    _problem(login, 401, "unauthenticated")
    assert login.headers["www-authenticate"] == "Bearer"


async def test_extensions_cannot_overwrite_standard_members() -> None:
    """An extension named like a standard member is dropped; odd values are stringified."""
    async with _client(_app()) as client:
        body = _problem(await client.get("/odd"), 409, "conflict")
    assert body["status"] == 409
    assert body["type"].endswith(":conflict")
    assert body["when"] == "2026-01-02"


async def test_unknown_route_and_wrong_method() -> None:
    """404 for an unknown route and 405 (with Allow) share the same shape."""
    async with _client(_app()) as client:
        missing = await client.get("/nowhere")
        wrong = await client.delete("/orders/1")
    assert _problem(missing, 404, "not_found")["instance"] == "/nowhere"
    _problem(wrong, 405, "method_not_allowed")
    assert wrong.headers["allow"] == "GET"


async def test_http_exception_with_structured_detail_keeps_detail_a_string() -> None:
    """A non-string HTTPException detail moves to `details`; `detail` stays a string."""
    async with _client(_app()) as client:
        teapot = _problem(await client.get("/http/418"), 418, "i_m_a_teapot")
        gone = _problem(await client.get("/http/410"), 410, "gone")
        no_body = await client.get("/http/204")
    assert teapot["details"] == {"why": "structured"}
    assert teapot["detail"] == "I'm a Teapot"
    assert gone["detail"] == "Gone"
    assert no_body.status_code == 204
    assert no_body.content == b""


async def test_validation_error_lists_errors_without_echoing_input() -> None:
    """FastAPI validation becomes 422 invalid_input with loc/msg/type and no input echo."""
    async with _client(_app()) as client:
        response = await client.post("/items", json={"name": "hunter2", "quantity": "many"})
    body = _problem(response, 422, "invalid_input")
    assert body["errors"] == [
        {
            "loc": ["body", "quantity"],
            "msg": "Input should be a valid integer, unable to parse string as an integer",
            "type": "int_parsing",
        }
    ]
    assert "many" not in response.text


async def test_unhandled_error_is_sanitized(caplog: pytest.LogCaptureFixture) -> None:
    """500 internal_error: no message, type or traceback in the body; logged with traceback."""
    app = _app()
    app.add_middleware(CorrelationIdMiddleware)
    caplog.set_level(logging.INFO)
    async with _client(app) as client:
        response = await client.get("/boom", headers={"X-Request-ID": "req-500"})
    body = _problem(response, 500, "internal_error")
    assert body["detail"] == INTERNAL_ERROR_DETAIL
    for leak in ("secret", "hunter2", "RuntimeError", "Traceback", "line "):
        assert leak not in response.text
    assert response.headers["x-request-id"] == "req-500"
    assert body["correlation_id"] == "req-500"
    logged = [r for r in caplog.records if r.exc_info]
    assert len(logged) == 1
    assert logged[0].correlation_id == "req-500"


async def test_expose_error_details_shows_type_and_message() -> None:
    """In development the 500 body names the exception and its message."""
    app = _app(expose_error_details=True)
    app.add_middleware(CorrelationIdMiddleware)
    async with _client(app) as client:
        body = _problem(await client.get("/boom"), 500, "internal_error")
    assert body["detail"] == "secret password hunter2"
    assert body["exception_type"] == "builtins.RuntimeError"


async def test_handlers_alone_still_give_a_correlation_id() -> None:
    """Without the middleware, error answers still carry an ID in header and body."""
    async with _client(_app()) as client:
        response = await client.get("/orders/1")
        crash = await _client_no_raise(_app()).get("/boom")
    assert response.headers["x-request-id"] == response.json()["correlation_id"]
    assert crash.status_code == 500
    assert crash.headers["x-request-id"] == crash.json()["correlation_id"]
    assert "secret" not in crash.text


def _client_no_raise(app: FastAPI) -> httpx.AsyncClient:
    # ServerErrorMiddleware re-raises after answering; the transport must not re-raise it too.
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, raise_app_exceptions=False), base_url="http://t"
    )


async def test_type_base_is_configurable() -> None:
    """The `type` URI is built from the configured base; 429 uses the IANA problem type."""
    app = _app(type_base="https://api.example.com/problems/")

    @app.get("/limited")
    async def limited() -> None:
        raise RateLimitedError("slow down", retry_after=1)

    async with _client(app) as client:
        missing = (await client.get("/nowhere")).json()
        limited_response = await client.get("/limited")
    assert missing["type"] == "https://api.example.com/problems/not_found"
    assert limited_response.json()["type"] == (
        "https://iana.org/assignments/http-problem-types#quota-exceeded"
    )
    assert limited_response.headers["retry-after"] == "1"


def test_app_error_root_is_500() -> None:
    """A bare AppError is an internal error."""
    assert AppError("x").status_code == 500


async def test_a_bare_rate_limited_error_says_when_to_come_back() -> None:
    """``raise RateLimitedError("too many")`` with no figure: 429 with ``Retry-After: 1``."""
    assert RateLimitedError("too many").headers == {"Retry-After": "1"}
    assert RateLimitedError(retry_after=7.2).headers == {"Retry-After": "8"}
    assert RateLimitedError(headers={"retry-after": "30"}).headers == {"retry-after": "30"}
    app = FastAPI()
    install_exception_handlers(app)

    @app.get("/busy")
    async def busy() -> None:
        raise RateLimitedError("too many")

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        answer = await client.get("/busy")
    assert answer.status_code == 429
    assert answer.headers["retry-after"] == "1"


async def test_the_unhandled_error_log_line_escapes_the_path(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``%0A`` in a path cannot forge a log line: control characters are escaped."""

    class Boom:
        # Fails for every path (a route's pattern would not match a line feed).
        def __init__(self, app: object) -> None:
            self.app = app

        async def __call__(self, scope: object, receive: object, send: object) -> None:
            raise RuntimeError("boom")

    app = FastAPI()
    app.add_middleware(Boom)
    install(app)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        with caplog.at_level(logging.ERROR, logger="fastapi_resilience.errors"):
            answer = await client.get("/x%0AINFO forged line%0D%1B[31m")
    assert answer.status_code == 500
    (record,) = caplog.records
    line = record.getMessage()
    assert "\n" not in line
    assert "\r" not in line
    assert "\x1b" not in line
    assert line.endswith("/x\\x0aINFO forged line\\x0d\\x1b[31m")


class _UnprintableError(Exception):
    """An exception whose message cannot be rendered: ``str()`` and ``repr()`` raise."""

    def __str__(self) -> str:
        raise ValueError("no message for you")

    def __repr__(self) -> str:
        raise ValueError("no repr either")


async def test_exposed_details_survive_an_exception_whose_str_raises(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With expose_error_details on, an exception whose __str__ raises still gets the
    problem+json 500 with its ID (a fallback detail naming the class), and it is logged once
    with its traceback."""
    app = FastAPI()
    fr.install(app, fr.ResilienceSettings(expose_error_details=True))

    @app.get("/unprintable")
    async def unprintable() -> None:
        raise _UnprintableError

    caplog.set_level(logging.INFO)
    async with _client_no_raise(app) as client:
        response = await client.get("/unprintable", headers={"X-Request-ID": "req-str"})
    body = _problem(response, 500, "internal_error")
    assert response.headers["x-request-id"] == "req-str"
    assert body["correlation_id"] == "req-str"
    assert body["exception_type"].endswith("._UnprintableError")
    assert body["detail"].startswith("_UnprintableError")
    assert "no message for you" not in response.text
    logged = [r for r in caplog.records if r.exc_info]
    assert len(logged) == 1
    assert logged[0].correlation_id == "req-str"
    # Formatting the record (as every handler does) renders the traceback without raising.
    assert "_UnprintableError" in caplog.text
    assert "Traceback (most recent call last)" in caplog.text


async def test_every_429_says_when_to_come_back() -> None:
    """Starlette's ``HTTPException(429)`` and a user's own 429 class carry ``Retry-After`` too."""

    class TooFast(ClientError):
        status_code = 429
        code = "too_fast"

    app = FastAPI()
    install_exception_handlers(app)

    @app.get("/http")
    async def http() -> None:
        raise HTTPException(429)

    @app.get("/mine")
    async def mine() -> None:
        raise TooFast("slow down")

    @app.get("/given")
    async def given() -> None:
        raise HTTPException(429, headers={"Retry-After": "30"})

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        for path, wait in [("/http", "1"), ("/mine", "1"), ("/given", "30")]:
            answer = await client.get(path)
            assert answer.status_code == 429
            assert answer.headers.get_list("retry-after") == [wait], path


async def test_an_exception_shared_by_requests_is_logged_for_each(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """One exception object raised in several requests (a cached failure) is logged once per
    request, each with its own correlation ID."""
    shared = RuntimeError("the upstream's configuration is broken")
    app = FastAPI()
    install(app)

    @app.get("/fail")
    async def fail() -> None:
        raise shared

    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        with caplog.at_level(logging.ERROR, logger="fastapi_resilience.errors"):
            for n in range(3):
                await client.get("/fail", headers={"X-Request-ID": f"req-{n}"})
    assert [r.correlation_id for r in caplog.records] == ["req-0", "req-1", "req-2"]  # type: ignore[attr-defined]
