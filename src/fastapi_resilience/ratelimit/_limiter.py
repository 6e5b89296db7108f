"""``RateLimiter``: the tiers, identity, storage and headers of one app.

Framework-free. Everything that does not depend on the request is worked out once: each tier's
limits and header bytes, and each (tier, route) combination's plan. A request costs one identity
lookup, one storage call for all its limits, and formatting two numbers per policy.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from starlette.types import Scope

from fastapi_resilience._asgi.paths import MountTemplates
from fastapi_resilience._limits import Limit, parse_limits
from fastapi_resilience._tally import RATE_LIMIT_DECISIONS
from fastapi_resilience.events import EventBus
from fastapi_resilience.exceptions import (
    AppError,
    ConfigurationError,
    ServiceUnavailableError,
    retry_after_header,
)
from fastapi_resilience.ratelimit._headers import (
    QUOTA_EXCEEDED_TYPE,
    RETRY_AFTER,
    TEMPORARY_REDUCED_CAPACITY_TYPE,
    HeaderPlan,
    PolicyHeader,
)
from fastapi_resilience.ratelimit._identity import (
    DefaultIdentityResolver,
    Identity,
    IdentityResolver,
    normalize_address,
)
from fastapi_resilience.ratelimit._storage import (
    Decision,
    IdentityStateStorage,
    LimitCheck,
    LimitState,
    LocalStorage,
    RateLimitStorage,
    StorageUnavailableError,
    admitted_decision,
    supports_identity_state,
)

__all__ = ["IdentityStateUnsupportedError", "LimitOutcome", "RateLimiter", "RoutePlan"]

#: Bound on cached per-identity plans: a flood of identities cannot grow it without limit.
_PLAN_CACHE_SIZE = 10_000
#: Bound on the route templates the limiter remembers: a ``rate_limit`` awaited outside routing
#: is keyed by the raw path, which a client chooses.
_KNOWN_ROUTES_SIZE = 1024

_T = TypeVar("_T")


class IdentityStateUnsupportedError(AppError):
    """The rate-limit storage cannot show or reset one identity's counts (a custom storage
    without ``peek`` and ``reset``): 501 problem+json from the admin API."""

    status_code = 501
    code = "not_implemented"
    title = "Not Implemented"


@dataclass(frozen=True, slots=True, eq=False)
class RoutePlan:
    """The limits a route adds on top of the tier (from its ``rate_limit(...)`` dependencies).

    ``path`` is the route's path template (``/items/{item_id}``): the budget is per template, not
    per raw URL. ``cost`` is what the request costs against every limit, the tier's included.
    ``sources`` are the dependency objects, so each can tell it was already enforced.
    """

    path: str
    limits: tuple[tuple[Limit, bool], ...]
    cost: int = 1
    sources: frozenset[object] = field(default_factory=frozenset)

    @property
    def key(self) -> str:
        return f"route:{self.path}"


@dataclass(frozen=True, slots=True, eq=False)
class _Plan:
    limiter: RateLimiter
    #: The tier the identity named (``tier`` is the default tier when it named an unknown one).
    identity_tier: str
    tier: str
    checks: tuple[LimitCheck, ...]
    header: HeaderPlan
    route: RoutePlan | None
    #: The plan's only check when it has one and it is enforced: the memory storage's
    #: ``try_admit`` case, where an admitted request builds no ``Decision``.
    single: LimitCheck | None = None
    #: The labels of an admitted request's count, built once per plan.
    admitted_labels: tuple[str, str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "admitted_labels", (self.tier, "admitted"))


class LimitOutcome:
    """What the limiter decided for one request; the middleware leaves it in the scope.

    ``decision`` is ``None`` when the storage could not answer and the request was let through
    (``unavailable``). An admitted request of one enforced limit carries only its two numbers,
    ``admitted = (remaining, reset_after)``, and builds ``decision`` when it is first read:
    the common case then builds no ``Decision`` or ``LimitState`` (it runs on every request).
    """

    __slots__ = ("_decision", "admitted", "identity", "plan")

    # No ``__init__``: ``new_outcome`` sets the four slots, where a class call that runs an
    # ``__init__`` costs a Python frame more, and an admitted request builds one every time.
    plan: _Plan
    identity: Identity
    _decision: Decision | None
    admitted: tuple[int, float] | None

    @property
    def limiter(self) -> RateLimiter:
        return self.plan.limiter

    @property
    def unavailable(self) -> bool:
        """The storage could not answer and the request was let through (fail-open)."""
        return self._decision is None and self.admitted is None

    @property
    def decision(self) -> Decision | None:
        decision = self._decision
        if decision is None and self.admitted is not None:
            decision = self._decision = admitted_decision(self.plan.checks[0], self.admitted)
        return decision

    @property
    def route_sources(self) -> frozenset[object]:
        return self.plan.route.sources if self.plan.route is not None else frozenset()

    @property
    def refused(self) -> bool:
        decision = self._decision  # an admitted request has none to build
        return decision is not None and not decision.allowed

    def headers(self) -> list[tuple[bytes, bytes]]:
        """The rate-limit header pairs for this response (none when the storage was down)."""
        admitted = self.admitted
        plan = self.plan
        if admitted is not None:
            # The common case: one policy, admitted, no ``Decision`` built.
            if not plan.limiter.headers_enabled:
                return []
            return plan.header.one_policy(admitted[0], admitted[1])
        decision = self._decision
        if decision is None:
            return []
        out: list[tuple[bytes, bytes]] = []
        if plan.limiter.headers_enabled:
            states = decision.states
            if len(states) == 1:
                state = states[0]
                out = plan.header.one_policy(state.remaining, state.reset_after)
            else:
                out = plan.header.headers(
                    [s.remaining for s in states], [s.reset_after for s in states]
                )
        if not decision.allowed:
            # Retry-After goes on every 429, advertised limits or not.
            out.append((RETRY_AFTER, retry_after_header(decision.retry_after).encode("ascii")))
        return out

    def violated(self) -> list[str]:
        """The names of the (non-shadow) policies that refused the request."""
        decision = self.decision
        if decision is None:
            return []
        return [
            policy.name
            for state, policy in zip(decision.states, self.plan.header.policies, strict=True)
            if not state.allowed and not state.check.shadow
        ]

    def problem(self, *, raw_headers: bool = False) -> tuple[int, dict[str, Any]]:
        """Status and ``problem_response`` keyword arguments for a refused request.

        ``raw_headers``: the header fields as the byte pairs they are made as
        (``raw_headers=``), not as a ``headers`` mapping of strings: the middleware's
        answer to every refused request, under a flood most of them.
        """
        violated = self.violated()
        policies = self.plan.header.policies
        first = next(p for p in policies if p.name in violated) if violated else policies[0]
        tier = self.plan.tier
        detail = (
            f"Rate limit {first.limit} exceeded for tier {tier!r}"
            if first.name in self.limiter.tier_policy_names(tier)
            else f"Rate limit {first.limit} of {self.plan.route.path if self.plan.route else ''}"
            f" exceeded for tier {tier!r}"
        )
        pairs = self.headers()
        retry_after = next((v for k, v in pairs if k == RETRY_AFTER), b"1")
        problem: dict[str, Any] = {
            "code": "rate_limited",
            "title": "Too Many Requests",
            "detail": detail,
            "type_uri": QUOTA_EXCEEDED_TYPE,
            "extensions": {
                "tier": tier,
                "limit": str(first.limit),
                "policy": first.name,
                "violated-policies": violated,
                "retry_after": int(retry_after),
            },
        }
        if raw_headers:
            problem["raw_headers"] = pairs
        else:
            problem["headers"] = {k.decode("latin-1"): v.decode("latin-1") for k, v in pairs}
        return 429, problem


def new_outcome(
    plan: _Plan,
    identity: Identity,
    decision: Decision | None,
    admitted: tuple[int, float] | None = None,
) -> LimitOutcome:
    """The :class:`LimitOutcome` of ``identity``'s request under ``plan``."""
    outcome = LimitOutcome()
    outcome.plan = plan
    outcome.identity = identity
    outcome._decision = decision
    outcome.admitted = admitted
    return outcome


class RateLimiter:
    """Tiered limits of one app: resolves identity, checks all limits in one storage call.

    Args:
        storage: where counts live; wrap a shared one in ``GuardedStorage`` so a dead Redis
            costs no request a timeout.
        tiers: tier name -> limit string (``"10/second; 300/hour"``) or limits.
        default_tier: the tier of requests whose identity is not known.
        resolver: ``async (scope) -> Identity | None``; default: :class:`DefaultIdentityResolver`
            with no API keys.
        exempt_paths: paths that are never limited and never touch the storage; one ending in
            ``*`` exempts every path that starts with the rest (``"/static/*"``).
        fail_open: when the storage is down, let requests through (``True``) or answer 503.
        shadow: report-only for every limit: count, set headers, emit events, refuse nothing.
        headers_enabled: add the rate-limit headers to limited responses.
        events: the bus shadow refusals are published on.

    Raises:
        ConfigurationError: a tier's limit string is invalid, or ``default_tier`` is unknown.
    """

    def __init__(
        self,
        storage: RateLimitStorage,
        *,
        tiers: Mapping[str, str | Sequence[Limit]],
        default_tier: str = "anonymous",
        resolver: IdentityResolver | None = None,
        exempt_paths: Iterable[str] = (),
        fail_open: bool = True,
        shadow: bool = False,
        headers_enabled: bool = True,
        events: EventBus | None = None,
    ) -> None:
        if not tiers:
            raise ConfigurationError("rate_limit_tiers: at least one tier is needed")
        self._storage = storage
        #: The storage when it answers without awaiting (in-process).
        self._local: LocalStorage | None = storage if isinstance(storage, LocalStorage) else None
        self.tiers: dict[str, tuple[Limit, ...]] = {
            name: parse_limits(spec) if isinstance(spec, str) else tuple(spec)
            for name, spec in tiers.items()
        }
        if default_tier not in self.tiers:
            raise ConfigurationError(
                f"rate_limit_default_tier: {default_tier!r} is not one of the tiers "
                f"({', '.join(self.tiers)})"
            )
        self.default_tier = default_tier
        self.resolver: IdentityResolver = resolver or DefaultIdentityResolver(
            default_tier=default_tier
        )
        paths = list(exempt_paths)
        self.exempt_paths = frozenset(p for p in paths if not p.endswith("*"))
        self.exempt_prefixes = tuple(p[:-1] for p in paths if p.endswith("*"))
        #: The app's mounts, so a route in a mounted sub-app is keyed by its full template.
        self.mounts = MountTemplates()
        self.fail_open = fail_open
        self.shadow = shadow
        self.headers_enabled = headers_enabled
        self.events = events or EventBus()
        self._tier_policies = {
            tier: tuple(
                PolicyHeader.build(_policy_name(tier, limit, limits), limit) for limit in limits
            )
            for tier, limits in self.tiers.items()
        }
        self._tier_names = {
            tier: frozenset(p.name for p in policies)
            for tier, policies in self._tier_policies.items()
        }
        self._headers: dict[tuple[str, RoutePlan | None, bool], HeaderPlan] = {}
        # Keyed by the identity's fields, not the object: a tuple of strings hashes in C,
        # a dataclass calls its generated ``__hash__``.
        self._plans: dict[tuple[str, str, RoutePlan | None, bool], _Plan] = {}
        #: The plans of the tier alone (no route limit: most requests), by identity key, whose
        #: hash a string keeps; the plan's ``identity_tier`` is checked on every hit.
        self._tier_plans: dict[str, _Plan] = {}
        #: Route template -> its limits, as the middleware and the ``rate_limit`` dependencies
        #: found them: what the admin API reports per route.
        self._known_routes: dict[str, tuple[Limit, ...]] = {}

    @property
    def storage(self) -> RateLimitStorage:
        """Where counts live; fixed at construction."""
        return self._storage

    def tier_policy_names(self, tier: str) -> frozenset[str]:
        return self._tier_names.get(tier, frozenset())

    def exempt(self, paths: Iterable[str]) -> None:
        """Exempt ``paths`` too, as ``exempt_paths`` does (``install()`` adds those of an app
        mounted in this one with its own ``install()``, whose requests this limiter counts)."""
        paths = list(paths)
        self.exempt_paths = self.exempt_paths | {p for p in paths if not p.endswith("*")}
        self.exempt_prefixes += tuple(
            p[:-1] for p in paths if p.endswith("*") and p[:-1] not in self.exempt_prefixes
        )

    def is_exempt(self, path: str) -> bool:
        return path in self.exempt_paths or (
            bool(self.exempt_prefixes) and path.startswith(self.exempt_prefixes)
        )

    async def identify(self, scope: Scope) -> Identity | None:
        """The identity and tier of ``scope``'s client, as the middleware resolves them.

        With :meth:`check`, limits what the middleware does not see, such as WebSocket
        connections: ``outcome = await limiter.check(scope, await limiter.identify(scope))``.
        ``None`` when a custom resolver leaves the request unlimited.
        """
        return await self.resolver(scope)

    def _plan(
        self, identity: Identity, route: RoutePlan | None = None, *, with_tier: bool = True
    ) -> _Plan:
        """The checks and header bytes of ``identity``'s requests to ``route`` (cached)."""
        if route is None and with_tier:
            plan = self._tier_plans.get(identity.key)
            if plan is None or plan.identity_tier != identity.tier:
                if len(self._tier_plans) >= _PLAN_CACHE_SIZE:
                    self._tier_plans.clear()
                plan = self._tier_plans[identity.key] = self._build_plan(identity, None, True)
            return plan
        cache_key = (identity.key, identity.tier, route, with_tier)
        plan = self._plans.get(cache_key)
        if plan is None:
            if len(self._plans) >= _PLAN_CACHE_SIZE:
                self._plans.clear()
            plan = self._plans[cache_key] = self._build_plan(identity, route, with_tier)
        return plan

    def _build_plan(self, identity: Identity, route: RoutePlan | None, with_tier: bool) -> _Plan:
        tier = identity.tier if identity.tier in self.tiers else self.default_tier
        cost = route.cost if route is not None else 1
        checks = [
            LimitCheck(f"tier:{tier}:{identity.key}", limit, cost, self.shadow)
            for limit in (self.tiers[tier] if with_tier else ())
        ]
        if route is not None:
            checks += [
                LimitCheck(f"{route.key}:{identity.key}", limit, cost, self.shadow or shadow)
                for limit, shadow in route.limits
            ]
        header = self._headers.get((tier, route, with_tier))
        if header is None:
            policies = list(self._tier_policies[tier]) if with_tier else []
            if route is not None:
                limits = [limit for limit, _ in route.limits]
                policies += [
                    PolicyHeader.build(_policy_name(route.path, limit, limits), limit)
                    for limit in limits
                ]
            header = self._headers[(tier, route, with_tier)] = HeaderPlan.build(policies)
        single = checks[0] if len(checks) == 1 and not checks[0].shadow else None
        return _Plan(self, identity.tier, tier, tuple(checks), header, route, single)

    def try_check(
        self,
        scope: Scope,
        identity: Identity,
        route: RoutePlan | None = None,
        *,
        with_tier: bool = True,
    ) -> LimitOutcome | None:
        """:meth:`check`, when the storage answers without awaiting (an in-process storage:
        it has ``try_admit`` and ``check_many``); ``None``, with nothing counted, otherwise.

        This runs on every request: the in-process storage never waits.
        """
        storage = self._local
        if storage is None:
            return None
        plan = self._plan(identity, route, with_tier=with_tier)
        single = plan.single
        if single is not None:
            # One enforced limit (most requests): counted when admitted, with no ``Decision``.
            admitted = storage.try_admit(single)
            if admitted is not None:
                return new_outcome(plan, identity, None, admitted)
        # Refused, or not the lean case: the general check decides and counts.
        return self._outcome(scope, identity, plan, storage.check_many(plan.checks))

    async def check(
        self,
        scope: Scope,
        identity: Identity,
        route: RoutePlan | None = None,
        *,
        with_tier: bool = True,
    ) -> LimitOutcome:
        """Check and count every limit of the request in one storage call.

        With ``with_tier=False`` only the route's limits are checked (a ``rate_limit``
        dependency the middleware did not see, whose tier was counted already).

        Raises:
            StorageUnavailableError: the storage is down and ``fail_open`` is off.
        """
        try:
            # An in-process storage answers at once: ``try_check`` asks it.
            local = self.try_check(scope, identity, route, with_tier=with_tier)
            if local is not None:
                return local
            plan = self._plan(identity, route, with_tier=with_tier)
            decision = await self._storage.check(identity.key, plan.checks)
        except StorageUnavailableError:
            if not self.fail_open:
                raise
            return new_outcome(self._plan(identity, route, with_tier=with_tier), identity, None)
        return self._outcome(scope, identity, plan, decision)

    def _outcome(
        self, scope: Scope, identity: Identity, plan: _Plan, decision: Decision
    ) -> LimitOutcome:
        outcome = new_outcome(plan, identity, decision)
        if self.shadow or plan.route is not None:
            self._report_shadow(scope, outcome)
        return outcome

    def _report_shadow(self, scope: Scope, outcome: LimitOutcome) -> None:
        decision = outcome.decision
        if decision is None or not decision.allowed:
            return
        counted = False
        for state, policy in zip(decision.states, outcome.plan.header.policies, strict=True):
            if state.check.shadow and not state.allowed:
                if not counted:
                    # The request is admitted (and counted so); this says a shadow limit
                    # would have refused it, once per request.
                    RATE_LIMIT_DECISIONS.add((outcome.plan.tier, "shadow_refused"))
                    counted = True
                self.events.emit(
                    "rate_limit.shadow_refused",
                    policy.name,
                    level=logging.INFO,
                    tier=outcome.plan.tier,
                    limit=str(policy.limit),
                    path=scope.get("path", ""),
                )

    def unavailable_problem(
        self, scope: Scope, identity: Identity, route: RoutePlan | None, exc: Exception
    ) -> dict[str, Any]:
        """``problem_response`` keyword arguments for the fail-closed 503."""
        retry = getattr(exc, "retry_after", None) or 1.0
        plan = self._plan(identity, route)
        return {
            "code": "service_unavailable",
            "title": "Service Unavailable",
            "detail": "The rate-limit storage is unavailable; try again shortly.",
            "type_uri": TEMPORARY_REDUCED_CAPACITY_TYPE,
            "extensions": {
                "violated-policies": [p.name for p in plan.header.policies],
                "retry_after": int(retry_after_header(retry)),
            },
            "headers": {"Retry-After": retry_after_header(retry)},
        }

    def learn_route(self, plan: RoutePlan) -> None:
        """Remember ``plan``'s route limits for :meth:`identity_state` and
        :meth:`reset_identity`. Called when a route table or a dependency's plan is built,
        never per request."""
        known = self._known_routes
        before = known.pop(plan.path, ())
        if len(known) >= _KNOWN_ROUTES_SIZE:
            del known[next(iter(known))]  # the least recently learnt
        # Two dependencies of one route may each be planned alone: their limits add up.
        known[plan.path] = tuple(dict.fromkeys([*before, *(limit for limit, _ in plan.limits)]))

    async def identity_state(self, identity: str) -> list[dict[str, Any]]:
        """The state of ``identity``'s counters, one dict per policy, counting nothing.

        ``identity`` is an ``Identity.key``: ``"ip:<address>"`` (any spelling of the address)
        or ``"key:<first 16 hex digits of the API key's SHA-256>"``. Reported: the policies of
        the identity's own tier (its API key's tier, else the default tier) and of every other
        tier where it has counts (its tier may have changed), then the policies of every route
        limit this limiter knows of. Route limits are learnt from the app's routes at the
        first request the middleware sees, and from each ``rate_limit`` dependency when it
        first runs: before that, only the tiers are reported.

        Each dict: ``policy`` (the name in ``RateLimit-Policy``), ``scope`` (``"tier"`` or
        ``"route"``), ``tier`` (``None`` for a route limit: it applies in every tier),
        ``route`` (the template, ``None`` for a tier limit), ``limit`` (``"10/minute"``),
        ``used``, ``remaining`` and ``reset_in`` (seconds until the oldest counted unit leaves
        the window; 0.0 when nothing is counted). A shadow limit counted past its amount shows
        ``used`` equal to the amount.

        Raises:
            IdentityStateUnsupportedError: the storage has no ``peek`` (501).
            ServiceUnavailableError: the storage is down (503, ``Retry-After``).
        """
        key = _identity_key(identity)
        policies = self._identity_policies(key)
        storage = self._state_storage()
        states = await _storage_call(storage.peek(key, [p.check for p in policies]))
        used = [p.check.amount - state.remaining for p, state in zip(policies, states, strict=True)]
        counted = {p.tier for p, n in zip(policies, used, strict=True) if p.tier and n > 0}
        own = self._tier_of(key)
        return [
            policy.report(state, n)
            for policy, state, n in zip(policies, states, used, strict=True)
            if policy.tier is None or policy.tier == own or policy.tier in counted
        ]

    async def reset_identity(self, identity: str) -> int:
        """Remove ``identity``'s counters of every tier and of every route limit this limiter
        knows of (see :meth:`identity_state`); returns how many existed. Its next request is
        counted from zero.

        Raises:
            IdentityStateUnsupportedError: the storage has no ``reset`` (501).
            ServiceUnavailableError: the storage is down (503, ``Retry-After``): nothing was
                reset.
        """
        key = _identity_key(identity)
        checks = [p.check for p in self._identity_policies(key)]
        return await _storage_call(self._state_storage().reset(key, checks))

    def _state_storage(self) -> IdentityStateStorage:
        storage: Any = self._storage
        if not supports_identity_state(storage):
            raise IdentityStateUnsupportedError(
                f"The rate-limit storage {type(storage).__name__} cannot show or reset one "
                "identity's counts: it has no peek() and reset()."
            )
        found: IdentityStateStorage = storage
        return found

    def _tier_of(self, key: str) -> str:
        """The tier the built-in resolver gives ``key``: its API key's, else the default."""
        resolver = self.resolver
        tier = resolver.tier_of(key) if isinstance(resolver, DefaultIdentityResolver) else None
        return tier if tier is not None and tier in self.tiers else self.default_tier

    def _identity_policies(self, key: str) -> list[_IdentityPolicy]:
        """One entry per counter ``key`` may have: every tier's limits, every known route's."""
        found = [
            _IdentityPolicy(policy.name, tier, None, LimitCheck(f"tier:{tier}:{key}", limit))
            for tier, limits in self.tiers.items()
            for limit, policy in zip(limits, self._tier_policies[tier], strict=True)
        ]
        for path, limits in self._known_routes.items():
            found += [
                _IdentityPolicy(
                    _policy_name(path, limit, limits),
                    None,
                    path,
                    LimitCheck(f"{RoutePlan(path, ()).key}:{key}", limit),
                )
                for limit in limits
            ]
        return found

    async def aclose(self) -> None:
        await self._storage.aclose()

    def __repr__(self) -> str:
        return (
            f"RateLimiter(tiers={list(self.tiers)}, default_tier={self.default_tier!r}, "
            f"fail_open={self.fail_open}, shadow={self.shadow})"
        )


@dataclass(frozen=True, slots=True)
class _IdentityPolicy:
    """One counter of one identity, as the admin API names it."""

    name: str
    #: ``None`` for a route limit.
    tier: str | None
    #: ``None`` for a tier limit.
    route: str | None
    check: LimitCheck

    def report(self, state: LimitState, used: int) -> dict[str, Any]:
        return {
            "policy": self.name,
            "scope": "tier" if self.route is None else "route",
            "tier": self.tier,
            "route": self.route,
            "limit": str(self.check.limit),
            "used": used,
            "remaining": state.remaining,
            "reset_in": round(state.reset_after, 3),
        }


def _identity_key(identity: str) -> str:
    """``identity`` as the resolver spells it: an address normalised (``ip:::ffff:1.2.3.4`` is
    ``ip:1.2.3.4``), key digits in lower case; anything else (a custom resolver's) as it is."""
    kind, _, rest = identity.partition(":")
    if kind == "ip":
        return f"ip:{normalize_address(rest) or rest}"
    if kind == "key":
        return f"key:{rest.lower()}"
    return identity


async def _storage_call(call: Awaitable[_T]) -> _T:
    """``await call``, the storage's outage answered as the app's 503 problem."""
    try:
        return await call
    except StorageUnavailableError as exc:
        raise ServiceUnavailableError(
            "The rate-limit storage is unavailable; try again shortly.",
            retry_after=exc.retry_after or 1.0,
        ) from exc


def _policy_name(owner: str, limit: Limit, limits: Sequence[Limit]) -> str:
    """``premium``, or ``premium-60s`` when the owner has several limits."""
    if len(limits) == 1:
        return owner
    same_period = sum(1 for other in limits if other.period == limit.period)
    return f"{owner}-{limit.period}s" if same_period == 1 else f"{owner}-{limit.policy_name}"
