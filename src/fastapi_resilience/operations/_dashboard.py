"""The operator dashboard: one self-contained HTML page, served from the package.

The page holds no data: it asks for the admin token, keeps it for the tab and reads everything
from the admin API under ``{admin_path}/api`` with ``Authorization: Bearer``. So the page itself
may be answered without the token; what protects it is a strict Content-Security-Policy.
"""

from __future__ import annotations

import base64
import hashlib
import re
from functools import cache
from importlib.resources import files

from starlette.responses import Response

__all__ = ["dashboard_html", "dashboard_response"]

_PAGE = "dashboard.html"
#: The page's inline blocks, exactly as the browser hashes them (the text between the tags).
_INLINE = re.compile(r"<(script|style)>(.*?)</\1>", re.DOTALL)


@cache
def dashboard_html() -> bytes:
    """The page's bytes, read from the package once."""
    return files(__package__ or "fastapi_resilience.operations").joinpath(_PAGE).read_bytes()


def _source_hash(block: str) -> str:
    digest = hashlib.sha256(block.encode("utf-8")).digest()
    return f"'sha256-{base64.b64encode(digest).decode('ascii')}'"


@cache
def content_security_policy() -> str:
    """The page's policy: its own inline script and style, by hash, and nothing else.

    Hashes rather than ``'unsafe-inline'``: a name that somehow became markup could not run a
    script or restyle the page, because only the blocks shipped in the file match. Hashes
    rather than a nonce: the page is static, so the policy can be computed once and the bytes
    served as they are, with no per-response rewrite. ``connect-src 'self'`` lets the page call
    the admin API and nothing else; ``img-src data:`` only covers the empty favicon.
    ``require-trusted-types-for 'script'`` makes the browser refuse any string assigned to
    ``innerHTML`` and the like, so the page can only render data as text.
    """
    html = dashboard_html().decode("utf-8")
    hashes: dict[str, list[str]] = {"script": [], "style": []}
    for tag, block in _INLINE.findall(html):
        hashes[tag].append(_source_hash(block))
    return "; ".join(
        [
            "default-src 'none'",
            f"script-src {' '.join(hashes['script'])}",
            f"style-src {' '.join(hashes['style'])}",
            "connect-src 'self'",
            "img-src data:",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
            "require-trusted-types-for 'script'",
            "trusted-types 'none'",
        ]
    )


def dashboard_response() -> Response:
    """The page, never cached (a new release must not meet an old page), framed by nobody."""
    return Response(
        dashboard_html(),
        media_type="text/html",
        headers={
            "Cache-Control": "no-store",
            "Content-Security-Policy": content_security_policy(),
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
        },
    )
