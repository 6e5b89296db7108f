"""``RateLimitMiddleware``: tiered rate limiting as pure ASGI, one storage call per request."""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fastapi_resilience._clock import SYSTEM_CLOCK, Clock
from fastapi_resilience._correlation import RESPONSE_HEADERS_KEY
from fastapi_resilience._events import EventBus
from fastapi_resilience._problem import problem_response
from fastapi_resilience._rate_limit_core import RateLimitStorage, StorageUnavailableError
from fastapi_resilience._rate_limit_identity import (
    DefaultIdentityResolver,
    Identity,
    IdentityResolver,
)
from fastapi_resilience._rate_limiter import (
    EXEMPT_KEY,
    OWN_HEADERS_KEY,
    SCOPE_KEY,
    RateLimiter,
    RoutePlan,
)
from fastapi_resilience._request_path import route_path

__all__ = ["RateLimitMiddleware"]

#: What ``admit`` found for a request it did not admit (its identity and route), for
#: ``__call__`` to take over instead of finding it again; removed by ``__call__`` at once.
_FOUND_KEY = "fastapi_resilience.rate_limit_found"


class RateLimitMiddleware:
    """Counts every HTTP request against its identity's tier, and its route's own limits.

    Per request: exempt paths pass untouched (no storage call, so they never wait on a stalled
    Redis); the identity and tier are resolved; the route's ``rate_limit(...)`` limits are found
    (ADR 0013); and all of them are checked and counted in one storage call, so a request refused
    by one limit uses nothing of the others. A refused request gets 429 problem+json with
    ``Retry-After``; an admitted one runs, and its response carries the rate-limit headers (added
    to ``http.response.start`` only: streaming bodies pass untouched). When the storage is down,
    ``fail_open`` lets requests through, otherwise they get 503 with ``Retry-After``. Non-HTTP
    scopes pass through.

    Place it inside ``CorrelationIdMiddleware`` (``install`` does), so that its 429 and 503
    answers carry the correlation ID.

    Args:
        app: the ASGI app to wrap.
        limiter: the :class:`RateLimiter` to use; built from ``settings`` when not given.
        settings: a ``ResilienceSettings``; ``ResilienceSettings()`` (the environment) when
            neither this nor ``limiter`` is given.
        storage: overrides the storage the settings name.
        resolver: overrides the built-in identity resolver.
        events: the event bus for storage state changes and shadow refusals.
        clock: the clock of the storage and its breaker.

    .. versionadded:: 0.1.0
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        limiter: RateLimiter | None = None,
        settings: Any = None,
        storage: RateLimitStorage | None = None,
        resolver: IdentityResolver | None = None,
        events: EventBus | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.app = app
        self._owns_limiter = limiter is None
        if limiter is None:
            from fastapi_resilience._rate_limit_setup import limiter_from_settings

            limiter = limiter_from_settings(
                settings, storage=storage, resolver=resolver, events=events, clock=clock
            )
        self.limiter = limiter
        self._routes: Any = None
        self._routes_app: Any = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan" and self._owns_limiter:
                await self.app(scope, receive, self._closing_send(send))
                return
            await self.app(scope, receive, send)
            return
        limiter = self.limiter
        found: tuple[Identity, RoutePlan | None] | None = scope.pop(_FOUND_KEY, None)
        if found is not None:
            # ``admit`` resolved this request and its lean path did not admit it (a refusal,
            # mostly: under a flood, most requests): the general path takes over from there.
            identity, route = found
            outcome = limiter.check_local(scope, identity, route, lean_tried=True)
        else:
            # The app's own path: behind a prefix (``--root-path``) exempt paths and route
            # limits are the app's paths, the prefix taken off as Starlette's routing does.
            if SCOPE_KEY in scope or EXEMPT_KEY in scope:
                # The limiter of an app this one is mounted in has judged the request: one
                # limiter counts it, and its answer has one set of headers (ADR 0052).
                await self.app(scope, receive, send)
                return
            path = route_path(scope) if scope.get("root_path") else scope["path"]
            if limiter.is_exempt(path):
                await self._unlimited(scope, receive, send)
                return
            resolver = limiter.resolver
            # The built-in resolver never waits: call it without a coroutine (every request).
            maybe = (
                resolver.resolve(scope)
                if type(resolver) is DefaultIdentityResolver
                else await resolver(scope)
            )
            if maybe is None:
                await self._unlimited(scope, receive, send)
                return
            identity = maybe
            # The route table is rebuilt only when the app changes (first request, mounted
            # apps).
            table = self._routes if scope.get("app") is self._routes_app else self._table_for(scope)
            route = table.match(scope, path) if table is not None else None
            # ``limiter.check`` in two steps: the in-process storage answers without a
            # coroutine.
            outcome = limiter.check_local(scope, identity, route)
        if outcome is None:
            try:
                outcome = await limiter.check_storage(scope, identity, route)
            except StorageUnavailableError as exc:
                problem = limiter.unavailable_problem(scope, identity, route, exc)
                await self._answer(scope, receive, send, 503, problem)
                return
        scope[SCOPE_KEY] = outcome
        # An idle keep-alive connection keeps its last request's scope until the next request
        # arrives: nothing of this request should stay reachable from it (ADR 0044).
        try:
            # ``admitted``: the common case, known to be let through without a ``Decision``.
            if outcome.admitted is None and outcome.refused and not limiter.shadow:
                status, problem = outcome.problem(raw_headers=True)
                limiter.events.emit(
                    "rate_limit.refused",
                    outcome.plan.tier,
                    level=logging.DEBUG,
                    policies=",".join(problem["extensions"]["violated-policies"]),
                )
                await self._answer(scope, receive, send, status, problem)
                return
            extra = outcome.headers()
            if not extra:
                await self.app(scope, receive, send)
                return
            shared: list[tuple[bytes, bytes]] | None = scope.get(RESPONSE_HEADERS_KEY)
            if shared is not None:
                # Inside CorrelationIdMiddleware: its one ``send`` wrapper adds these too.
                shared += extra
                await self.app(scope, receive, send)
            else:
                await self.app(scope, receive, self._send_with(scope, send, extra))
        finally:
            # ``pop``: a rate limiter of an app mounted inside may have removed it.
            scope.pop(SCOPE_KEY, None)

    @staticmethod
    def _send_with(scope: Scope, send: Send, extra: list[tuple[bytes, bytes]]) -> Send:
        # Not a closure in ``__call__``: that would turn its variables into cells on every
        # request, this wrapper or not.
        def send_with_headers(message: Message) -> Awaitable[None]:
            # A route limit the middleware could not see set its own headers: keep one set.
            if message["type"] == "http.response.start" and OWN_HEADERS_KEY not in scope:
                message["headers"] = [*message.get("headers", ()), *extra]
            return send(message)  # awaited by the caller: no coroutine of our own per message

        return send_with_headers

    def admit(self, scope: Scope) -> bool:
        """``__call__``'s common case without its coroutine, for ``CorrelationIdMiddleware``.

        For an HTTP request inside ``CorrelationIdMiddleware(rate_limiter=...)`` (``install``
        builds that): when the in-process storage admits it on its lean path (the built-in
        resolver, one enforced limit), its rate-limit headers go into the correlation
        middleware's list and its outcome into the scope, and ``True`` is returned: the caller
        runs ``self.app`` and deletes ``scope[SCOPE_KEY]`` when it is done. Otherwise nothing
        is counted and ``False``: the caller runs this middleware as usual, which takes over
        the identity and route found here when there are some (a private scope key it removes).
        """
        limiter = self.limiter
        resolver = limiter.resolver
        # ``_memory``: read directly, a property would cost a call on every request. A request
        # a limiter outside this one has judged goes to ``__call__``, which steps aside.
        if (
            limiter._memory is None
            or type(resolver) is not DefaultIdentityResolver
            or SCOPE_KEY in scope
            or EXEMPT_KEY in scope
        ):
            return False
        path = route_path(scope) if scope.get("root_path") else scope["path"]
        # ``limiter.is_exempt``, inlined: this is the path of every request under ``install``.
        if path in limiter.exempt_paths or (
            limiter.exempt_prefixes and path.startswith(limiter.exempt_prefixes)
        ):
            return False
        identity = resolver.resolve(scope)
        table = self._routes if scope.get("app") is self._routes_app else self._table_for(scope)
        route: RoutePlan | None = table.match(scope, path) if table is not None else None
        if route is None:
            # Most requests: their tier's limit alone, counted and formatted in one call.
            if limiter.admit_tier(scope, identity, scope[RESPONSE_HEADERS_KEY]):
                return True
        else:
            outcome = limiter.admit_local(identity, route)
            if outcome is not None:
                scope[RESPONSE_HEADERS_KEY] += outcome.headers()
                scope[SCOPE_KEY] = outcome
                return True
        # Not admitted here: ``__call__``, which the caller runs next, takes these over.
        scope[_FOUND_KEY] = (identity, route)
        return False

    def _table_for(self, scope: Scope) -> Any:
        from fastapi_resilience._rate_limit_routes import RouteTable

        app = scope.get("app")
        table = RouteTable.for_app(app)
        # ``None`` when no route is limited: one test less on every request.
        self._routes = table if table else None
        self._routes_app = app
        return self._routes

    async def _unlimited(self, scope: Scope, receive: Receive, send: Send) -> None:
        # A route's own ``rate_limit`` must not count what this middleware lets pass unlimited.
        scope[EXEMPT_KEY] = True
        try:
            await self.app(scope, receive, send)
        finally:
            scope.pop(EXEMPT_KEY, None)

    async def _answer(
        self, scope: Scope, receive: Receive, send: Send, status: int, problem: dict[str, Any]
    ) -> None:
        response = problem_response(scope, status=status, **problem)
        await response(scope, receive, send)

    def _closing_send(self, send: Send) -> Send:
        # The middleware built this limiter, so it closes its storage when the app shuts down.
        async def closing_send(message: Message) -> None:
            if message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                await self.limiter.aclose()
            await send(message)

        return closing_send
