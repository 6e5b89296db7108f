"""``uvicorn --workers N`` on one port, all workers sharing one Redis: exactly the limit admitted.

One server process per test with N workers behind one listening socket (how most deployments
run one host), unlike ``test_rate_limit_multiprocess.py``'s two servers on two ports. Every answer
names its worker (``x-worker-pid``, added by the test app), so the test shows that the answers
came from several workers and that between them they admitted exactly the limit.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest
import redis.asyncio as aioredis
from loopback import RedisServer, UvicornProcess

from tests.test_rate_limit_multiprocess import APP, app_env, command_calls

pytestmark = [pytest.mark.anyio, pytest.mark.redis, pytest.mark.slow]

LIMIT = 100  # the anonymous tier of app_env(): 100/minute
BURST = 300  # requests fired at once from one identity, three times the limit
CLIENTS = 32  # one keep-alive connection each; the burst is spread over them
PID = "x-worker-pid"


@pytest.fixture(name="server")
def _server(workers: int, redis_server: RedisServer) -> Iterator[UvicornProcess]:
    server = UvicornProcess(APP, env=app_env(redis_server.url), args=["--workers", str(workers)])
    try:
        yield server
    finally:
        server.stop()


async def clients_on_workers(url: str, workers: int) -> list[httpx.AsyncClient]:
    """One-connection clients whose connections reach several workers when there are several.

    The workers share one listening socket and the kernel decides which accepts a connection;
    each client keeps its one keep-alive connection, so the worker that answered its warm-up
    answers every later request it sends. Connections opened at once may all land on one
    worker, so a fresh set is opened until two or more workers hold them. Warm-up requests use
    another identity, so they count nothing against the burst's.
    """
    wanted = min(workers, 2)
    seen: set[str] = set()
    one = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    for _ in range(20):
        clients = [httpx.AsyncClient(base_url=url, limits=one, timeout=30) for _ in range(CLIENTS)]
        warm = await asyncio.gather(
            *(c.get("/limited", headers={"X-API-Key": "warm-up-key"}) for c in clients)
        )
        assert {a.status_code for a in warm} == {200}
        seen = {a.headers[PID] for a in warm}
        if len(seen) >= wanted:
            return clients
        await asyncio.gather(*(c.aclose() for c in clients))
    pytest.fail(f"{CLIENTS} connections never reached {wanted} workers: {seen}")


@pytest.mark.parametrize("workers", [1, 2, 4], ids=lambda n: f"workers={n}")
async def test_workers_behind_one_port_admit_exactly_the_limit(
    workers: int, server: UvicornProcess, redis_server: RedisServer
) -> None:
    """300 concurrent requests from one identity over N workers: 100 admitted, 200 get 429."""
    clients = await clients_on_workers(server.url, workers)
    observer = aioredis.Redis.from_url(redis_server.url)
    try:
        before = await command_calls(observer)
        answers = await asyncio.gather(
            *(clients[i % CLIENTS].get("/limited") for i in range(BURST))
        )
        after = await command_calls(observer)
    finally:
        await asyncio.gather(*(c.aclose() for c in clients))
        await observer.aclose()

    statuses = Counter(a.status_code for a in answers)
    assert statuses == {200: LIMIT, 429: BURST - LIMIT}
    for answer in answers:
        if answer.status_code == 429:
            assert answer.headers["content-type"] == "application/problem+json"
            assert int(answer.headers["retry-after"]) >= 1
    answered_by = Counter(a.headers[PID] for a in answers)
    # With several workers, several answered: the limit held across processes.
    assert (len(answered_by) >= 2) if workers > 1 else (len(answered_by) == 1)
    assert len(answered_by) <= workers
    # Each request was one EVALSHA on the shared Redis, whichever worker took it.
    assert after["cmdstat_evalsha"] - before["cmdstat_evalsha"] == BURST
