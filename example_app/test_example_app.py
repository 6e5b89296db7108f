"""The example app, served by a real uvicorn process, does what the README says."""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from loopback import UvicornProcess

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(name="server", scope="module")
def _server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[UvicornProcess, Path]]:
    log = tmp_path_factory.mktemp("example") / "server.log"
    with log.open("wb") as sink:
        # These tests are about errors and IDs, not limits: the anonymous tier must not refuse.
        env = {"RESILIENCE_RATE_LIMIT_TIERS": '{"anonymous": "100000/minute"}'}
        server = UvicornProcess("example_app.main:app", cwd=ROOT, stderr=sink, env=env)
        try:
            yield server, log
        finally:
            server.stop()


def _raw_request(port: int, header_value: bytes) -> bytes:
    """Send bytes httpx would refuse to send, the way a hostile client can."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(
            b"GET /whoami HTTP/1.1\r\nHost: t\r\nX-Request-ID: "
            + header_value
            + b"\r\nConnection: close\r\n\r\n"
        )
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_missing_route_is_problem_json_with_request_id(server: tuple[UvicornProcess, Path]) -> None:
    """`curl -i 127.0.0.1:8000/<missing>` answers 404 problem+json with X-Request-ID."""
    response = httpx.get(f"{server[0].url}/no/such/thing")
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["x-request-id"])
    assert response.json()["correlation_id"] == response.headers["x-request-id"]


def test_orders_errors(server: tuple[UvicornProcess, Path]) -> None:
    """404 for an unknown order, 422 for a bad one, 409 for shipping twice."""
    base = server[0].url
    assert httpx.get(f"{base}/orders/999").json()["order_id"] == 999
    bad = httpx.post(f"{base}/orders", json={"sku": "", "quantity": 0})
    assert bad.status_code == 422
    assert {tuple(e["loc"]) for e in bad.json()["errors"]} == {
        ("body", "sku"),
        ("body", "quantity"),
    }
    created = httpx.post(f"{base}/orders", json={"sku": "tea", "quantity": 1}).json()
    assert httpx.post(f"{base}/orders/{created['id']}/ship").status_code == 200
    again = httpx.post(f"{base}/orders/{created['id']}/ship")
    assert (again.status_code, again.json()["code"]) == (409, "conflict")


@pytest.mark.parametrize(
    "value",
    [b"a" * 10_000, "\u00e9t\u00e9".encode(), b"", b"id with spaces", b"\x01\x02"],
    ids=["10kB", "non-ascii", "empty", "spaces", "control"],
)
def test_abusive_request_ids_are_never_reflected(
    server: tuple[UvicornProcess, Path], value: bytes
) -> None:
    """Over a real socket, a bad X-Request-ID is replaced by a fresh one."""
    raw = _raw_request(server[0].port, value)
    head, _, body = raw.partition(b"\r\n\r\n")
    if head.startswith(b"HTTP/1.1 400") and b"x-request-id" not in head.lower():
        # httptools (uvicorn[standard]) refuses control bytes before any app sees them;
        # h11 passes them on. Either way the value must not come back.
        assert value not in head + body
        return
    assert head.startswith(b"HTTP/1.1 200")
    echoed = re.search(rb"(?im)^x-request-id: (.*)$", head)
    assert echoed is not None
    assert re.fullmatch(rb"[0-9a-f]{32}", echoed[1].strip())
    assert value not in head or value == b""
    assert echoed[1].strip() in body


def test_unhandled_error_is_sanitized_and_logged_once(server: tuple[UvicornProcess, Path]) -> None:
    """RuntimeError('secret...') -> 500 without text, type or traceback; one log with the ID."""
    process, log = server
    response = httpx.get(f"{process.url}/debug/crash", headers={"X-Request-ID": "crash-1"})
    assert response.status_code == 500
    assert response.headers["x-request-id"] == "crash-1"
    assert response.json()["correlation_id"] == "crash-1"
    for leak in ("secret", "hunter2", "RuntimeError", "Traceback"):
        assert leak not in response.text
    logged = _wait_for_log(log, "crash-1")
    assert logged.count("Traceback (most recent call last)") == 1
    assert "[crash-1]" in logged
    assert "Exception in ASGI application" not in logged


def _wait_for_log(log: Path, needle: str) -> str:
    # The server writes its log asynchronously to our request; poll the file briefly.
    import time

    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        if needle in text and "RuntimeError" in text:
            return text
        time.sleep(0.05)
    return log.read_text(errors="replace")


def test_rate_limit_headers_and_login_limit(tmp_path: Path) -> None:
    """The example's tiers answer rate-limit headers, and /login refuses the sixth try."""
    server = UvicornProcess("example_app.main:app", cwd=ROOT)
    try:
        premium = httpx.get(f"{server.url}/orders/1", headers={"X-API-Key": "demo-premium-key"})
        assert premium.headers["x-ratelimit-limit"] in {"50", "1000"}
        codes = [httpx.post(f"{server.url}/login").status_code for _ in range(6)]
        assert codes == [200] * 5 + [429]
        refused = httpx.post(f"{server.url}/login")
        assert refused.headers["content-type"] == "application/problem+json"
        assert int(refused.headers["retry-after"]) >= 1
    finally:
        server.stop()


def test_runtime_stats_are_not_served_by_default(server: tuple[UvicornProcess, Path]) -> None:
    """`GET /_runtime` (the soak run's task count) is a 404 unless asked for."""
    assert httpx.get(f"{server[0].url}/_runtime").status_code == 404


def test_runtime_stats_count_the_processs_tasks_when_asked_for() -> None:
    """With EXAMPLE_RUNTIME_STATS=1 the process says its id and how many asyncio tasks it has."""
    env = {"EXAMPLE_RUNTIME_STATS": "1", "RESILIENCE_RATE_LIMIT_TIERS": '{"anonymous": "9/second"}'}
    server = UvicornProcess("example_app.main:app", cwd=ROOT, env=env)
    try:
        stats = httpx.get(f"{server.url}/_runtime").json()
    finally:
        server.stop()
    assert stats["pid"] == server.proc.pid
    assert stats["tasks"] >= 1  # at least the task answering
    assert "traced" not in stats  # tracemalloc is off unless the environment turns it on


def test_runtime_stats_name_the_lines_holding_memory_when_traced() -> None:
    """With PYTHONTRACEMALLOC set too, the answer adds what Python's allocations hold and,
    with ``?top=N``, the N source lines holding the most (how the soak's steps were named)."""
    env = {
        "EXAMPLE_RUNTIME_STATS": "1",
        "PYTHONTRACEMALLOC": "1",
        "RESILIENCE_RATE_LIMIT_TIERS": '{"anonymous": "9/second"}',
    }
    server = UvicornProcess("example_app.main:app", cwd=ROOT, env=env)
    try:
        stats = httpx.get(f"{server.url}/_runtime", params={"top": 3}).json()
        for bad in ("-1", "1001", "many"):  # out of range is said, not quietly clamped
            answer = httpx.get(f"{server.url}/_runtime", params={"top": bad})
            assert answer.status_code == 422
            assert answer.headers["content-type"] == "application/problem+json"
    finally:
        server.stop()
    assert 0 < stats["traced"] <= stats["traced_peak"]
    assert len(stats["top"]) == 3
    sizes = [line["size"] for line in stats["top"]]
    assert sizes == sorted(sizes, reverse=True)
    assert all(re.fullmatch(r".+:\d+", line["where"]) for line in stats["top"])
