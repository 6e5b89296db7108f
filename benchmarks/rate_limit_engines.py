"""This library's rate-limit engine against ``limits`` (slowapi's engine), on a private Redis.

Run: .venv/bin/python -m benchmarks.rate_limit_engines     (figures quoted in adr/0012)

Measures, per limited request with the figures rate-limit headers need:
  * round trips to Redis (socket writes) and the commands the server saw (INFO commandstats);
  * throughput of one process (checks/s), sequential and with 64 concurrent requests;
  * event-loop blocking while Redis is stalled (SIGSTOP) for 1 s;
  * atomicity of two limits on one request, and agreement between clients with skewed clocks.
Starts its own ``redis-server`` on a free port; never touches the machine's Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from unittest import mock

import limits
import limits.aio.strategies
import limits.storage.redis
import limits.strategies
import redis
import redis.asyncio.connection
import redis.connection
from redis._parsers import _AsyncRESP2Parser

from fastapi_resilience.ratelimit import GuardedStorage, Limit, LimitCheck, RedisStorage

SENDS = {"n": 0}


def _count_sends(original: Callable[..., object]) -> Callable[..., object]:
    def wrapper(*args: object, **kwargs: object) -> object:
        SENDS["n"] += 1
        return original(*args, **kwargs)

    return wrapper


redis.connection.AbstractConnection.send_packed_command = _count_sends(  # type: ignore[method-assign]
    redis.connection.AbstractConnection.send_packed_command
)
redis.asyncio.connection.AbstractConnection.send_packed_command = _count_sends(  # type: ignore[method-assign]
    redis.asyncio.connection.AbstractConnection.send_packed_command
)


@contextlib.contextmanager
def redis_server() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as workdir:
        proc = subprocess.Popen(
            [shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind",
             "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", workdir],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            for _ in range(100):
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)):
                    break
                time.sleep(0.02)
            yield f"redis://127.0.0.1:{port}/0", proc
        finally:
            proc.send_signal(signal.SIGCONT)
            proc.terminate()
            proc.wait()


OBSERVERS: dict[str, redis.Redis] = {}


def commandstats(url: str) -> dict[str, int]:
    client = OBSERVERS.get(url) or OBSERVERS.setdefault(url, redis.Redis.from_url(url))
    stats = client.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}


def per_request(url: str, run: Callable[[], None], n: int = 200) -> tuple[float, str]:
    run()  # warm-up: connections, script loading
    before = commandstats(url)
    sends = SENDS["n"]
    for _ in range(n):
        run()
    sent = SENDS["n"] - sends
    after = commandstats(url)
    delta = {k: after[k] - before.get(k, 0) for k in after}
    delta["info"] = delta.get("info", 0) - 1
    mix = ", ".join(f"{k} {v / n:g}" for k, v in sorted(delta.items()) if v > 0)
    return sent / n, mix


def run_async(coro: Awaitable[object]) -> object:
    return asyncio.get_event_loop().run_until_complete(coro)


async def throughput(call: Callable[[int], Awaitable[object]], concurrency: int) -> float:
    stop = time.perf_counter() + 1.5
    done = 0

    async def worker(i: int) -> None:
        nonlocal done
        while time.perf_counter() < stop:
            await call(i)
            done += 1

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return done / 1.5


def sync_throughput(call: Callable[[], object]) -> float:
    stop, done = time.perf_counter() + 1.5, 0
    while time.perf_counter() < stop:
        call()
        done += 1
    return done / 1.5


async def loop_lag_during_stall(
    proc: subprocess.Popen[bytes], call: Callable[[], Awaitable[object]]
) -> tuple[float, float]:
    """Stall Redis for 1 s while requests keep coming; returns (max loop lag, max call time)."""
    lag = 0.0
    slowest = 0.0
    stop = time.perf_counter() + 1.5

    async def ticker() -> None:
        nonlocal lag
        while time.perf_counter() < stop:
            before = time.perf_counter()
            await asyncio.sleep(0.005)
            lag = max(lag, time.perf_counter() - before - 0.005)

    async def requests() -> None:
        nonlocal slowest
        while time.perf_counter() < stop:
            start = time.perf_counter()
            with contextlib.suppress(Exception):
                await call()
            slowest = max(slowest, time.perf_counter() - start)
            await asyncio.sleep(0.001)

    proc.send_signal(signal.SIGSTOP)
    # A thread resumes Redis: a blocked event loop could not.
    threading.Timer(1.0, proc.send_signal, (signal.SIGCONT,)).start()
    await asyncio.gather(ticker(), requests())
    return lag, slowest


def main() -> None:
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    tier, route = Limit(1_000_000, 60), Limit(1_000_000, 60)
    ours_checks = [LimitCheck("tier:free:ip:1", tier)]
    two_checks = [LimitCheck("tier:free:ip:1", tier), LimitCheck("route:/x:ip:1", route)]
    item = limits.parse("1000000/minute")
    print("## Round trips and commands per limited request (headers included)\n")
    print("| engine | round trips | commands the server saw per request |")
    print("|---|---|---|")
    with redis_server() as (url, proc):
        ours = RedisStorage.from_url(url)
        for label, checks in (("this library, 1 limit", ours_checks), ("2 limits", two_checks)):
            trips, mix = per_request(url, lambda c=checks: run_async(ours.check("ip:1", c)))  # type: ignore[misc]
            print(f"| {label} | {trips:g} | {mix} |")
        sync_storage = limits.storage.storage_from_string(url)
        for name in ("fixed-window", "moving-window", "sliding-window-counter"):
            strategy = limits.strategies.STRATEGIES[name](sync_storage)

            def slowapi_like(s: limits.strategies.RateLimiter = strategy, key: str = name) -> None:
                s.hit(item, key, "/x")
                s.get_window_stats(item, key, "/x")  # slowapi's headers

            trips, mix = per_request(url, slowapi_like)
            print(f"| limits (sync, as slowapi) {name} | {trips:g} | {mix} |")
        async_storage = limits.storage.storage_from_string(
            url.replace("redis://", "async+redis://"), implementation="redispy"
        )
        async_moving = limits.aio.strategies.MovingWindowRateLimiter(async_storage)

        async def limits_async_call(i: int = 0) -> None:
            await async_moving.hit(item, f"async:{i}", "/x")
            await async_moving.get_window_stats(item, f"async:{i}", "/x")

        trips, mix = per_request(url, lambda: run_async(limits_async_call()))  # type: ignore[arg-type]
        print(f"| limits (async) moving-window | {trips:g} | {mix} |")

        print("\n## Throughput of one process (checks/s, headers included)\n")
        print("| engine | sequential | 64 concurrent |")
        print("|---|---|---|")
        plain = RedisStorage.from_url(url, coalesce=False, max_connections=200)
        # redis-py's pure-Python reply parser instead of hiredis, to see what hiredis buys.
        python_parser = {"parser_class": _AsyncRESP2Parser}
        no_hiredis = RedisStorage.from_url(url, **python_parser)
        plain_no_hiredis = RedisStorage.from_url(
            url, coalesce=False, max_connections=200, **python_parser
        )
        for label, storage in (
            ("this library, coalesced", ours),
            ("this library, coalesced, no hiredis", no_hiredis),
            ("this library, one command per check", plain),
            ("this library, one command per check, no hiredis", plain_no_hiredis),
        ):

            async def call(i: int, s: RedisStorage = storage) -> object:
                return await s.check(f"ip:{i}", [LimitCheck(f"tier:free:ip:{i}", tier)])

            seq = run_async(throughput(call, 1))
            conc = run_async(throughput(call, 64))
            print(f"| {label} | {seq:.0f} | {conc:.0f} |")
        seq = run_async(throughput(limits_async_call, 1))
        conc = run_async(throughput(limits_async_call, 64))
        print(f"| limits (async) moving-window | {seq:.0f} | {conc:.0f} |")
        sync_moving = limits.strategies.MovingWindowRateLimiter(sync_storage)
        seq = sync_throughput(
            lambda: (
                sync_moving.hit(item, "moving-window", "/x"),
                sync_moving.get_window_stats(item, "moving-window", "/x"),
            )
        )
        print(f"| limits (sync, as slowapi) moving-window | {seq:.0f} | (blocks the loop) |")

        print("\n## Redis stalled (SIGSTOP) for 1 s while requests keep coming\n")
        print("| engine | longest event-loop stall | slowest request |")
        print("|---|---|---|")
        guard = GuardedStorage(RedisStorage.from_url(url))
        lag, slowest = run_async(
            loop_lag_during_stall(proc, lambda: guard.check("ip:1", ours_checks))
        )  # type: ignore[misc]
        print(f"| this library (guarded) | {lag * 1000:.0f} ms | {slowest * 1000:.0f} ms |")
        time.sleep(0.2)

        async def sync_in_loop() -> None:
            sync_moving.hit(item, "moving-window", "/x")  # what slowapi does in an async app

        lag, slowest = run_async(loop_lag_during_stall(proc, sync_in_loop))  # type: ignore[misc]
        print(f"| limits (sync, as slowapi) | {lag * 1000:.0f} ms | {slowest * 1000:.0f} ms |")

        print("\n## Two limits on one request: refused by the route limit (2/min)\n")
        strict, loose = Limit(2, 60), Limit(100, 60)
        for _ in range(10):
            run_async(
                ours.check("ip:2", [LimitCheck("tier:ip:2", loose), LimitCheck("r:ip:2", strict)])
            )
        state = run_async(ours.check("ip:2", [LimitCheck("tier:ip:2", loose)]))
        used = 100 - state.states[0].remaining  # type: ignore[attr-defined]
        print(f"- this library: tier units used after 10 requests (2 admitted): {used - 1}")
        fixed = limits.strategies.FixedWindowRateLimiter(sync_storage)
        loose_item, strict_item = limits.parse("100/minute"), limits.parse("2/minute")
        for _ in range(10):  # slowapi's order: each limit hit in turn, stop at the first refusal
            if fixed.hit(loose_item, "ip:2", "tier"):
                fixed.hit(strict_item, "ip:2", "route")
        stats = fixed.get_window_stats(loose_item, "ip:2", "tier")
        print(f"- limits as slowapi uses it: tier units used: {100 - stats.remaining}")

        print("\n## Two clients, clocks 61 s apart, 100/minute on one identity\n")
        real_time = time.time
        ahead = lambda: real_time() + 61  # noqa: E731
        moving = limits.strategies.MovingWindowRateLimiter(sync_storage)
        hundred = limits.parse("100/minute")
        first = sum(moving.hit(hundred, "skew") for _ in range(150))
        with mock.patch.object(limits.storage.redis.time, "time", ahead):
            second = sum(moving.hit(hundred, "skew") for _ in range(150))
        print(f"- limits moving-window (client timestamps): {first} + {second} admitted")
        check = [LimitCheck("skew", Limit(100, 60))]
        first = sum(run_async(ours.check("skew", check)).allowed for _ in range(150))  # type: ignore[attr-defined]
        with mock.patch.object(time, "time", ahead):
            second = sum(run_async(ours.check("skew", check)).allowed for _ in range(150))  # type: ignore[attr-defined]
        print(f"- this library (Redis TIME): {first} + {second} admitted")
        for storage in (ours, plain, no_hiredis, plain_no_hiredis, guard):
            run_async(storage.aclose())
        OBSERVERS.pop(url).close()
    loop.close()


if __name__ == "__main__":
    main()
