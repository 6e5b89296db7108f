"""``make run`` (``python -m example_app.run``) never serves against someone else's upstream."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from loopback import free_port, wait_for_port

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _launcher(port: int, upstream_port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "example_app.run",
        "--port",
        str(port),
        "--upstream-port",
        str(upstream_port),
    ]


@pytest.fixture(name="occupied")
def _occupied() -> Iterator[socket.socket]:
    """Another process's server on a loopback port: it listens, and nobody must connect."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        sock.setblocking(False)
        yield sock


def _nobody_connected(sock: socket.socket) -> bool:
    try:
        sock.accept()[0].close()
    except BlockingIOError:
        return True
    return False


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return True
    return False


def test_make_run_runs_the_launcher() -> None:
    """What this file tests is what `make run` runs, with its ports passed on."""
    if shutil.which("make") is None:  # pragma: no cover - make is the README's front door
        pytest.skip("make is not installed")
    dry = subprocess.run(
        ["make", "-n", "run", "PORT=8010", "UPSTREAM_PORT=8011"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "-m example_app.run --host 127.0.0.1 --port 8010 --upstream-port 8011" in dry.stdout


def test_taken_upstream_port_stops_make_run(occupied: socket.socket) -> None:
    """With the upstream's port owned by another server, nothing starts: the launcher exits 1
    naming the port and a free one, the app port stays closed, and the other server was never
    called."""
    taken = occupied.getsockname()[1]
    port = free_port()
    done = subprocess.run(
        _launcher(port, taken), cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 1
    assert f"127.0.0.1:{taken} is already in use" in done.stderr
    assert "inventory upstream" in done.stderr
    assert "make run UPSTREAM_PORT=" in done.stderr
    assert _refused(port)
    assert _nobody_connected(occupied)


def test_taken_app_port_stops_make_run_before_the_upstream(occupied: socket.socket) -> None:
    taken = occupied.getsockname()[1]
    upstream_port = free_port()
    done = subprocess.run(
        _launcher(taken, upstream_port),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert f"127.0.0.1:{taken} is already in use" in done.stderr
    assert "make run PORT=" in done.stderr
    assert _refused(upstream_port)


def test_make_run_serves_the_example_against_its_own_upstream() -> None:
    """On free ports the app calls the upstream the launcher started, and stopping the
    launcher stops both."""
    port, upstream_port = free_port(), free_port()
    launcher = subprocess.Popen(_launcher(port, upstream_port), cwd=ROOT)
    try:
        wait_for_port(port, timeout=30, proc=launcher)
        stock = httpx.get(f"http://127.0.0.1:{port}/inventory/tea-earl-grey", timeout=10)
        control = httpx.get(f"http://127.0.0.1:{upstream_port}/_control", timeout=10)
    finally:
        launcher.terminate()
        launcher.wait(timeout=30)
    assert stock.status_code == 200
    assert stock.json()["sku"] == "tea-earl-grey"
    assert control.json()["requests"] == 1
    assert _refused(port)
    assert _refused(upstream_port)
