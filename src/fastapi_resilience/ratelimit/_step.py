"""Tiered rate limiting in the request pipeline: ``RateLimitStep`` and ``RateLimitMiddleware``."""

from __future__ import annotations

import logging
from typing import Any

from starlette.types import Scope

from fastapi_resilience._asgi.pipeline import PENDING, UNLIMITED, Answer, RequestState
from fastapi_resilience._tally import RATE_LIMIT_DECISIONS
from fastapi_resilience.problems._render import problem_response
from fastapi_resilience.ratelimit._identity import (
    DefaultIdentityResolver,
)
from fastapi_resilience.ratelimit._limiter import LimitOutcome, RateLimiter, RoutePlan
from fastapi_resilience.ratelimit._routes import RouteTable
from fastapi_resilience.ratelimit._storage import StorageUnavailableError

__all__ = ["RateLimitStep"]


class RateLimitStep:
    """Counts every HTTP request against its identity's tier, and its route's own limits.

    Per request: exempt paths pass uncounted (no storage call, so they never wait on a stalled
    Redis); the identity and tier are resolved; the route's ``rate_limit(...)`` limits are found
    (ADR 0013); and all of them are checked and counted in one storage call, so a request refused
    by one limit uses nothing of the others. The in-process storage decides without awaiting.
    A refused request is answered 429 problem+json with ``Retry-After``; an admitted one gets the
    rate-limit fields when its response starts. When the storage is down, ``fail_open`` lets
    requests through, otherwise they get 503 with ``Retry-After``.

    A request a limiter outside this one has judged (an app with ``install()`` mounted in
    another) is left to it: one limiter per request, one set of fields (ADR 0052).
    """

    websocket = False

    def __init__(self, limiter: RateLimiter, *, close_limiter: bool = False) -> None:
        self.limiter = limiter
        #: Close the limiter's storage when the app shuts down (the step's middleware built it).
        self.close_limiter = close_limiter
        self._routes: Any = None
        self._routes_app: Any = None

    def enter(self, state: RequestState) -> Answer | None:
        if state.limit is not None:
            return None  # judged already, by a limiter outside this one
        limiter = self.limiter
        scope = state.scope
        path = state.path
        if limiter.is_exempt(path):
            state.limit = UNLIMITED
            return None
        resolver = limiter.resolver
        if type(resolver) is not DefaultIdentityResolver:
            return PENDING  # a custom resolver may await: ``decide``
        # The built-in resolver never waits: called without a coroutine (every request).
        identity = resolver.resolve(scope)
        if identity is None:
            state.limit = UNLIMITED  # the resolver leaves the request unlimited
            return None
        try:
            outcome = limiter.try_check(scope, identity, self._route(scope, path))
        except StorageUnavailableError:
            return PENDING  # ``decide`` asks again through ``check``, which fails open or not
        if outcome is None:
            return PENDING  # the storage must be awaited: ``decide``
        return self._decided(state, outcome)

    async def decide(self, state: RequestState) -> Answer | None:
        """The answer when ``enter`` could not decide without awaiting (a custom resolver, a
        shared storage)."""
        limiter = self.limiter
        scope = state.scope
        identity = await limiter.resolver(scope)
        if identity is None:
            state.limit = UNLIMITED
            return None
        route = self._route(scope, state.path)
        try:
            outcome = await limiter.check(scope, identity, route)
        except StorageUnavailableError as exc:
            problem = limiter.unavailable_problem(scope, identity, route, exc)
            return problem_response(scope, status=503, **problem)
        return self._decided(state, outcome)

    def _route(self, scope: Scope, path: str) -> RoutePlan | None:
        """The limits ``rate_limit(...)`` sets on the route ``path`` matches (ADR 0013)."""
        # The route table is rebuilt only when the app changes (first request, mounted apps).
        table = self._routes if scope.get("app") is self._routes_app else self._table_for(scope)
        return table.match(scope, path) if table is not None else None

    def _decided(self, state: RequestState, outcome: LimitOutcome) -> Answer | None:
        state.limit = outcome
        limiter = self.limiter
        if outcome.refused and not limiter.shadow:
            status, problem = outcome.problem(raw_headers=True)
            limiter.events.emit(
                "rate_limit.refused",
                outcome.plan.tier,
                level=logging.DEBUG,
                policies=",".join(problem["extensions"]["violated-policies"]),
            )
            # The answer carries the fields itself.
            return problem_response(state.scope, status=status, **problem)
        fields = state.limit_fields = outcome.headers()
        state.fields.append(fields)
        return None

    def leave(self, state: RequestState) -> None:
        """Count the request's final decision once: a route limit checked after this step
        may have refused what the tier admitted."""
        outcome = state.limit
        if outcome is None or outcome is UNLIMITED:
            return
        plan = outcome.plan
        if plan.limiter is not self.limiter:
            return  # another limiter decided (an outer one): it counts
        if type(outcome) is LimitOutcome:
            refused = outcome.refused
        else:  # route limits checked after the tier: refused if any of them refused
            refused = any(part.refused for part in outcome.parts)
        if refused and not self.limiter.shadow:
            RATE_LIMIT_DECISIONS.add((plan.tier, "refused"))
        else:
            RATE_LIMIT_DECISIONS.add(plan.admitted_labels)

    async def shutdown(self) -> None:
        if self.close_limiter:
            await self.limiter.aclose()

    def _table_for(self, scope: Scope) -> Any:
        app = scope.get("app")
        table = RouteTable.for_app(app)
        for plan in table.plans() if table is not None else ():
            self.limiter.learn_route(plan)  # for the admin API; only when the table is built
        # ``None`` when no route is limited: one test less on every request.
        self._routes = table if table else None
        self._routes_app = app
        return self._routes
