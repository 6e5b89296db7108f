"""Degraded mode: features the app switches off, by hand or while a breaker they need is open.

A feature is a named part of the app (recommendations, search, exports) that the rest can do
without. While one is off the app is in degraded mode: ``requires_feature`` refuses its routes
with 503 ``feature_unavailable``, ``DegradedModeMiddleware`` sheds the paths it owns before any
route code runs and marks every response with a notice header, readiness says ``"degraded"``,
and each change is published once on the event bus (logged with the correlation ID, counted).
"""

from __future__ import annotations

import logging
import re
import weakref
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

from starlette.requests import Request
from starlette.routing import BaseRoute, Match, Mount
from starlette.types import Receive, Scope, Send

from fastapi_resilience._asgi.app_state import resilience_of
from fastapi_resilience._asgi.pipeline import Answer, RequestState, state_of
from fastapi_resilience._asgi.routes import dependency_calls, flat_routes
from fastapi_resilience.clock import SYSTEM_CLOCK, Clock
from fastapi_resilience.correlation._ids import HEADER_NAME
from fastapi_resilience.events import EventBus, EventSource
from fastapi_resilience.exceptions import ConfigurationError, FeatureUnavailableError
from fastapi_resilience.health._checks import CheckResult
from fastapi_resilience.outbound._breaker import (
    OPEN,
    BreakerRegistry,
    CircuitBreaker,
    default_registry,
)

__all__ = [
    "DEGRADED_ENTERED",
    "DEGRADED_LEFT",
    "FEATURE_ATTR",
    "FEATURE_DISABLED",
    "FEATURE_ENABLED",
    "DegradedMode",
    "Feature",
    "FeatureStatus",
    "requires_feature",
]

#: Event kinds, published on the mode's bus.
FEATURE_DISABLED = "feature.disabled"
FEATURE_ENABLED = "feature.enabled"
DEGRADED_ENTERED = "degraded.entered"
DEGRADED_LEFT = "degraded.left"

#: Feature names go into a response header and metric labels: keep them tokens.
_FEATURE_NAME = re.compile(r"[A-Za-z0-9._\-]{1,64}")
#: The detail of a refusal. Reasons (breaker names, an operator's words) stay in the logs and
#: on the readiness page; the client learns which feature and, when known, when to come back.
UNAVAILABLE_DETAIL = "The feature {name!r} is temporarily unavailable."
#: What a ``disabled_features`` setting puts down as the reason.
SETTINGS_REASON = "switched off by the disabled_features setting"

Cause = Literal["manual", "breaker"]


@dataclass(frozen=True, slots=True)
class FeatureStatus:
    """Whether a feature is available now and, when it is not, why and for how long.

    ``retry_after`` is the number of seconds until it is expected back (the time its open
    breaker has left, or what is left of a timed switch-off); ``None`` when nobody knows.
    """

    name: str
    available: bool
    cause: Cause | None = None
    reason: str | None = None
    retry_after: float | None = None


class Feature:
    """A part of the app that can be switched off; declared with :meth:`DegradedMode.feature`."""

    __slots__ = ("_off_reason", "_off_until", "depends_on", "description", "name", "paths")

    def __init__(
        self, name: str, depends_on: tuple[str, ...], paths: tuple[str, ...], description: str
    ) -> None:
        self.name = name
        #: Names of the circuit breakers it needs: while any of them is open, it is off.
        self.depends_on = depends_on
        #: Path prefixes it owns: while it is off, the middleware answers them itself.
        self.paths = paths
        self.description = description
        self._off_reason: str | None = None
        self._off_until: float | None = None

    def owns(self, path: str) -> bool:
        """True for one of its prefixes and anything below it (``/search`` owns
        ``/search/books``, not ``/searches``)."""
        for prefix in self.paths:
            if path == prefix or path.startswith(prefix if prefix.endswith("/") else prefix + "/"):
                return True
        return False

    def __repr__(self) -> str:
        return f"Feature({self.name!r}, depends_on={self.depends_on!r}, paths={self.paths!r})"


class DegradedMode(EventSource):
    """The app's switchable features and whether it runs degraded now.

    ``install`` makes one per app (``resilience.degraded``) on the app's event bus and its
    breakers' registry; declare features on it after ``install``::

        resilience.degraded.feature(
            "recommendations", depends_on=["recommender"], paths=["/recommendations"]
        )
        resilience.degraded.disable("search", reason="reindexing", duration=600)

    A feature is off while it is switched off by hand (until :meth:`enable`, or for
    ``duration`` seconds) or while a breaker it depends on is *open*. It is back on when the
    breaker turns half-open, so the trial calls that can close the breaker get through.

    ``active`` (a plain attribute, read per request) is true while any feature is off. The
    mode listens on each breaker it depends on (from declaration, or from start-up for a
    breaker registered later); it also looks again on every request while it is degraded,
    on every readiness check and on every switch, so a breaker that turns half-open without
    being called, or a timed switch-off that ends, is noticed.

    Args:
        breakers: where ``depends_on`` names are looked up (the default registry).
        events: the bus it publishes its changes on (the fallback bus, which logs, for None).
        clock: for timed switch-offs.
        notice_header: the response header that lists the features off while degraded
            (``""``: none). Feature names are visible to clients.
        disabled: features that start switched off (the ``disabled_features`` setting).
    """

    def __init__(
        self,
        *,
        breakers: BreakerRegistry | None = None,
        events: EventBus | None = None,
        clock: Clock = SYSTEM_CLOCK,
        notice_header: str = "X-Degraded",
        disabled: Iterable[str] = (),
    ) -> None:
        if notice_header and not HEADER_NAME.fullmatch(notice_header):
            raise ValueError(f"notice_header: {notice_header!r} is not a valid HTTP header name")
        self.breakers = breakers if breakers is not None else default_registry
        self.clock = clock
        self.notice_header = notice_header
        self._header = notice_header.lower().encode("latin-1")
        self._start_disabled = frozenset(disabled)
        self._features: dict[str, Feature] = {}
        self._off: dict[str, FeatureStatus] = {}
        self._refreshing = False
        self._watched: weakref.WeakSet[CircuitBreaker] = weakref.WeakSet()
        #: True while any feature is off.
        self.active = False
        #: The notice header's value while degraded: the features off, comma-separated.
        self.notice = b""
        self._events = events
        #: ``requires_feature(name, mode=self)``'s dependencies, one per name: kept here, so
        #: they go when the mode goes.
        self.feature_dependencies: dict[str, Callable[[Request], Awaitable[None]]] = {}
        #: Path prefixes never shed, whatever feature claims them (:meth:`keep_serving`).
        self._kept: tuple[str, ...] = ()

    # -- declaring ---------------------------------------------------------------------

    def keep_serving(self, prefixes: Sequence[str]) -> None:
        """Never shed a path under ``prefixes``, even where a feature that is off claims it:
        ``install()`` keeps its health, metrics and admin routes this way, so a feature on
        ``"/"`` switched off cannot lock operators out of switching it on again."""
        self._kept = (*self._kept, *prefixes)

    def feature(
        self,
        name: str,
        *,
        depends_on: Sequence[str] = (),
        paths: Sequence[str] = (),
        description: str = "",
    ) -> Feature:
        """Declare a feature; returns it.

        Raises:
            ValueError: the name is taken or not 1 to 64 characters of ``[A-Za-z0-9._-]``,
                or a path does not start with ``/``.
            TypeError: ``paths`` or ``depends_on`` is a string rather than a list.
        """
        if not _FEATURE_NAME.fullmatch(name):
            raise ValueError(f"feature name {name!r}: use 1 to 64 characters of [A-Za-z0-9._-]")
        if name in self._features:
            raise ValueError(f"feature {name!r} is already declared")
        if isinstance(paths, str) or isinstance(depends_on, str):
            raise TypeError(f"feature {name!r}: paths and depends_on take lists of strings")
        for path in paths:
            if not path.startswith("/"):
                raise ValueError(f"feature {name!r}: path {path!r} must start with '/'")
        declared = Feature(name, tuple(depends_on), tuple(paths), description)
        self._features[name] = declared
        if name in self._start_disabled:
            declared._off_reason = SETTINGS_REASON
        self.refresh()
        return declared

    def features(self) -> list[Feature]:
        """The declared features, by name."""
        return [self._features[name] for name in sorted(self._features)]

    def __contains__(self, name: object) -> bool:
        return name in self._features

    def validate(self, routes: Sequence[BaseRoute] = ()) -> None:
        """Check what can only be checked once the app is assembled (``install`` runs it at
        start-up): every ``depends_on`` names a registered breaker, every name in
        ``disabled_features`` and every ``requires_feature`` of ``routes`` a declared feature.

        Raises:
            ConfigurationError: naming the feature, setting or route at fault.
        """
        known = ", ".join(sorted(self._features)) or "none"
        for feature in self._features.values():
            for breaker in feature.depends_on:
                if breaker not in self.breakers:
                    raise ConfigurationError(
                        f"feature {feature.name!r}: depends_on names {breaker!r}, but no circuit "
                        f"breaker of that name is registered ({', '.join(self.breakers.names())})"
                    )
        for name in sorted(self._start_disabled - self._features.keys()):
            raise ConfigurationError(
                f"disabled_features (env RESILIENCE_DISABLED_FEATURES): {name!r} is not a "
                f"declared feature (declared: {known})"
            )
        # Breakers registered after their features were declared are watched from here on.
        self.refresh()
        for path, name in _required_features(routes):
            if name not in self._features:
                raise ConfigurationError(
                    f"route {path}: requires_feature({name!r}) names no declared feature "
                    f"(declared: {known})"
                )

    # -- switching ---------------------------------------------------------------------

    def disable(
        self, name: str, *, reason: str = "switched off", duration: float | None = None
    ) -> None:
        """Switch ``name`` off until :meth:`enable`, or for ``duration`` seconds.

        Raises:
            LookupError: no feature of that name is declared.
        """
        feature = self._get(name)
        if duration is not None and not duration > 0:
            raise ValueError(f"duration must be > 0 seconds, got {duration!r}")
        feature._off_reason = reason
        feature._off_until = None if duration is None else self.clock.monotonic() + duration
        # A new reason or end for a feature that stays off is not a change of state: refresh
        # publishes nothing then, but the status it keeps is the new one.
        self.refresh()

    def enable(self, name: str) -> None:
        """Undo :meth:`disable`. The feature stays off while a breaker it needs is open."""
        feature = self._get(name)
        feature._off_reason = None
        feature._off_until = None
        self.refresh()

    # -- reading -----------------------------------------------------------------------

    def status(self, name: str) -> FeatureStatus:
        """Whether ``name`` is available now, and why not."""
        self.refresh()
        return self._off.get(name) or FeatureStatus(self._get(name).name, True)

    def available(self, name: str) -> bool:
        """True when ``name`` is on (for a route that leaves a part out rather than failing)."""
        if not self.active:
            self._get(name)
            return True
        return self.status(name).available

    def require(self, name: str, *, looked: bool = False) -> None:
        """Return when ``name`` is on; raise ``FeatureUnavailableError`` (503) when not.

        ``looked``: every feature was looked at again during this request already (by
        ``DegradedModeMiddleware``): decide on that look instead of taking another.

        Raises:
            FeatureUnavailableError: with ``Retry-After`` when the wait is known.
            LookupError: no feature of that name is declared.
        """
        if looked:
            self._get(name)
            status = self._off.get(name)
            if status is not None:
                raise unavailable_error(status)
        elif not self.available(name):
            raise unavailable_error(self._off[name])

    def unavailable(self) -> list[FeatureStatus]:
        """The features off now, by name."""
        self.refresh()
        return [self._off[name] for name in sorted(self._off)]

    def shed(self, path: str) -> FeatureUnavailableError | None:
        """The refusal for a request to ``path`` when a feature that is off owns it."""
        if self._kept and any(_under(path, prefix) for prefix in self._kept):
            return None
        status = self.owner_off(path)
        return None if status is None else unavailable_error(status)

    def owner_off(self, path: str) -> FeatureStatus | None:
        """The status of the feature that is off and owns ``path``, if there is one."""
        for status in self._off.values():
            if self._features[status.name].owns(path):
                return status
        return None

    async def health_check(self) -> CheckResult:
        """A readiness check: ``"degraded"``, naming each feature off and why."""
        off = self.unavailable()
        if not off:
            return CheckResult("ok")
        parts = [f"{s.name} ({s.reason})" for s in off]
        return CheckResult("degraded", "features off: " + "; ".join(parts))

    # -- keeping up to date ------------------------------------------------------------

    def _watch(self, breaker: CircuitBreaker) -> None:
        # A listener on the breaker itself, not the event bus: a breaker reports on the bus of
        # the first app that bound it, and a mode must see its breakers whatever bus that is.
        # Breakers are process-wide and modes per app: the listener holds the mode weakly
        # and removes itself once the mode is gone (apps built per test, say).
        if breaker in self._watched:
            return
        self._watched.add(breaker)
        mode = weakref.ref(self)

        def on_change(_breaker: CircuitBreaker, _old: str, _new: str) -> None:
            watcher = mode()
            if watcher is None:
                remove()
            else:
                watcher.refresh()

        remove = breaker.add_listener(on_change)

    def refresh(self) -> None:
        """Look at every feature again and publish what changed."""
        if self._refreshing:
            # Reading a breaker's state can turn it half-open, which publishes an event that
            # comes back here: the outer pass reads the new state anyway.
            return
        self._refreshing = True
        try:
            now = self.clock.monotonic()
            off: dict[str, FeatureStatus] = {}
            for name in sorted(self._features):
                status = self._status_of(self._features[name], now)
                if status is not None:
                    off[name] = status
        finally:
            self._refreshing = False
        self._apply(off)

    def _status_of(self, feature: Feature, now: float) -> FeatureStatus | None:
        if feature._off_reason is not None:
            until = feature._off_until
            if until is None or now < until:
                left = None if until is None else until - now
                return FeatureStatus(feature.name, False, "manual", feature._off_reason, left)
            feature._off_reason = feature._off_until = None
        registry = self.breakers
        open_breakers: list[CircuitBreaker] = []
        for name in feature.depends_on:
            if name in registry:
                breaker = registry.get(name)
                self._watch(breaker)
                if breaker.state == OPEN:
                    open_breakers.append(breaker)
        if not open_breakers:
            return None
        names = ", ".join(repr(b.name) for b in open_breakers)
        return FeatureStatus(
            feature.name,
            False,
            "breaker",
            f"circuit breaker {names} open",
            max(b.time_left_open() for b in open_breakers),
        )

    def _apply(self, off: dict[str, FeatureStatus]) -> None:
        before = self._off
        self._off = off
        self.active = bool(off)
        self.notice = ", ".join(off).encode("ascii")
        for name, status in off.items():
            if name not in before:
                self.events.emit(
                    FEATURE_DISABLED,
                    name,
                    cause=status.cause,
                    reason=status.reason,
                    retry_after=None if status.retry_after is None else round(status.retry_after),
                )
        for name in before.keys() - off.keys():
            self.events.emit(FEATURE_ENABLED, name, level=logging.INFO)
        if off and not before:
            self.events.emit(DEGRADED_ENTERED, "app", features=",".join(off))
        elif before and not off:
            self.events.emit(DEGRADED_LEFT, "app", level=logging.INFO)

    def _get(self, name: str) -> Feature:
        try:
            return self._features[name]
        except KeyError:
            known = ", ".join(sorted(self._features)) or "none"
            raise LookupError(
                f"no feature named {name!r} is declared (declared: {known})"
            ) from None

    def notice_pair(self) -> tuple[bytes, bytes] | None:
        """The notice header as a raw pair, while degraded and a header is configured."""
        if not self.active or not self._header:
            return None
        return (self._header, self.notice)

    def __repr__(self) -> str:
        return f"DegradedMode(features={sorted(self._features)}, off={sorted(self._off)})"


def unavailable_error(status: FeatureStatus) -> FeatureUnavailableError:
    """The 503 for a feature that is off."""
    return FeatureUnavailableError(
        UNAVAILABLE_DETAIL.format(name=status.name),
        extensions={"feature": status.name},
        retry_after=status.retry_after,
    )


class DegradedStep:
    """While the app is degraded: shed the paths of features that are off (503
    ``feature_unavailable`` problem+json, ``Retry-After`` when known) and put the notice header
    on every response. While nothing is off it costs one attribute test per request.

    A WebSocket connection to a path it sheds is closed with code 1013 (try again later)
    before it is accepted; other connections pass.
    """

    websocket = True

    def __init__(self, mode: DegradedMode) -> None:
        self.mode = mode

    def enter(self, state: RequestState) -> Answer | None:
        mode = self.mode
        if not mode.active:
            return None
        mode.refresh()
        if state.scope["type"] == "websocket":
            return None if mode.owner_off(state.path) is None else _close_unavailable
        # The route's ``requires_feature`` decides on this look (one look per request, which
        # an outage makes every request pay).
        state.degraded_mode = mode
        notice = mode.notice_pair()
        if notice is not None:
            state.fields.append((notice,))
        error = mode.shed(state.path)
        if error is None or _method_not_served(state.scope):
            return None
        # Imported here: the renderer pulls in the error handlers.
        from fastapi_resilience.problems._render import app_error_response

        return app_error_response(state.scope, error)


def _method_not_served(scope: Scope, routes: Sequence[BaseRoute] | None = None) -> bool:
    """Whether the app routes the request's path, but not its method: its router then answers
    405 with ``Allow``, whatever state the feature is in. Looked up only for a request about
    to be shed, so no other request pays for it (ADR 0077). A mounted app's routes are looked
    at as its router does (a mount without routes, static files, serves every method)."""
    if routes is None:
        routes = getattr(getattr(scope.get("app"), "router", None), "routes", None) or ()
    partial = False
    for route in routes:
        match, child = route.matches(scope)
        if match is Match.FULL:
            inner = route.routes if isinstance(route, Mount) else None
            return bool(inner) and _method_not_served({**scope, **child}, inner)
        partial = partial or match is Match.PARTIAL
    return partial


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix if prefix.endswith("/") else prefix + "/")


async def _close_unavailable(scope: Scope, receive: Receive, send: Send) -> None:
    message = await receive()
    if message["type"] == "websocket.connect":
        await send({"type": "websocket.close", "code": 1013, "reason": "feature unavailable"})


# -- the dependency ----------------------------------------------------------------------

#: The attribute that marks a ``requires_feature`` dependency with its feature's name.
FEATURE_ATTR = "__fastapi_resilience_feature__"
#: ``requires_feature(name)``'s dependencies (the app's mode, found per request), by name.
_app_mode_deps: dict[str, Callable[[Request], Awaitable[None]]] = {}


def requires_feature(
    name: str, *, mode: DegradedMode | None = None
) -> Callable[[Request], Awaitable[None]]:
    """A dependency that refuses the route with 503 ``feature_unavailable`` while ``name``
    is off::

        @app.get("/recommendations", dependencies=[Depends(requires_feature("recommendations"))])

    The feature is looked up in the app's degraded mode (``install``'s), or in ``mode``. The
    same callable is returned for the same name every time, so ``app.dependency_overrides``
    can replace it. ``install`` checks at start-up that the feature is declared.
    """
    made = _app_mode_deps if mode is None else mode.feature_dependencies
    dependency = made.get(name)
    if dependency is None:

        async def dependency(request: Request) -> None:
            found = mode if mode is not None else mode_of(request)
            state = state_of(request.scope)
            found.require(name, looked=state is not None and state.degraded_mode is found)

        dependency.__name__ = f"requires_feature_{name}"
        dependency.__qualname__ = dependency.__name__
        setattr(dependency, FEATURE_ATTR, name)
        made[name] = dependency
    return dependency


def mode_of(request: Request) -> DegradedMode:
    """The degraded mode ``install`` set up for the request's app (or the app it is
    mounted in)."""
    mode = getattr(resilience_of(request.app), "degraded", None)
    if not isinstance(mode, DegradedMode):
        raise LookupError(
            "requires_feature: this app has no degraded mode; call install(app) first, "
            "or pass requires_feature(name, mode=...)"
        )
    return mode


def _required_features(routes: Sequence[BaseRoute]) -> Iterator[tuple[str, str]]:
    """``(path, feature)`` for every ``requires_feature`` in the routes' dependency trees,
    included routers' routes too."""
    for route in flat_routes(routes):
        for call in dependency_calls(getattr(route, "dependant", None)):
            name = getattr(call, FEATURE_ATTR, None)
            if name is not None:
                yield getattr(route, "path", "?"), name
