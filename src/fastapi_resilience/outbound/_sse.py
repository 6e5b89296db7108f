"""Server-sent events from an upstream: a parser of the WHATWG rules, and ``sse_events``.

``async for event in sse_events(client, "GET", url): ...`` streams the answer through the
client's guards (see ``_stream``) and yields each event as it is complete. With
``resume=True`` a stream the upstream cut midway is opened again with ``Last-Event-ID``,
after the wait the server asked for in ``retry`` (capped), a bounded number of times.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

import httpx

from fastapi_resilience.clock import SYSTEM_CLOCK, Clock
from fastapi_resilience.exceptions import (
    ConfigurationError,
    DeadlineCutError,
    StreamCutError,
    UpstreamTimeoutError,
)
from fastapi_resilience.outbound._deadline import remaining
from fastapi_resilience.outbound._stream import STREAM_EXTENSION

__all__ = ["SSEParser", "ServerSentEvent", "sse_events"]

_LINE_END = re.compile(r"\r\n|\r|\n")
_BOM = "\ufeff"


@dataclass(frozen=True, slots=True)
class ServerSentEvent:
    """One dispatched event.

    ``event`` is its type (``"message"`` unless named), ``data`` its data lines joined with
    ``"\\n"``, ``id`` the last event ID (it carries over from earlier events, as in a
    browser), ``retry`` the reconnection time in milliseconds this event's block set, if any.
    """

    event: str = "message"
    data: str = ""
    id: str = ""
    retry: int | None = None


#: The longest line and the most data of one event the parser holds, in characters: an
#: upstream that never ends a line or an event cannot grow the caller's memory without bound.
MAX_LINE_CHARS = 1024 * 1024
MAX_EVENT_CHARS = 8 * 1024 * 1024


class SSEParser:
    """Turns an event stream's text into events, by the WHATWG server-sent events rules.

    Feed it decoded text in pieces of any size with :meth:`feed`; it returns the events each
    piece completed. Lines end in CRLF, LF or CR (a CR at the end of one piece and an LF at
    the start of the next are one line end). A line starting with ``:`` is a comment; a
    line without a colon is a field with an empty value; one space after the colon is
    dropped; ``retry`` is taken only when it is all ASCII digits; an ``id`` holding NULL is
    ignored; an event with no data is not dispatched; an unfinished event at the end of the
    stream is dropped. :meth:`feed_bytes` decodes UTF-8 and drops a leading BOM.
    """

    def __init__(self) -> None:
        #: The last event ID: kept across events and across reconnections.
        self.last_event_id = ""
        #: The reconnection time (ms) the server asked for, ``None`` until it did.
        self.retry: int | None = None
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._start = True
        self._pieces: list[str] = []
        self._pending_size = 0
        self._skip_lf = False
        self._reset_event()

    def _reset_event(self) -> None:
        self._data: list[str] = []
        self._data_size = 0
        self._event = ""
        self._block_retry: int | None = None

    def restart(self) -> None:
        """A new connection: drop the unfinished line and event, keep the last event ID and
        the reconnection time."""
        self._decoder.reset()
        self._start = True
        self._pieces, self._pending_size = [], 0
        self._skip_lf = False
        self._reset_event()

    def feed_bytes(self, chunk: bytes) -> list[ServerSentEvent]:
        return self.feed(self._decoder.decode(chunk))

    def feed(self, text: str) -> list[ServerSentEvent]:
        if self._start and text:
            self._start = False
            if text.startswith(_BOM):
                text = text[1:]
        if self._skip_lf and text:
            self._skip_lf = False
            if text.startswith("\n"):
                text = text[1:]
        if not text:
            return []
        if _LINE_END.search(text) is None:
            # No line ends yet: keep the piece (joined once, when the line ends, so a long
            # line costs linear time) within the bound.
            self._pieces.append(text)
            self._pending_size += len(text)
            if self._pending_size > MAX_LINE_CHARS:
                raise StreamCutError(
                    f"A server-sent events line is longer than {MAX_LINE_CHARS} characters."
                )
            return []
        lines = _LINE_END.split("".join(self._pieces) + text)
        pending = lines.pop()  # after the last line end: not a whole line yet
        self._pieces, self._pending_size = ([pending], len(pending)) if pending else ([], 0)
        self._skip_lf = text.endswith("\r")
        events: list[ServerSentEvent] = []
        for line in lines:
            event = self._line(line)
            if event is not None:
                events.append(event)
        return events

    def _line(self, line: str) -> ServerSentEvent | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None  # a comment (often a keep-alive)
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
            self._data_size += len(value) + 1
            if self._data_size > MAX_EVENT_CHARS:
                raise StreamCutError(
                    f"A server-sent event's data is longer than {MAX_EVENT_CHARS} characters."
                )
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self.last_event_id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self.retry = self._block_retry = int(value)
        return None

    def _dispatch(self) -> ServerSentEvent | None:
        data, event, retry = self._data, self._event, self._block_retry
        self._reset_event()
        if not data:
            return None
        return ServerSentEvent(event or "message", "\n".join(data), self.last_event_id, retry)


def _resumable(exc: BaseException) -> bool:
    """A stream that broke midway for the upstream's reasons, with time left to go on."""
    if isinstance(exc, DeadlineCutError):
        return False
    if not isinstance(exc, StreamCutError | UpstreamTimeoutError):
        return False
    left = remaining()
    return left is None or left > 0


async def sse_events(
    client: httpx.AsyncClient,
    method: str,
    url: str | httpx.URL,
    *,
    resume: bool = False,
    max_reconnects: int = 3,
    retry_delay: float = 1.0,
    max_retry_delay: float = 30.0,
    clock: Clock = SYSTEM_CLOCK,
    **kwargs: Any,
) -> AsyncGenerator[ServerSentEvent, None]:
    """Yield the server-sent events of ``client.stream(method, url, **kwargs)`` as they come.

    The request is marked as streamed and asks for ``text/event-stream``; on a
    :func:`~fastapi_resilience.resilient_client` every connection goes through its guards
    (one breaker verdict per connection, by how it ended). An answer that is not 2xx is read
    and raised as ``httpx.HTTPStatusError``; a 204 ends the events (the server says: stop).

    With ``resume=True``, a stream cut midway (:class:`StreamCutError`) or silent for too long
    (an :class:`UpstreamTimeoutError`, not a :class:`DeadlineCutError`) is opened again with
    ``Last-Event-ID`` set to the last ID seen, after the server's ``retry`` wait (or
    ``retry_delay`` seconds when it gave none), at most ``max_retry_delay`` seconds and never
    past the request's deadline; after ``max_reconnects`` reconnections the error is raised.

    Close it early with ``contextlib.aclosing(sse_events(...))`` to let the connection go at
    once. Raises what the client raises for the first connection (``CircuitOpenError``,
    ``RetryExhaustedError``...), and the stream's error when it is not resumed.
    """
    if max_reconnects < 0 or retry_delay < 0 or max_retry_delay < 0:
        raise ConfigurationError(
            "max_reconnects, retry_delay and max_retry_delay must be >= 0, got "
            f"{max_reconnects!r}, {retry_delay!r}, {max_retry_delay!r}"
        )
    parser = SSEParser()
    headers = httpx.Headers(kwargs.pop("headers", None))
    headers.setdefault("Accept", "text/event-stream")
    headers.setdefault("Cache-Control", "no-cache")
    extensions = {**(kwargs.pop("extensions", None) or {}), STREAM_EXTENSION: True}
    reconnects = 0
    while True:
        if parser.last_event_id:
            headers["Last-Event-ID"] = parser.last_event_id
        opened = False  # a failure before the answer came is the client's to retry, not ours
        try:
            async with client.stream(
                method, url, headers=headers, extensions=extensions, **kwargs
            ) as response:
                opened = True
                if response.status_code == 204:
                    return
                if not response.is_success:
                    await response.aread()
                    response.raise_for_status()
                async for chunk in response.aiter_bytes():
                    for event in parser.feed_bytes(chunk):
                        yield event
            return
        except (StreamCutError, UpstreamTimeoutError) as exc:
            if not (resume and opened) or reconnects >= max_reconnects or not _resumable(exc):
                raise
            wait = _reconnect_wait(parser.retry, retry_delay, max_retry_delay)
            if wait is None:
                raise
        reconnects += 1
        parser.restart()
        await clock.sleep(wait)


def _reconnect_wait(retry_ms: int | None, default: float, cap: float) -> float | None:
    """Seconds to wait before reconnecting; ``None`` when the deadline would run out first."""
    wait = min(cap, default if retry_ms is None else retry_ms / 1000)
    left = remaining()
    if left is not None and wait >= left:
        return None
    return wait
