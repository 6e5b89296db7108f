"""Streamed answers through ``ResilientTransport``: unbuffered, guarded until they end.

A request is *streamed* when its ``STREAM_EXTENSION`` request extension is true. The client
:func:`~fastapi_resilience.resilient_client` builds sets it for ``client.stream(...)`` and
``client.send(request, stream=True)`` (httpx itself does not tell a transport whether the
caller will stream), and :func:`~fastapi_resilience.outbound.sse_events` sets it on any
client; anyone may set it with ``extensions={STREAM_EXTENSION: True}``.

A streamed answer passes the guards until its headers, as any call does (retry, throttle,
breaker, bulkhead, timeout), and then holds its breaker permit and bulkhead slot until it
ends. How it ends is the verdict, given once: read to the end (a success), cut by the
upstream or silent for longer than ``stream_idle_timeout`` (a failure, raised from the
stream's iterator as :class:`StreamCutError` or :class:`UpstreamTimeoutError`, never
retried), or closed early by the caller (nothing).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx

from fastapi_resilience.exceptions import AppError, StreamCutError
from fastapi_resilience.outbound._breaker import BreakerPermit, CircuitBreaker
from fastapi_resilience.outbound._bulkhead import Bulkhead
from fastapi_resilience.outbound._deadline import (
    DEADLINE_EXCEEDED_DETAIL,
    effective_timeout,
    timeout_error,
)

__all__ = [
    "DEFAULT_STREAM_IDLE_TIMEOUT",
    "STREAM_EXTENSION",
    "GuardedStream",
    "StreamAwareClient",
    "guard_stream",
    "is_streamed",
    "observe_at_end",
]

logger = logging.getLogger("fastapi_resilience.outbound")

#: The request extension that marks a request as streamed.
STREAM_EXTENSION = "fastapi_resilience.stream"

#: Seconds a streamed answer may stay silent between two chunks, unless told otherwise.
DEFAULT_STREAM_IDLE_TIMEOUT = 60.0

#: ``on_end(error, early)``: ``error`` is ``None`` for a complete stream and for one the
#: caller closed early (``early``).
EndCallback = Callable[[BaseException | None, bool], Awaitable[None] | None]


def is_streamed(request: httpx.Request) -> bool:
    """Whether the caller reads ``request``'s answer as a stream."""
    return bool(request.extensions.get(STREAM_EXTENSION))


class StreamAwareClient(httpx.AsyncClient):
    """An ``httpx.AsyncClient`` that tells its transport which requests are streamed."""

    async def send(
        self, request: httpx.Request, *, stream: bool = False, **kwargs: Any
    ) -> httpx.Response:
        if stream:
            request.extensions[STREAM_EXTENSION] = True
        return await super().send(request, stream=stream, **kwargs)


class GuardedStream(httpx.AsyncByteStream):
    """The body of a streamed answer: passes chunks on as they come, bounds the wait for
    each by the idle timeout and the request's deadline, and tells its ``on_end`` callbacks
    once how it ended."""

    def __init__(
        self, inner: httpx.AsyncByteStream, *, host: str, idle_timeout: float | None
    ) -> None:
        self._inner = inner
        self._host = host
        self._idle_timeout = idle_timeout
        self._on_end: list[EndCallback] = []
        self._ended = False

    def on_end(self, callback: EndCallback) -> None:
        """Call ``callback(error, early)`` when the stream ends (innermost guard first)."""
        self._on_end.append(callback)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        iterator = self._inner.__aiter__()
        while True:
            try:
                chunk = await self._next_chunk(iterator)
            except StopAsyncIteration:
                await self._end(None, early=False)
                return
            except Exception as exc:
                error = self._as_error(exc)
                await self._end(error, early=False)
                if error is exc:
                    raise
                raise error from exc
            # Cancellation (BaseException) passes through: the caller's aclose() settles it.
            yield chunk

    async def _next_chunk(self, iterator: AsyncIterator[bytes]) -> bytes:
        limit, by_deadline = effective_timeout(self._idle_timeout)
        if limit is None:
            return await iterator.__anext__()
        if limit <= 0:
            raise timeout_error(
                DEADLINE_EXCEEDED_DETAIL,
                started=True,
                by_deadline=by_deadline,
                extensions={"upstream": self._host},
            )
        scope = asyncio.timeout(limit)
        try:
            async with scope:
                return await iterator.__anext__()
        except TimeoutError as exc:
            if not scope.expired():
                raise
            detail = (
                DEADLINE_EXCEEDED_DETAIL
                if by_deadline
                else f"Upstream {self._host} sent nothing for {limit:g}s mid-stream."
            )
            raise timeout_error(
                detail,
                started=True,
                by_deadline=by_deadline,
                extensions={"upstream": self._host, "stream_idle_timeout": limit},
            ) from exc

    def _as_error(self, exc: Exception) -> Exception:
        """The library's error for a stream that broke: its own errors pass as they are."""
        if isinstance(exc, AppError):
            return exc
        if isinstance(exc, httpx.TimeoutException):
            return timeout_error(
                f"Upstream {self._host} timed out mid-stream ({type(exc).__name__}).",
                started=True,
                by_deadline=False,
                extensions={"upstream": self._host},
            )
        return StreamCutError(
            f"Upstream {self._host} cut the stream ({type(exc).__name__}).",
            extensions={"upstream": self._host},
        )

    async def aclose(self) -> None:
        # Closed before the end (the caller stopped, or was cancelled): no verdict.
        await self._end(None, early=True)

    async def _end(self, error: BaseException | None, *, early: bool) -> None:
        if self._ended:
            return
        self._ended = True
        try:
            await self._inner.aclose()
        except Exception:  # closing a broken connection must not hide how the stream ended
            logger.debug("closing the upstream stream of %s failed", self._host, exc_info=True)
        finally:
            for callback in self._on_end:
                try:
                    result = callback(error, early)
                    if result is not None:
                        await result
                except Exception:  # one guard's bookkeeping must not skip the others'
                    logger.exception("stream end callback %r failed", callback)


async def guard_stream(
    exchange: Callable[[], Awaitable[httpx.Response]],
    *,
    breaker: CircuitBreaker | None,
    bulkhead: Bulkhead | None,
    host: str,
    request: httpx.Request,
    idle_timeout: float | None,
) -> httpx.Response:
    """Run ``exchange`` (the guarded attempt up to the headers) holding the breaker's permit
    and a bulkhead slot until the answer's stream ends.

    A failure before the headers settles at once and is raised (the retry around may try
    again). Otherwise the answer's body becomes a :class:`GuardedStream` that settles the
    permit and frees the slot when it ends.
    """
    permit = await breaker.admit() if breaker is not None else None
    try:
        if bulkhead is not None:
            await bulkhead.acquire()
        try:
            response = await exchange()
        except BaseException:
            if bulkhead is not None:
                bulkhead.release()
            raise
    except BaseException as exc:
        if permit is not None:
            await permit.settle(exc)
        raise
    _lift_read_timeout(request)
    stream = GuardedStream(_byte_stream(response.stream), host=host, idle_timeout=idle_timeout)
    if bulkhead is not None:
        stream.on_end(lambda _error, _early: bulkhead.release())
    if permit is not None:
        permit.answered()
        stream.on_end(_settler(permit))
    response.stream = stream
    return response


def observe_at_end(
    response: httpx.Response, observe: Callable[[BaseException | None], None]
) -> bool:
    """For a streamed answer, call ``observe(error)`` when it ends and say so; ``False``:
    not a streamed answer (observe it now)."""
    stream = response.stream
    if not isinstance(stream, GuardedStream):
        return False
    stream.on_end(lambda error, _early: observe(error))
    return True


def _settler(permit: BreakerPermit) -> EndCallback:
    async def settle(error: BaseException | None, early: bool) -> None:
        if early:
            await permit.abandon()
        else:
            await permit.settle(error)

    return settle


def _lift_read_timeout(request: httpx.Request) -> None:
    """Past the headers, the wait for each chunk is bounded by the idle timeout and the
    deadline (in :class:`GuardedStream`), not by the attempt's read timeout; httpcore reads
    this value when the body's first chunk is asked for."""
    timeouts = request.extensions.get("timeout")
    if isinstance(timeouts, dict):
        timeouts["read"] = None


def _byte_stream(stream: httpx.SyncByteStream | httpx.AsyncByteStream) -> httpx.AsyncByteStream:
    if isinstance(stream, httpx.AsyncByteStream):
        return stream
    raise TypeError("ResilientTransport needs an async transport")  # pragma: no cover
