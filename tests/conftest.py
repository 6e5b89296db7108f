from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests._servers import RedisServer, require_binary


@pytest.fixture(name="redis_server")
def _redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh ``redis-server`` on a free port for one test (never the machine's own Redis)."""
    server = RedisServer(require_binary("redis-server"), tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
