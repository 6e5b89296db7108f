"""The apps ``make bench`` measures: one registry entry per variant, all serving the same route.

Each variant is a factory that builds an ASGI app around :func:`tiny_app`. The harness starts
``uvicorn benchmarks.apps:create_app --factory`` with ``BENCH_VARIANT=<name>`` (and
``BENCH_REDIS_URL`` when the variant needs Redis), so each variant runs in its own process and
imports only what it needs: factories import their library inside the function.

To add a variant, write a factory and add one :class:`HttpVariant` to ``VARIANTS`` in the
section of its group (see ``benchmarks/README.md``).
"""

from __future__ import annotations

import contextvars
import gc
import importlib
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: Environment variables the harness sets for the server process.
VARIANT_ENV = "BENCH_VARIANT"
#: The ``src`` directory of the earlier commit the ``baseline`` variants run (``--baseline``).
BASELINE_SRC_ENV = "BENCH_BASELINE_SRC"
REDIS_URL_ENV = "BENCH_REDIS_URL"
#: Optional: CPython's gen-0 collection threshold for every server (default 700).
GC_THRESHOLD_ENV = "BENCH_GC_THRESHOLD"

#: The one route every variant serves, and its exact body.
ROUTE = "/"
BODY = b'{"status":"ok"}'

#: A rate limit no benchmark run can reach: limiters count every request but never refuse.
HUGE_LIMIT = "1000000000/hour"


@dataclass(frozen=True, slots=True)
class BenchEnv:
    """What the harness hands a factory: the private Redis when the variant asked for one."""

    redis_url: str | None = None

    def require_redis(self) -> str:
        if self.redis_url is None:
            raise RuntimeError(f"this variant needs Redis: set needs_redis=True ({REDIS_URL_ENV})")
        return self.redis_url


#: A factory is a callable or an import string ``"package.module:function"``.
AppFactory = Callable[[BenchEnv], ASGIApp] | str


@dataclass(frozen=True, slots=True)
class HttpVariant:
    """One app measured by the HTTP benchmark.

    Args:
        description: one line for the results table (what is added to bare FastAPI).
        factory: builds the app; a callable or an import string.
        group: the results table it appears in (``"foundation"``, ``"rate_limit"``, ...).
        needs_redis: start the harness's private redis-server and pass its URL.
        expect_headers: response headers (lower case) that prove the variant is active; the
            harness checks them on one request before measuring.
        refuses: every request after the first is refused (429): a flood, measured by what
            each refusal costs. Its non-2xx answers are the point, not errors.
        baseline: served by the library of an earlier commit (``--baseline REF``: its
            ``src/`` first on the server's path), to measure a change in the same run; left out
            without ``--baseline``.
    """

    description: str
    factory: AppFactory
    group: str
    needs_redis: bool = False
    expect_headers: tuple[str, ...] = ()
    refuses: bool = False
    baseline: bool = False

    def build(self, env: BenchEnv) -> ASGIApp:
        factory = self.factory
        if isinstance(factory, str):
            module_name, _, attr = factory.partition(":")
            factory = getattr(importlib.import_module(module_name), attr)
        return factory(env)


def tiny_app(before_routes: Callable[[FastAPI], object] | None = None) -> FastAPI:
    """Bare FastAPI with the one tiny JSON route; every variant starts from this.

    ``before_routes`` set-up runs before the route is defined, as the README's ``install()``
    does: what it adds to the app's routes is met first by every request.
    """
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    if before_routes is not None:
        before_routes(app)

    # ``response_model=None``: no response validation, so a middleware's cost is not hidden
    # behind a heavier route.
    @app.get(ROUTE, response_model=None)
    async def status() -> dict[str, str]:
        return {"status": "ok"}

    return app


# ---- foundation ------------------------------------------------------------------


def bare(env: BenchEnv) -> ASGIApp:
    return tiny_app()


class NoopASGIMiddleware:
    """The cheapest possible pure ASGI middleware: the floor for any middleware."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


class NoopBaseHTTPMiddleware(BaseHTTPMiddleware):
    """A ``BaseHTTPMiddleware`` that does nothing: what that base class costs by itself."""

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        return await call_next(request)


def noop_asgi(env: BenchEnv) -> ASGIApp:
    app = tiny_app()
    app.add_middleware(NoopASGIMiddleware)
    return app


#: The six header fields the full stack adds to a limited response, with values of the same size.
SIX_HEADERS = (
    (b"x-request-id", b"0123456789abcdef0123456789abcdef"),
    (b"ratelimit-policy", b'"anonymous";q=1000000000;w=3600'),
    (b"ratelimit", b'"anonymous";r=999999999;t=3600'),
    (b"x-ratelimit-limit", b"1000000000"),
    (b"x-ratelimit-remaining", b"999999999"),
    (b"x-ratelimit-reset", b"3600"),
)


class ConstantHeadersMiddleware:
    """Adds fixed header fields and nothing else: what the headers alone cost the server."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), *SIX_HEADERS]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def noop_headers(env: BenchEnv) -> ASGIApp:
    app = tiny_app()
    app.add_middleware(ConstantHeadersMiddleware)
    return app


#: A context variable no library reads: what setting one per request costs by itself.
_REQUEST_VAR: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "bench_request_var", default=None
)


class ContextVarMiddleware:
    """Sets (and resets) a context variable per request and nothing else.

    Every correlation-ID middleware does this so that routes, tasks and log records see the ID.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        token = _REQUEST_VAR.set("id")
        try:
            await self.app(scope, receive, send)
        finally:
            _REQUEST_VAR.reset(token)


def noop_contextvar(env: BenchEnv) -> ASGIApp:
    app = tiny_app()
    app.add_middleware(ContextVarMiddleware)
    return app


def noop_basehttp(env: BenchEnv) -> ASGIApp:
    app = tiny_app()
    app.add_middleware(NoopBaseHTTPMiddleware)
    return app


def resilience_errors_ids(env: BenchEnv) -> ASGIApp:
    from fastapi_resilience import CorrelationIdMiddleware, install_exception_handlers

    app = tiny_app()
    app.add_middleware(CorrelationIdMiddleware)
    install_exception_handlers(app)
    return app


def asgi_correlation_id(env: BenchEnv) -> ASGIApp:
    from asgi_correlation_id import CorrelationIdMiddleware

    app = tiny_app()
    app.add_middleware(CorrelationIdMiddleware)
    return app


# ---- rate limiting: the slowapi peers --------------------------------------------


def _slowapi_app(
    *,
    storage_uri: str,
    headers_enabled: bool = False,
    asgi_middleware: bool = False,
    limit: str = HUGE_LIMIT,
) -> ASGIApp:
    from slowapi import Limiter, _rate_limit_exceeded_handler
    from slowapi.errors import RateLimitExceeded
    from slowapi.middleware import SlowAPIASGIMiddleware, SlowAPIMiddleware
    from slowapi.util import get_remote_address

    app = tiny_app()
    app.state.limiter = Limiter(
        key_func=get_remote_address,
        default_limits=[limit],
        storage_uri=storage_uri,
        headers_enabled=headers_enabled,
    )
    app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)  # type: ignore[arg-type]
    app.add_middleware(SlowAPIASGIMiddleware if asgi_middleware else SlowAPIMiddleware)
    return app


def slowapi_memory(env: BenchEnv) -> ASGIApp:
    return _slowapi_app(storage_uri="memory://")


def slowapi_memory_asgi(env: BenchEnv) -> ASGIApp:
    return _slowapi_app(storage_uri="memory://", asgi_middleware=True)


def slowapi_redis(env: BenchEnv) -> ASGIApp:
    return _slowapi_app(storage_uri=env.require_redis())


def slowapi_redis_headers(env: BenchEnv) -> ASGIApp:
    return _slowapi_app(storage_uri=env.require_redis(), headers_enabled=True)


def _resilience_full(storage: str, *, headers: bool = True, metrics: bool = True) -> ASGIApp:
    from fastapi_resilience import ResilienceSettings, install

    settings = ResilienceSettings(
        rate_limit_storage=storage,
        rate_limit_tiers={"anonymous": HUGE_LIMIT},
        rate_limit_headers_enabled=headers,
        metrics_enabled=metrics,
    )
    # Before the route, as the README writes it: its health and metrics routes come first.
    return tiny_app(lambda app: install(app, settings))


def resilience_full_memory(env: BenchEnv) -> ASGIApp:
    return _resilience_full("memory://")


def resilience_full_memory_no_metrics(env: BenchEnv) -> ASGIApp:
    return _resilience_full("memory://", metrics=False)


def resilience_full_memory_no_headers(env: BenchEnv) -> ASGIApp:
    return _resilience_full("memory://", headers=False)


def resilience_full_redis(env: BenchEnv) -> ASGIApp:
    return _resilience_full(env.require_redis())


class FloorLimiterStep:
    """The least any limiter with the contract's headers can do per request: a reference.

    One fixed-window counter per client address in a dict, the five rate-limit header fields
    formatted from it when the response starts, as a step of ``install()``'s pipeline. None of
    the library's work besides: no tiers or API keys, no route limits, no sliding window, no
    refusals, no bound on memory, no shadow mode, no storage guard.
    """

    websocket = False

    def __init__(self, *, amount: int = 1_000_000_000, period: int = 3600) -> None:
        self.amount = amount
        self.period = period
        self.counts: dict[str, list[float]] = {}
        self.policy = b'"anonymous";q=%d;w=%d' % (amount, period)
        self.amount_bytes = b"%d" % amount

    def enter(self, state: Any) -> None:
        client = state.scope.get("client")
        address = client[0] if client else "-"
        now = time.monotonic()
        window = self.counts.get(address)
        if window is None or window[0] <= now:
            window = self.counts[address] = [now + self.period, 0]
        window[1] += 1
        left, reset = self.amount - int(window[1]), math.ceil(window[0] - now)
        state.fields.append(
            [
                (b"ratelimit-policy", self.policy),
                (b"ratelimit", b'"anonymous";r=%d;t=%d' % (left, reset)),
                (b"x-ratelimit-limit", self.amount_bytes),
                (b"x-ratelimit-remaining", b"%d" % left),
                (b"x-ratelimit-reset", b"%d" % reset),
            ]
        )


def floor_limiter(env: BenchEnv) -> ASGIApp:
    from fastapi_resilience import ResilienceSettings, install

    def setup(app: FastAPI) -> None:
        # install() without its limiter (IDs, errors, health), the floor a step of its layer.
        install(app, ResilienceSettings(rate_limit_enabled=False))
        layer = app.user_middleware[0]
        steps = layer.kwargs["steps"]
        steps.insert(1, FloorLimiterStep())

    return tiny_app(setup)


def refused_memory(env: BenchEnv) -> ASGIApp:
    from fastapi_resilience import ResilienceSettings, install

    settings = ResilienceSettings(rate_limit_tiers={"anonymous": "1/hour"})
    return tiny_app(lambda app: install(app, settings))


def slowapi_refused_memory(env: BenchEnv) -> ASGIApp:
    return _slowapi_app(
        storage_uri="memory://", headers_enabled=True, asgi_middleware=True, limit="1/hour"
    )


#: Every variant, by name. ``bare`` is always measured: ratios are to it, in the same run.
VARIANTS: dict[str, HttpVariant] = {
    # ---- foundation
    "bare": HttpVariant("FastAPI, nothing added", bare, "foundation"),
    "noop_asgi": HttpVariant("a no-op pure ASGI middleware (reference)", noop_asgi, "foundation"),
    "noop_headers": HttpVariant(
        "a pure ASGI middleware adding the six header fields of the full stack, fixed (reference)",
        noop_headers,
        "foundation",
        expect_headers=("x-request-id", "ratelimit-policy"),
    ),
    "noop_contextvar": HttpVariant(
        "a pure ASGI middleware that only sets a context variable per request (reference)",
        noop_contextvar,
        "foundation",
    ),
    "noop_basehttp": HttpVariant(
        "a no-op `BaseHTTPMiddleware` (reference)", noop_basehttp, "foundation"
    ),
    "resilience_errors_ids": HttpVariant(
        "fastapi-resilience `CorrelationIdMiddleware` + `install_exception_handlers`",
        resilience_errors_ids,
        "foundation",
        expect_headers=("x-request-id",),
    ),
    "asgi_correlation_id": HttpVariant(
        "asgi-correlation-id `CorrelationIdMiddleware` (peer)",
        asgi_correlation_id,
        "foundation",
        expect_headers=("x-request-id",),
    ),
    # ---- rate limiting: this library's variants go here, next to the peers.
    "resilience_full_memory": HttpVariant(
        "fastapi-resilience `install()`: IDs, errors, rate limit (memory), headers on, metrics on",
        resilience_full_memory,
        "rate_limit",
        expect_headers=("x-request-id", "x-ratelimit-limit", "ratelimit-policy"),
    ),
    "resilience_full_memory_before": HttpVariant(
        "`resilience_full_memory` as the commit given by `--baseline` builds it (reference)",
        resilience_full_memory,
        "rate_limit",
        expect_headers=("x-request-id", "x-ratelimit-limit", "ratelimit-policy"),
        baseline=True,
    ),
    "resilience_full_memory_no_metrics": HttpVariant(
        "fastapi-resilience `install()` as above, metrics off: no request timing (reference)",
        resilience_full_memory_no_metrics,
        "rate_limit",
        expect_headers=("x-request-id", "x-ratelimit-limit", "ratelimit-policy"),
    ),
    "resilience_full_memory_no_headers": HttpVariant(
        "fastapi-resilience `install()` as above, rate-limit headers off (reference)",
        resilience_full_memory_no_headers,
        "rate_limit",
        expect_headers=("x-request-id",),
    ),
    "floor_limiter": HttpVariant(
        "`install()` without its limiter, plus a minimal limiter adding the five rate-limit "
        "fields: one fixed-window count per address, nothing else (reference)",
        floor_limiter,
        "rate_limit",
        expect_headers=("x-request-id", "ratelimit-policy"),
    ),
    "resilience_full_redis": HttpVariant(
        "fastapi-resilience `install()`: IDs, errors, rate limit (Redis), headers on",
        resilience_full_redis,
        "rate_limit",
        needs_redis=True,
        expect_headers=("x-request-id", "x-ratelimit-limit", "ratelimit-policy"),
    ),
    "slowapi_memory": HttpVariant(
        "slowapi, memory storage, `SlowAPIMiddleware` (peer)", slowapi_memory, "rate_limit"
    ),
    "slowapi_memory_asgi": HttpVariant(
        "slowapi, memory storage, `SlowAPIASGIMiddleware` (peer)",
        slowapi_memory_asgi,
        "rate_limit",
    ),
    "slowapi_redis": HttpVariant(
        "slowapi, Redis storage, `SlowAPIMiddleware` (peer)",
        slowapi_redis,
        "rate_limit",
        needs_redis=True,
    ),
    "slowapi_redis_headers": HttpVariant(
        "slowapi, Redis storage, headers on, `SlowAPIMiddleware` (peer)",
        slowapi_redis_headers,
        "rate_limit",
        needs_redis=True,
        expect_headers=("x-ratelimit-limit", "x-ratelimit-remaining"),
    ),
    # ---- a flood: every request after the first refused (what a refusal costs)
    "refused_memory": HttpVariant(
        "fastapi-resilience `install()`, memory storage, a limit of 1/hour: every request "
        "after the first answered 429 problem+json with its headers",
        refused_memory,
        "flood",
        expect_headers=("x-request-id", "ratelimit-policy"),
        refuses=True,
    ),
    "slowapi_refused_memory": HttpVariant(
        "slowapi, memory storage, headers on, `SlowAPIASGIMiddleware`, a limit of 1/hour: "
        "every request after the first answered 429 (peer)",
        slowapi_refused_memory,
        "flood",
        expect_headers=("x-ratelimit-limit",),
        refuses=True,
    ),
    # ---- further groups (degraded mode, admin, ...) add a section here.
}

#: The order in which group tables are written; unknown groups follow, sorted.
GROUP_TITLES: dict[str, str] = {
    "foundation": "Correlation IDs and error handling",
    "rate_limit": "Rate limiting",
    "flood": "Under a flood: every request refused (ratios to bare FastAPI serving 200)",
}


def create_app() -> ASGIApp:
    """The uvicorn factory: the app of the variant named by ``BENCH_VARIANT``."""
    threshold = os.environ.get(GC_THRESHOLD_ENV)
    if threshold:
        # An experiment, not a default: every server of the run gets the same gen-0 threshold.
        gc.set_threshold(int(threshold))
    name = os.environ.get(VARIANT_ENV, "bare")
    try:
        variant = VARIANTS[name]
    except KeyError:
        raise RuntimeError(
            f"{VARIANT_ENV}={name!r}: no such variant ({sorted(VARIANTS)})"
        ) from None
    return variant.build(BenchEnv(redis_url=os.environ.get(REDIS_URL_ENV) or None))
