"""Per-call cost of the outbound response cache, the fallback and the dead-letter queue.

Run: ``.venv/bin/python benchmarks/bench_response_cache.py [--redis-url redis://127.0.0.1:PORT/0]``
(never the machine's own Redis: start a private one). Prints microseconds per call, best of 5.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi_resilience import fallback
from fastapi_resilience.events import EventBus
from fastapi_resilience.exceptions import UpstreamError
from fastapi_resilience.outbound import (
    MemoryDeadLetterQueue,
    RedisDeadLetterQueue,
    ResponseCache,
    with_fallback,
)


async def upstream(sku: str = "a") -> dict[str, Any]:
    return {"sku": sku, "stock": 3}


async def per_call_us(fn: Callable[[], Awaitable[Any]], n: int) -> float:
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(n):
            await fn()
        best = min(best, (time.perf_counter() - start) / n)
    return best * 1e6


async def main(redis_url: str | None, n: int) -> None:
    plain = await per_call_us(upstream, n)
    print(f"plain await f()                      {plain:8.2f} us")

    cache = ResponseCache(ttl=3600, stale_ttl=3600, events=EventBus(log=False))
    await cache.call("k", upstream)
    hit = await per_call_us(lambda: cache.call("k", upstream), n)
    print(f"ResponseCache.call, L1 hit           {hit:8.2f} us  (+{hit - plain:.2f})")

    decorated = fallback(lambda error: None)(upstream)
    fb_ok = await per_call_us(decorated, n)
    print(f"@fallback, call succeeds             {fb_ok:8.2f} us  (+{fb_ok - plain:.2f})")
    wf_ok = await per_call_us(lambda: with_fallback(upstream, lambda e: None), n)
    print(f"with_fallback, call succeeds         {wf_ok:8.2f} us  (+{wf_ok - plain:.2f})")

    memory = MemoryDeadLetterQueue(1000, events=EventBus(log=False))
    error = UpstreamError("down")
    rec = await per_call_us(lambda: memory.record("op", error, context={"sku": "a"}), n)
    print(f"MemoryDeadLetterQueue.record         {rec:8.2f} us")

    if redis_url:
        l2 = ResponseCache(ttl=3600, redis_url=redis_url, events=EventBus(log=False))
        await l2.set("k", {"sku": "a", "stock": 3})

        async def l2_read() -> Any:
            l2.clear_local()
            return await l2.call("k", upstream)

        l2_hit = await per_call_us(l2_read, n // 10)
        print(f"ResponseCache.call, L2 (Redis) hit   {l2_hit:8.2f} us")
        await l2.aclose()
        queue = RedisDeadLetterQueue(redis_url, stream="bench:dlq", maxlen=1000)
        xadd = await per_call_us(lambda: queue.record("op", error, context={"sku": "a"}), n // 10)
        print(f"RedisDeadLetterQueue.record (XADD)   {xadd:8.2f} us")
        await queue.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--redis-url")
    parser.add_argument("-n", type=int, default=20_000)
    args = parser.parse_args()
    asyncio.run(main(args.redis_url, args.n))
