"""Liveness and readiness: pluggable async checks, each with its own timeout, one verdict."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import APIRouter
from starlette.responses import JSONResponse

from fastapi_resilience._fixed_routes import FixedPathRoutes, add_fixed_route

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


@dataclass(frozen=True, slots=True)
class _Registered:
    check: HealthCheck
    timeout: float
    critical: bool


class HealthChecks:
    """The readiness checks of one app.

    A failing *critical* check makes the app ``"unhealthy"`` (503); a failing non-critical one
    makes it ``"degraded"`` (still 200). A check that returns ``CheckResult("degraded")`` says
    so itself (an open breaker, a rate-limit storage that is down while failing open).
    """

    def __init__(self, *, default_timeout: float = 1.0) -> None:
        if default_timeout <= 0:
            raise ValueError("default_timeout must be > 0 seconds")
        self.default_timeout = default_timeout
        self._checks: dict[str, _Registered] = {}

    def add(
        self,
        name: str,
        check: HealthCheck,
        *,
        timeout: float | None = None,
        critical: bool = True,
    ) -> None:
        """Register ``check`` under ``name`` (replacing one of the same name)."""
        timeout = self.default_timeout if timeout is None else timeout
        if timeout <= 0:
            raise ValueError(f"health check {name!r}: timeout must be > 0 seconds")
        self._checks[name] = _Registered(check, timeout, critical)

    def remove(self, name: str) -> None:
        self._checks.pop(name, None)

    def __contains__(self, name: object) -> bool:
        return name in self._checks

    async def run(self) -> tuple[HealthStatus, dict[str, dict[str, Any]]]:
        """Run every check concurrently; returns the overall status and one entry per check."""
        names = list(self._checks)
        results = await asyncio.gather(*(self._run_one(self._checks[n]) for n in names))
        checks = dict(zip(names, results, strict=True))
        overall: HealthStatus = "ok"
        for entry in checks.values():
            if _RANK[entry["status"]] > _RANK[overall]:
                overall = entry["status"]
        return overall, checks

    async def _run_one(self, registered: _Registered) -> dict[str, Any]:
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
    into ``group`` (one route entry for all, out of the OpenAPI schema: ADR 0046)."""

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
