"""The README's code runs and does what the README says."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from fastapi_resilience.outbound import BreakerRegistry

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.anyio


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


async def test_readme_examples_run(default_breakers: BreakerRegistry) -> None:
    """The 20-line example answers the documented 404; the guarded route answers its stock."""
    blocks = _python_blocks()
    namespace: dict[str, Any] = {}
    exec(blocks[0], namespace)

    async def fetch_stock(sku: str) -> dict[str, Any]:
        return {"sku": sku, "stock": 3}

    namespace["fetch_stock"] = fetch_stock
    try:
        exec(blocks[1], namespace)
        transport = httpx.ASGITransport(app=namespace["app"])
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            missing = await client.get("/orders/9")
            shipped = await client.post("/orders/1/ship")
            stock = await client.get("/stock/tea")
    finally:
        default_breakers.unregister("inventory")
    body = missing.json()
    assert missing.status_code == 404
    assert body["type"] == "urn:fastapi-resilience:problem:not_found"
    assert body["detail"] == "order 9 does not exist"
    assert body["order_id"] == 9
    assert (shipped.status_code, shipped.json()["code"]) == (409, "conflict")
    assert stock.json() == {"sku": "tea", "stock": 3}


def _walk_through() -> str:
    """The README's curl walk-through: the shell block after `make run`."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    walk = [block for block in blocks if "curl" in block]
    assert len(walk) == 1
    return walk[0]


def _run_walk_through(script: str) -> list[int]:
    """Run it with bash; every curl prints only its status code."""
    import subprocess

    from loopback import require_binary

    require_binary("curl")
    status_only = "curl() { command curl -s -o /dev/null -w '%{http_code} ' \"$@\"; }\n"
    done = subprocess.run(
        ["bash", "-e", "-c", status_only + script],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return [int(code) for code in done.stdout.split()]


@pytest.mark.slow
def test_readme_walk_through_runs_twice_in_a_row() -> None:
    """`make run`, then the README's walk-through twice within the minute: every step answers
    what the README says both times; only /login (5/minute per client) refuses at once in the
    second run, as the README says."""
    import subprocess
    import sys

    from loopback import free_port, wait_for_port

    port, upstream_port = free_port(), free_port()
    script = (
        _walk_through()
        .replace("127.0.0.1:8000", f"127.0.0.1:{port}")
        .replace("127.0.0.1:8001", f"127.0.0.1:{upstream_port}")
    )
    command = ["-m", "example_app.run", "--port", f"{port}", "--upstream-port", f"{upstream_port}"]
    launcher = subprocess.Popen(
        [sys.executable, *command],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, timeout=30, proc=launcher)
        first = _run_walk_through(script)
        second = _run_walk_through(script)
    finally:
        launcher.terminate()
        launcher.wait(timeout=30)
    steps = [200, 404, 500, 200, 200]  # order, unknown route, crash, readiness, premium
    inventory = [200, 200, 200]  # a read, the upstream's _control, the read again
    assert first == [*steps, 200, 200, 200, 200, 200, 429, *inventory]
    assert second == [*steps, 429, 429, 429, 429, 429, 429, *inventory]
