"""The request pipeline: one ASGI layer that runs independent steps in order.

A *step* is a small object that looks at a request before the app runs and decides: let it
through, or answer it instead (a 429, a 503). Steps know nothing of each other. They share one
:class:`RequestState` per request: the request's path as the app's routes see it, and what each
step decided (the correlation ID, the rate-limit outcome, the features looked at). Route
dependencies read it too (``rate_limit``, ``requires_feature``, a tiered bulkhead).

Response headers are added once, when the response starts: the fields each step decided for
the request, a list per step in ``state.fields``. A route-level limit checked later replaces
the rate-limit decision and its list; nothing is withdrawn.

``install()`` builds one :class:`Pipeline` (correlation ID, rate limiting, degraded mode).
Each public middleware (``CorrelationIdMiddleware``, ``RateLimitMiddleware``,
``DegradedModeMiddleware``, ``RequestDeadlineMiddleware``) is a pipeline of its one step. A
pipeline inside another (an app with ``install()`` mounted in another, middleware stacked by
hand) joins the request of the outer one: its steps see what the outer steps decided, and the
outer pipeline adds every step's fields.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, cast

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fastapi_resilience._asgi.paths import route_path

__all__ = [
    "PENDING",
    "REQUEST_KEY",
    "UNLIMITED",
    "Answer",
    "Pipeline",
    "RequestState",
    "Step",
    "state_of",
]

#: Where the request's :class:`RequestState` is in the ASGI scope while a pipeline runs it.
REQUEST_KEY = "fastapi_resilience.request"

#: An answer in place of the app: an ASGI app for this one request (a ``Response``, say).
Answer = Callable[[Scope, Receive, Send], Awaitable[None]]
#: Runs what is inside an ``around`` step with the ``send`` it is given.
Inner = Callable[[Send], Awaitable[None]]


class ErrorAnswer(Protocol):
    """Answers an exception the app raised: ``response_started`` says whether the response
    had started (then only logging is left), ``reraise`` whether the pipeline raises the
    exception again afterwards."""

    def __call__(
        self, scope: Scope, exc: Exception, send: Send, *, response_started: bool, reraise: bool
    ) -> Awaitable[None]: ...


class _Pending:
    __slots__ = ()

    def __repr__(self) -> str:
        return "PENDING"


#: What :meth:`Step.enter` returns when it must await something (a Redis check) to decide:
#: the pipeline then awaits the step's ``decide(state)`` for the answer.
PENDING: Answer = cast("Answer", _Pending())


class RequestState:
    """One request, as the steps and the route's dependencies see it.

    ``path`` is the path the app's routes match (``root_path`` removed); the other attributes
    are what the steps decided, each step writing its own. :meth:`send` is the request's one
    ``send`` wrapper: it adds the steps' fields when the response starts.
    """

    __slots__ = (
        "_path",
        "_path_root",
        "_send",
        "arounds",
        "context",
        "correlation_id",
        "deadlines",
        "degraded_mode",
        "fields",
        "limit",
        "limit_fields",
        "scope",
        "started",
        "timing",
    )

    scope: Scope
    _send: Send
    _path: str | None
    _path_root: Any
    #: The request's correlation ID, once a correlation step gave it one.
    correlation_id: str | None
    #: The response's fields the steps decided, a list per step, added when it starts.
    fields: list[Sequence[tuple[bytes, bytes]]]
    #: Context variables the steps set for the request, three items each: variable, value,
    #: token. They are unset while the last body message is sent, and when the request is done.
    context: list[Any] | None
    #: The rate-limit decision: ``None`` before one, :data:`UNLIMITED` for a request a limiter
    #: let pass uncounted (an exempt path, no identity), else its
    #: :class:`~fastapi_resilience.ratelimit._limiter.LimitOutcome`.
    limit: Any
    #: The rate-limit decision's list in ``fields`` (``None``: none is added), which a route
    #: limit checked later replaces.
    limit_fields: list[tuple[bytes, bytes]] | None
    #: The degraded mode whose features were looked at for this request (``None``: none).
    degraded_mode: Any
    #: The deadlines the deadline steps opened for the request: (step, budget, scope) each.
    deadlines: list[tuple[Any, float, Any]] | None
    #: Steps that run the app inside themselves (``around``), added by their ``enter``.
    arounds: list[Any] | None
    #: The response has started.
    started: bool
    #: What a timing step noted when the request came in (``None``: no step times it).
    timing: Any

    def __init__(self, scope: Scope, send: Send) -> None:
        self.scope = scope
        self._send = send
        self._path = self._path_root = None
        self.correlation_id = self.context = self.limit = self.limit_fields = None
        self.degraded_mode = self.deadlines = None
        self.arounds = self.timing = None
        self.fields = []
        self.started = False

    @property
    def path(self) -> str:
        """The path the current app's routes match: ``root_path`` removed. Inside a mounted
        app that has a pipeline of its own, the mount's prefix is in ``root_path`` too."""
        scope = self.scope
        root = scope.get("root_path")
        path = self._path
        if path is None or root is not self._path_root:
            path = self._path = route_path(scope) if root else scope["path"]
            self._path_root = root
        return path

    def send(self, message: Message) -> Awaitable[None]:
        """The server's ``send`` with the steps' fields added to the response start.

        It returns ``send``'s awaitable: no coroutine of its own for every message.
        """
        kind = message["type"]
        if kind == "http.response.start":
            self.started = True
            headers = [*message.get("headers", ())]
            for group in self.fields:
                headers += group
            message["headers"] = headers
        elif kind == "http.response.body" and self.context and not message.get("more_body"):
            return _last_body(self.context, self._send, message)
        return self._send(message)


class _Unlimited:
    __slots__ = ()

    def __repr__(self) -> str:
        return "UNLIMITED"


#: ``RequestState.limit`` of a request a limiter let pass uncounted.
UNLIMITED: Any = _Unlimited()


def state_of(scope: Scope) -> RequestState | None:
    """The request's state while a pipeline runs it; ``None`` outside one."""
    state: RequestState | None = scope.get(REQUEST_KEY)
    return state


class Step(Protocol):
    """One decision about a request, made before the app runs.

    ``enter`` returns ``None`` (go on), an :data:`Answer` (send it instead of the app) or
    :data:`PENDING` (the pipeline awaits the step's ``decide(state)`` for one of the other
    two). A step appends the response fields it decided to ``state.fields`` (a list of its
    own) and the context variables it set to ``state.context``; one with ``leave(state)`` is
    called after the app, whatever happened; one with ``around(state, inner, send)`` runs the
    app inside itself once its ``enter`` appended it to ``state.arounds``; ``startup(scope)``
    and ``async shutdown()``, when a step has them, run with the app's lifespan.
    ``websocket``: the step looks at WebSocket connections too.
    """

    websocket: bool

    def enter(self, state: RequestState) -> Answer | None: ...


class Pipeline:
    """Runs ``steps`` in order in front of ``app``, as one ASGI layer.

    Args:
        app: the ASGI app.
        steps: the steps, outermost first.
        on_error: answers an exception raised inside the layer (``install()`` and
            ``CorrelationIdMiddleware`` give the one that logs it once and answers the 500
            problem+json with the correlation ID); ``None``: it propagates. Starlette's own
            error layer sits outside every middleware and would send its 500 past the fields
            the steps add.
        reraise: after that 500, raise the exception again; ``None``: under Starlette's
            ``TestClient`` only (ADR 0054).
    """

    def __init__(
        self,
        app: ASGIApp,
        steps: Sequence[Any],
        *,
        on_error: ErrorAnswer | None = None,
        reraise: bool | None = None,
    ) -> None:
        self.app = app
        self.steps = tuple(steps)
        self._websocket_steps = tuple(s for s in self.steps if s.websocket)
        self._leaving = tuple(reversed([s for s in self.steps if hasattr(s, "leave")]))
        self._starting = tuple(s for s in self.steps if hasattr(s, "startup"))
        self._stopping = tuple(s for s in self.steps if hasattr(s, "shutdown"))
        self.on_error = on_error
        self.reraise = reraise

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "websocket" and self._websocket_steps:
                await self._websocket(scope, receive, send)
            elif scope["type"] == "lifespan" and (self._starting or self._stopping):
                await self._lifespan(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        state: RequestState | None = scope.get(REQUEST_KEY)
        owner = state is None
        if state is None:
            state = scope[REQUEST_KEY] = RequestState(scope, send)
            send = state.send
        # else: a pipeline outside this one runs the request, and these steps join it.
        # The context variables this pipeline's steps set come after ``mark``: it unsets them
        # itself, in its own task (a layer between two pipelines may run the inner in another).
        mark = len(state.context) if state.context else 0
        # One coroutine per request: the steps, the app and the error answer, inlined.
        try:
            answer: Answer | None = None
            for step in self.steps:
                answer = step.enter(state)
                if answer is not None:
                    if answer is PENDING:
                        answer = await step.decide(state)
                    if answer is not None:
                        break
            if answer is not None:
                await answer(scope, receive, send)
            elif state.arounds:
                await _around(state, self.app, scope, receive, send)
            else:
                await self.app(scope, receive, send)
        except Exception as exc:
            if self.on_error is None:
                raise
            reraise = self._reraise(scope)
            await self.on_error(scope, exc, send, response_started=state.started, reraise=reraise)
            if reraise:
                raise
        finally:
            self._finish(state, mark, owner)

    def _reraise(self, scope: Scope) -> bool:
        if self.reraise is not None:
            return self.reraise
        # Starlette's TestClient asks every app for its debug messages; servers do not.
        return "http.response.debug" in scope.get("extensions", ())

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = scope.get(REQUEST_KEY)
        owned = state is None
        if state is None:
            state = scope[REQUEST_KEY] = RequestState(scope, send)
        mark = len(state.context) if state.context else 0
        try:
            for step in self._websocket_steps:
                answer = step.enter(state)
                if answer is PENDING:
                    answer = await step.decide(state)
                if answer is not None:
                    await answer(scope, receive, send)
                    return
            await self.app(scope, receive, send)
        finally:
            self._finish(state, mark, owned)

    def _finish(self, state: RequestState, mark: int, owner: bool) -> None:
        """The steps leave, the context variables they set after ``mark`` are unset; the
        pipeline that made the state (``owner``) takes it out of the scope."""
        for step in self._leaving:
            step.leave(state)
        if state.context and len(state.context) > mark:
            _unset(state.context, mark)
        if owner:
            # Nothing of the request stays reachable from its scope (ADR 0044).
            del state.scope[REQUEST_KEY]

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The app's lifespan, with the steps' ``startup(scope)`` before it and their
        ``await shutdown()`` once the app has shut down."""
        for step in self._starting:
            step.startup(scope)

        async def shutdown_send(message: Message) -> None:
            if message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                for step in self._stopping:
                    await step.shutdown()
            await send(message)

        await self.app(scope, receive, shutdown_send if self._stopping else send)


async def _last_body(context: list[Any], send: Send, message: Message) -> None:
    """Send the last body message with the request's context variables unset.

    The server's handling of the last body message is the connection's, not the request's:
    uvicorn arms its keep-alive timer there, and the timer keeps a copy of the current context
    until the connection's next request (ADR 0044). They are set again afterwards, for
    background tasks.
    """
    unset: list[int] = []
    for index in range(len(context) - 3, -1, -3):
        if _unset_one(context[index], context[index + 2]):
            unset.append(index)
    try:
        await send(message)
    finally:
        for index in reversed(unset):
            context[index + 2] = context[index].set(context[index + 1])


def _unset(context: list[Any], start: int) -> None:
    """Unset the context variables of ``context`` from ``start`` on, the last set first, and
    drop them from the list."""
    while len(context) > start:
        token = context.pop()
        context.pop()
        _unset_one(context.pop(), token)


def _unset_one(variable: Any, token: Any) -> bool:
    """Unset ``variable`` back to before ``token``; ``False`` when this task cannot: it was
    set in another task's context (a streaming body's task group, a nested layer's task),
    whose end drops it anyway."""
    try:
        variable.reset(token)
    except (ValueError, RuntimeError):
        return False
    return True


async def _around(
    state: RequestState, app: ASGIApp, scope: Scope, receive: Receive, send: Send
) -> None:
    """Run ``app`` inside every step of ``state.arounds``, the first outermost."""
    arounds = state.arounds or []
    state.arounds = None

    def inner_of(index: int) -> Inner:
        if index == len(arounds):
            return lambda send_: app(scope, receive, send_)
        return lambda send_: arounds[index].around(state, inner_of(index + 1), send_)

    await inner_of(0)(send)
