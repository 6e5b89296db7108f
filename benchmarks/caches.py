"""Each bounded or expiring structure of the package, hand-made against its cachetools form.

For every structure ADR 0065 looks at, the operation that structure repeats most is timed in
the two forms side by side: the plain ``dict``/``OrderedDict`` code the package has (or had), and
the ``cachetools`` class that would (or does) replace it, holding the same entries. Nanoseconds
per operation, the best of five repeats, garbage collector on::

    .venv/bin/python -m benchmarks.caches [-n 200000]

The figures are of the structure alone. For scale, the last line is the wall time of one request
through the full memory stack (``resilience_full_memory``), driven in this process as
``benchmarks.instructions`` drives it. What a difference means depends on how often a request
uses the structure; ADR 0065 says that for each, and judges the one on every inbound request
with ``python -m benchmarks.instructions --only bare,resilience_full_memory`` instead.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import time
import timeit
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cachetools import FIFOCache, LRUCache, TLRUCache

from benchmarks.apps import VARIANTS, BenchEnv
from benchmarks.instructions import lifespan
from benchmarks.micro import asgi_request
from fastapi_resilience.testing import ManualClock

#: Entries each structure holds while it is timed (its bound is larger unless a case says not).
FILLED = 1000
BOUND = 1024
KEY = "GET https://inventory.example/items/500"


@dataclass(slots=True)
class _Slot:
    """The response cache's entry: what the L1 holds per key."""

    value: Any
    stored_mono: float
    ttl: float
    stale_ttl: float


def _keys(count: int) -> list[str]:
    return [f"GET https://inventory.example/items/{i}" for i in range(count)]


# --- the response cache's first level ----------------------------------------------------------


def l1_hit() -> tuple[Callable[[], Any], Callable[[], Any]]:
    """A fresh hit: find the entry, check its age against one clock read, mark it used."""
    clock = ManualClock()
    ordered: OrderedDict[str, _Slot] = OrderedDict()
    tlru: TLRUCache[str, _Slot] = TLRUCache(
        BOUND, lambda _k, s, _now: s.stored_mono + s.ttl + s.stale_ttl, timer=clock.monotonic
    )
    for key in _keys(FILLED):
        ordered[key] = tlru[key] = _Slot(key, clock.monotonic(), 60.0, 60.0)

    def hand_made() -> Any:
        slot = ordered.get(KEY)
        if slot is not None:
            age = clock.monotonic() - slot.stored_mono
            if 0.0 <= age < slot.ttl:
                ordered.move_to_end(KEY)
                return slot.value
        return None

    def with_cachetools() -> Any:
        try:
            slot = tlru[KEY]
        except KeyError:
            return None
        age = clock.monotonic() - slot.stored_mono
        return slot.value if 0.0 <= age < slot.ttl else None

    return hand_made, with_cachetools


def l1_store_full() -> tuple[Callable[[], Any], Callable[[], Any]]:
    """A miss stored into a full level: the least recently used entry makes room."""
    clock = ManualClock()
    ordered: OrderedDict[str, _Slot] = OrderedDict()
    tlru: TLRUCache[str, _Slot] = TLRUCache(
        FILLED, lambda _k, s, _now: s.stored_mono + s.ttl + s.stale_ttl, timer=clock.monotonic
    )
    for key in _keys(FILLED):
        ordered[key] = tlru[key] = _Slot(key, clock.monotonic(), 60.0, 60.0)
    fresh = (f"new {i}" for i in itertools.count())

    def hand_made() -> None:
        key = next(fresh)
        ordered[key] = _Slot(key, clock.monotonic(), 60.0, 60.0)
        ordered.move_to_end(key)
        while len(ordered) > FILLED:
            ordered.popitem(last=False)

    def with_cachetools() -> None:
        key = next(fresh)
        tlru[key] = _Slot(key, clock.monotonic(), 60.0, 60.0)

    return hand_made, with_cachetools


# --- the learned Vary names of the transport's cache --------------------------------------------


def vary_lookup() -> tuple[Callable[[], Any], Callable[[], Any]]:
    """The look-up every cached GET makes, for a URL with no learned ``Vary`` (the common case)."""
    ordered: OrderedDict[str, tuple[str, ...]] = OrderedDict()
    lru: LRUCache[str, tuple[str, ...]] = LRUCache(BOUND)
    for key in _keys(FILLED):
        ordered[key] = lru[key] = ("accept-language",)

    def hand_made() -> Any:
        varied = ordered.get("GET https://other.example/")
        if varied is not None:
            ordered.move_to_end("GET https://other.example/")
        return varied

    def with_cachetools() -> Any:
        return lru.get("GET https://other.example/")

    return hand_made, with_cachetools


# --- the transport's per-host policies ----------------------------------------------------------


def host_touch() -> tuple[Callable[[], Any], Callable[[], Any]]:
    """Each outbound request marks its host's policy as used (the policy itself is found in a
    plain dict by origin first, in both forms)."""
    ordered: OrderedDict[str, object] = OrderedDict()
    lru: LRUCache[str, object] = LRUCache(BOUND)
    for key in _keys(FILLED):
        ordered[key] = lru[key] = object()

    def hand_made() -> None:
        ordered.move_to_end(KEY)

    def with_cachetools() -> None:
        lru[KEY]  # a read is what marks an entry used

    return hand_made, with_cachetools


# --- the breaker and bulkhead registries --------------------------------------------------------


def registry_get() -> tuple[Callable[[], Any], Callable[[], Any]]:
    """``get_breaker(name)`` and ``breaker_dependency`` look a name up on every call."""
    plain: dict[str, object] = {}
    lru: LRUCache[str, object] = LRUCache(BOUND)
    for key in _keys(FILLED):
        plain[key] = lru[key] = object()

    def hand_made() -> object:
        return plain[KEY]

    def with_cachetools() -> object:
        return lru[KEY]

    return hand_made, with_cachetools


# --- the identity resolver's caches (inbound: judged with benchmarks.instructions) ------------

GENERATION = 4096


class _Generations:
    """The resolver's cache: this generation's dict and the one before it."""

    def __init__(self) -> None:
        self.current: dict[str, str] = {}
        self.old: dict[str, str] = {}

    def get(self, key: str) -> str | None:
        return self.current.get(key)

    def miss(self, key: str) -> str:
        value = self.old.get(key) or key
        if len(self.current) >= GENERATION:
            self.old, self.current = self.current, {}
        self.current[key] = value
        return value


def identity_hit() -> tuple[Callable[[], Any], Callable[[], Any]]:
    """Every limited request: the identity of an address seen lately."""
    generations = _Generations()
    lru: LRUCache[str, str] = LRUCache(2 * GENERATION)
    for key in _keys(FILLED):
        generations.miss(key)
        lru[key] = key

    def hand_made() -> Any:
        return generations.get(KEY) or generations.miss(KEY)

    def with_cachetools() -> Any:
        return lru.get(KEY) or lru.setdefault(KEY, KEY)

    return hand_made, with_cachetools


def identity_flood() -> tuple[Callable[[], Any], Callable[[], Any]]:
    """A flood of addresses never seen: each is a miss that must make room."""
    generations = _Generations()
    lru: LRUCache[str, str] = LRUCache(2 * GENERATION)
    for key in _keys(2 * GENERATION):
        generations.miss(key)
        lru[key] = key
    fresh = (f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}" for i in itertools.count())

    def hand_made() -> Any:
        key = next(fresh)
        return generations.get(key) or generations.miss(key)

    def with_cachetools() -> Any:
        key = next(fresh)
        value = lru.get(key)
        if value is None:
            lru[key] = value = key
        return value

    return hand_made, with_cachetools


# --- the dead-letter memory queue --------------------------------------------------------------


class _DroppingFifo(FIFOCache[str, str]):
    """A FIFOCache that tells of what it drops, as the queue must (its key index, ``dlq.full``)."""

    def __init__(self, maxsize: int, on_drop: Callable[[str], None]) -> None:
        super().__init__(maxsize)
        self.on_drop = on_drop

    def popitem(self) -> tuple[str, str]:
        key, value = super().popitem()
        self.on_drop(value)
        return key, value


def dead_letter_full() -> tuple[Callable[[], Any], Callable[[], Any]]:
    """A record into a full queue: the oldest entry goes, and its key leaves the index."""
    ordered: OrderedDict[str, str] = OrderedDict()
    index: dict[str, str] = {}

    def forget(value: str) -> None:
        index.pop(value, None)

    fifo = _DroppingFifo(FILLED, forget)
    for key in _keys(FILLED):
        ordered[key] = fifo[key] = key
    fresh = (f"{i}-1" for i in itertools.count())

    def hand_made() -> None:
        key = next(fresh)
        ordered[key] = key
        if len(ordered) > FILLED:
            _, dropped = ordered.popitem(last=False)
            index.pop(dropped, None)

    def with_cachetools() -> None:
        key = next(fresh)
        fifo[key] = key

    return hand_made, with_cachetools


# --- the health checks' results ----------------------------------------------------------------


@dataclass(slots=True)
class _Check:
    entry: dict[str, Any] | None
    fresh_until: float


def health_fresh() -> tuple[Callable[[], Any], Callable[[], Any]]:
    """A readiness call that finds a check's result still fresh."""
    clock = ManualClock()
    check = _Check({"status": "ok"}, clock.monotonic() + 1.0)
    tlru: TLRUCache[str, dict[str, Any]] = TLRUCache(
        BOUND, lambda _k, _v, now: now + 1.0, timer=clock.monotonic
    )
    tlru["redis"] = {"status": "ok"}

    def hand_made() -> Any:
        if check.entry is not None and clock.monotonic() < check.fresh_until:
            return check.entry
        return None

    def with_cachetools() -> Any:
        return tlru.get("redis")

    return hand_made, with_cachetools


CASES: dict[str, Callable[[], tuple[Callable[[], Any], Callable[[], Any]]]] = {
    "response cache L1, fresh hit (TLRUCache)": l1_hit,
    "response cache L1, store when full (TLRUCache)": l1_store_full,
    "transport cache, Vary look-up (LRUCache)": vary_lookup,
    "transport policies, mark a host used (LRUCache)": host_touch,
    "breaker/bulkhead registry, get (LRUCache)": registry_get,
    "identity cache, hit (LRUCache)": identity_hit,
    "identity cache, flood of new addresses (LRUCache)": identity_flood,
    "dead-letter queue, record when full (FIFOCache)": dead_letter_full,
    "health check, fresh result (TLRUCache)": health_fresh,
}


def best_ns(fn: Callable[[], Any], number: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e9


def request_us(variant: str = "resilience_full_memory", number: int = 5000) -> float:
    """One request through ``variant``'s app, in this process: best of five, microseconds."""
    app = VARIANTS[variant].build(BenchEnv())
    call = asgi_request(app)

    async def run() -> float:
        best = float("inf")
        async with lifespan(app):
            for _ in range(number // 5):  # warm: the caches, the identity, the windows
                await call()
            for _ in range(5):
                start = time.perf_counter()
                for _ in range(number):
                    await call()
                best = min(best, (time.perf_counter() - start) / number)
        return best * 1e6

    return asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.caches")
    parser.add_argument("-n", type=int, default=200_000, help="operations per repeat")
    args = parser.parse_args()
    print("| structure, operation | hand-made ns | cachetools ns |")
    print("| :--- | ---: | ---: |")
    for name, build in CASES.items():
        hand_made, with_cachetools = build()
        print(
            f"| {name} | {best_ns(hand_made, args.n):,.0f} "
            f"| {best_ns(with_cachetools, args.n):,.0f} |",
            flush=True,
        )
    scale = request_us()
    print(f"\nFor scale: one request through resilience_full_memory, in process: {scale:.1f} µs")


if __name__ == "__main__":
    main()
