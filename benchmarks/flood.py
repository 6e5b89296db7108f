"""Apps for ``python -m benchmarks.instructions`` that refuse every request: what a flood costs.

While a client floods an app, most of its requests are refused; what each refusal costs the
app is then what the flood costs it. ``refused_memory`` is ``install()`` with the memory
storage and an anonymous tier of one request an hour: every request after the first gets the
429 problem+json with its headers; ``slowapi_refused_memory`` is slowapi's pure ASGI
middleware (its faster one) with memory storage, headers on and the same limit. Not HTTP
benchmark variants (those must all answer 200)::

    python -m benchmarks.instructions --only refused_memory,slowapi_refused_memory
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.types import ASGIApp

from benchmarks.apps import _slowapi_app, tiny_app


def refused_memory() -> ASGIApp:
    from fastapi_resilience import ResilienceSettings, install

    settings = ResilienceSettings(rate_limit_tiers={"anonymous": "1/hour"})
    return tiny_app(lambda app: install(app, settings))


def slowapi_refused_memory() -> ASGIApp:
    return _slowapi_app(
        storage_uri="memory://", headers_enabled=True, asgi_middleware=True, limit="1/hour"
    )


FLOOD_PROBES: dict[str, Callable[[], ASGIApp]] = {
    "refused_memory": refused_memory,
    "slowapi_refused_memory": slowapi_refused_memory,
}
