"""The README's code runs and does what the README says."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from fastapi_resilience._breaker import default_registry

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.anyio


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


async def test_readme_examples_run() -> None:
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
        default_registry.unregister("inventory")
    body = missing.json()
    assert missing.status_code == 404
    assert body["type"] == "urn:fastapi-resilience:problem:not_found"
    assert body["detail"] == "order 9 does not exist"
    assert body["order_id"] == 9
    assert (shipped.status_code, shipped.json()["code"]) == (409, "conflict")
    assert stock.json() == {"sku": "tea", "stock": 3}
