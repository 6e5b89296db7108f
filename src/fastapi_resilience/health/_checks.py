"""Liveness and readiness: pluggable async checks, each with its own timeout, one verdict.

A check's result is served again for a short time, and callers that arrive while it runs share
that run: readiness calls, however many, run each check at most once per period. A background
monitor (:class:`~fastapi_resilience.health.HealthMonitor`) may instead *feed* a check's latest
result (:meth:`HealthChecks.feed`): readiness then serves that and runs nothing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import APIRouter
from starlette.responses import JSONResponse

from fastapi_resilience._asgi.fixed_routes import FixedPathRoutes, add_fixed_route
from fastapi_resilience.clock import SYSTEM_CLOCK, Clock

__all__ = [
    "CheckResult",
    "HealthCheck",
    "HealthChecks",
    "HealthStatus",
    "add_health_routes",
]

HealthStatus = Literal["ok", "degraded", "unhealthy"]
_RANK: dict[HealthStatus, int] = {"ok": 0, "degraded": 1, "unhealthy": 2}


@dataclass(frozen=True, slots=True)
class CheckResult:
    """What a check found. ``detail`` is shown on the readiness page: keep secrets out of it."""

    status: HealthStatus = "ok"
    detail: str | None = None


#: A check returns ``True``/``None``/a ``CheckResult`` when fine, ``False`` or raises when not.
HealthCheck = Callable[[], Awaitable[bool | CheckResult | None]]

#: A recovery action (reconnect a pool, warm a cache): run by a monitor when its check fails.
RecoveryAction = Callable[[], Awaitable[None]]

#: What a fed check's readiness entry is read from, at every readiness call.
LatestResult = Callable[[], Mapping[str, Any]]


@dataclass(slots=True, eq=False)
class _Registered:
    check: HealthCheck
    timeout: float
    critical: bool
    cache_seconds: float
    #: Names of the checks this one needs; a monitor does not run it while one of them fails.
    depends_on: tuple[str, ...] = ()
    #: Run in order by a monitor when the check fails, each within ``timeout``.
    recover: tuple[RecoveryAction, ...] = ()
    #: Run by readiness on every call, even while a monitor feeds the others.
    live: bool = False
    #: Set by a monitor: readiness serves what this returns and does not run the check.
    fed: LatestResult | None = None
    #: The latest result, and until when (monotonic) it is served again.
    entry: dict[str, Any] | None = None
    fresh_until: float = 0.0
    #: The run in progress, which every caller that arrives meanwhile awaits.
    running: asyncio.Future[dict[str, Any]] | None = None
    #: Moves on at every ``forget``: a run started before it neither stores its result nor
    #: takes callers who arrive after it.
    generation: int = 0


class HealthChecks:
    """The readiness checks of one app.

    A failing *critical* check makes the app ``"unhealthy"`` (503); a failing non-critical one
    makes it ``"degraded"`` (still 200). A check that returns ``CheckResult("degraded")`` says
    so itself (an open breaker, a rate-limit storage that is down while failing open).

    A check's result, passing or failing, is served again for ``cache_seconds`` (by default;
    per check with ``add(..., cache_seconds=...)``), timed by ``clock``; callers that arrive
    while a check runs share that run. ``0`` runs the check on every call that finds it idle.

    A check fed by a monitor (:meth:`feed`) is not run by :meth:`run`: its latest result is
    served instead, until :meth:`unfeed` or :meth:`forget`.
    """

    def __init__(
        self,
        *,
        default_timeout: float = 1.0,
        cache_seconds: float = 0.0,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        if default_timeout <= 0:
            raise ValueError("default_timeout must be > 0 seconds")
        if cache_seconds < 0:
            raise ValueError("cache_seconds must be >= 0 seconds")
        self.default_timeout = default_timeout
        self.cache_seconds = cache_seconds
        self._clock = clock
        self._checks: dict[str, _Registered] = {}

    def add(
        self,
        name: str,
        check: HealthCheck,
        *,
        timeout: float | None = None,
        critical: bool = True,
        cache_seconds: float | None = None,
        depends_on: Sequence[str] = (),
        recover: Sequence[RecoveryAction] = (),
        live: bool = False,
    ) -> None:
        """Register ``check`` under ``name`` (replacing one of the same name).

        ``cache_seconds``: how long its result is served again; ``0`` for a check that only
        reads this process's state and must always be current. Default: the check's own
        ``cache_seconds`` attribute when it has one (:func:`breaker_health_check`'s is 0),
        else the checks' own.

        ``depends_on``: names of checks this one needs (one name may be given as a string).
        While one of them fails, a :class:`~fastapi_resilience.health.HealthMonitor` does not
        run this check and reports it failing with that dependency's root cause. The names may
        be registered later, but :meth:`validate` (called when a monitor starts) refuses one
        that is not; a cycle is refused here as soon as every check in it is registered.

        ``recover``: recovery actions (reconnect a pool, warm a cache) that a monitor runs, in
        order and each within ``timeout``, when this check fails; then it runs the check again.

        ``live``: readiness runs it on every call even while a monitor runs the others in the
        background, and the monitor leaves it alone (unless it has recovery actions or other
        checks depend on it): for a check that reads this process's state and whose changes
        are reported already, such as an open breaker, which must show at once.

        Raises:
            ValueError: naming the check: a timeout or cache period out of range, a recovery
                action that is not callable, a dependency on itself or a cycle.
        """
        timeout = self.default_timeout if timeout is None else timeout
        if timeout <= 0:
            raise ValueError(f"health check {name!r}: timeout must be > 0 seconds")
        if cache_seconds is None:
            own = getattr(check, "cache_seconds", None)
            cache_seconds = own if isinstance(own, int | float) else self.cache_seconds
        if cache_seconds < 0:
            raise ValueError(f"health check {name!r}: cache_seconds must be >= 0 seconds")
        # A lone name is one dependency, not one per character.
        needs = (depends_on,) if isinstance(depends_on, str) else tuple(dict.fromkeys(depends_on))
        actions = tuple(recover)
        for action in actions:
            if not callable(action):
                raise ValueError(
                    f"health check {name!r}: recovery action {action!r} is not callable"
                )
        cycle = self._cycle_through(name, needs)
        if cycle:
            raise ValueError(
                f"health check {name!r}: dependency cycle {' -> '.join(map(repr, cycle))}"
            )
        self._checks[name] = _Registered(
            check, timeout, critical, cache_seconds, depends_on=needs, recover=actions, live=live
        )

    def _cycle_through(self, name: str, needs: Sequence[str]) -> list[str]:
        """A path back to ``name`` from one of ``needs`` through the registered checks, as
        ``[name, ..., name]``; empty when there is none."""
        seen: set[str] = set()

        def path_from(current: str) -> list[str]:
            if current == name:
                return [current]
            if current in seen or current not in self._checks:
                return []
            seen.add(current)
            for dependency in self._checks[current].depends_on:
                rest = path_from(dependency)
                if rest:
                    return [current, *rest]
            return []

        for dependency in needs:
            found = path_from(dependency)
            if found:
                return [name, *found]
        return []

    def validate(self) -> None:
        """Refuse a dependency on a check that is not registered, or a cycle.

        Raises:
            ValueError: naming the check that depends on an unknown name or is in a cycle.
        """
        for name, registered in self._checks.items():
            for dependency in registered.depends_on:
                if dependency not in self._checks:
                    raise ValueError(
                        f"health check {name!r} depends on {dependency!r}, "
                        "which is not a registered check"
                    )
            cycle = self._cycle_through(name, registered.depends_on)
            if cycle:
                raise ValueError(
                    f"health check {name!r}: dependency cycle {' -> '.join(map(repr, cycle))}"
                )

    def feed(self, name: str, latest: LatestResult) -> None:
        """Serve ``latest()`` as check ``name``'s readiness entry, without running the check,
        until :meth:`unfeed` or :meth:`forget`: what a background monitor calls. An entry is a
        mapping with at least ``"status"`` (``"ok"``, ``"degraded"`` or ``"unhealthy"``)."""
        registered = self._checks.get(name)
        if registered is not None:
            registered.fed = latest

    def unfeed(self, name: str | None = None) -> None:
        """Run check ``name`` (every check: ``None``) on demand again, as without a monitor."""
        for registered_name, registered in self._checks.items():
            if name is None or registered_name == name:
                registered.fed = None

    def forget(self, name: str | None = None) -> None:
        """Drop the cached result of check ``name`` (of every check: ``None``), so the next
        call runs it: for when you learn that what it checks has changed. A run already
        under way answers the callers that joined it but stores nothing, and later callers
        get a run of their own. A result fed by a monitor is dropped too, until the monitor
        next runs the check."""
        for registered_name, registered in self._checks.items():
            if name is None or registered_name == name:
                registered.entry = None
                registered.fed = None
                registered.running = None
                registered.generation += 1

    def remove(self, name: str) -> None:
        self._checks.pop(name, None)

    def __contains__(self, name: object) -> bool:
        return name in self._checks

    async def run(self) -> tuple[HealthStatus, dict[str, dict[str, Any]]]:
        """Run every check concurrently; returns the overall status and one entry per check.

        A check fed by a monitor is not run: its latest result is its entry."""
        names = list(self._checks)
        results = await asyncio.gather(*(self._result(self._checks[n]) for n in names))
        checks = dict(zip(names, results, strict=True))
        overall: HealthStatus = "ok"
        for entry in checks.values():
            if _RANK[entry["status"]] > _RANK[overall]:
                overall = entry["status"]
        return overall, checks

    async def _result(self, registered: _Registered) -> dict[str, Any]:
        """The check's fed result; its cached one while fresh; else its run, shared with every
        caller."""
        if registered.fed is not None:
            return dict(registered.fed())
        if registered.entry is not None and self._clock.monotonic() < registered.fresh_until:
            return registered.entry
        running = registered.running
        if running is None or running.get_loop() is not asyncio.get_running_loop():
            run = self._run_one(registered, registered.generation)
            running = registered.running = asyncio.ensure_future(run)
        # Shielded: a caller that gives up (a client gone) does not cancel the others' run.
        return await asyncio.shield(running)

    async def _run_one(self, registered: _Registered, generation: int) -> dict[str, Any]:
        try:
            entry = await self._checked(registered)
        finally:
            if registered.generation == generation:
                registered.running = None
        if registered.generation == generation:
            registered.entry = entry
            registered.fresh_until = self._clock.monotonic() + registered.cache_seconds
        return entry

    async def _checked(self, registered: _Registered) -> dict[str, Any]:
        failed: HealthStatus = "unhealthy" if registered.critical else "degraded"
        start = time.perf_counter()
        detail: str | None = None
        try:
            outcome = await asyncio.wait_for(registered.check(), registered.timeout)
        except TimeoutError:
            status, detail = failed, f"timed out after {registered.timeout:g}s"
        except Exception as exc:
            # The class name only: an exception's text may carry hosts or credentials.
            status, detail = failed, f"raised {type(exc).__name__}"
        else:
            if isinstance(outcome, CheckResult):
                status, detail = outcome.status, outcome.detail
                if status == "unhealthy" and not registered.critical:
                    status = "degraded"
            else:
                status = failed if outcome is False else "ok"
        entry: dict[str, Any] = {
            "status": status,
            "duration_ms": round((time.perf_counter() - start) * 1000, 2),
            "checked_at": self._clock.time(),
        }
        if detail:
            entry["detail"] = detail
        return entry


def add_health_routes(
    router: APIRouter,
    checks: HealthChecks,
    *,
    prefix: str = "/health",
    group: FixedPathRoutes | None = None,
) -> None:
    """``GET {prefix}/live`` (200 while the process serves) and ``GET {prefix}/ready``, added
    to ``router`` (the app's own: an included router costs every other request, ADR 0045), or
    into ``group`` (one route entry for all, out of the OpenAPI schema: ADR 0045)."""

    async def live() -> dict[str, str]:
        return {"status": "ok"}

    async def ready() -> JSONResponse:
        status, results = await checks.run()
        return JSONResponse(
            {"status": status, "checks": results},
            status_code=503 if status == "unhealthy" else 200,
            headers={"Cache-Control": "no-store"},
        )

    add_fixed_route(
        router, f"{prefix}/live", live, group=group, summary="Liveness", tags=["health"]
    )
    add_fixed_route(
        router,
        f"{prefix}/ready",
        ready,
        group=group,
        summary="Readiness",
        tags=["health"],
        response_model=None,
    )
