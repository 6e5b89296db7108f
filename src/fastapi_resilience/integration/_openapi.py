"""The OpenAPI schema of an app under ``install()``: every answer the library adds, documented.

FastAPI's schema knows the routes' own answers. The library adds more: 422 and 500 as
problem+json, 429 where a limit applies, 503 where a breaker, bulkhead, named policy or feature
guards the route, 504 where a deadline runs, and its headers on every answer. This module reads
what is in force (the settings, the routes' dependencies, the features, the middleware) once,
when the schema is first asked for, and adds those answers to each operation; an app's own
``responses=`` for a status win (ADR 0077). Nothing here runs on the request path.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException

from fastapi_resilience._asgi.routes import dependency_calls, flat_routes
from fastapi_resilience.exceptions import ConfigurationError
from fastapi_resilience.integration._dependencies import GUARD_ATTR
from fastapi_resilience.integration._middleware import RequestDeadlineMiddleware
from fastapi_resilience.integration._resilience import install_paths
from fastapi_resilience.operations._degraded import FEATURE_ATTR
from fastapi_resilience.outbound._policies import Policy
from fastapi_resilience.problems._handlers import (
    http_exception_handler,
    request_validation_handler,
)
from fastapi_resilience.problems._render import PROBLEM_CONTENT_TYPE
from fastapi_resilience.ratelimit._memory import MemoryStorage
from fastapi_resilience.ratelimit._routes import RateLimit

if TYPE_CHECKING:
    from fastapi import FastAPI

    from fastapi_resilience.integration._resilience import Resilience
    from fastapi_resilience.ratelimit._limiter import RateLimiter

__all__ = [
    "PROBLEM_SCHEMA",
    "RATE_LIMIT_PROBLEM_SCHEMA",
    "VALIDATION_PROBLEM_SCHEMA",
    "OpenAPIDocs",
    "document_openapi",
    "problem_responses",
]

#: The components' names; a name the app's schema already uses for something else is
#: prefixed (``FastAPIResilienceProblemDetails``).
PROBLEM_SCHEMA = "ProblemDetails"
VALIDATION_PROBLEM_SCHEMA = "ValidationProblemDetails"
RATE_LIMIT_PROBLEM_SCHEMA = "RateLimitProblemDetails"
_PREFIX = "FastAPIResilience"
_REF = "#/components/schemas/"

#: RFC 9457's members, as ``problem_response`` renders every one of them.
_PROBLEM = {
    "type": "object",
    "title": "Problem details (RFC 9457)",
    "description": (
        "Every error answer of the app: RFC 9457 problem details with a stable `code` and the "
        "request's `correlation_id`. Other members carry what a kind of problem adds."
    ),
    "properties": {
        "type": {"type": "string", "description": "A URI naming the kind of problem."},
        "title": {"type": "string", "description": "A short summary of the kind of problem."},
        "status": {
            "type": "integer",
            "minimum": 100,
            "maximum": 599,
            "description": "The HTTP status code.",
        },
        "detail": {"type": "string", "description": "What went wrong with this request."},
        "instance": {"type": "string", "description": "The path of the request."},
        "code": {
            "type": "string",
            "description": "A stable snake_case code (`rate_limited`, `circuit_open`, ...).",
        },
        "correlation_id": {
            "type": "string",
            "description": "The request's correlation ID, also in the correlation header.",
        },
    },
    "required": ["type", "title", "status", "detail", "instance", "code", "correlation_id"],
    "additionalProperties": True,
}

#: ``request_validation_handler``'s ``errors``: one item per invalid value.
_VALIDATION_PROBLEM = {
    "title": "Validation problem details",
    "description": "422 `invalid_input`: the request's parameters or body are not valid.",
    "allOf": [
        {"$ref": "{problem}"},
        {
            "type": "object",
            "properties": {
                "errors": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "loc": {
                                "type": "array",
                                "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
                                "description": "Where the value is (`body`, `query`, ...).",
                            },
                            "msg": {"type": "string", "description": "What is wrong with it."},
                            "type": {"type": "string", "description": "The kind of error."},
                        },
                        "required": ["loc", "msg", "type"],
                    },
                }
            },
            "required": ["errors"],
        },
    ],
}

#: What the rate limiter's own refusals add (a ``RateLimitedError`` the app raises has none).
_RATE_LIMIT_PROBLEM = {
    "title": "Rate-limit problem details",
    "description": "429 `rate_limited`: a limit of the caller's tier or of the route refused it.",
    "allOf": [
        {"$ref": "{problem}"},
        {
            "type": "object",
            "properties": {
                "tier": {"type": "string", "description": "The caller's tier."},
                "limit": {"type": "string", "description": "The limit that refused it."},
                "policy": {"type": "string", "description": "That limit's policy name."},
                "violated-policies": {"type": "array", "items": {"type": "string"}},
                "retry_after": {"type": "integer", "description": "Seconds to wait."},
            },
        },
    ],
}

_INTEGER_HEADER = {"type": "integer", "minimum": 0}
_STRING_HEADER = {"type": "string"}
#: Header components: name -> (schema, description).
_HEADERS: dict[str, tuple[dict[str, Any], str]] = {
    "Retry-After": (_INTEGER_HEADER, "Seconds to wait before trying again."),
    "RateLimit-Policy": (
        _STRING_HEADER,
        "The rate-limit policies of the request (draft-ietf-httpapi-ratelimit-headers): each "
        "a name with its quota `q` and its window `w` in seconds.",
    ),
    "RateLimit": (
        _STRING_HEADER,
        "Each policy's units left `r` and the seconds until they are back `t`.",
    ),
    "X-RateLimit-Limit": (_INTEGER_HEADER, "The quota of the tightest policy."),
    "X-RateLimit-Remaining": (_INTEGER_HEADER, "The units the tightest policy has left."),
    "X-RateLimit-Reset": (_INTEGER_HEADER, "Seconds until the tightest policy's units are back."),
}
_RATE_LIMIT_HEADERS = ("RateLimit-Policy", "RateLimit", *(h for h in _HEADERS if h[0] == "X"))


@dataclass(frozen=True, slots=True)
class _Layer:
    """One ``install()`` whose layer serves the documented app's requests: the app's own
    (``prefix`` ``""``) or that of an app it is mounted in, at ``prefix`` (its template)."""

    app: Any
    resilience: Resilience
    prefix: str


@dataclass(slots=True)
class _Answers:
    """What the library can answer on one operation, beyond 422 and 500."""

    limited: bool = False
    #: Why a 429 may come (the limits), for the description.
    refusals: list[str] = field(default_factory=list)
    unavailable: list[str] = field(default_factory=list)
    timeouts: list[str] = field(default_factory=list)
    upstream: list[str] = field(default_factory=list)

    def add(self, into: list[str], reason: str) -> None:
        if reason not in into:
            into.append(reason)


def problem_responses(descriptions: Mapping[int | str, str]) -> dict[int | str, dict[str, Any]]:
    """``responses=`` entries for the problem answers a route gives itself.

    Each status (``404``, ``"4XX"``...) is documented as ``application/problem+json`` with the
    ``ProblemDetails`` component, which the library adds to the schema: the errors the route
    raises (``NotFoundError``, ``ConflictError``...) and the guards it calls in its body,
    where the library cannot see them.

    .. code-block:: python

        @app.post(
            "/orders/{order_id}/ship",
            responses=problem_responses(
                {404: "No such order.", 409: "The order has already shipped."}
            ),
        )
        async def ship(order_id: int) -> Order: ...

    A status the route declares is the route's own: the library adds nothing to it but the
    headers every answer carries (ADR 0077); a 429 or 503 documents ``Retry-After`` too, which
    the library's problems of those statuses send when the wait is known. Only 4xx and 5xx are
    problems; any other status, or an empty description, raises :class:`ConfigurationError`
    where the route is declared.
    """
    entries: dict[int | str, dict[str, Any]] = {}
    for status, description in descriptions.items():
        if not _problem_status(status):
            raise ConfigurationError(
                f"problem_responses: {status!r} is not a 4xx or 5xx status (nor 4XX, 5XX)"
            )
        if not isinstance(description, str) or not description.strip():
            raise ConfigurationError(f"problem_responses: give {status!r} a description")
        entries[status] = {
            "description": description,
            "content": {PROBLEM_CONTENT_TYPE: {"schema": {"$ref": _REF + PROBLEM_SCHEMA}}},
        }
        if str(status) in _WAIT_STATUSES:
            # The library's 429 and 503 problems say how long to wait when they know.
            schema, about = _HEADERS["Retry-After"]
            entries[status]["headers"] = {
                "Retry-After": {"description": about, "schema": dict(schema)}
            }
    return entries


#: Statuses whose problems carry ``Retry-After`` when the wait is known.
_WAIT_STATUSES = frozenset({"429", "503"})


def _problem_status(status: object) -> bool:
    if isinstance(status, str):
        if status.upper() in {"4XX", "5XX"}:
            return True
        status = int(status) if status.isdigit() else 0
    return isinstance(status, int) and not isinstance(status, bool) and 400 <= status <= 599


class OpenAPIDocs:
    """``app.openapi`` under ``install()``: FastAPI's schema, with the library's answers.

    Built once, at the first call (the first ``/openapi.json``), and kept in
    ``app.openapi_schema`` as FastAPI keeps its own; ``app.openapi_schema = None`` builds it
    again.
    """

    def __init__(self, app: FastAPI, original: Callable[[], dict[str, Any]]) -> None:
        self.app = app
        self.original = original
        self.layers: list[_Layer] = []
        self._made: dict[str, Any] | None = None

    def add_layer(self, app: Any, resilience: Resilience, prefix: str) -> None:
        """Another ``install()`` serves the app's requests (once per app and prefix)."""
        layer = _Layer(app, resilience, prefix)
        if any(known.resilience is resilience and known.prefix == prefix for known in self.layers):
            return
        self.layers.append(layer)
        if self._made is not None and self.app.openapi_schema is self._made:
            self.app.openapi_schema = None  # built without it: build again when asked
        self._made = None

    def __call__(self) -> dict[str, Any]:
        app = self.app
        if self._made is not None and app.openapi_schema is self._made:
            return self._made
        schema = self.original()
        if self.layers and self._owner().resilience.settings.openapi_responses:
            _Documenter(app, self.layers, self._owner(), schema).run()
        else:
            # Off, but the app's own ``problem_responses`` refer to the component: add it,
            # so that the schema stays valid.
            _point_own_problems(app, schema, lambda: _store_problem(_schemas(schema)))
        self._made = app.openapi_schema = schema
        return schema

    def _owner(self) -> _Layer:
        """The ``install()`` whose settings decide: the app's own, else the nearest outer one."""
        own = [layer for layer in self.layers if layer.app is self.app]
        return own[0] if own else self.layers[-1]


def document_openapi(
    app: Any, resilience: Resilience, *, served_by: Any = None, prefix: str = ""
) -> None:
    """Document in ``app``'s schema the answers ``resilience``'s layer adds to its routes.

    ``served_by``: the app that called ``install()`` (default ``app``), with ``app`` mounted in
    it at ``prefix``. Only FastAPI apps have a schema; others are left alone.
    """
    original = getattr(app, "openapi", None)
    if original is None or not hasattr(app, "openapi_schema"):
        return
    docs = original if isinstance(original, OpenAPIDocs) else OpenAPIDocs(app, original)
    docs.add_layer(served_by if served_by is not None else app, resilience, prefix)
    app.openapi = docs


class _Documenter:
    """One pass over one schema."""

    def __init__(
        self, app: Any, layers: list[_Layer], owner: _Layer, schema: dict[str, Any]
    ) -> None:
        self.app = app
        self.layers = layers
        self.owner = owner
        self.schema = schema
        components = schema.setdefault("components", {})
        self.schemas: dict[str, Any] = components.setdefault("schemas", {})
        self.headers: dict[str, Any] = components.setdefault("headers", {})
        self.names: dict[str, str] = {}
        # The outermost layer's correlation step gives the ID; the others step aside.
        outer = [layer for layer in layers if layer.app is not app]
        self.correlation = (outer[0] if outer else owner).resilience.settings.correlation_header
        self.problems = self._problem_handlers()
        self.deadline_everywhere = any(
            _has_deadline_middleware(a) for a in {id(x.app): x.app for x in layers}.values()
        ) or _has_deadline_middleware(app)

    def run(self) -> None:
        paths = self.schema.get("paths") or {}
        for route, method in self._operations():
            operation = paths.get(route.path_format, {}).get(method)
            if isinstance(operation, dict):
                self._document(operation, route)
        _point_own_problems(self.app, self.schema, lambda: self._schema(PROBLEM_SCHEMA))
        self._drop_unused(["HTTPValidationError", "ValidationError"])
        if not self.headers:
            del self.schema["components"]["headers"]

    # -- which operations --------------------------------------------------------------

    def _operations(self) -> Iterator[tuple[Any, str]]:
        """Each operation of the schema with its route (the last route of a path and method
        wins, as in FastAPI's schema); the library's own routes are left as they are."""
        found: dict[tuple[str, str], Any] = {}
        for route in flat_routes(self.app.router.routes):
            path = getattr(route, "path_format", None)
            if not getattr(route, "include_in_schema", False) or not isinstance(path, str):
                continue
            if not hasattr(route, "dependant") or self._ours(path):
                continue
            for method in getattr(route, "methods", None) or ():
                found[(path, method.lower())] = route
        for (_, method), route in found.items():
            yield route, method

    def _ours(self, path: str) -> bool:
        settings = self.owner.resilience.settings
        if self.owner.app is not self.app:
            return False  # a mounted app's routes are its own
        admin = settings.admin_path
        return path in install_paths(settings) or (
            settings.admin_token is not None and (path == admin or path.startswith(admin + "/"))
        )

    # -- what is in force on one route -------------------------------------------------

    def _answers(self, route: Any) -> _Answers:
        answers = _Answers()
        calls = list(dependency_calls(getattr(route, "dependant", None)))
        route_limits = [call for call in calls if isinstance(call, RateLimit)]
        for layer in self.layers:
            self._rate_limits(answers, layer, layer.prefix + route.path_format, route_limits)
            self._features(answers, layer, layer.prefix + route.path_format)
        for call in calls:
            self._guard(answers, call)
        if self.deadline_everywhere:
            answers.add(answers.timeouts, "the request's deadline ran out")
        return answers

    def _rate_limits(
        self, answers: _Answers, layer: _Layer, path: str, route_limits: list[RateLimit]
    ) -> None:
        limiter = layer.resilience.rate_limiter
        if limiter is None:
            return
        settings = layer.resilience.settings
        tier = not _all_exempt(limiter, path)
        if tier:
            answers.limited = answers.limited or limiter.headers_enabled
            if not limiter.shadow:
                tiers = ", ".join(f"{t} {spec}" for t, spec in settings.rate_limit_tiers.items())
                answers.add(answers.refusals, f"the caller's tier limit ({tiers})")
        for dep in route_limits:
            if not dep.limits:
                continue
            answers.limited = answers.limited or limiter.headers_enabled
            if not (dep.shadow or limiter.shadow):
                spec = "; ".join(str(limit) for limit in dep.limits)
                answers.add(answers.refusals, f"the route's limit ({spec})")
        if (tier or any(dep.limits for dep in route_limits)) and _may_be_down(limiter):
            answers.add(answers.unavailable, "the rate-limit storage is unavailable")

    def _features(self, answers: _Answers, layer: _Layer, path: str) -> None:
        """A declared feature whose paths own the route's: shed while it is off."""
        for feature in layer.resilience.degraded.features():
            if any(_may_own(prefix, path) for prefix in feature.paths):
                answers.add(answers.unavailable, f"the feature {feature.name!r} is off")

    def _guard(self, answers: _Answers, call: Any) -> None:
        feature = getattr(call, FEATURE_ATTR, None)
        if isinstance(feature, str):
            answers.add(answers.unavailable, f"the feature {feature!r} is off")
        guard = getattr(call, GUARD_ATTR, None)
        if isinstance(guard, tuple):
            kind, name = guard
            if kind == "deadline":
                answers.add(answers.timeouts, "the route's deadline ran out")
            else:
                answers.add(answers.unavailable, f"the {kind} {name!r} refused the call")
        if isinstance(call, Policy):
            answers.add(answers.unavailable, f"the policy {call.name!r} refused the call")
            answers.add(answers.timeouts, f"a call through the policy {call.name!r} timed out")
            if _retries(call):
                answers.add(answers.upstream, f"the policy {call.name!r} ran out of retries")

    # -- writing -----------------------------------------------------------------------

    def _document(self, operation: dict[str, Any], route: Any) -> None:
        responses: dict[str, Any] = operation.setdefault("responses", {})
        own = {str(status).upper() for status in (getattr(route, "responses", None) or {})}
        answers = self._answers(route)
        every = self._every_answer_headers(answers)

        def free(status: str) -> bool:
            if {status, f"{status[0]}XX", "DEFAULT"} & own:
                return False  # the app's own answer for it wins
            return status not in responses or status == "422"

        if "422" in responses and self.problems and free("422"):
            responses["422"] = self._problem(
                "Validation error: the request's parameters or body are not valid "
                "(`invalid_input`).",
                VALIDATION_PROBLEM_SCHEMA,
            )
        if getattr(route, "body_field", None) is not None and self.problems and free("400"):
            # FastAPI's own answer to a body it cannot parse, rendered by the library.
            responses["400"] = self._problem(
                "Bad request (`bad_request`): the request's body could not be parsed."
            )
        if answers.refusals and free("429"):
            responses["429"] = self._problem(
                "Too many requests (`rate_limited`): " + "; ".join(answers.refusals) + ".",
                RATE_LIMIT_PROBLEM_SCHEMA,
                required={"Retry-After"},
            )
        if free("500"):
            responses["500"] = self._problem(
                "Internal server error (`internal_error`): an unhandled exception, logged with "
                "the correlation ID."
            )
        if answers.upstream and free("502"):
            responses["502"] = self._problem(
                "Bad gateway (`retries_exhausted`, `upstream_error`): "
                + "; ".join(answers.upstream)
                + "."
            )
        if answers.unavailable and free("503"):
            responses["503"] = self._problem(
                "Service unavailable (`circuit_open`, `bulkhead_full`, `feature_unavailable`, "
                "`service_unavailable`): "
                + "; ".join(answers.unavailable)
                + ". `Retry-After` when the wait is known.",
                optional={"Retry-After"},
            )
        if answers.timeouts and free("504"):
            responses["504"] = self._problem(
                "Gateway timeout (`upstream_timeout`): " + "; ".join(answers.timeouts) + "."
            )
        for response in responses.values():
            if isinstance(response, dict) and "$ref" not in response:
                # A copy: older FastAPI versions put here the headers dict of the app's own
                # ``responses=`` itself, one object shared by every route that declares it.
                headers = response["headers"] = dict(response.get("headers") or {})
                lower = {name.lower() for name in headers}
                for name, header in every.items():
                    if name.lower() not in lower:
                        headers[name] = header

    def _every_answer_headers(self, answers: _Answers) -> dict[str, Any]:
        """The headers every answer of the operation may carry."""
        headers = {self.correlation: self._header_ref(self.correlation)}
        if answers.limited:
            for name in _RATE_LIMIT_HEADERS:
                headers[name] = self._header_ref(name)
        for layer in self.layers:
            notice = layer.resilience.settings.degraded_header
            if notice and layer.resilience.degraded.features() and notice not in headers:
                headers[notice] = self._header_ref(notice)
        return headers

    def _problem(
        self,
        description: str,
        schema: str = PROBLEM_SCHEMA,
        *,
        required: Iterable[str] = (),
        optional: Iterable[str] = (),
    ) -> dict[str, Any]:
        headers = {name: self._header_ref(name, required=True) for name in required}
        headers.update({name: self._header_ref(name) for name in optional})
        return {
            "description": description,
            "headers": headers,
            "content": {PROBLEM_CONTENT_TYPE: {"schema": {"$ref": _REF + self._schema(schema)}}},
        }

    def _schema(self, name: str) -> str:
        """The component ``name`` is stored under, added on first use."""
        known = self.names.get(name)
        if known is not None:
            return known
        body: dict[str, Any]
        if name == PROBLEM_SCHEMA:
            body = copy.deepcopy(_PROBLEM)
        else:
            body = copy.deepcopy(
                _VALIDATION_PROBLEM if name == VALIDATION_PROBLEM_SCHEMA else _RATE_LIMIT_PROBLEM
            )
            body["allOf"][0]["$ref"] = _REF + self._schema(PROBLEM_SCHEMA)
        stored = _free_name(self.schemas, name, body)
        self.schemas[stored] = body
        self.names[name] = stored
        return stored

    def _header_ref(self, name: str, *, required: bool = False) -> dict[str, Any]:
        """A reference to the header's component; inline where this answer always carries a
        header others carry only at times (``Retry-After`` on a 429)."""
        schema, description = _HEADERS.get(name, (_STRING_HEADER, self._header_description(name)))
        header: dict[str, Any] = {"description": description, "schema": dict(schema)}
        if name == self.correlation:
            header["required"] = True  # every answer carries it
        elif required:
            return {**header, "required": True}
        stored = _free_name(self.headers, name, header)
        self.headers[stored] = header
        return {"$ref": f"#/components/headers/{stored}"}

    def _header_description(self, name: str) -> str:
        if name == self.correlation:
            return (
                "The request's correlation ID: the client's own when it is valid, else a new "
                "one; the problem body's `correlation_id` is the same."
            )
        return "While the app runs degraded: the features that are off, comma-separated."

    def _problem_handlers(self) -> bool:
        """Whether the app's 400 and 422 are the library's (an app may register its own
        handlers)."""
        handlers = getattr(self.app, "exception_handlers", {})
        return (
            handlers.get(RequestValidationError) is request_validation_handler
            and handlers.get(HTTPException) is http_exception_handler
        )

    def _drop_unused(self, names: list[str]) -> None:
        """Drop FastAPI's validation components once nothing else in the schema refers to
        them (an app's own ``components.responses`` may)."""
        for name in names:
            if name not in self.schemas:
                continue
            rest = {k: v for k, v in self.schemas.items() if k != name}
            components = {**self.schema["components"], "schemas": rest}
            text = json.dumps({**self.schema, "components": components})
            if f'"{_REF}{name}"' not in text:
                del self.schemas[name]


def _schemas(schema: dict[str, Any]) -> dict[str, Any]:
    schemas: dict[str, Any] = schema.setdefault("components", {}).setdefault("schemas", {})
    return schemas


#: What ``problem_responses`` puts in an entry's ``content``.
_OWN_PROBLEM_CONTENT = {PROBLEM_CONTENT_TYPE: {"schema": {"$ref": _REF + PROBLEM_SCHEMA}}}


def _store_problem(schemas: dict[str, Any]) -> str:
    """The name the library's ``ProblemDetails`` is stored under, added if missing."""
    stored = _free_name(schemas, PROBLEM_SCHEMA, _PROBLEM)
    schemas.setdefault(stored, copy.deepcopy(_PROBLEM))
    return stored


def _point_own_problems(app: Any, schema: dict[str, Any], component: Callable[[], str]) -> None:
    """Point the entries of the routes' ``problem_responses`` at the library's component,
    added by ``component()`` on first use: under a prefixed name when the app's schema holds
    a ``ProblemDetails`` of its own, which the app's problem answers do not follow."""
    paths = schema.get("paths") or {}
    for route in flat_routes(app.router.routes):
        declared = getattr(route, "responses", None)
        path = getattr(route, "path_format", None)
        if not declared or not isinstance(declared, dict) or path not in paths:
            continue
        own = [str(status).upper() for status, entry in declared.items() if _is_own_problem(entry)]
        for method in getattr(route, "methods", None) or ():
            answers = (paths[path].get(method.lower()) or {}).get("responses") or {}
            for status in own:
                content = (answers.get(status) or {}).get("content") or {}
                ref = (content.get(PROBLEM_CONTENT_TYPE) or {}).get("schema")
                if isinstance(ref, dict) and ref.get("$ref") == _REF + PROBLEM_SCHEMA:
                    ref["$ref"] = _REF + component()


def _is_own_problem(entry: object) -> bool:
    return isinstance(entry, dict) and entry.get("content") == _OWN_PROBLEM_CONTENT


def _free_name(store: dict[str, Any], name: str, body: dict[str, Any]) -> str:
    """``name`` unless the app's schema holds something else there; then a prefixed one."""
    if store.get(name, body) == body:
        return name
    return _free_name(store, _PREFIX + name, body)


def _all_exempt(limiter: RateLimiter, template: str) -> bool:
    """Whether every path ``template`` matches is exempt from ``limiter``'s tiers."""
    if "{" not in template:
        return limiter.is_exempt(template)
    literal = template.split("{", 1)[0]
    return any(literal.startswith(prefix) for prefix in limiter.exempt_prefixes)


def _may_be_down(limiter: RateLimiter) -> bool:
    """A shared storage that refuses requests while it is down (``fail_open`` off)."""
    return not limiter.fail_open and not isinstance(limiter.storage, MemoryStorage)


def _may_own(prefix: str, template: str) -> bool:
    """Whether a feature's path ``prefix`` owns some path ``template`` matches: equal to it,
    or below it (``/search`` owns ``/search/{q}``; ``/items/{id}`` may be ``/items/5``)."""
    want = [part for part in prefix.strip("/").split("/") if part] if prefix != "/" else []
    have = template.strip("/").split("/")
    for i, part in enumerate(want):
        if i >= len(have):
            return False
        segment = have[i]
        if segment.startswith("{") and segment.endswith("}"):
            if segment.endswith(":path}"):
                return True  # a path parameter spans the rest
            continue
        if segment != part:
            return False
    return True


def _retries(call: Policy) -> bool:
    """Whether the policy retries (its last failure is then a 502 ``retries_exhausted``)."""
    try:
        return call.settings.retry.attempts > 1
    except Exception:  # not declared yet: start-up names it; a retry is the safe guess here
        return True


def _has_deadline_middleware(app: Any) -> bool:
    return any(
        isinstance(entry.cls, type) and issubclass(entry.cls, RequestDeadlineMiddleware)
        for entry in getattr(app, "user_middleware", ())
    )
