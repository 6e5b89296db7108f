"""Text from a request, made safe for a log line.

A request's path, headers or identity can carry control characters (``%0A`` in a path decodes
to a line feed): written as they are, one request could forge log lines or hide its own. Every
value of a request that the library logs goes through :func:`printable` first.
"""

from __future__ import annotations

import re

__all__ = ["printable", "without_password"]

#: A ``password=`` query parameter's value, up to the next ``&`` or ``#``.
_QUERY_PASSWORD = re.compile(r"([?&]password=)[^&#]*", re.IGNORECASE)

#: C0 controls, DEL, C1 controls and the Unicode line and paragraph separators, each written as
#: a Python escape (``\n`` as ``\x0a``), so the line stays one line and nothing is lost.
_ESCAPES = {
    code: f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
    for code in (*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029)
}


def printable(value: object) -> str:
    """``str(value)`` with every control character escaped; printable text is unchanged."""
    text = value if isinstance(value, str) else str(value)
    if text.isprintable():
        return text
    return text.translate(_ESCAPES)


def without_password(url: str) -> str:
    """``url`` with the password of its ``user:password@`` part written as ``***``, for errors.

    Everything after the scheme up to the last ``@`` counts as the user part, so a password
    holding ``/``, ``?``, ``#`` or ``@`` is hidden whole; without ``://`` (a scheme mistyped or
    left out) everything up to the last ``@`` is. A ``password=`` query value (a form redis-py
    reads) is hidden too.
    """
    url = _QUERY_PASSWORD.sub(r"\1***", url)
    scheme, sep, rest = url.partition("://")
    if "@" not in (rest if sep else url):
        return url
    if not sep:
        return "***@" + url.rpartition("@")[2]
    userinfo, _, hosts = rest.rpartition("@")
    user, has_password, _ = userinfo.partition(":")
    return f"{scheme}://{user}:***@{hosts}" if has_password else f"{scheme}://***@{hosts}"
