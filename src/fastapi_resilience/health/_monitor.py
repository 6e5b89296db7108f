"""A health monitor: checks run in the background, recovery actions heal what failed, and an
outage is reported once, at its root.

One asyncio task runs every registered check each ``interval`` (a check before the checks that
depend on it) and feeds each result to :class:`HealthChecks`, so readiness serves the latest
result and runs nothing. A check whose dependency fails is not run: it is reported failing with
that dependency as its ``root_cause``. A failing check's recovery actions run, then the check
runs again to verify; while it still fails, the next attempt waits ``recovery_backoff`` seconds,
doubling up to ``recovery_backoff_max``, between the rounds if need be.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi_resilience.clock import SYSTEM_CLOCK, Clock
from fastapi_resilience.events import EventBus, EventSource
from fastapi_resilience.exceptions import ConfigurationError
from fastapi_resilience.health._checks import HealthChecks, HealthStatus, _Registered

__all__ = ["HealthMonitor", "RecoveryOutcome"]

logger = logging.getLogger("fastapi_resilience.health")

#: How a recovery attempt ended: the check passed again, it still failed, or an action raised
#: or did not finish within the check's timeout (and the check still failed).
RecoveryOutcome = Literal["recovered", "failed", "error"]
_OUTCOMES: tuple[RecoveryOutcome, ...] = ("recovered", "failed", "error")

#: Times closer than this count as equal: a wake-up computed as ``now + (due - now)`` may land a
#: rounding error short of ``due``.
_SLACK = 1e-9

#: The name of the monitor's task, for ``asyncio.all_tasks()`` and debuggers.
TASK_NAME = "fastapi_resilience.health_monitor"


@dataclass(slots=True, eq=False)
class _State:
    """What the monitor knows of one check."""

    #: The latest result: ``status``, ``checked_at`` and, when it ran, ``duration_ms``; with
    #: ``detail`` when there is one.
    entry: dict[str, Any]
    #: The dependency whose failure this check's is (the root of a chain), else ``None``.
    root_cause: str | None = None
    consecutive_failures: int = 0
    #: Monotonic time of the first failing result of the current outage.
    failing_since: float | None = None
    #: ``health.check_failed`` was published for the current outage (so, at its end,
    #: ``health.check_recovered`` is too). Never for an outage that was only a dependency's.
    announced: bool = False
    #: Recovery attempts in the current outage (the last one's, once it is over).
    attempts: int = 0
    last_outcome: RecoveryOutcome | None = None
    #: What went wrong in the last attempt's actions (a class name, never an exception's text).
    last_error: str | None = None
    #: The wait after the last failed attempt; ``0``: none failed in this outage.
    backoff: float = 0.0
    #: Monotonic time of the next attempt; ``None``: none scheduled (the next failing run
    #: in a round tries at once).
    next_attempt_at: float | None = None
    #: Attempts since the monitor was made, by outcome.
    recoveries: dict[RecoveryOutcome, int] = field(
        default_factory=lambda: dict.fromkeys(_OUTCOMES, 0)
    )

    @property
    def failing(self) -> bool:
        return bool(self.entry["status"] != "ok")


def _seconds(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigurationError(f"{name} must be a number of seconds, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ConfigurationError(f"{name} must be > 0 seconds, got {value!r}")
    return float(value)


class HealthMonitor(EventSource):
    """Runs ``checks`` in the background, heals what fails, and reports each outage once.

    Args:
        checks: the checks to run; their ``depends_on`` and ``recover`` (``HealthChecks.add``)
            say what needs what and how to heal it.
        interval: seconds between two rounds of every check.
        recovery_backoff: the wait after a failed recovery attempt; it doubles at every
            further failed attempt and is back to this when the check passes.
        recovery_backoff_max: the longest wait between two recovery attempts.
        clock: times the rounds, the backoff and ``checked_at``.
        events: the bus for ``health.check_failed``, ``health.recovery_attempted`` and
            ``health.check_recovered``.

    Call :meth:`start` inside the running event loop (at the app's start-up) and ``await``
    :meth:`stop` at its shutdown. While it runs, ``checks.run()`` (``/health/ready``) serves the
    latest result of each check it has run; before, and after ``stop()``, checks run on demand.

    "Failing" means any status but ``"ok"``: a check reporting ``CheckResult("degraded")`` is
    failing too (its recovery actions run, its dependents are not run).

    Raises:
        ConfigurationError: (a ``ValueError``) an argument is out of range, naming it.

    .. versionadded:: 0.2
    """

    __slots__ = (
        "_fed",
        "_states",
        "_task",
        "checks",
        "clock",
        "interval",
        "recovery_backoff",
        "recovery_backoff_max",
    )

    def __init__(
        self,
        checks: HealthChecks,
        *,
        interval: float = 10.0,
        recovery_backoff: float = 1.0,
        recovery_backoff_max: float = 60.0,
        clock: Clock = SYSTEM_CLOCK,
        events: EventBus | None = None,
    ) -> None:
        if not isinstance(checks, HealthChecks):
            raise ConfigurationError(f"checks must be a HealthChecks, got {checks!r}")
        self.checks = checks
        self.interval = _seconds("interval", interval)
        self.recovery_backoff = _seconds("recovery_backoff", recovery_backoff)
        self.recovery_backoff_max = _seconds("recovery_backoff_max", recovery_backoff_max)
        if self.recovery_backoff_max < self.recovery_backoff:
            raise ConfigurationError(
                f"recovery_backoff_max must be >= recovery_backoff ({recovery_backoff!r}), "
                f"got {recovery_backoff_max!r}"
            )
        self.clock = clock
        self._events = events
        self._states: dict[str, _State] = {}
        self._task: asyncio.Task[None] | None = None
        #: Checks whose readiness entry this monitor feeds.
        self._fed: set[str] = set()

    # --- life cycle ---------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether the background task is running."""
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Start the background task (the first round runs at once); harmless when running.

        Raises:
            ValueError: a check depends on an unregistered name or is in a cycle, naming it.
            RuntimeError: no event loop is running.
        """
        if self.running:
            return
        self.checks.validate()
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._loop(), name=TASK_NAME)

    async def stop(self) -> None:
        """Cancel the background task and wait for it; readiness then runs checks on demand
        again. Harmless when not running."""
        task, self._task = self._task, None
        try:
            if task is not None:
                if not task.done():
                    task.cancel()
                # ``wait``: the task's cancellation is not ours; ours (if any) still propagates.
                await asyncio.wait([task])
                if not task.cancelled() and task.exception() is not None:
                    logger.error("health monitor stopped on an error", exc_info=task.exception())
        finally:
            for name in self._fed:
                self.checks.unfeed(name)
            self._fed.clear()

    # --- report -------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Per check the monitor has run: ``status``, ``up``, ``detail``, ``root_cause``,
        ``checked_at`` (wall time), ``consecutive_failures``, ``recovery`` (``attempts`` in the
        current or last outage, ``last_outcome``, ``next_attempt_in``, ``last_error``) and
        ``recoveries`` (attempts since the monitor was made, by outcome)."""
        return {
            name: {
                "status": state.entry["status"],
                "up": not state.failing,
                "detail": state.entry.get("detail"),
                "root_cause": state.root_cause,
                "checked_at": state.entry["checked_at"],
                "consecutive_failures": state.consecutive_failures,
                "recovery": {
                    "attempts": state.attempts,
                    "last_outcome": state.last_outcome,
                    "next_attempt_in": self._next_attempt_in(state),
                    "last_error": state.last_error,
                },
                "recoveries": dict(state.recoveries),
            }
            for name, state in self._states.items()
            if name in self.checks
        }

    def _entry(self, name: str) -> dict[str, Any]:
        """Check ``name``'s readiness entry, read at every readiness call."""
        state = self._states[name]
        entry = dict(state.entry)
        if state.root_cause is not None:
            entry["root_cause"] = state.root_cause
        if state.attempts:
            entry["recovery"] = {
                "attempts": state.attempts,
                "last_outcome": state.last_outcome,
                "next_attempt_in": self._next_attempt_in(state),
            }
        return entry

    def _next_attempt_in(self, state: _State) -> float | None:
        if state.next_attempt_at is None:
            return None
        return round(max(0.0, state.next_attempt_at - self.clock.monotonic()), 3)

    # --- the loop -----------------------------------------------------------------------------

    async def _loop(self) -> None:
        next_round = self.clock.monotonic()
        while True:
            try:
                now = self.clock.monotonic()
                if next_round <= now + _SLACK:
                    next_round = now + self.interval
                    await self._round()
                await self._recover_due()
                attempts = [s.next_attempt_at for s in self._states.values()]
                wake = min([next_round, *(at for at in attempts if at is not None)])
            except Exception:
                # A bug of ours must not end the monitoring: report it and try again later.
                logger.exception("health monitor round failed")
                wake = next_round = self.clock.monotonic() + self.interval
            await self.clock.sleep(max(0.0, wake - self.clock.monotonic()))

    async def _round(self) -> None:
        registered = self.checks._checks
        for gone in [name for name in self._states if name not in registered]:
            del self._states[gone]
            self._fed.discard(gone)
        # A live check mirrors state that reports its own changes (an open breaker): the
        # monitor leaves it to readiness, unless it has recovery actions or others need it.
        needed = {name for check in registered.values() for name in check.depends_on}
        await self._evaluate(
            [
                name
                for name, check in registered.items()
                if not check.live or check.recover or name in needed
            ]
        )

    async def _evaluate(self, names: Iterable[str]) -> None:
        """Run ``names``, each after the checks it depends on."""
        for level in self._levels(names):
            await asyncio.gather(*(self._evaluate_one(name) for name in level))

    def _levels(self, names: Iterable[str]) -> list[list[str]]:
        """``names`` grouped by depth: checks with no dependency first."""
        registered = self.checks._checks
        depths: dict[str, int] = {}

        def depth(name: str, seen: frozenset[str]) -> int:
            if name not in depths:
                needs = [
                    d for d in registered[name].depends_on if d in registered and d not in seen
                ]
                depths[name] = 1 + max((depth(d, seen | {name}) for d in needs), default=-1)
            return depths[name]

        levels: dict[int, list[str]] = {}
        for name in names:
            if name in registered:
                levels.setdefault(depth(name, frozenset()), []).append(name)
        return [levels[d] for d in sorted(levels)]

    async def _evaluate_one(self, name: str) -> None:
        registered = self.checks._checks.get(name)
        if registered is None:
            return
        blocked = self._blocked_by(registered)
        if blocked is not None:
            root_cause, detail = blocked
            entry = {
                "status": _failed_status(registered),
                "detail": detail,
                "checked_at": self.clock.time(),
            }
            self._record(name, registered, entry, root_cause=root_cause)
            # Its own recovery actions cannot help while it is not run: none is due until it is.
            self._states[name].next_attempt_at = None
            return
        await self._run_check(name, registered)
        state = self._states[name]
        if state.failing and registered.recover:
            due = state.next_attempt_at
            if due is None or due <= self.clock.monotonic() + _SLACK:
                await self._attempt_recovery(name, registered)

    def _blocked_by(self, registered: _Registered) -> tuple[str | None, str] | None:
        """Why the check is not run: ``(root cause, detail)``; ``None``: it runs."""
        for dependency in registered.depends_on:
            if dependency not in self.checks:
                # Registered after start-up without its dependency: the check's own fault.
                return None, f"depends on {dependency!r}, which is not a registered check"
            state = self._states.get(dependency)
            if state is not None and state.failing:
                root = state.root_cause or dependency
                return root, f"not run: depends on {dependency!r}, which is failing"
        return None

    async def _run_check(self, name: str, registered: _Registered) -> None:
        generation = registered.generation
        entry = await self.checks._checked(registered)
        entry["checked_at"] = self.clock.time()
        # ``forget()`` while it ran: what it found may be out of date, so readiness runs the
        # check itself until the next round.
        self._record(name, registered, entry, feed=registered.generation == generation)

    def _record(
        self,
        name: str,
        registered: _Registered,
        entry: dict[str, Any],
        *,
        root_cause: str | None = None,
        feed: bool = True,
    ) -> None:
        """Store a result; publish ``check_failed`` / ``check_recovered`` on a change."""
        state = self._states.get(name)
        was_failing = state is not None and state.failing
        if state is None:
            state = self._states[name] = _State(entry)
        state.entry = entry
        state.root_cause = root_cause
        if state.failing:
            state.consecutive_failures += 1
            if not was_failing:  # a new outage: its recovery starts afresh
                state.failing_since = self.clock.monotonic()
                state.attempts, state.last_outcome, state.last_error = 0, None, None
                state.backoff, state.next_attempt_at = 0.0, None
            if root_cause is None and not state.announced:
                # Its own outage (a dependency's is reported at that dependency, once).
                state.announced = True
                details = {"detail": entry["detail"]} if entry.get("detail") else {}
                self.events.emit(
                    "health.check_failed",
                    name,
                    level=logging.WARNING,
                    status=entry["status"],
                    root_cause=name,
                    critical=registered.critical,
                    **details,
                )
        else:
            if state.announced:
                since = state.failing_since
                self.events.emit(
                    "health.check_recovered",
                    name,
                    level=logging.INFO,
                    failures=state.consecutive_failures,
                    recovery_attempts=state.attempts,
                    down_for=None if since is None else round(self.clock.monotonic() - since, 3),
                )
            state.announced = False
            state.consecutive_failures = 0
            state.failing_since = None
            state.backoff, state.next_attempt_at = 0.0, None
        if feed and not registered.live:
            self.checks.feed(name, functools.partial(self._entry, name))
            self._fed.add(name)

    # --- recovery -----------------------------------------------------------------------------

    async def _recover_due(self) -> None:
        """Make the recovery attempts whose backoff is over; run again what depends on a check
        that recovered."""
        now = self.clock.monotonic()
        due = [
            name
            for name, state in self._states.items()
            if state.next_attempt_at is not None and state.next_attempt_at <= now + _SLACK
        ]
        if not due:
            return
        recovered: list[str] = []

        async def attempt(name: str) -> None:
            registered = self.checks._checks.get(name)
            state = self._states[name]
            if registered is None or not registered.recover or not state.failing:
                state.next_attempt_at = None
                return
            await self._attempt_recovery(name, registered)
            if not state.failing:
                recovered.append(name)

        await asyncio.gather(*(attempt(name) for name in due))
        if recovered:
            await self._evaluate(self._dependents(recovered))

    def _dependents(self, names: Iterable[str]) -> list[str]:
        """The checks that depend on one of ``names``, directly or not."""
        registered = self.checks._checks
        found: set[str] = set()
        frontier = set(names)
        while frontier:
            frontier = {
                name
                for name, r in registered.items()
                if name not in found and frontier.intersection(r.depends_on)
            }
            found |= frontier
        return [name for name in registered if name in found]

    async def _attempt_recovery(self, name: str, registered: _Registered) -> None:
        """Run the check's recovery actions in order, each within its timeout, stopping at one
        that raises or hangs; then run the check to see whether it passes."""
        state = self._states[name]
        state.attempts += 1
        error: str | None = None
        for index, action in enumerate(registered.recover, start=1):
            try:
                await asyncio.wait_for(action(), registered.timeout)
            except TimeoutError:
                error = f"recovery action {index} timed out after {registered.timeout:g}s"
                break
            except Exception as exc:
                # The class name only: an exception's text may carry hosts or credentials.
                error = f"recovery action {index} raised {type(exc).__name__}"
                break
        generation = registered.generation
        entry = await self.checks._checked(registered)
        entry["checked_at"] = self.clock.time()
        passed = entry["status"] == "ok"
        outcome: RecoveryOutcome = "recovered" if passed else "error" if error else "failed"
        state.last_outcome, state.last_error = outcome, error
        state.recoveries[outcome] += 1
        if not passed:
            backoff = self.recovery_backoff if state.backoff == 0 else state.backoff * 2
            state.backoff = min(backoff, self.recovery_backoff_max)
            state.next_attempt_at = self.clock.monotonic() + state.backoff
        attributes: dict[str, Any] = {
            "attempt": state.attempts,
            "outcome": outcome,
            "next_attempt_in": None if passed else state.backoff,
        }
        if error is not None:
            attributes["error"] = error
        self.events.emit("health.recovery_attempted", name, level=logging.INFO, **attributes)
        self._record(name, registered, entry, feed=registered.generation == generation)

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"HealthMonitor(interval={self.interval:g}, {state})"


def _failed_status(registered: _Registered) -> HealthStatus:
    return "unhealthy" if registered.critical else "degraded"
