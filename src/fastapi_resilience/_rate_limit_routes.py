"""Per-route limits: ``Depends(rate_limit("5/minute"))``, and how the middleware finds them.

The middleware must know a route's limits *before* the route runs, to check them together with
the tier's in one atomic storage call (ADR 0013). So at its first request it walks the app's
routes once and keeps the few that carry a ``rate_limit(...)`` dependency; per request it tries
only those. The dependency, behind the middleware, finds its limits already enforced and does
nothing; without the middleware (or on a route the middleware cannot see, such as one inside a
mounted sub-app) it checks its own limits itself.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match
from starlette.types import Scope

from fastapi_resilience._fixed_routes import route_path
from fastapi_resilience._limit_string import Limit, parse_limits
from fastapi_resilience._rate_limit_core import StorageUnavailableError
from fastapi_resilience._rate_limiter import (
    OWN_HEADERS_KEY,
    SCOPE_KEY,
    LimitOutcome,
    RateLimiter,
    RoutePlan,
    withdraw_middleware_headers,
)
from fastapi_resilience._route_walk import dependency_calls, flat_routes
from fastapi_resilience.exceptions import (
    ConfigurationError,
    RateLimitedError,
    ServiceUnavailableError,
)

__all__ = ["RateLimit", "RouteTable", "rate_limit"]


class RateLimit:
    """The dependency :func:`rate_limit` returns; one object per call, reusable on many routes."""

    def __init__(
        self, limits: str | Sequence[Limit] | None = None, *, cost: int = 1, shadow: bool = False
    ) -> None:
        if isinstance(cost, bool) or not isinstance(cost, int) or cost < 1:
            raise ConfigurationError(f"rate_limit(cost=...): must be an int >= 1, got {cost!r}")
        if limits is None:
            self.limits: tuple[Limit, ...] = ()
        elif isinstance(limits, str):
            self.limits = parse_limits(limits)
        else:
            self.limits = tuple(limits)
        self.cost = cost
        self.shadow = shadow
        self._plans: dict[str, RoutePlan] = {}

    def __repr__(self) -> str:
        spec = "; ".join(str(limit) for limit in self.limits)
        return f"rate_limit({spec!r}, cost={self.cost}, shadow={self.shadow})"

    async def __call__(self, request: Request, response: Response) -> None:
        scope = request.scope
        outcome: LimitOutcome | None = scope.get(SCOPE_KEY)
        if outcome is not None and self in outcome.route_sources:
            return  # the middleware checked this route's limits with the tier's
        if not self.limits:
            return  # a cost only: it applies where the middleware sees the route
        limiter = outcome.limiter if outcome is not None else _limiter_of(request)
        if limiter is None:
            return  # rate limiting is disabled for this app
        identity = outcome.identity if outcome is not None else await limiter.resolver(scope)
        if identity is None:
            return
        route = scope.get("route")
        path = getattr(route, "path_format", None) or getattr(route, "path", None) or scope["path"]
        plan = self._plans.get(path)
        if plan is None:
            if len(self._plans) >= 1024:  # raw paths if no route is known: keep it bounded
                self._plans.clear()
            plan = self._plans[path] = RoutePlan(
                path,
                tuple((limit, self.shadow) for limit in self.limits),
                self.cost,
                frozenset({self}),
            )
        own = await _check_route_only(limiter, scope, identity, plan)
        if own is None or own.decision is None:
            return
        scope[OWN_HEADERS_KEY] = True
        withdraw_middleware_headers(scope)
        if own.refused:
            _, problem = own.problem()
            raise RateLimitedError(
                problem["detail"], extensions=problem["extensions"], headers=problem["headers"]
            )
        for name, value in own.headers():
            response.headers[name.decode("latin-1")] = value.decode("latin-1")


async def _check_route_only(
    limiter: RateLimiter, scope: Scope, identity: Any, plan: RoutePlan
) -> LimitOutcome | None:
    # Outside the middleware's view only the route's own limits are checked here: the tier was
    # counted by the middleware already, or there is none.
    try:
        return await limiter.check(scope, identity, plan, with_tier=False)
    except StorageUnavailableError as exc:
        problem = limiter.unavailable_problem(scope, identity, plan, exc)
        raise ServiceUnavailableError(
            str(problem["detail"]), extensions=problem["extensions"], headers=problem["headers"]
        ) from None


def _limiter_of(request: Request) -> RateLimiter | None:
    resilience = getattr(request.app.state, "resilience", None)
    if resilience is not None:
        return getattr(resilience, "rate_limiter", None)
    from fastapi_resilience._rate_limit_setup import standalone_limiter

    return standalone_limiter()


def rate_limit(
    limits: str | Sequence[Limit] | None = None, *, cost: int = 1, shadow: bool = False
) -> RateLimit:
    """A dependency that adds a per-route limit on top of the caller's tier limit.

    ``Depends(rate_limit("5/minute"))`` limits each identity to 5 requests a minute on this
    route (keyed by the route's path template, not the raw URL), in addition to its tier's
    limit; the tightest limit decides the headers. Behind :class:`RateLimitMiddleware` the route's
    and the tier's limits are checked and counted in one atomic storage call, so a request the
    route limit refuses uses nothing of the tier's budget.

    Args:
        limits: one or more limits (``"5/minute; 100/day"``); ``None`` adds no limit, only a cost.
        cost: units the request uses, of this limit and of the tier's.
        shadow: report-only: count, set headers, emit ``rate_limit.shadow_refused``, never refuse.

    Raises:
        ConfigurationError: the limit string or the cost is invalid (at import time).

    .. versionadded:: 0.1.0
    """
    return RateLimit(limits, cost=cost, shadow=shadow)


def _rate_limits_of(dependant: Any) -> Iterator[RateLimit]:
    return (call for call in dependency_calls(dependant) if isinstance(call, RateLimit))


def _literal_prefix(route: Any) -> str:
    """The text every path the route matches starts with ("" when it cannot tell)."""
    path_format = getattr(route, "path_format", None)
    if not isinstance(path_format, str) or not isinstance(
        getattr(route, "path_regex", None), re.Pattern
    ):
        return ""
    return path_format.split("{", 1)[0]


# Read once: ``Match.FULL`` goes through ``EnumType.__getattr__`` in Python 3.11 (ADR 0046), and
# ``match`` reads it for every limited route on every request.
_FULL = Match.FULL


class RouteTable:
    """The app's routes that carry ``rate_limit(...)``, in routing order, and a matcher."""

    __slots__ = ("_limited", "_routes")

    def __init__(self, routes: Sequence[Any]) -> None:
        self._routes = list(routes)
        self._limited: list[tuple[str, int, Any, RoutePlan]] = []
        for index, route in enumerate(self._routes):
            found = list(dict.fromkeys(_rate_limits_of(getattr(route, "dependant", None))))
            if not found:
                continue
            limits = tuple((limit, dep.shadow) for dep in found for limit in dep.limits)
            path = str(getattr(route, "path_format", None) or getattr(route, "path", ""))
            plan = RoutePlan(path, limits, max(dep.cost for dep in found), frozenset(found))
            self._limited.append((_literal_prefix(route), index, route, plan))

    @classmethod
    def for_app(cls, app: Any) -> RouteTable | None:
        """The table of ``app`` (a Starlette/FastAPI app), or ``None`` when no route is limited."""
        routes = getattr(getattr(app, "router", None), "routes", None)
        if not routes:
            return None
        table = cls(flat_routes(routes))
        return table if table._limited else None

    def __bool__(self) -> bool:
        return bool(self._limited)

    def match(self, scope: Scope, path: str | None = None) -> RoutePlan | None:
        """The plan of the limited route that will handle ``scope``, if any.

        ``path``: ``route_path(scope)``, when the caller has it already.
        """
        if path is None:
            path = route_path(scope)
        for prefix, index, route, plan in self._limited:
            # A route's regex starts with its path's literal text, so a path without that
            # prefix cannot match: most requests skip every limited route's regex this way.
            if not path.startswith(prefix) or route.matches(scope)[0] is not _FULL:
                continue
            # The router takes the first full match: an earlier, unlimited route may win.
            for earlier in self._routes[:index]:
                if earlier.matches(scope)[0] is _FULL:
                    return None
            return plan
        return None
