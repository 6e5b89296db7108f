"""Per-route limits: ``Depends(rate_limit("5/minute"))``, and how the middleware finds them.

The middleware must know a route's limits *before* the route runs, to check them together with
the tier's in one atomic storage call (ADR 0013). So at its first request it walks the app's
routes once and keeps the few that carry a ``rate_limit(...)`` dependency; per request it tries
only those. The dependency, behind the middleware, finds its limits already enforced and does
nothing; without the middleware (or on a route the middleware cannot see, such as one inside a
mounted sub-app) it checks its own limits itself.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match
from starlette.types import Scope

from fastapi_resilience._asgi.app_state import resilience_of
from fastapi_resilience._asgi.paths import app_path, mount_prefix, route_path
from fastapi_resilience._asgi.pipeline import UNLIMITED, state_of
from fastapi_resilience._asgi.routes import dependency_calls, flat_routes
from fastapi_resilience._limits import Limit, parse_limits
from fastapi_resilience._tally import RATE_LIMIT_DECISIONS
from fastapi_resilience.exceptions import (
    ConfigurationError,
    RateLimitedError,
    ServiceUnavailableError,
)
from fastapi_resilience.ratelimit._headers import HeaderPlan, PolicyHeader
from fastapi_resilience.ratelimit._limiter import LimitOutcome, RateLimiter, RoutePlan
from fastapi_resilience.ratelimit._storage import StorageUnavailableError

__all__ = [
    "RateLimit",
    "RouteLimitOutcome",
    "RouteLimitRefused",
    "RouteLimitUnavailable",
    "RouteTable",
    "rate_limit",
    "route_plan",
]


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
        self._plans: dict[tuple[int, str], tuple[object, RoutePlan]] = {}

    def __repr__(self) -> str:
        spec = "; ".join(str(limit) for limit in self.limits)
        return f"rate_limit({spec!r}, cost={self.cost}, shadow={self.shadow})"

    async def __call__(self, request: Request, response: Response) -> None:
        scope = request.scope
        state = state_of(scope)
        if state is not None and state.limit is UNLIMITED:
            return  # the middleware let this request pass unlimited (an exempt path)
        outcome: Any = state.limit if state is not None else _checked_here(request)
        if outcome is not None and self in outcome.route_sources:
            return  # its limits were checked: by the middleware with the tier's, or by another
        if not self.limits:
            return  # a cost only: it applies where the middleware sees the route
        limiter = outcome.limiter if outcome is not None else _limiter_of(request)
        if limiter is None:
            return  # rate limiting is disabled for this app
        identity = outcome.identity if outcome is not None else await limiter.resolver(scope)
        if identity is None:
            return
        own = await _check_route_only(limiter, scope, identity, self._plan_for(scope, limiter))
        if own.decision is None:
            return  # the storage did not answer and the limiter fails open
        # The route's limits replace the decision: one set of fields for the tier and the route.
        decided = RouteLimitOutcome(outcome, own)
        fields = state.limit_fields if state is not None else None
        if state is not None:
            state.limit = decided
        else:
            request.state.fastapi_resilience_route_limit = decided
        if state is None:
            # No rate-limit step counts this request's decision: counted here, per limit.
            decision = "refused" if own.refused else "admitted"
            RATE_LIMIT_DECISIONS.add((own.plan.tier, decision))
        if own.refused:
            if fields is not None:
                fields.clear()  # the refusal carries its own fields
            _, problem = own.problem()
            # As the rate-limit step reports its refusals: per request, so DEBUG.
            limiter.events.emit(
                "rate_limit.refused",
                own.plan.tier,
                level=logging.DEBUG,
                policies=",".join(problem["extensions"]["violated-policies"]),
            )
            raise RouteLimitRefused(
                problem["detail"], extensions=problem["extensions"], headers=problem["headers"]
            )
        if fields is not None:
            fields[:] = decided.headers()  # the decision's fields, replaced
        else:
            # No rate-limit step adds fields to this response: the route's response has them.
            for name, value in decided.headers():
                response.headers[name.decode("latin-1")] = value.decode("latin-1")

    def _plan_for(self, scope: Scope, limiter: RateLimiter) -> RoutePlan:
        """The plan of every ``rate_limit`` of the matched route, keyed by its full template.

        All of the route's limits are checked together, once, whichever of its dependencies
        runs first: the same limit declared on a router and on the route counts once.
        """
        route = scope.get("route")
        # The mounts in front of the route, as templates: ``/tenants/{tenant}``, whatever the
        # tenant, so that a client cannot change a path segment for a fresh budget.
        prefix = limiter.mounts.template(mount_prefix(scope))
        # By the route's id (routes do not hash), with the route kept to tell a reused id.
        cache_key = (id(route), prefix if route is not None else route_path(scope))
        cached = self._plans.get(cache_key)
        if cached is not None and cached[0] is route:
            return cached[1]
        if len(self._plans) >= 1024:  # raw paths if no route is known: keep it bounded
            self._plans.clear()
        plan = route_plan(route, prefix) if route is not None else None
        if plan is None or self not in plan.sources:
            # No route (a call outside routing) or one that does not declare this dependency
            # (awaited by another dependency): this dependency's limits alone, by template.
            template = getattr(route, "path_format", None) if route is not None else None
            plan = _plan_of([self], prefix + template if template else app_path(scope))
        self._plans[cache_key] = (route, plan)
        limiter.learn_route(plan)  # once per plan built, for the admin API
        return plan


class _AlsoHTTPException(HTTPException):
    """Starlette's ``HTTPException`` as a second base of an ``AppError``.

    ``AppError`` keeps ``status_code``, ``detail`` and ``headers`` as ``HTTPException`` names
    them; this base only takes ``AppError``'s cooperative ``super().__init__(detail)`` call,
    which ``HTTPException.__init__`` would read as a status code.
    """

    def __init__(self, *args: object) -> None:
        Exception.__init__(self, *args)


class RouteLimitRefused(RateLimitedError, _AlsoHTTPException):  # type: ignore[misc]
    """A route limit's refusal: a ``RateLimitedError`` that is also Starlette's ``HTTPException``.

    Where the library's handlers are installed it is rendered as problem+json like any
    ``AppError`` (``AppError`` comes first in its method resolution order). In an app without
    them (``Depends(rate_limit(...))`` alone) the app's own ``HTTPException`` handler answers
    it: a 429 with ``Retry-After`` in the app's own error format, never a 500.
    """

    __str__ = RateLimitedError.__str__
    __repr__ = RateLimitedError.__repr__


class RouteLimitUnavailable(ServiceUnavailableError, _AlsoHTTPException):  # type: ignore[misc]
    """The fail-closed 503 of a route limit whose storage is down; answered like
    :class:`RouteLimitRefused` in an app without the library's handlers."""

    __str__ = ServiceUnavailableError.__str__
    __repr__ = ServiceUnavailableError.__repr__


def _checked_here(request: Request) -> Any:
    """The route limits a ``rate_limit`` of this request checked, where no pipeline runs."""
    return getattr(request.state, "fastapi_resilience_route_limit", None)


class RouteLimitOutcome:
    """The decision of a request whose route limits were checked apart from its tier (by the
    route's dependencies): every outcome that counted it, the tier's first when a middleware
    counted one, then one per ``rate_limit`` dependency in the order they were awaited."""

    __slots__ = ("parts",)

    parts: tuple[LimitOutcome, ...]

    def __init__(self, earlier: LimitOutcome | RouteLimitOutcome | None, route: LimitOutcome):
        if isinstance(earlier, RouteLimitOutcome):
            before: tuple[LimitOutcome, ...] = earlier.parts
        else:
            before = (earlier,) if earlier is not None else ()
        self.parts = (*before, route)

    @property
    def route(self) -> LimitOutcome:
        """The outcome of the dependency checked last."""
        return self.parts[-1]

    @property
    def limiter(self) -> RateLimiter:
        return self.route.limiter

    @property
    def identity(self) -> Any:
        return self.route.identity

    @property
    def plan(self) -> Any:
        return self.route.plan

    @property
    def route_sources(self) -> frozenset[object]:
        return frozenset().union(*(part.route_sources for part in self.parts))

    def headers(self) -> list[tuple[bytes, bytes]]:
        """Every policy in the IETF fields, the tightest in ``X-RateLimit-*``."""
        own = self.route
        decided = [(part, part.decision) for part in self.parts if part.decision is not None]
        if len(decided) < 2 or own.decision is None or not own.limiter.headers_enabled:
            return own.headers()
        plan = HeaderPlan.build(
            _distinct([policy for part, _ in decided for policy in part.plan.header.policies])
        )
        states = [state for _, decision in decided if decision for state in decision.states]
        return plan.headers([s.remaining for s in states], [s.reset_after for s in states])


def _distinct(policies: list[PolicyHeader]) -> list[PolicyHeader]:
    """``policies`` with names that say which is which: two dependencies on one route name
    their limits after the route, so a repeated name gets its limit appended
    (``/search``, ``/search-2/minute``)."""
    seen: set[str] = set()
    out = []
    for policy in policies:
        if policy.name in seen:
            policy = PolicyHeader.build(f"{policy.name}-{policy.limit.policy_name}", policy.limit)
        seen.add(policy.name)
        out.append(policy)
    return out


async def _check_route_only(
    limiter: RateLimiter, scope: Scope, identity: Any, plan: RoutePlan
) -> LimitOutcome:
    # Outside the middleware's view only the route's own limits are checked here: the tier was
    # counted by the middleware already, or there is none.
    try:
        return await limiter.check(scope, identity, plan, with_tier=False)
    except StorageUnavailableError as exc:
        problem = limiter.unavailable_problem(scope, identity, plan, exc)
        raise RouteLimitUnavailable(
            str(problem["detail"]), extensions=problem["extensions"], headers=problem["headers"]
        ) from None


def _limiter_of(request: Request) -> RateLimiter | None:
    resilience = resilience_of(request.app)
    if resilience is not None:
        return getattr(resilience, "rate_limiter", None)
    from fastapi_resilience.ratelimit._setup import standalone_limiter

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


def route_plan(route: Any, prefix: str = "") -> RoutePlan | None:
    """The plan of ``route``'s ``rate_limit`` dependencies, ``None`` when it has none.

    ``prefix``: the mounts' prefix in front of the route's template (``mount_prefix``).
    """
    found = list(dict.fromkeys(_rate_limits_of(getattr(route, "dependant", None))))
    if not found:
        return None
    path = str(getattr(route, "path_format", None) or getattr(route, "path", ""))
    return _plan_of(found, prefix + path)


def _plan_of(found: Sequence[RateLimit], path: str) -> RoutePlan:
    # The same limit declared twice (on a router and on its route, say) is one constraint:
    # counted once, and enforced unless every declaration of it is a shadow.
    limits: dict[Limit, bool] = {}
    for dep in found:
        for limit in dep.limits:
            limits[limit] = limits.get(limit, True) and dep.shadow
    return RoutePlan(path, tuple(limits.items()), max(dep.cost for dep in found), frozenset(found))


def _literal_prefix(route: Any) -> str:
    """The text every path the route matches starts with ("" when it cannot tell)."""
    path_format = getattr(route, "path_format", None)
    if not isinstance(path_format, str) or not isinstance(
        getattr(route, "path_regex", None), re.Pattern
    ):
        return ""
    return path_format.split("{", 1)[0]


# Read once: ``Match.FULL`` goes through ``EnumType.__getattr__`` in Python 3.11 (ADR 0045), and
# ``match`` reads it for every limited route on every request.
_FULL = Match.FULL


class RouteTable:
    """The app's routes that carry ``rate_limit(...)``, in routing order, and a matcher."""

    __slots__ = ("_limited", "_routes")

    def __init__(self, routes: Sequence[Any], prefix: str = "") -> None:
        self._routes = list(routes)
        self._limited: list[tuple[str, int, Any, RoutePlan]] = []
        for index, route in enumerate(self._routes):
            plan = route_plan(route, prefix)
            if plan is not None:
                self._limited.append((_literal_prefix(route), index, route, plan))

    @classmethod
    def for_app(cls, app: Any, prefix: str = "") -> RouteTable | None:
        """The table of ``app`` (a Starlette/FastAPI app), or ``None`` when no route is limited.

        ``prefix``: where ``app`` is mounted (``/v2``), so its routes' budgets are keyed by
        their full template and never shared with the parent's routes of the same path.
        """
        routes = getattr(getattr(app, "router", None), "routes", None)
        if not routes:
            return None
        table = cls(flat_routes(routes), prefix)
        return table if table._limited else None

    def __bool__(self) -> bool:
        return bool(self._limited)

    def plans(self) -> list[RoutePlan]:
        """The plan of each limited route, in routing order."""
        return [plan for _, _, _, plan in self._limited]

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
