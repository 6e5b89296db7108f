"""Cost of this library's rate-limit storages (the figures quoted in adr/0010 and the docs).

Run: .venv/bin/python -m benchmarks.rate_limit_storage

  * memory storage: CPU per check, bytes per window, and a flood of 1,000,000 identities;
  * Redis storage: bytes per busy identity against a plain sliding log and ``limits``'
    moving window, and the server's time per EVALSHA.
Starts its own ``redis-server`` on a free port; never touches the machine's Redis.
"""

from __future__ import annotations

import time
import tracemalloc

import limits
import limits.strategies
import redis

from benchmarks.rate_limit_engines import redis_server, run_async
from fastapi_resilience.ratelimit import Limit, LimitCheck, MemoryStorage, RedisStorage
from fastapi_resilience.testing import ManualClock


def memory_cpu() -> None:
    clock = ManualClock()
    storage = MemoryStorage(clock=clock)
    one = (LimitCheck("tier:free:ip:1", Limit(1_000_000, 60)),)
    two = (*one, LimitCheck("route:/x:ip:1", Limit(1_000_000, 60)))
    for label, checks in (("1 limit", one), ("2 limits", two)):
        n = 100_000
        start = time.process_time()
        for i in range(n):
            if i % 100 == 0:
                clock.advance(0.05)
            storage.check_now(checks)
        cpu = (time.process_time() - start) / n * 1e6
        print(f"- memory storage, {label}: {cpu:.1f} µs CPU per check")


def memory_per_window() -> None:
    clock = ManualClock()
    storage = MemoryStorage(clock=clock, max_keys=50_000)
    limit = Limit(10, 60)
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    for i in range(50_000):
        storage.check_now((LimitCheck(f"tier:anonymous:ip:10.0.{i // 256}.{i % 256}", limit),))
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    print(f"- memory storage: {used / 50_000:.0f} bytes per window (tracemalloc, 50,000 windows)")


def million_identities() -> None:
    """The flood of the docs: 1,000,000 distinct identities, then one period of silence."""
    clock = ManualClock()
    storage = MemoryStorage(clock=clock)
    limit = Limit(10, 60)
    with open("/proc/self/statm") as statm:
        before = int(statm.read().split()[1]) * 4096
    for i in range(1_000_000):
        storage.check_now((LimitCheck(f"ip:{i}", limit),))
        if i % 1000 == 0:
            clock.advance(0.001)
    with open("/proc/self/statm") as statm:
        grown = (int(statm.read().split()[1]) * 4096 - before) / 2**20
    kept = len(storage)
    clock.advance(61)
    storage.sweep()
    print(
        f"- 1,000,000 distinct identities: {kept:,} windows kept, RSS grew {grown:.0f} MiB; "
        f"{len(storage)} left 61 s later"
    )


def redis_memory(url: str) -> None:
    client = redis.Redis.from_url(url)
    storage = RedisStorage.from_url(url)
    check = [LimitCheck("tier:premium:key:abc", Limit(1000, 60))]
    for _ in range(1000):
        run_async(storage.check("key:abc", check))
    log, total = storage.keys_for("key:abc", check[0])
    one_bucket = sum(client.memory_usage(k) or 0 for k in (log, total))
    # The worst case: one unit in each of the 61 buckets a window can hold.
    now = int(time.time())
    client.delete(log)
    client.rpush(log, *[v for b in range(now, now - 61, -1) for v in (b, 16)])
    full = sum(client.memory_usage(k) or 0 for k in (log, total))
    client.delete("plain-log")
    client.rpush("plain-log", *[int(time.time() * 1000) + i for i in range(1000)])
    plain = client.memory_usage("plain-log") or 0
    moving = limits.strategies.MovingWindowRateLimiter(limits.storage.storage_from_string(url))
    item = limits.parse("1000/minute")
    for _ in range(1000):
        moving.hit(item, "key:abc")
    moving_key = next(k for k in client.keys("LIMITS*"))
    moving_bytes = client.memory_usage(moving_key) or 0
    print("\nRedis bytes for one identity that used its whole 1000/minute:\n")
    print(f"- this library, all in one bucket: {one_bucket} B; spread over 61 buckets: {full} B")
    print(f"- a plain sliding log of 1000 ms timestamps: {plain} B")
    print(f"- limits moving window (1000 float timestamps): {moving_bytes} B")
    stats = client.info("commandstats")
    evalsha = stats["cmdstat_evalsha"]
    print(f"- server time per EVALSHA (one limit): {evalsha['usec_per_call']:.1f} µs")
    run_async(storage.aclose())
    client.close()


def main() -> None:
    print("Memory storage:\n")
    memory_cpu()
    memory_per_window()
    million_identities()
    with redis_server() as (url, _):
        redis_memory(url)


if __name__ == "__main__":
    main()
