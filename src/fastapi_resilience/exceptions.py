"""The error hierarchy: every error here is also an HTTP answer (RFC 9457 problem details).

```
AppError                          500 internal_error
├── ClientError                   400 bad_request
│   ├── BadRequestError           400 bad_request
│   ├── InvalidInputError         422 invalid_input
│   ├── AuthenticationError       401 unauthenticated      (adds WWW-Authenticate)
│   ├── PermissionDeniedError     403 permission_denied
│   ├── NotFoundError             404 not_found
│   ├── ConflictError             409 conflict
│   └── RateLimitedError          429 rate_limited         retryable, Retry-After
└── ServerError                   500 internal_error
    ├── InternalError             500 internal_error
    ├── UpstreamError             502 upstream_error       retryable
    │   ├── UpstreamTimeoutError  504 upstream_timeout     retryable
    │   ├── RetryExhaustedError   502 retries_exhausted
    │   └── StreamCutError        502 upstream_stream_cut  not retried (part already delivered)
    └── ServiceUnavailableError   503 service_unavailable  retryable
        ├── CircuitOpenError      503 circuit_open         Retry-After = time left open
        ├── BulkheadFullError     503 bulkhead_full        not retryable (refused in this process)
        ├── ThrottledError        503 upstream_throttled   not retryable (refused in this process)
        │   └── QuotaExhaustedError 503 quota_exhausted    Retry-After = when the call may go
        └── FeatureUnavailableError 503 feature_unavailable
```

Users subclass any of these with their own ``status_code`` / ``code`` / ``title`` and the
handlers render them with no registration.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import httpx

__all__ = [
    "AppError",
    "AuthenticationError",
    "BadRequestError",
    "BulkheadFullError",
    "CircuitOpenError",
    "ClientError",
    "ConfigurationError",
    "ConflictError",
    "DeadlineCutError",
    "FeatureUnavailableError",
    "InternalError",
    "InvalidInputError",
    "NotFoundError",
    "PermissionDeniedError",
    "QuotaExhaustedError",
    "RateLimitedError",
    "RetryExhaustedError",
    "ServerError",
    "ServiceUnavailableError",
    "StorageUnavailableError",
    "StreamCutError",
    "ThrottledError",
    "UpstreamError",
    "UpstreamStatusError",
    "UpstreamTimeoutError",
]


class ConfigurationError(ValueError):
    """A setting or argument is invalid; raised at start-up, naming the setting."""


def retry_after_header(seconds: float) -> str:
    """``Retry-After`` in whole seconds: the ceiling of ``seconds``, at least 1."""
    return str(max(1, math.ceil(seconds)))


class AppError(Exception):
    """Root of the hierarchy; an unexpected failure of the app itself (500)."""

    status_code: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"
    title: ClassVar[str] = "Internal Server Error"
    retryable: ClassVar[bool] = False
    #: Problem ``type`` URI; ``None`` means "the configured base + ``code``".
    type_uri: ClassVar[str | None] = None

    def __init__(
        self,
        detail: str | None = None,
        *,
        extensions: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        retry_after: float | None = None,
    ) -> None:
        self.detail: str = self.title if detail is None else str(detail)
        self.extensions: dict[str, Any] = dict(extensions or {})
        self.headers: dict[str, str] = dict(headers or {})
        if retry_after is not None:
            if retry_after < 0 or math.isnan(retry_after):
                raise ValueError(f"retry_after must be >= 0 seconds, got {retry_after!r}")
            self.headers["Retry-After"] = retry_after_header(retry_after)
        self.retry_after: float | None = retry_after
        super().__init__(self.detail)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.detail!r}, status_code={self.status_code})"


class ClientError(AppError):
    """The request is at fault (4xx); never retried."""

    status_code = 400
    code = "bad_request"
    title = "Bad Request"


class BadRequestError(ClientError):
    """The request is malformed."""


class InvalidInputError(ClientError):
    """The request is well-formed but its content is invalid (FastAPI validation maps here)."""

    status_code = 422
    code = "invalid_input"
    title = "Invalid Input"


class AuthenticationError(ClientError):
    """No or bad credentials; the answer carries ``WWW-Authenticate``."""

    status_code = 401
    code = "unauthenticated"
    title = "Unauthenticated"

    def __init__(
        self,
        detail: str | None = None,
        *,
        extensions: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        www_authenticate: str = "Bearer",
    ) -> None:
        merged = {"WWW-Authenticate": www_authenticate, **(headers or {})}
        super().__init__(detail, extensions=extensions, headers=merged)


class PermissionDeniedError(ClientError):
    """The caller is known but not allowed to do this."""

    status_code = 403
    code = "permission_denied"
    title = "Permission Denied"


class NotFoundError(ClientError):
    """The resource does not exist (also an unknown route)."""

    status_code = 404
    code = "not_found"
    title = "Not Found"


class ConflictError(ClientError):
    """The request conflicts with the resource's current state."""

    status_code = 409
    code = "conflict"
    title = "Conflict"


class RateLimitedError(ClientError):
    """The caller went over a rate limit; ``Retry-After`` says when to come back."""

    status_code = 429
    code = "rate_limited"
    title = "Too Many Requests"
    retryable = True
    type_uri = "https://iana.org/assignments/http-problem-types#quota-exceeded"

    def __init__(
        self,
        detail: str | None = None,
        *,
        extensions: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(detail, extensions=extensions, headers=headers, retry_after=retry_after)
        if not any(name.lower() == "retry-after" for name in self.headers):
            # Every 429 says when to come back; with no figure given, the shortest wait.
            self.headers["Retry-After"] = retry_after_header(0)


class ServerError(AppError):
    """The server or something behind it failed (5xx)."""


class InternalError(ServerError):
    """An internal failure the app chose to report as such."""


class UpstreamError(ServerError):
    """A service this app depends on failed or answered an error."""

    status_code = 502
    code = "upstream_error"
    title = "Bad Gateway"
    retryable = True


class UpstreamTimeoutError(UpstreamError, TimeoutError):
    """A call to an upstream, or the request's deadline, ran out of time."""

    status_code = 504
    code = "upstream_timeout"
    title = "Gateway Timeout"


class RetryExhaustedError(UpstreamError):
    """Every retry attempt failed; the last error is chained as ``__cause__``."""

    code = "retries_exhausted"
    title = "Retries Exhausted"
    retryable = False


class ServiceUnavailableError(ServerError):
    """The service cannot answer now; ``Retry-After`` is set when the wait is known."""

    status_code = 503
    code = "service_unavailable"
    title = "Service Unavailable"
    retryable = True


class CircuitOpenError(ServiceUnavailableError):
    """A circuit breaker is open; no call was made. ``retry_after`` is the time left open."""

    code = "circuit_open"
    title = "Circuit Open"


class BulkheadFullError(ServiceUnavailableError):
    """A bulkhead has no free slot and its waiting line is full or the wait timed out.

    Not retryable: the refusal is made in this process, and the bulkhead's own waiting line
    (``max_waiting``, ``wait_timeout``) is the place to wait for a slot; a retry would only
    wait again outside it and spend the retry budget.
    """

    code = "bulkhead_full"
    title = "Bulkhead Full"
    retryable = False


class FeatureUnavailableError(ServiceUnavailableError):
    """A feature is switched off while the app runs in degraded mode."""

    code = "feature_unavailable"
    title = "Feature Unavailable"


class ThrottledError(ServiceUnavailableError):
    """Adaptive throttling dropped the call locally: the upstream has been refusing work.

    Not retryable: retrying a local drop would add the very load the throttle sheds.
    """

    code = "upstream_throttled"
    title = "Upstream Throttled"
    retryable = False


class QuotaExhaustedError(ThrottledError):
    """A call to an upstream was not sent: the upstream said its quota is used up, or this
    client's own outbound rate limit is reached, until ``retry_after`` seconds from now, longer
    than the call may wait (``rate_limit_wait`` or the request's deadline).

    ``extensions``: ``upstream`` (the host) and ``reason``: ``"upstream_quota"`` (the upstream's
    own headers said so) or ``"rate_limit"`` (the client's ``rate_limit``). Not retryable, as
    every refusal made in this process (ADR 0064): the transport's own wait is the place to wait.
    """

    code = "quota_exhausted"
    title = "Upstream Quota Exhausted"


class DeadlineCutError(UpstreamTimeoutError):
    """The caller's time, not the upstream, ended the call: it never started (the deadline
    was spent), or a deadline the client chose cut it.

    An :class:`UpstreamTimeoutError` like any other (504 ``upstream_timeout``, a
    ``TimeoutError``), but no breaker counts it against the upstream, adaptive throttling takes
    it for no refusal, and ``Retry`` does not retry it: there is no time left to retry in.
    """

    retryable = False


class UpstreamStatusError(UpstreamError):
    """The upstream answered 5xx; ``response`` is that answer, ``upstream_status`` its code."""

    def __init__(self, response: httpx.Response, host: str, retry_after: float | None) -> None:
        super().__init__(
            f"Upstream {host} answered {response.status_code}.",
            extensions={"upstream": host, "upstream_status": response.status_code},
            retry_after=retry_after,
        )
        self.response = response
        self.upstream_status = response.status_code


class StreamCutError(UpstreamError):
    """A streamed answer broke off after some of it reached the caller (the upstream closed
    the connection, or it failed, before the end).

    Raised by the stream's iterator, not by the call that opened it. Not retried: the caller
    already holds part of the answer, and only it knows how to go on (``sse_events(...,
    resume=True)`` reconnects with ``Last-Event-ID``).
    """

    code = "upstream_stream_cut"
    title = "Upstream Stream Cut"
    retryable = False


class StorageUnavailableError(Exception):
    """Raised when the rate-limit storage cannot answer within its timeout, or is down.

    ``retry_after`` is the number of seconds until the storage will be tried again, when known.
    """

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after
