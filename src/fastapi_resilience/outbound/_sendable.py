"""A request no upstream could ever be sent is the app's error, not the upstream's (ADR 0076).

httpx refuses some of them itself while it builds the request (``httpx.InvalidURL``: a control
character in the URL, a URL too long), before any transport sees them. Others it refuses only
inside its HTTP transport, as transport errors (``UnsupportedProtocol``, ``LocalProtocolError``),
which a resilient transport would otherwise take for an unreachable upstream: retried, counted
by the breaker, answered 502. :func:`refuse_unsendable` finds those first, before any guard, and
raises the httpx error that names the fault.
"""

from __future__ import annotations

import re

import httpx

__all__ = ["refuse_unsendable"]

# What httpx's own HTTP transport sends: ws and wss are HTTP/1.1 upgrade requests (httpx-ws).
_SCHEMES = frozenset({"http", "https", "ws", "wss"})
# RFC 9110 token: what a header name may be made of.
_TOKEN = re.compile(rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+")
# A header value HTTP/1.1 can carry (h11's rule): no CR, LF, NUL or other line-breaking
# whitespace, and no space or tab at either end.
_FIELD_VALUE = re.compile(rb"(?:[^\x00\s]+(?:[ \t]+[^\x00\s]+)*)?")


def _origin(url: httpx.URL) -> str:
    # Scheme, host and port only: a URL's userinfo, path and query may hold secrets or a
    # caller's input, and the message may reach a log line.
    port = f":{url.port}" if url.port is not None else ""
    return repr(f"{url.scheme}://{url.host}{port}")


def refuse_unsendable(request: httpx.Request, *, any_scheme: bool = False) -> None:
    """Raise if ``request`` cannot be sent over HTTP whatever the upstream does.

    ``any_scheme`` lets any scheme through: for an app's own inner transport, which may serve
    schemes httpx's does not (``http+unix``, a test's ``mock://``).

    Raises:
        httpx.InvalidURL: the scheme is not http, https, ws or wss, the host is missing, or the port
            is outside 1-65535.
        httpx.LocalProtocolError: a header name is not a token, or a header value holds CR,
            LF, NUL, or a space or tab at either end.
    """
    url = request.url
    if not url.scheme:
        raise httpx.InvalidURL(
            f"cannot send {request.method} to a relative URL: give the client a base_url, "
            "or the URL its http:// or https://"
        )
    if url.scheme not in _SCHEMES and not any_scheme:
        raise httpx.InvalidURL(
            f"cannot send {request.method} to {_origin(url)}: "
            "the scheme must be http, https, ws or wss"
        )
    if not url.raw_host:  # not .host: that decodes an IDNA host on every call
        raise httpx.InvalidURL(f"cannot send {request.method} to {_origin(url)}: no host")
    if url.port is not None and not 0 < url.port < 65536:
        raise httpx.InvalidURL(
            f"cannot send {request.method} to {_origin(url)}: the port is not in 1-65535"
        )
    for name, value in request.headers.raw:
        if _TOKEN.fullmatch(name) is None:
            raise httpx.LocalProtocolError(
                f"cannot send {request.method} to {_origin(url)}: "
                f"the header name {name!r} is not a token"
            )
        if _FIELD_VALUE.fullmatch(value) is None:
            # The value is left out: it may be a credential.
            raise httpx.LocalProtocolError(
                f"cannot send {request.method} to {_origin(url)}: the value of header "
                f"{name.decode('ascii')!r} holds CR, LF, NUL, or a space or tab at either end"
            )
