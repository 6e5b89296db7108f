"""The app-shape matrix: every request-path feature, through every shape apps take, under
``TestClient`` and under a real uvicorn process.

Each cell asserts what a client relies on (status, content type, headers) and, where a budget
is involved, what is left of it. Under ``TestClient`` each cell builds its own app; under a real
server one process serves each shape and each cell comes from its own address (the loopback is
a trusted proxy, and each cell sends its own ``X-Forwarded-For``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx
import pytest
from fastapi.testclient import TestClient
from loopback import UvicornProcess

from tests._shapes import ORIGIN, ROOT_PATH, ROUTE_LIMIT, SHAPES, TIER_LIMIT, build

ROOT = Path(__file__).resolve().parent.parent
PROBLEM = "application/problem+json"
CLIENTS = ["testclient", "uvicorn"]


class Answer(Protocol):
    status_code: int

    @property
    def headers(self) -> Mapping[str, str]: ...

    def json(self) -> Any: ...


@dataclass
class ShapeClient:
    """Requests to the service's routes of one shape, as one client."""

    send: Callable[..., Answer]
    base: str
    headers: dict[str, str] = field(default_factory=dict)

    def get(self, path: str, **headers: str) -> Answer:
        return self.request("GET", path, headers)

    def request(
        self, method: str, path: str, headers: Mapping[str, str] = {}, **kwargs: Any
    ) -> Answer:
        return self.send(method, self.base + path, headers={**self.headers, **headers}, **kwargs)


_addresses = (f"10.{i // 250}.{i % 250}.1" for i in itertools.count(1))
_servers: dict[str, UvicornProcess] = {}


@pytest.fixture(scope="module", autouse=True)
def _stop_servers() -> Iterator[None]:
    yield
    for server in _servers.values():
        server.stop()
    _servers.clear()


def _server(shape: str) -> UvicornProcess:
    if shape not in _servers:
        args = ["--factory"] + (["--root-path", ROOT_PATH] if shape == "root_path" else [])
        _servers[shape] = UvicornProcess(
            "tests._shapes:from_environment", env={"SHAPE": shape}, cwd=ROOT, args=args
        )
    return _servers[shape]


@pytest.fixture
def shape_client(request: pytest.FixtureRequest) -> Iterator[tuple[str, ShapeClient]]:
    shape, kind = request.param
    built = build(shape)
    if kind == "testclient":
        with TestClient(built.app, root_path=built.root_path, raise_server_exceptions=False) as c:
            # The server's prefix is part of the path the app is asked for (ASGI's rule).
            yield shape, ShapeClient(c.request, built.root_path + built.prefix)
        return
    server = _server(shape)
    with httpx.Client(base_url=server.url, timeout=10) as c:
        # uvicorn puts its --root-path in front of the path itself.
        yield shape, ShapeClient(c.request, built.prefix, {"X-Forwarded-For": next(_addresses)})


def cells(shapes: list[str] = SHAPES) -> Any:
    pairs = [(shape, kind) for shape in shapes for kind in CLIENTS]
    return pytest.mark.parametrize(
        "shape_client", pairs, ids=[f"{s}-{k}" for s, k in pairs], indirect=True
    )


def assert_problem(answer: Answer, status: int, code: str) -> dict[str, Any]:
    assert answer.status_code == status
    assert answer.headers["content-type"] == PROBLEM
    body: dict[str, Any] = answer.json()
    assert body["status"] == status
    assert body["code"] == code
    assert body["correlation_id"] == answer.headers["x-request-id"]
    return body


@cells()
def test_unknown_route_is_a_404_problem(shape_client: tuple[str, ShapeClient]) -> None:
    _, client = shape_client
    assert_problem(client.get("/missing"), 404, "not_found")


@cells()
def test_wrong_method_is_a_405_problem(shape_client: tuple[str, ShapeClient]) -> None:
    _, client = shape_client
    assert_problem(client.get("/orders"), 405, "method_not_allowed")


@cells()
def test_invalid_body_is_a_422_problem(shape_client: tuple[str, ShapeClient]) -> None:
    _, client = shape_client
    body = assert_problem(
        client.request("POST", "/orders", json={"sku": "A-1"}), 422, "invalid_input"
    )
    assert body["errors"][0]["loc"] == ["body", "quantity"]


@cells()
def test_unhandled_error_is_a_sanitized_500_problem(shape_client: tuple[str, ShapeClient]) -> None:
    _, client = shape_client
    answer = client.get("/boom")
    assert_problem(answer, 500, "internal_error")
    assert "boom" not in answer.json()["detail"]


@cells()
def test_raised_error_is_its_problem(shape_client: tuple[str, ShapeClient]) -> None:
    _, client = shape_client
    body = assert_problem(client.get("/conflict"), 409, "conflict")
    assert body["detail"] == "order 7 has already shipped"


@cells()
def test_correlation_id_is_echoed_or_made(shape_client: tuple[str, ShapeClient]) -> None:
    _, client = shape_client
    assert client.get("/hello", **{"X-Request-ID": "shape-1"}).headers["x-request-id"] == "shape-1"
    made = client.get("/hello", **{"X-Request-ID": "bad id!"}).headers["x-request-id"]
    assert len(made) == 32
    assert made != "bad id!"


@cells()
def test_tier_limit_counts_and_refuses(shape_client: tuple[str, ShapeClient]) -> None:
    _, client = shape_client
    left = [client.get("/hello").headers["x-ratelimit-remaining"] for _ in range(TIER_LIMIT)]
    assert left == [str(n) for n in range(TIER_LIMIT - 1, -1, -1)]
    refused = client.get("/hello")
    assert_problem(refused, 429, "rate_limited")
    assert int(refused.headers["retry-after"]) >= 1


@cells()
def test_route_limit_counts_and_refuses(shape_client: tuple[str, ShapeClient]) -> None:
    shape, client = shape_client
    answers = [client.get("/login") for _ in range(ROUTE_LIMIT)]
    assert [a.status_code for a in answers] == [200] * ROUTE_LIMIT
    assert answers[-1].headers["x-ratelimit-remaining"] == "0"
    refused = client.get("/login")
    body = assert_problem(refused, 429, "rate_limited")
    assert int(refused.headers["retry-after"]) >= 1
    # Named by the full route, whichever app's limiter counts it.
    assert body["violated-policies"] == [client_prefix(shape) + "/login"]
    if shape == "sub_app_with_parameter":
        # One budget for the template: another tenant's path is no fresh budget.
        other = client.base.replace("/acme", "/other") + "/login"
        assert client.send("GET", other, headers=client.headers).status_code == 429


def client_prefix(shape: str) -> str:
    """The service's routes as templates: a route limit is named and keyed by these."""
    return {
        "router": "/shop",
        "sub_app": "/sub",
        "sub_app_installed": "/sub",
        "sub_app_with_parameter": "/tenants/{tenant}",
        "nested_sub_app": "/outer/inner",
    }.get(shape, "")


@cells()
def test_exempt_path_is_never_counted(shape_client: tuple[str, ShapeClient]) -> None:
    _, client = shape_client
    answers = [client.get("/exempt/ping") for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert "x-ratelimit-remaining" not in answers[-1].headers
    assert client.get("/hello").headers["x-ratelimit-remaining"] == str(TIER_LIMIT - 1)


@cells()
def test_feature_off_sheds_its_paths(shape_client: tuple[str, ShapeClient]) -> None:
    _, client = shape_client
    answer = client.get("/exports/orders.csv")
    assert_problem(answer, 503, "feature_unavailable")
    assert "exports" in answer.headers["x-degraded"]


@cells()
def test_feature_off_refuses_routes_that_require_it(shape_client: tuple[str, ShapeClient]) -> None:
    _, client = shape_client
    assert_problem(client.get("/reports"), 503, "feature_unavailable")


@cells()
def test_request_deadline_answers_504(shape_client: tuple[str, ShapeClient]) -> None:
    _, client = shape_client
    answer = client.get("/slow", **{"X-Request-Timeout": "0.2"})
    assert_problem(answer, 504, "upstream_timeout")


@cells(["cors_before", "cors_after"])
def test_cors_headers_on_refusals_and_errors(shape_client: tuple[str, ShapeClient]) -> None:
    _, client = shape_client
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "GET"}
    assert [client.request("OPTIONS", "/hello", preflight).status_code for _ in range(3)] == [
        200
    ] * 3
    failed = client.get("/boom", Origin=ORIGIN)
    assert_problem(failed, 500, "internal_error")
    assert failed.headers["access-control-allow-origin"] == ORIGIN
    for _ in range(TIER_LIMIT - 1):
        assert client.get("/hello", Origin=ORIGIN).status_code == 200
    refused = client.get("/hello", Origin=ORIGIN)
    assert_problem(refused, 429, "rate_limited")
    assert refused.headers["access-control-allow-origin"] == ORIGIN


@cells([s for s in SHAPES if "middleware" in s])
def test_user_middleware_sees_what_its_place_lets_it_see(
    shape_client: tuple[str, ShapeClient],
) -> None:
    """Added after install() (outside its layer) a user's middleware sees every answer, the
    library's 429 and 500 included; added before (inside) it sees the app's own answers, and
    not what the layer answered around it."""
    shape, client = shape_client
    outside = shape.endswith("_after")
    answers = {
        "route": client.get("/hello"),
        "handled error": client.get("/conflict"),
        "unhandled error": client.get("/boom"),
    }
    for _ in range(TIER_LIMIT):
        answers["refusal"] = client.get("/hello")
    assert answers["refusal"].status_code == 429
    seen = {name: "x-user-middleware" in a.headers for name, a in answers.items()}
    assert seen == {
        "route": True,
        "handled error": True,
        "unhandled error": outside,
        "refusal": outside,
    }
