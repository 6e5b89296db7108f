"""The OpenAPI schema of an app under ``install()`` documents every answer the library adds.

Each test reads ``/openapi.json`` as a client generator or a contract test does, and where it
can, asks the route for that answer and finds it documented with its content type and headers.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import APIRouter, FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.testclient import TestClient
from loopback import UvicornProcess
from openapi_spec_validator import validate

# At collection: the example's inventory breaker is registered before any test's registries
# are saved (tests/conftest.py), so a later test that builds the example app finds it.
from example_app import outbound as _example_outbound  # noqa: F401
from fastapi_resilience import (
    ConfigurationError,
    ConflictError,
    NotFoundError,
    ResilienceSettings,
    install,
    problem_responses,
)
from tests import _openapi_app, _schemathesis, _shapes

PROBLEM = "application/problem+json"
JSON = "application/json"


@pytest.fixture
def client() -> Iterator[TestClient]:
    with TestClient(_openapi_app.create_app()) as client:
        yield client


def responses(schema: dict[str, Any], path: str, method: str = "get") -> dict[str, Any]:
    result: dict[str, Any] = schema["paths"][path][method]["responses"]
    return result


def header_names(schema: dict[str, Any], response: dict[str, Any]) -> dict[str, bool]:
    """Each header the response documents, and whether it is required ($refs followed)."""
    out = {}
    for name, header in response.get("headers", {}).items():
        if "$ref" in header:
            header = schema["components"]["headers"][header["$ref"].rsplit("/", 1)[1]]
        out[name] = bool(header.get("required"))
    return out


def problem_ref(response: dict[str, Any]) -> str:
    ref: str = response["content"][PROBLEM]["schema"]["$ref"]
    return ref.rsplit("/", 1)[1]


def assert_documented(schema: dict[str, Any], path: str, method: str, answer: Any) -> None:
    """The live ``answer`` has a documented status, content type and required headers."""
    documented = responses(schema, path, method)
    status = str(answer.status_code)
    assert status in documented, f"{method.upper()} {path} answered {status}: not documented"
    response = documented[status]
    content_type = answer.headers["content-type"].split(";")[0]
    assert content_type in response.get("content", {content_type: None})
    for name, required in header_names(schema, response).items():
        if required:
            assert name in answer.headers, f"{status} of {path} lacks {name}"


def test_every_answer_the_library_adds_is_documented_with_its_headers(
    client: TestClient,
) -> None:
    """A tier, a route limit, a breaker, a bulkhead, a policy, features and deadlines: each
    route documents the answers they can give, and the live answers match the schema."""
    schema = client.get("/openapi.json").json()

    login = responses(schema, "/login", "post")
    assert problem_ref(login["429"]) == "RateLimitProblemDetails"
    assert "3/minute" in login["429"]["description"]
    headers = header_names(schema, login["429"])
    assert headers["Retry-After"] is True
    for name in ("RateLimit", "RateLimit-Policy", "X-RateLimit-Limit", "X-RateLimit-Remaining"):
        assert name in headers
        assert name in header_names(schema, login["200"])  # on admitted answers too
    assert "X-RateLimit-Reset" in headers

    assert "'stock'" in responses(schema, "/stock/{sku}")["503"]["description"]
    assert "'reserve'" in responses(schema, "/reserve/{sku}", "post")["503"]["description"]
    catalog = responses(schema, "/catalog/{sku}")
    assert {"502", "503", "504"} <= catalog.keys()
    assert "'exports'" in responses(schema, "/exports/orders.csv")["503"]["description"]
    assert "'reports'" in responses(schema, "/reports")["503"]["description"]
    assert "route's deadline" in responses(schema, "/budget")["504"]["description"]
    for path in ("/slow", "/plain/{item}"):  # the request deadline: every route
        assert "504" in responses(schema, path)
    assert header_names(schema, catalog["503"])["Retry-After"] is False  # when it is known
    for code in ("502", "503", "504"):
        assert problem_ref(catalog[code]) == "ProblemDetails"

    # Every answer of every operation carries the correlation ID.
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                assert header_names(schema, response).get("X-Request-ID") is True, (
                    method,
                    path,
                    status,
                )
                assert "500" in operation["responses"]

    # The live answers are the documented ones.
    assert_documented(schema, "/stock/{sku}", "get", client.get("/stock/tea"))
    assert_documented(schema, "/exports/orders.csv", "get", client.get("/exports/orders.csv"))
    assert_documented(schema, "/reports", "get", client.get("/reports"))
    assert_documented(schema, "/budget", "get", client.get("/budget", params={"delay": 0.5}))
    assert_documented(schema, "/orders", "post", client.post("/orders", json={"sku": ""}))
    unparsable = client.post(
        "/orders", content=b"\x05\xff", headers={"content-type": "application/json"}
    )
    assert unparsable.status_code == 400
    assert_documented(schema, "/orders", "post", unparsable)
    for _ in range(4):
        answer = client.post("/login")
    assert answer.status_code == 429
    assert_documented(schema, "/login", "post", answer)


def test_the_problem_shapes_are_the_rendered_ones(client: TestClient) -> None:
    """The components name every member the renderer writes, and the validation problem's
    ``errors`` items; FastAPI's own validation components go once nothing uses them."""
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    problem = schemas["ProblemDetails"]
    members = ["type", "title", "status", "detail", "instance", "code", "correlation_id"]
    assert sorted(problem["required"]) == sorted(members)
    assert set(problem["properties"]) == set(members)
    assert problem["additionalProperties"] is True
    errors = schemas["ValidationProblemDetails"]["allOf"][1]["properties"]["errors"]
    assert set(errors["items"]["required"]) == {"loc", "msg", "type"}
    assert "HTTPValidationError" not in schemas
    assert "ValidationError" not in schemas

    body = client.post("/orders", json={"sku": "", "quantity": 0}).json()
    assert set(members) <= body.keys()
    assert all(set(error) == {"loc", "msg", "type"} for error in body["errors"])


def test_a_route_with_nothing_in_force_documents_only_422_and_500() -> None:
    app = FastAPI()
    install(app, ResilienceSettings(rate_limit_enabled=False))

    @app.get("/items/{item_id}")
    async def item(item_id: int) -> dict[str, int]:
        return {"item_id": item_id}

    @app.get("/ping")
    async def ping() -> dict[str, bool]:
        return {"ok": True}

    schema = TestClient(app).get("/openapi.json").json()
    assert set(responses(schema, "/items/{item_id}")) == {"200", "422", "500"}
    assert set(responses(schema, "/ping")) == {"200", "500"}  # nothing to validate: no 422
    assert problem_ref(responses(schema, "/items/{item_id}")["422"]) == ("ValidationProblemDetails")
    assert "RateLimit" not in header_names(schema, responses(schema, "/ping")["200"])


def test_an_exempt_path_documents_no_429(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    ping = responses(schema, "/public/ping")
    assert "429" not in ping
    assert "RateLimit" not in header_names(schema, ping["200"])


def test_the_apps_own_responses_win(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    custom = responses(schema, "/custom")
    assert custom["429"]["description"] == "Slow down: the app's own words."
    assert custom["503"]["description"] == "Closed for maintenance."
    assert "content" not in custom["503"]
    assert responses(schema, "/orders/{order_id}")["404"]["description"] == "No such order."


def test_a_routers_own_responses_and_ranges_win() -> None:
    """A router's ``responses=`` are its routes' own; ``5XX`` covers every 5xx status."""
    app = FastAPI()
    install(app, ResilienceSettings())
    router = APIRouter(prefix="/r", responses={"5XX": {"description": "Ours, all of them."}})

    @router.get("/items/{item_id}")
    async def item(item_id: int) -> dict[str, int]:
        return {"item_id": item_id}

    app.include_router(router)
    documented = responses(TestClient(app).get("/openapi.json").json(), "/r/items/{item_id}")
    assert set(documented) == {"200", "422", "429", "5XX"}
    assert documented["5XX"]["description"] == "Ours, all of them."


def test_the_apps_own_responses_are_left_as_they_were() -> None:
    """One ``responses=`` dict shared by a limited and an exempt route: each documents its
    own headers, and the app's dict is not written to (older FastAPI versions put its nested
    ``headers`` dict in the schema as it is)."""
    shared = {404: {"description": "No such item.", "headers": {"X-Shelf": {"schema": {}}}}}
    before = copy.deepcopy(shared)
    app = FastAPI()
    install(app, ResilienceSettings(rate_limit_exempt_paths=["/public/*"]))

    @app.get("/items/{item_id}", responses=shared)
    async def item(item_id: int) -> dict[str, int]:
        return {"item_id": item_id}

    @app.get("/public/items/{item_id}", responses=shared)
    async def public_item(item_id: int) -> dict[str, int]:
        return {"item_id": item_id}

    schema = TestClient(app).get("/openapi.json").json()
    assert shared == before
    limited = header_names(schema, responses(schema, "/items/{item_id}")["404"])
    public = header_names(schema, responses(schema, "/public/items/{item_id}")["404"])
    assert {"X-Shelf", "RateLimit"} <= set(limited)
    assert "X-Shelf" in public
    assert "RateLimit" not in public


def test_routes_left_out_of_the_schema_stay_out(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert "/hidden" not in paths
    assert not [p for p in paths if p.startswith(("/health", "/metrics", "/resilience"))]


def test_the_librarys_own_routes_keep_their_schema() -> None:
    """Health routes listed with ``health_in_schema`` are documented as before."""
    plain, documented = FastAPI(), FastAPI()
    install(plain, ResilienceSettings(health_in_schema=True, openapi_responses=False))
    install(documented, ResilienceSettings(health_in_schema=True))
    before = TestClient(plain).get("/openapi.json").json()["paths"]["/health/ready"]
    after = TestClient(documented).get("/openapi.json").json()["paths"]["/health/ready"]
    assert after == before


def test_the_setting_turns_it_off() -> None:
    with TestClient(_openapi_app.create_app(openapi_responses=False)) as client:
        schema = client.get("/openapi.json").json()
    assert "ProblemDetails" not in schema["components"]["schemas"]
    assert "HTTPValidationError" in schema["components"]["schemas"]
    assert set(responses(schema, "/login", "post")) == {"200"}
    assert "headers" not in responses(schema, "/stock/{sku}")["200"]


def test_the_setting_is_validated_and_read_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(ConfigurationError, match="openapi_responses"):
        ResilienceSettings(openapi_responses="sometimes")  # type: ignore[arg-type]
    monkeypatch.setenv("RESILIENCE_OPENAPI_RESPONSES", "false")
    assert ResilienceSettings().openapi_responses is False


def test_a_router_prefix_and_a_mounted_sub_app_are_documented(client: TestClient) -> None:
    """A router's prefix is part of its routes' paths; a mounted sub-app's own schema
    documents what the app around it answers on its routes."""
    schema = client.get("/openapi.json").json()
    assert "30/minute" in responses(schema, "/shop/items/{item_id}")["429"]["description"]
    sub = client.get("/v2/openapi.json").json()
    search = responses(sub, "/search")
    assert "20/minute" in search["429"]["description"]
    assert "1000/minute" in search["429"]["description"]  # the tier of the app around it
    assert problem_ref(search["422"]) == "ValidationProblemDetails"
    assert "504" in search  # the app's request deadline
    assert_documented(sub, "/hello/{name}", "get", client.get("/v2/hello/ada"))


@pytest.mark.parametrize(
    "shape", ["router", "sub_app", "sub_app_installed", "sub_app_with_parameter", "nested_sub_app"]
)
def test_each_app_shape_documents_the_service(shape: str) -> None:
    """Wherever the service's routes are (a router's prefix, a sub-app with or without its own
    ``install()``, behind a mount with a parameter, two mounts deep), the schema that lists
    them documents the route limit, the feature off by path and the one off by dependency."""
    built = _shapes.build(shape)
    with TestClient(built.app) as client:
        if shape == "router":
            schema, at = client.get("/openapi.json").json(), built.prefix
        else:  # the sub-app's own schema, at its own openapi_url behind the mount
            schema, at = client.get(f"{built.prefix}/openapi.json").json(), ""
        validate(schema)
        login = responses(schema, f"{at}/login")
        assert f"{_shapes.ROUTE_LIMIT}/minute" in login["429"]["description"]
        assert f"{_shapes.TIER_LIMIT}/minute" in login["429"]["description"]
        assert "'exports'" in responses(schema, f"{at}/exports/orders.csv")["503"]["description"]
        assert "'reports'" in responses(schema, f"{at}/reports")["503"]["description"]
        assert "429" not in responses(schema, f"{at}/exempt/ping")["200"]
        answer = client.get(f"{built.prefix}/exports/orders.csv")
        assert_documented(schema, f"{at}/exports/orders.csv", "get", answer)


def test_the_schemas_are_valid_openapi(client: TestClient) -> None:
    """openapi-spec-validator accepts every schema: the app's, its sub-app's, one without
    rate limiting, one with the setting off, and the example app's."""
    validate(client.get("/openapi.json").json())
    validate(client.get("/v2/openapi.json").json())
    bare = FastAPI()
    install(bare, ResilienceSettings(rate_limit_enabled=False))
    bare.include_router(APIRouter())
    validate(TestClient(bare).get("/openapi.json").json())
    with TestClient(_openapi_app.create_app(openapi_responses=False)) as off:
        validate(off.get("/openapi.json").json())
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:  # the example sets up the root logger, as an app does
        from example_app import main, rate_limits

        example = main.create_app(rate_limits.example_settings())
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    schema = TestClient(example).get("/openapi.json").json()
    validate(schema)
    assert "'exports'" in responses(schema, "/exports/orders.csv")["503"]["description"]
    assert problem_ref(responses(schema, "/orders", "post")["422"]) == "ValidationProblemDetails"


def refs(node: Any) -> Iterator[str]:
    """Every ``$ref`` in ``node``."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from refs(item)


def test_a_component_the_apps_own_schema_refers_to_is_kept() -> None:
    """An app whose own ``openapi()`` (FastAPI's documented way to extend the schema) adds a
    reusable response over FastAPI's ``HTTPValidationError``: the schema keeps that component,
    so every reference in it resolves."""
    app = FastAPI()

    @app.get("/items/{item_id}")
    async def item(item_id: int) -> dict[str, int]:
        return {"item_id": item_id}

    def own_openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title="shop", version="1", routes=app.routes)
            schema["components"]["responses"] = {
                "BadInput": {
                    "description": "What the gateway answers for a bad request.",
                    "content": {
                        JSON: {"schema": {"$ref": "#/components/schemas/HTTPValidationError"}}
                    },
                }
            }
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = own_openapi  # type: ignore[method-assign]
    install(app, ResilienceSettings(rate_limit_enabled=False))
    schema = TestClient(app).get("/openapi.json").json()
    validate(schema)
    for ref in refs(schema):
        kind, name = ref.split("/")[-2:]
        assert name in schema["components"][kind], f"{ref} does not resolve"
    assert problem_ref(responses(schema, "/items/{item_id}")["422"]) == "ValidationProblemDetails"


def test_the_schema_is_built_once_and_the_docs_page_renders(client: TestClient) -> None:
    app = client.app
    assert isinstance(app, FastAPI)
    first = app.openapi()
    assert app.openapi() is first
    assert client.get("/openapi.json").json() == first
    assert client.get("/docs").status_code == 200
    assert client.get("/redoc").status_code == 200


def test_an_apps_own_route_at_the_metrics_path_is_documented_when_metrics_are_off() -> None:
    """With metrics off, ``/metrics`` is no path of the library's: the app's own route there
    is documented like any other."""
    app = FastAPI()
    install(app, ResilienceSettings(metrics_enabled=False))

    @app.get("/metrics")
    async def own_metrics(x: int = 0) -> dict[str, int]:
        return {"x": x}

    documented = responses(TestClient(app).get("/openapi.json").json(), "/metrics", "get")
    assert problem_ref(documented["500"]) == "ProblemDetails"
    assert problem_ref(documented["422"]) == "ValidationProblemDetails"


def test_the_schema_is_built_once_until_it_is_dropped() -> None:
    """The app's own schema function (set before ``install()``) runs at the first read only;
    ``app.openapi_schema = None`` asks for a new build, as with FastAPI's own."""
    app = FastAPI()
    builds: list[int] = []

    def own_openapi() -> dict[str, Any]:
        builds.append(1)
        return get_openapi(title="own", version="1", routes=app.routes)

    app.openapi = own_openapi  # type: ignore[method-assign]
    install(app)

    @app.get("/items")
    async def items() -> list[int]:
        return []

    client = TestClient(app)
    first = client.get("/openapi.json").json()
    assert "500" in first["paths"]["/items"]["get"]["responses"]  # documented by the library
    assert app.openapi() == first
    assert client.get("/openapi.json").json() == first
    assert builds == [1]
    app.openapi_schema = None
    app.openapi()
    assert builds == [1, 1]


#: Generated requests per operation of the test app, for valid and for invalid data each.
FUZZ_MAX_EXAMPLES = 10


@pytest.mark.slow
def test_schemathesis_finds_every_answer_documented() -> None:
    """The test app (every feature on: a breaker held open, a feature off, deadlines, limits)
    under uvicorn, fuzzed with every schemathesis check (``tests/_schemathesis.py``): every
    answer, 503 and 504 included, is one its operation documents, with its content type,
    headers and body schema. ``POST /login`` is sent past its limit, so its 429 is checked too."""
    server = UvicornProcess("tests._openapi_app:create_app", args=["--factory"])
    try:
        schema = _schemathesis.load_schema(server.url)
        tally = _schemathesis.fuzz(schema, server.url, dict, FUZZ_MAX_EXAMPLES)
        login = schema["/login"]["POST"]  # no parameters: one case, sent past its limit
        for _ in range(4):
            tally.statuses[_schemathesis.validate(login.Case(), server.url, {})] += 1
    finally:
        server.stop()
    print(tally.summary("the test app"))
    assert {429, 503, 504} <= set(tally.statuses)
    assert 500 not in tally.statuses


def _app_with_own_problems(**settings: Any) -> FastAPI:
    app = FastAPI()
    install(app, ResilienceSettings(rate_limit_enabled=False, **settings))

    @app.post(
        "/orders/{order_id}/ship",
        responses=problem_responses({404: "No such order.", 409: "It has already shipped."}),
    )
    async def ship(order_id: int) -> dict[str, int]:
        if order_id == 1:
            raise ConflictError("order 1 has already shipped")
        raise NotFoundError(f"order {order_id} does not exist")

    return app


def test_problem_responses_document_a_routes_own_errors() -> None:
    """A route's own raises, declared with ``problem_responses``, are documented as the
    library's problems: problem+json with ``ProblemDetails``, the correlation header; the live
    answers match."""
    client = TestClient(_app_with_own_problems())
    schema = client.get("/openapi.json").json()
    validate(schema)
    documented = responses(schema, "/orders/{order_id}/ship", "post")
    assert documented["409"]["description"] == "It has already shipped."
    assert problem_ref(documented["404"]) == problem_ref(documented["409"]) == "ProblemDetails"
    assert header_names(schema, documented["404"]) == {"X-Request-ID": True}
    for order_id in (1, 2):
        answer = client.post(f"/orders/{order_id}/ship")
        assert_documented(schema, "/orders/{order_id}/ship", "post", answer)


def test_problem_responses_document_retry_after_on_429_and_503() -> None:
    """A route that declares its own 503 (a guard called in its body) or 429 documents the
    ``Retry-After`` the library's problems of those statuses send; other statuses do not."""
    app = FastAPI()
    install(app, ResilienceSettings(rate_limit_enabled=False))

    @app.get(
        "/stock",
        responses=problem_responses({503: "Inventory down.", 429: "Slow down.", 404: "None."}),
    )
    async def stock() -> dict[str, int]:
        return {"left": 1}

    schema = TestClient(app).get("/openapi.json").json()
    validate(schema)
    documented = responses(schema, "/stock", "get")
    for status in ("503", "429"):
        assert header_names(schema, documented[status])["Retry-After"] is False
    assert "Retry-After" not in header_names(schema, documented["404"])


def test_problem_responses_keep_a_schema_valid_with_the_setting_off() -> None:
    """With ``openapi_responses=False`` the schema gets only the component the route's own
    entries refer to."""
    schema = TestClient(_app_with_own_problems(openapi_responses=False)).get("/openapi.json")
    validate(schema.json())
    assert "ProblemDetails" in schema.json()["components"]["schemas"]
    assert "500" not in responses(schema.json(), "/orders/{order_id}/ship", "post")


@pytest.mark.parametrize("documented", [True, False])
def test_problem_responses_point_at_the_librarys_problem_beside_an_apps_own(
    documented: bool,
) -> None:
    """An app with a ``ProblemDetails`` model of its own: the ``problem_responses`` entries
    refer to the library's component (stored under another name), which the live answer
    follows, not to the app's model."""
    from pydantic import BaseModel

    class ProblemDetails(BaseModel):
        message: str

    app = _app_with_own_problems(openapi_responses=documented)

    @app.get("/legacy", responses={400: {"model": ProblemDetails}})
    async def legacy() -> dict[str, str]:
        return {}

    client = TestClient(app)
    schema = client.get("/openapi.json").json()
    validate(schema)
    components = schema["components"]["schemas"]
    assert components["ProblemDetails"]["required"] == ["message"]  # the app's, kept
    documented_404 = responses(schema, "/orders/{order_id}/ship", "post")["404"]
    name = problem_ref(documented_404)
    assert name != "ProblemDetails"
    assert "correlation_id" in components[name]["required"]
    assert "correlation_id" in client.post("/orders/2/ship").json()


@pytest.mark.parametrize("status", [200, 302, "2XX", "default", True, 600])
def test_problem_responses_take_only_error_statuses(status: Any) -> None:
    with pytest.raises(ConfigurationError, match="not a 4xx or 5xx"):
        problem_responses({status: "an answer"})
    with pytest.raises(ConfigurationError, match="description"):
        problem_responses({404: " "})
    assert set(problem_responses({"4XX": "Any client error.", "503": "Closed."})) == {
        "4XX",
        "503",
    }
