from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import BackgroundTasks, Depends, FastAPI
from starlette.responses import StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from fastapi_resilience import (
    CorrelationIdFilter,
    CorrelationIdMiddleware,
    get_correlation_id,
    install_exception_handlers,
)
from fastapi_resilience.correlation import generate_correlation_id
from tests._asgi import http_get

pytestmark = pytest.mark.anyio

#: The IDs an incoming header may carry (docs/correlation-ids.md): anything else is replaced.
VALID_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")


def is_valid_correlation_id(value: str | bytes) -> bool:
    raw = value.encode("utf-8", "replace") if isinstance(value, str) else value
    return VALID_ID.fullmatch(raw) is not None


def _client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


async def _echo_app(scope: Scope, receive: Receive, send: Send) -> None:
    body = (get_correlation_id() or "").encode()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


def _response_id(sent: list[Message]) -> bytes:
    start = sent[0]
    values = [v for k, v in start["headers"] if k == b"x-request-id"]
    assert len(values) == 1, start["headers"]
    return values[0]


async def test_valid_incoming_id_is_echoed_and_visible_to_the_app() -> None:
    """A valid X-Request-ID is echoed on the response and returned by get_correlation_id()."""
    sent = await http_get(CorrelationIdMiddleware(_echo_app), [(b"x-request-id", b"abc-123:x.y_z")])
    assert _response_id(sent) == b"abc-123:x.y_z"
    assert sent[1]["body"] == b"abc-123:x.y_z"


@pytest.mark.parametrize(
    "bad",
    [
        b"abc\r\nSet-Cookie: x=1",
        b"abc\ndef",
        b"a" * 10_000,
        b"a" * 129,
        "caf\u00e9".encode(),
        b"\xff\xfe",
        b"",
        b"has space",
        b"<script>",
    ],
    ids=["crlf", "lf", "10kB", "129", "non-ascii", "non-utf8", "empty", "space", "markup"],
)
async def test_invalid_incoming_id_is_never_reflected(bad: bytes) -> None:
    """A malformed, oversized, non-ASCII or empty ID is replaced by a new valid one."""
    sent = await http_get(CorrelationIdMiddleware(_echo_app), [(b"x-request-id", bad)])
    echoed = _response_id(sent)
    assert echoed != bad
    assert is_valid_correlation_id(echoed)
    assert sent[1]["body"] == echoed
    # The replacement is one the next service (or this one) takes as it is.
    again = await http_get(CorrelationIdMiddleware(_echo_app), [(b"x-request-id", echoed)])
    assert _response_id(again) == echoed


async def test_generated_id_replaces_the_request_header() -> None:
    """Code reading the raw request header sees the same ID the response carries."""
    seen: list[Any] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append([v for k, v in scope["headers"] if k == b"x-request-id"])
        seen.append(get_correlation_id())
        await _echo_app(scope, receive, send)

    sent = await http_get(CorrelationIdMiddleware(app), [(b"x-request-id", b"bad id")])
    assert seen[0] == [_response_id(sent)]
    assert seen[1].encode() == _response_id(sent)


async def test_new_ids_are_unique() -> None:
    """Two requests without an ID get two different IDs."""
    mw = CorrelationIdMiddleware(_echo_app)
    ids = {_response_id(await http_get(mw, [])) for _ in range(50)}
    assert len(ids) == 50


async def test_custom_header_and_generator() -> None:
    """header_name and generator are honoured."""
    mw = CorrelationIdMiddleware(_echo_app, header_name="X-Correlation-ID", generator=lambda: "g1")
    sent = await http_get(mw, [])
    assert (b"x-correlation-id", b"g1") in sent[0]["headers"]


def test_bad_header_name_fails_at_construction() -> None:
    """A header name that is not a token is refused when the middleware is built."""
    with pytest.raises(ValueError, match="header_name"):
        CorrelationIdMiddleware(_echo_app, header_name="X Request\n")


async def test_lifespan_passes_through_untouched() -> None:
    """Non-HTTP scopes reach the app unchanged and get no ID."""
    seen: list[Scope] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(dict(scope))

    await CorrelationIdMiddleware(app)({"type": "lifespan"}, None, None)  # type: ignore[arg-type]
    assert seen == [{"type": "lifespan"}]


async def test_websocket_scope_gets_an_id_in_context() -> None:
    """A websocket connection has a correlation ID too (no response headers to echo it on)."""
    seen: list[str | None] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(get_correlation_id())

    scope = {"type": "websocket", "headers": [(b"x-request-id", b"ws-1")], "path": "/ws"}
    await CorrelationIdMiddleware(app)(scope, None, None)  # type: ignore[arg-type]
    assert seen == ["ws-1"]
    assert get_correlation_id() is None


def _fastapi_app() -> FastAPI:
    app = FastAPI()
    install_exception_handlers(app)
    app.add_middleware(CorrelationIdMiddleware)
    return app


async def test_id_reaches_routes_dependencies_and_background_tasks() -> None:
    """Routes, dependencies and background tasks (async and sync) all see the request's ID."""
    app = _fastapi_app()
    seen: dict[str, str | None] = {}
    done = asyncio.Event()

    def dep() -> str | None:
        return get_correlation_id()

    async def async_task() -> None:
        seen["async_task"] = get_correlation_id()

    def sync_task() -> None:
        seen["sync_task"] = get_correlation_id()

    async def last_task() -> None:
        done.set()

    @app.get("/r")
    async def route(bg: BackgroundTasks, from_dep: str | None = Depends(dep)) -> dict[str, Any]:
        seen["route"] = get_correlation_id()
        seen["dependency"] = from_dep
        bg.add_task(async_task)
        bg.add_task(sync_task)
        bg.add_task(last_task)
        return {}

    async with _client(app) as client:
        response = await client.get("/r", headers={"X-Request-ID": "req-42"})
    await asyncio.wait_for(done.wait(), 5)
    assert response.headers["x-request-id"] == "req-42"
    assert seen == dict.fromkeys(["route", "dependency", "async_task", "sync_task"], "req-42")


async def test_id_is_on_error_answers() -> None:
    """404, 405, 422 and 500 answers all carry the ID in the header and in the body."""
    app = _fastapi_app()

    @app.get("/items/{n}")
    async def item(n: int) -> None:
        raise RuntimeError("boom")

    async with _client(app) as client:
        for method, path, status in [
            ("GET", "/missing", 404),
            ("POST", "/items/1", 405),
            ("GET", "/items/x", 422),
            ("GET", "/items/1", 500),
        ]:
            response = await client.request(method, path, headers={"X-Request-ID": "e-1"})
            assert response.status_code == status
            assert response.headers["x-request-id"] == "e-1"
            assert response.json()["correlation_id"] == "e-1"


async def test_filter_stamps_log_records(caplog: pytest.LogCaptureFixture) -> None:
    """CorrelationIdFilter puts the ID on every record inside a request, '-' outside."""
    app = _fastapi_app()
    log = logging.getLogger("test.corr")
    log.addFilter(CorrelationIdFilter())

    @app.get("/log")
    async def route() -> None:
        log.warning("inside")

    caplog.set_level(logging.INFO)
    async with _client(app) as client:
        await client.get("/log", headers={"X-Request-ID": "log-7"})
    log.warning("outside")
    stamped = {r.getMessage(): r.correlation_id for r in caplog.records if r.name == "test.corr"}
    assert stamped == {"inside": "log-7", "outside": "-"}


async def test_unhandled_error_logged_once_with_traceback_and_id(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An unhandled exception is logged exactly once, with its traceback and the ID."""
    app = _fastapi_app()

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("secret")

    caplog.set_level(logging.INFO)
    async with _client(app) as client:
        response = await client.get("/boom", headers={"X-Request-ID": "b-1"})
    assert response.status_code == 500
    errors = [r for r in caplog.records if r.exc_info]
    assert len(errors) == 1
    assert errors[0].correlation_id == "b-1"
    assert errors[0].exc_info is not None
    assert errors[0].exc_info[0] is RuntimeError


async def test_streaming_response_passes_through_in_chunks() -> None:
    """A streaming body arrives chunk by chunk, unbuffered, with the ID header."""
    sent: list[Message] = []

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(3):
            yield f"chunk{i};".encode()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await StreamingResponse(chunks())(scope, receive, send)

    async def send(message: Message) -> None:
        sent.append(message)

    async def receive() -> Message:
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")  # pragma: no cover

    scope = {"type": "http", "method": "GET", "path": "/", "headers": [], "query_string": b""}
    await CorrelationIdMiddleware(app)(scope, receive, send)
    bodies = [m.get("body") for m in sent if m["type"] == "http.response.body"]
    assert bodies[:3] == [b"chunk0;", b"chunk1;", b"chunk2;"]
    assert any(k == b"x-request-id" for k, _ in sent[0]["headers"])


async def test_error_after_response_started_is_logged_not_answered_twice(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A stream that fails midway is logged once; no second response start is sent."""
    sent = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"part", "more_body": True})
        raise RuntimeError("stream broke")

    caplog.set_level(logging.INFO)
    sent = await http_get(CorrelationIdMiddleware(app), [])
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert len([r for r in caplog.records if r.exc_info]) == 1


def test_generated_ids_are_unique_and_valid_across_pool_refills() -> None:
    """IDs cut from one batch of random bytes are all valid and never repeat, refill included."""
    ids = [generate_correlation_id() for _ in range(2_000)]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 32 and is_valid_correlation_id(i) for i in ids)


# Python 3.12+ warns about fork() in a process with threads; this child only writes to a pipe.
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_forked_child_does_not_reuse_the_parents_ids() -> None:
    """A worker forked after IDs were pooled makes its own, never its parent's next ones."""
    import os

    generate_correlation_id()  # fill the pool
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        os.write(write_end, generate_correlation_id().encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child_id = os.read(read_end, 64).decode()
    os.close(read_end)
    os.close(write_end)
    assert child_id != generate_correlation_id()


async def test_generated_id_reaches_the_request_headers_whatever_iterable_they_came_in() -> None:
    """ASGI allows a tuple of header pairs: the generated ID is added to a new list then."""
    seen: list[Any] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["headers"])
        await _echo_app(scope, receive, send)

    for headers in ([(b"host", b"t")], ((b"host", b"t"),)):
        sent = await http_get(CorrelationIdMiddleware(app), headers)  # type: ignore[arg-type]
        generated = _response_id(sent)
        assert list(seen[-1]) == [(b"host", b"t"), (b"x-request-id", generated)]


def _recording_server_send(seen: list[tuple[str, bool, str | None]]) -> Send:
    """A server ``send`` that notes, per message, the ID visible while the server handles it."""

    async def send(message: Message) -> None:
        seen.append((message["type"], message.get("more_body", False), get_correlation_id()))

    return send


async def test_server_handles_the_last_body_message_outside_the_request_context() -> None:
    """uvicorn arms its keep-alive timer while handling the last body message, and the timer
    keeps a copy of the context until the connection's next request: that copy must not carry
    this request's ID (ADR 0044). The start, earlier chunks and background work keep it."""
    after_response: list[str | None] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"a", "more_body": True})
        await send({"type": "http.response.body", "body": b"b"})
        after_response.append(get_correlation_id())  # where Starlette runs background tasks

    seen: list[tuple[str, bool, str | None]] = []
    scope = {"type": "http", "method": "GET", "path": "/", "query_string": b""}
    scope["headers"] = [(b"x-request-id", b"req-7")]

    async def receive() -> Message:  # pragma: no cover - the app never reads the body
        return {"type": "http.request", "body": b"", "more_body": False}

    await CorrelationIdMiddleware(app)(scope, receive, _recording_server_send(seen))
    assert seen == [
        ("http.response.start", False, "req-7"),
        ("http.response.body", True, "req-7"),
        ("http.response.body", False, None),
    ]
    assert after_response == ["req-7"]
    assert get_correlation_id() is None


async def test_last_body_sent_from_a_copied_context_is_sent_as_is() -> None:
    """A body sent from another task (Starlette streams that way before ASGI spec 2.4) cannot
    step out of the request's context; it is sent unchanged and the request ends cleanly."""

    async def chunks() -> AsyncIterator[bytes]:
        yield b"x"

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await StreamingResponse(chunks())(scope, receive, send)

    async def receive() -> Message:
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")  # pragma: no cover

    seen: list[tuple[str, bool, str | None]] = []
    scope = {"type": "http", "method": "GET", "path": "/", "query_string": b""}
    scope["headers"] = [(b"x-request-id", b"req-8")]
    await CorrelationIdMiddleware(app)(scope, receive, _recording_server_send(seen))
    # The task group's child has a copy of the request's context: the ID is still visible.
    assert [kind for kind, _, _ in seen] == ["http.response.start", *["http.response.body"] * 2]
    assert seen[-1] == ("http.response.body", False, "req-8")
    assert get_correlation_id() is None


async def test_nothing_of_the_request_stays_in_the_scope_after_it() -> None:
    """An idle keep-alive connection keeps its last scope: nothing the middleware put there for
    the request stays once it is done."""
    scope = {"type": "http", "method": "GET", "path": "/", "headers": [], "query_string": b""}

    async def receive() -> Message:  # pragma: no cover - the app never reads the body
        return {"type": "http.request", "body": b"", "more_body": False}

    await CorrelationIdMiddleware(_echo_app)(scope, receive, _recording_server_send([]))
    assert not [key for key in scope if key.startswith("fastapi_resilience.")]
