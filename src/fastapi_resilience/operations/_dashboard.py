"""The operator dashboard: one HTML page from the package (placeholder until the page lands)."""

from __future__ import annotations

from starlette.responses import Response

__all__ = ["dashboard_response"]


def dashboard_response() -> Response:
    return Response("<!doctype html><title>fastapi-resilience</title>", media_type="text/html")
