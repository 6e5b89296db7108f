"""What ``install()`` sets up for one app, and hands back: :class:`Resilience`."""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from fastapi_resilience._asgi.paths import MountTemplates
from fastapi_resilience._settings import ResilienceSettings
from fastapi_resilience.clock import SYSTEM_CLOCK, Clock
from fastapi_resilience.events import EventBus
from fastapi_resilience.exceptions import ConfigurationError
from fastapi_resilience.health._checks import HealthChecks
from fastapi_resilience.health._monitor import HealthMonitor
from fastapi_resilience.operations._degraded import DegradedMode
from fastapi_resilience.operations._metrics import prometheus_available
from fastapi_resilience.outbound._breaker import default_registry

if TYPE_CHECKING:
    from fastapi_resilience.operations._errors import ErrorAnalytics, ProblemRecorder
    from fastapi_resilience.operations._metrics import MetricsSources
    from fastapi_resilience.outbound._dead_letter import DeadLetterQueue, ReplayHandler
    from fastapi_resilience.outbound._policy_file import PolicyFileWatcher
    from fastapi_resilience.ratelimit._limiter import RateLimiter

__all__ = ["Resilience", "install_paths"]


class Resilience:
    """What ``install`` set up for one app: settings, the event bus, health checks, the rate
    limiter and the degraded mode (``degraded``, where the app's features are declared)."""

    def __init__(
        self,
        settings: ResilienceSettings,
        *,
        events: EventBus | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.events = events or EventBus()
        self.health = HealthChecks(
            default_timeout=settings.health_check_timeout,
            cache_seconds=settings.health_cache_seconds,
            clock=clock,
        )
        #: The app's rate limiter; ``None`` when ``rate_limit_enabled`` is off.
        self.rate_limiter: RateLimiter | None = None
        #: The app's switchable features; the breakers they name are the default registry's.
        self.degraded = DegradedMode(
            breakers=default_registry,
            events=self.events,
            clock=clock,
            notice_header=settings.degraded_header,
            disabled=settings.disabled_features,
        )
        #: What this app reports on ``/metrics`` besides the process-wide counts; ``None``
        #: while metrics are off.
        self.metrics: MetricsSources | None = None
        #: The templates of the app's mounts, for metric and analytics labels.
        self.mounts = MountTemplates()
        #: Runs the readiness checks in the background and their recovery actions; ``None``
        #: while ``health_monitor_interval`` is 0.
        self.health_monitor: HealthMonitor | None = None
        if settings.health_monitor_interval > 0:
            self.health_monitor = HealthMonitor(
                self.health,
                interval=settings.health_monitor_interval,
                recovery_backoff=settings.health_recovery_backoff,
                recovery_backoff_max=settings.health_recovery_backoff_max,
                clock=clock,
                events=self.events,
            )
        #: Reloads the named policies when ``policies_file`` changes; ``None`` without the
        #: file, with ``policies_reload`` off, or without ``watchfiles``.
        self.policy_watcher: PolicyFileWatcher | None = None
        #: The error analytics behind ``GET {admin_path}/api/errors`` and the dashboard.
        self.analytics: ErrorAnalytics | None = None
        #: What the problem renderer records each problem answer of the app's requests with.
        self.problem_recorder: ProblemRecorder | None = None
        #: The dead-letter queue the admin API lists and replays (:meth:`use_dead_letters`).
        self.dead_letters: DeadLetterQueue | None = None
        self.replay_handler: ReplayHandler | None = None
        self._on_start: Callable[[], None] | None = None
        self._on_stop: Callable[[], Awaitable[None]] | None = None
        #: Apps with their own ``install()`` mounted in this one: started and stopped with it.
        self._mounted: list[Resilience] = []

    def use_dead_letters(
        self, queue: DeadLetterQueue, *, replay: ReplayHandler | None = None
    ) -> None:
        """Show ``queue`` in the admin API and the dashboard; ``replay`` is what
        ``POST {admin_path}/api/dead-letters/replay`` runs each letter through (without it,
        the queue is listed but not replayed). Its events go to this app's bus."""
        self.dead_letters = queue
        self.replay_handler = replay
        queue.events = self.events
        if self.metrics is not None:
            self.metrics.dead_letters = queue

    def start(self) -> None:
        """Run ``install()``'s start-up checks: the app's lifespan calls it after the app's own
        start-up; an app mounted in another with its own ``install()`` is started by that one
        (Starlette runs no lifespan of a mounted app)."""
        if self._on_start is not None:
            self._on_start()
        if self.health_monitor is not None:
            try:
                self.health_monitor.start()
            except ConfigurationError:
                raise
            except ValueError as exc:  # a dependency on an unknown check, a cycle
                raise ConfigurationError(str(exc)) from None
        if self.policy_watcher is not None:
            # Started by hand outside a loop (a test of the checks): nothing to watch from.
            with contextlib.suppress(RuntimeError):
                self.policy_watcher.start()

    async def stop(self) -> None:
        """Close what ``install()`` opened (the rate-limit storage), mounted installs' too."""
        try:
            if self.policy_watcher is not None:
                await self.policy_watcher.stop()
            if self.health_monitor is not None:
                # First: its checks may use what the rest closes (the rate-limit storage).
                await self.health_monitor.stop()
            await _stop_each(self._mounted)
        finally:
            if self._on_stop is not None:
                await self._on_stop()

    def __repr__(self) -> str:
        return f"Resilience(checks={len(self.health._checks)})"


async def _stop_each(installs: list[Resilience]) -> None:
    """Stop every mounted install, even when one fails; then raise the first failure."""
    first: BaseException | None = None
    for mounted in installs:
        try:
            await mounted.stop()
        except Exception as exc:
            first = first or exc
    if first is not None:
        raise first


def install_paths(settings: ResilienceSettings) -> dict[str, str]:
    """The paths ``install()`` serves, each with the setting that moves it."""
    paths = {f"{settings.health_path}{end}": "health_path" for end in ("/live", "/ready")}
    if settings.metrics_enabled and prometheus_available():
        paths[settings.metrics_path] = "metrics_path"
    return paths
