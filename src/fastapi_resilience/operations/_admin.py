"""The admin API under ``admin_path``: read and steer breakers, features, dead letters, rate
limits and the error analytics over HTTP, behind one bearer token.

Fail closed: ``install()`` adds these routes only when ``admin_token`` is set, and every JSON
route checks the token (compared in constant time, never logged) before it reads anything.
Every action is published as an ``admin.action`` event, so it is logged once with the
request's correlation ID.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from fastapi_resilience._asgi.pipeline import UNLIMITED, RequestState
from fastapi_resilience._policy_settings import PolicySettings
from fastapi_resilience._tally import RATE_LIMIT_DECISIONS
from fastapi_resilience.events import EventBus
from fastapi_resilience.exceptions import AuthenticationError, InvalidInputError, NotFoundError
from fastapi_resilience.health._checks import HealthChecks
from fastapi_resilience.operations._dashboard import dashboard_response
from fastapi_resilience.operations._degraded import DegradedMode, FeatureStatus
from fastapi_resilience.operations._metrics import request_percentiles
from fastapi_resilience.outbound._breaker import BreakerRegistry, CircuitBreaker
from fastapi_resilience.outbound._bulkhead import BulkheadRegistry, TieredBulkhead
from fastapi_resilience.outbound._dead_letter import DeadLetter, DeadLetterQueue, ReplayHandler
from fastapi_resilience.outbound._policies import PolicyTable

__all__ = [
    "ADMIN_ACTION",
    "AdminTokenStep",
    "Operated",
    "add_admin_routes",
    "breaker_json",
    "feature_json",
    "token_matches",
]

#: The event every admin action publishes: ``name`` is what it acted on, ``action`` what it did.
ADMIN_ACTION = "admin.action"

logger = logging.getLogger("fastapi_resilience.admin")


class _Analytics(Protocol):
    def snapshot(self) -> dict[str, Any]: ...


class _RateLimits(Protocol):
    async def identity_state(self, identity: str) -> list[dict[str, Any]]: ...

    async def reset_identity(self, identity: str) -> int: ...


class Operated(Protocol):
    """What the admin API reads and steers: the ``Resilience`` object ``install()`` returns."""

    @property
    def events(self) -> EventBus: ...

    @property
    def degraded(self) -> DegradedMode: ...

    @property
    def health(self) -> HealthChecks: ...

    @property
    def analytics(self) -> _Analytics | None: ...

    @property
    def rate_limiter(self) -> Any: ...

    @property
    def dead_letters(self) -> DeadLetterQueue | None: ...

    @property
    def replay_handler(self) -> ReplayHandler | None: ...


#: The longest switch-off the API takes: a week. Longer is "until switched on" (no seconds).
MAX_OFF_SECONDS = 7 * 24 * 3600.0


def token_matches(header: str, expected: bytes) -> bool:
    """Whether an ``Authorization`` value is ``Bearer <expected>``, compared in constant time
    whatever the scheme, so a wrong scheme takes as long as a wrong token."""
    scheme, _, given = header.partition(" ")
    matches = hmac.compare_digest(given.strip().encode("utf-8", "replace"), expected)
    return matches and scheme.lower() == "bearer"


class AdminTokenStep:
    """Lets a request under ``admin_path`` that carries the admin token past the rate limiter
    (a step placed before it): the dashboard polls, and an operator must never be refused in
    the incident being watched. A request without the token is counted like any other, so
    guessing the token costs the guesser's own quota."""

    websocket = False

    def __init__(self, path: str, token: str) -> None:
        self._path = path
        self._prefix = path + "/"
        self._expected = token.encode("utf-8")

    def enter(self, state: RequestState) -> None:
        if state.limit is not None:
            return None
        path = state.path
        if path != self._path and not path.startswith(self._prefix):
            return None
        for name, value in state.scope["headers"]:
            if name == b"authorization":
                if token_matches(value.decode("latin-1"), self._expected):
                    state.limit = UNLIMITED
                break
        return None


def bearer_guard(token: str) -> Callable[[Request], Awaitable[None]]:
    """A dependency that lets a request through only with ``Authorization: Bearer <token>``."""
    expected = token.encode("utf-8")

    async def require_token(request: Request) -> None:
        header = request.headers.get("authorization", "")
        if not token_matches(header, expected):
            raise AuthenticationError(
                "This admin route needs the admin token: Authorization: Bearer <token>."
                if not header
                else "The admin token is not valid.",
                www_authenticate='Bearer realm="fastapi-resilience"',
            )

    return require_token


def breaker_json(breaker: CircuitBreaker) -> dict[str, Any]:
    """A breaker as the admin API and the dashboard show it."""
    counts = breaker.window_counts()
    return {
        "name": breaker.name,
        "state": breaker.state,
        "failures": breaker.failures,
        "failure_threshold": breaker.failure_threshold,
        "failure_rate": round(counts.failure_rate, 4) if counts is not None else None,
        "window": (
            {"calls": counts.calls, "failures": counts.failures, "slow": counts.slow}
            if counts is not None
            else None
        ),
        "calls": {
            "success": breaker.calls_succeeded,
            "failure": breaker.calls_failed,
            "rejected": breaker.calls_rejected,
        },
        "recovery_timeout": breaker.recovery_timeout,
        "time_left_open": round(breaker.time_left_open(), 3),
        "changed_at": breaker.changed_at,
    }


def feature_json(degraded: DegradedMode, name: str) -> dict[str, Any]:
    status: FeatureStatus = degraded.status(name)
    feature = next(f for f in degraded.features() if f.name == name)
    return {
        "name": name,
        "available": status.available,
        "cause": status.cause,
        "reason": status.reason,
        "retry_after": None if status.retry_after is None else round(status.retry_after, 3),
        "depends_on": list(feature.depends_on),
        "paths": list(feature.paths),
        "description": feature.description or None,
    }


def _bulkheads_json(registry: BulkheadRegistry) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for item in registry:
        for bulkhead in item if isinstance(item, TieredBulkhead) else (item,):
            found.append(
                {
                    "name": bulkhead.name,
                    "max_concurrent": bulkhead.max_concurrent,
                    "in_use": bulkhead.active,
                    "waiting": bulkhead.waiting,
                    "rejected": bulkhead.rejected,
                }
            )
    return found


def _tiers_json() -> dict[str, Any]:
    tiers: dict[str, dict[str, Any]] = {}
    for (tier, decision), count in RATE_LIMIT_DECISIONS.items():
        entry = tiers.setdefault(
            tier, {"tier": tier, "admitted": 0, "refused": 0, "shadow_refused": 0}
        )
        entry[decision] = entry.get(decision, 0) + count
    return {"tiers": [tiers[name] for name in sorted(tiers)]}


def _letter_json(letter: DeadLetter) -> dict[str, Any]:
    return {
        "id": letter.id,
        "operation": letter.operation,
        "error_code": letter.error_code,
        "message": letter.message,
        "correlation_id": letter.correlation_id,
        "recorded_at": letter.recorded_at,
        "attempts": letter.attempts,
        "context": letter.context,
    }


def add_admin_routes(
    router: APIRouter,
    operated: Operated,
    *,
    token: str,
    path: str,
    breakers: BreakerRegistry,
    bulkheads: BulkheadRegistry,
    policies: PolicyTable | None = None,
    include_in_schema: bool = False,
) -> None:
    """The dashboard page at ``{path}/`` and the JSON routes at ``{path}/api``, on ``router``."""
    api = APIRouter(
        prefix=f"{path}/api",
        dependencies=[Depends(bearer_guard(token))],
        include_in_schema=include_in_schema,
        tags=["resilience admin"],
    )
    _breaker_routes(api, operated, breakers)
    _feature_routes(api, operated)
    _dead_letter_routes(api, operated)
    _rate_limit_routes(api, operated)
    if policies is not None:
        _policy_routes(api, policies)

    @api.get("/errors")
    async def errors() -> dict[str, Any]:
        return _errors_json(operated)

    @api.get("/overview")
    async def overview() -> dict[str, Any]:
        """Everything the dashboard shows, in one answer."""
        status, checks = await operated.health.run()
        degraded = operated.degraded
        return {
            "generated_at": _wall(operated),
            "degraded": [s.name for s in degraded.unavailable()],
            "health": {"status": status, "checks": checks},
            "breakers": [breaker_json(b) for b in sorted(breakers, key=lambda b: b.name)],
            "features": [feature_json(degraded, f.name) for f in degraded.features()],
            "bulkheads": _bulkheads_json(bulkheads),
            "rate_limits": _tiers_json(),
            "requests": request_percentiles(),
            "errors": _errors_json(operated),
        }

    async def no_such_route(request: Request) -> None:
        # Last under the prefix, behind the token like the rest: without it, a wrong method
        # or path would answer 405 or 404 and tell a caller which admin routes exist.
        raise NotFoundError(
            f"No admin route answers {request.method} {request.url.path}.",
        )

    api.add_api_route(
        "/{rest:path}",
        no_such_route,
        methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"],
        include_in_schema=False,
    )
    router.include_router(api)

    async def dashboard() -> Response:
        return dashboard_response()

    # The page holds no data: it asks for the token and sends it with every call it makes.
    router.add_api_route(f"{path}/", dashboard, methods=["GET"], include_in_schema=False)


def _wall(operated: Operated) -> float:
    return float(operated.degraded.clock.time())


def _errors_json(operated: Operated) -> dict[str, Any]:
    analytics = operated.analytics
    return analytics.snapshot() if analytics is not None else {}


def _action(operated: Operated, request: Request, action: str, target: str, **figures: Any) -> None:
    """Publish one ``admin.action`` event: the log line (with the correlation ID) and the count."""
    client = request.client.host if request.client is not None else "unknown"
    operated.events.emit(ADMIN_ACTION, target, action=action, client=client, **figures)


def _breaker_routes(api: APIRouter, operated: Operated, breakers: BreakerRegistry) -> None:
    def find(name: str) -> CircuitBreaker:
        if name not in breakers:
            raise NotFoundError(f"No circuit breaker named {name!r} is registered.")
        return breakers.get(name)

    @api.get("/breakers")
    async def list_breakers() -> dict[str, Any]:
        return {"breakers": [breaker_json(b) for b in sorted(breakers, key=lambda b: b.name)]}

    actions: dict[str, Callable[[CircuitBreaker], None]] = {
        "open": lambda b: b.force_open(),
        "close": lambda b: b.force_closed(),
        "reset": lambda b: b.reset(),
    }
    for verb, act in actions.items():
        _add_breaker_action(api, operated, find, verb, act)


def _add_breaker_action(
    api: APIRouter,
    operated: Operated,
    find: Callable[[str], CircuitBreaker],
    verb: str,
    act: Callable[[CircuitBreaker], None],
) -> None:
    async def breaker_action(name: str, request: Request) -> dict[str, Any]:
        breaker = find(name)
        act(breaker)
        _action(operated, request, f"breaker.{verb}", name, state=breaker.state)
        return breaker_json(breaker)

    breaker_action.__name__ = f"breaker_{verb}"
    # ``:path``: a breaker's name may hold a '/' (the server decodes the page's ``%2F``).
    api.add_api_route(f"/breakers/{{name:path}}/{verb}", breaker_action, methods=["POST"])


def _feature_routes(api: APIRouter, operated: Operated) -> None:
    degraded = operated.degraded

    def check(name: str) -> None:
        if name not in {f.name for f in degraded.features()}:
            raise NotFoundError(f"No feature named {name!r} is declared.")

    @api.get("/features")
    async def list_features() -> dict[str, Any]:
        return {"features": [feature_json(degraded, f.name) for f in degraded.features()]}

    @api.post("/features/{name:path}/off")
    async def switch_off(name: str, request: Request) -> dict[str, Any]:
        check(name)
        seconds = await _seconds_of(request)
        degraded.disable(name, reason="switched off by an operator", duration=seconds)
        _action(operated, request, "feature.off", name, seconds=seconds)
        return feature_json(degraded, name)

    @api.post("/features/{name:path}/on")
    async def switch_on(name: str, request: Request) -> dict[str, Any]:
        check(name)
        degraded.enable(name)
        _action(operated, request, "feature.on", name)
        return feature_json(degraded, name)


async def _seconds_of(request: Request) -> float | None:
    """The optional ``{"seconds": N}`` body of a switch-off: ``None`` for no body."""
    raw = await request.body()
    if not raw.strip():
        return None
    try:
        body = json.loads(raw)
    except ValueError:
        raise InvalidInputError('The body must be JSON: {"seconds": N}.') from None
    seconds = body.get("seconds") if isinstance(body, dict) else None
    if seconds is None and isinstance(body, dict) and set(body) <= {"seconds"}:
        return None
    if (
        isinstance(seconds, bool)
        or not isinstance(seconds, int | float)
        or not math.isfinite(seconds)
        or not 0 < seconds <= MAX_OFF_SECONDS
    ):
        raise InvalidInputError(
            f"seconds must be a number of seconds > 0 and at most {MAX_OFF_SECONDS:.0f}, "
            "or left out (off until switched on)."
        )
    return float(seconds)


def _dead_letter_routes(api: APIRouter, operated: Operated) -> None:
    def queue() -> DeadLetterQueue:
        found = operated.dead_letters
        if found is None:
            raise NotFoundError(
                "No dead-letter queue is attached: resilience.use_dead_letters(queue, replay=...)."
            )
        return found

    @api.get("/dead-letters")
    async def list_letters(limit: int = 100) -> dict[str, Any]:
        found = queue()
        letters = await found.list(limit=max(1, min(limit, 1000)))
        return {"queue": found.label, "letters": [_letter_json(x) for x in letters]}

    @api.post("/dead-letters/replay")
    async def replay(request: Request) -> dict[str, Any]:
        found = queue()
        handler = operated.replay_handler
        if handler is None:
            raise NotFoundError("No replay handler is attached to the dead-letter queue.")
        report = await found.replay(handler)
        _action(
            operated,
            request,
            "dead_letters.replay",
            found.label,
            succeeded=len(report.succeeded),
            failed=len(report.failed),
        )
        return {
            "succeeded": report.succeeded,
            "failed": [_letter_json(x) for x in report.failed],
            "requeued_ids": report.requeued_ids,
        }


def _rate_limit_routes(api: APIRouter, operated: Operated) -> None:
    def limits() -> _RateLimits:
        found = operated.rate_limiter
        if found is None:
            raise NotFoundError("Rate limiting is off for this app.")
        result: _RateLimits = found
        return result

    @api.get("/rate-limits/{identity}")
    async def identity_state(identity: str) -> dict[str, Any]:
        _check_identity(identity)
        return {"identity": identity, "policies": await limits().identity_state(identity)}

    @api.delete("/rate-limits/{identity}")
    async def reset_identity(identity: str, request: Request) -> dict[str, Any]:
        _check_identity(identity)
        removed = await limits().reset_identity(identity)
        _action(operated, request, "rate_limits.reset", identity, counters=removed)
        return {"identity": identity, "reset": removed}


def _policy_routes(api: APIRouter, policies: PolicyTable) -> None:
    def policy_json(name: str, settings: PolicySettings) -> dict[str, Any]:
        return {"name": name, "settings": settings.model_dump()}

    @api.get("/policies")
    async def list_policies() -> dict[str, Any]:
        return {"policies": [policy_json(n, s) for n, s in policies.declared().items()]}

    @api.put("/policies/{name}")
    async def change_policy(name: str, request: Request) -> dict[str, Any]:
        client = request.client.host if request.client is not None else "unknown"
        try:
            body = json.loads(await request.body())
        except ValueError:
            body = None  # refused below, as a change that is not a JSON object
        # Validated, swapped in and published (``policy.changed`` with the client, or
        # ``policy.change_rejected`` with the reason) by the table itself.
        settings = policies.change(name, body, by=client)
        return policy_json(name, settings)


def _check_identity(identity: str) -> None:
    kind, _, rest = identity.partition(":")
    if kind not in ("ip", "key") or not rest or len(identity) > 100:
        raise InvalidInputError(
            "identity is 'ip:<address>' or 'key:<first 16 hex digits of the key's SHA-256>'."
        )
