"""Apps for ``python -m benchmarks.instructions`` that refuse every request: what a flood costs.

While a client floods an app, most of its requests are refused; what each refusal costs the
app is then what the flood costs it. ``refused_memory`` is ``install()`` with the memory
storage and an anonymous tier of one request an hour: every request after the first gets the
429 problem+json with its headers. Not an HTTP benchmark variant (those must all answer 200)::

    python -m benchmarks.instructions --only resilience_full_memory,refused_memory
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.types import ASGIApp

from benchmarks.apps import tiny_app


def refused_memory() -> ASGIApp:
    from fastapi_resilience import ResilienceSettings, install

    settings = ResilienceSettings(rate_limit_tiers={"anonymous": "1/hour"})
    return tiny_app(lambda app: install(app, settings))


FLOOD_PROBES: dict[str, Callable[[], ASGIApp]] = {"refused_memory": refused_memory}
