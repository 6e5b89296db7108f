"""Per-call overhead of wrappers (middleware, breakers, retries), in one process, in nanoseconds.

Every case wraps the same async no-op ``noop``; its cost is the time of one wrapped call minus
the time of a plain ``await noop()`` measured in the same repeat (a synchronous wrapper is
compared with a plain ``noop_sync()`` call, an ASGI middleware with the same request sent
straight to a bare ASGI endpoint). Cases are interleaved: each repeat times every
case once, in a rotated order, and the median over repeats is reported. The garbage collector
stays on, so what a wrapper allocates is part of its cost.

To add a case, write an async ``setup`` that returns the callable doing one wrapped call, and
add one :class:`MicroCase` to ``MICRO_CASES`` (see ``benchmarks/README.md``).
"""

from __future__ import annotations

import asyncio
import gc
import math
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

from benchmarks._loop import loop_factory

Kind = Literal["async", "sync", "asgi"]
#: One wrapped call: a coroutine function (``async``, ``asgi``) or a plain function (``sync``).
Call = Callable[[], Any]


class CaseUnavailable(RuntimeError):
    """A case's library (or an optional part of it) is missing; the case is reported, not run."""


async def noop() -> None:
    """The async function every async case wraps."""


def noop_sync() -> None:
    """The function every sync case wraps."""


@dataclass(frozen=True, slots=True)
class MicroCase:
    """One wrapper measured by the micro benchmark.

    Args:
        description: one line for the results table.
        setup: async function returning the callable that makes one wrapped call of ``noop``
            (or ``noop_sync`` for a ``sync`` case); raise :class:`CaseUnavailable` when the
            library is missing.
        group: the results table it appears in (``"baseline"``, ``"breaker"``, ``"retry"``).
        kind: ``"async"`` cases are compared with ``await noop()``, ``"sync"`` ones with
            ``noop_sync()``, ``"asgi"`` ones (one request through a middleware) with the
            same request sent straight to ``asgi_endpoint`` (see :func:`asgi_request`).
    """

    description: str
    setup: Callable[[], Awaitable[Call]]
    group: str
    kind: Kind = "async"


# ---- baselines -------------------------------------------------------------------------------


async def plain_await() -> Call:
    return noop


async def plain_call() -> Call:
    return noop_sync


# ---- ASGI middleware: one request's cost, with no server and no network -------------------

ASGI_BODY = b'{"status":"ok"}'
_START = {
    "type": "http.response.start",
    "status": 200,
    "headers": [(b"content-type", b"application/json"), (b"content-length", b"15")],
}
_BODY = {"type": "http.response.body", "body": ASGI_BODY, "more_body": False}
_REQUEST = {"type": "http.request", "body": b"", "more_body": False}


async def asgi_endpoint(scope: Any, receive: Any, send: Any) -> None:
    """The innermost app: answers the tiny JSON body, as cheaply as ASGI allows."""
    await send(dict(_START))
    await send(_BODY)


async def _receive() -> dict[str, Any]:
    return _REQUEST


async def _send(message: Any) -> None:
    return None


def asgi_request(app: Any) -> Call:
    """One GET / through ``app``, with a fresh scope as a server would build (wrk's headers)."""

    def call() -> Any:
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": "/",
            "raw_path": b"/",
            "root_path": "",
            "query_string": b"",
            "headers": [(b"host", b"127.0.0.1:8000")],
            "client": ("127.0.0.1", 40000),
            "server": ("127.0.0.1", 8000),
            "state": {},
        }
        return app(scope, _receive, _send)

    return call


async def asgi_plain() -> Call:
    return asgi_request(asgi_endpoint)


async def asgi_noop() -> Call:
    from benchmarks.apps import NoopASGIMiddleware

    return asgi_request(NoopASGIMiddleware(asgi_endpoint))


async def asgi_resilience_ids() -> Call:
    from fastapi_resilience import CorrelationIdMiddleware

    return asgi_request(CorrelationIdMiddleware(asgi_endpoint))


async def asgi_correlation_id_peer() -> Call:
    from asgi_correlation_id import CorrelationIdMiddleware

    return asgi_request(CorrelationIdMiddleware(asgi_endpoint))


# ---- circuit breakers: the peers ---------------------------------------------------


async def circuitbreaker_decorator() -> Call:
    from circuitbreaker import CircuitBreaker

    return CircuitBreaker(failure_threshold=5, recovery_timeout=30, name="bench").decorate(noop)  # type: ignore[no-any-return]


async def purgatory_decorator() -> Call:
    from purgatory import AsyncCircuitBreakerFactory

    factory = AsyncCircuitBreakerFactory(default_threshold=5, default_ttl=30)
    await factory.initialize()
    return factory(circuit="bench")(noop)  # type: ignore[no-any-return]


async def aiobreaker_decorator() -> Call:
    from aiobreaker import CircuitBreaker

    return CircuitBreaker(fail_max=5, timeout_duration=timedelta(seconds=30))(noop)  # type: ignore[no-any-return]


async def pybreaker_sync() -> Call:
    from pybreaker import CircuitBreaker

    return CircuitBreaker(fail_max=5, reset_timeout=30)(noop_sync)


async def pybreaker_async() -> Call:
    import pybreaker

    if getattr(pybreaker, "gen", None) is None:
        raise CaseUnavailable("pybreaker's async path needs tornado")
    breaker = pybreaker.CircuitBreaker(fail_max=5, reset_timeout=30)
    # ``call_async`` returns a Tornado future, which asyncio can await.
    return lambda: breaker.call_async(noop)  # type: ignore[no-untyped-call]


# ---- circuit breakers: this library, closed state ----------------------------------


async def resilience_breaker() -> Call:
    from fastapi_resilience import CircuitBreaker

    breaker = CircuitBreaker(
        "bench", failure_threshold=5, recovery_timeout=30, half_open_max_calls=1, registry=None
    )
    return breaker(noop)


async def resilience_breaker_call() -> Call:
    from fastapi_resilience import CircuitBreaker

    breaker = CircuitBreaker("bench-call", failure_threshold=5, recovery_timeout=30, registry=None)
    return lambda: breaker.call(noop)


# ---- retries: this library, on a call that succeeds first time ---------------------


async def resilience_retry() -> Call:
    from fastapi_resilience import Retry

    return Retry(attempts=3)(noop)


async def resilience_retry_call() -> Call:
    from fastapi_resilience import Retry

    retry = Retry(attempts=3)
    return lambda: retry.call(noop)


async def resilience_retry_budget() -> Call:
    from fastapi_resilience import Retry, RetryBudget

    retry = Retry(attempts=3, budget=RetryBudget())
    return lambda: retry.call(noop)


# ---- retries: the peers, on a call that succeeds first time ------------------------


async def tenacity_decorator() -> Call:
    from tenacity import retry, stop_after_attempt, wait_exponential_jitter

    return retry(stop=stop_after_attempt(3), wait=wait_exponential_jitter())(noop)


async def tenacity_async_for() -> Call:
    from tenacity import AsyncRetrying, stop_after_attempt, wait_exponential_jitter

    async def call() -> None:
        async for attempt in AsyncRetrying(
            stop=stop_after_attempt(3), wait=wait_exponential_jitter()
        ):
            with attempt:
                await noop()

    return call


async def stamina_decorator() -> Call:
    import stamina

    return stamina.retry(on=Exception, attempts=3)(noop)


async def stamina_context() -> Call:
    import stamina

    async def call() -> None:
        async for attempt in stamina.retry_context(on=Exception, attempts=3):
            with attempt:
                await noop()

    return call


#: Every case, by name. The two ``plain_*`` baselines are always measured.
MICRO_CASES: dict[str, MicroCase] = {
    "plain_await": MicroCase("`await noop()` (baseline)", plain_await, "baseline"),
    "plain_call": MicroCase("`noop_sync()` (baseline)", plain_call, "baseline", kind="sync"),
    "asgi_plain": MicroCase(
        "a request straight to a bare ASGI endpoint (baseline)", asgi_plain, "baseline", "asgi"
    ),
    # ---- ASGI middleware, one request without server or network; rate limiters go here too.
    "asgi_noop": MicroCase("a no-op pure ASGI middleware (reference)", asgi_noop, "asgi", "asgi"),
    "asgi_resilience_ids": MicroCase(
        "fastapi-resilience `CorrelationIdMiddleware`", asgi_resilience_ids, "asgi", "asgi"
    ),
    "asgi_correlation_id": MicroCase(
        "asgi-correlation-id `CorrelationIdMiddleware` (peer)",
        asgi_correlation_id_peer,
        "asgi",
        "asgi",
    ),
    # ---- circuit breakers: this library's CircuitBreaker goes here.
    "resilience_breaker": MicroCase(
        "fastapi-resilience `@CircuitBreaker(...)` decorator, closed",
        resilience_breaker,
        "breaker",
    ),
    "resilience_breaker_call": MicroCase(
        "fastapi-resilience `await breaker.call(noop)`, closed",
        resilience_breaker_call,
        "breaker",
    ),
    "circuitbreaker": MicroCase(
        "circuitbreaker `CircuitBreaker` decorator (peer)", circuitbreaker_decorator, "breaker"
    ),
    "purgatory": MicroCase(
        "purgatory `AsyncCircuitBreakerFactory` decorator, in memory (peer)",
        purgatory_decorator,
        "breaker",
    ),
    "aiobreaker": MicroCase(
        "aiobreaker `CircuitBreaker` decorator (peer)", aiobreaker_decorator, "breaker"
    ),
    "pybreaker_sync": MicroCase(
        "pybreaker `CircuitBreaker` decorator, sync call (peer)",
        pybreaker_sync,
        "breaker",
        kind="sync",
    ),
    "pybreaker_async": MicroCase(
        "pybreaker `call_async` (Tornado future) (peer)", pybreaker_async, "breaker"
    ),
    # ---- retries: this library's Retry goes here.
    "resilience_retry": MicroCase(
        "fastapi-resilience `@Retry(attempts=3)` decorator, success first time",
        resilience_retry,
        "retry",
    ),
    "resilience_retry_call": MicroCase(
        "fastapi-resilience `await retry.call(noop)`, success first time",
        resilience_retry_call,
        "retry",
    ),
    "resilience_retry_budget": MicroCase(
        "fastapi-resilience `Retry` with a `RetryBudget`, success first time",
        resilience_retry_budget,
        "retry",
    ),
    "tenacity_decorator": MicroCase(
        "tenacity `@retry` (3 attempts, exponential jitter) (peer)", tenacity_decorator, "retry"
    ),
    "tenacity_async_for": MicroCase(
        "tenacity `async for attempt in AsyncRetrying(...)` (peer)", tenacity_async_for, "retry"
    ),
    "stamina_decorator": MicroCase(
        "stamina `@retry(on=Exception, attempts=3)` (peer)", stamina_decorator, "retry"
    ),
    "stamina_context": MicroCase(
        "stamina `async for attempt in retry_context(...)` (peer)", stamina_context, "retry"
    ),
}

BASELINES: dict[Kind, str] = {"async": "plain_await", "sync": "plain_call", "asgi": "asgi_plain"}


@dataclass(frozen=True, slots=True)
class MicroSummary:
    """A case over all repeats: median time per call and overhead over its baseline.

    ``overhead_ns`` is the median of per-repeat differences; ``best_overhead_ns`` compares the
    fastest repeats, which is the steadier figure on a machine shared with other work.
    """

    case: str
    description: str
    group: str
    kind: Kind
    per_call_ns: float
    overhead_ns: float
    overhead_min_ns: float
    overhead_max_ns: float
    best_overhead_ns: float
    iterations: int
    repeats: int
    unavailable: str | None = None


async def _time_async(call: Call, n: int) -> int:
    start = time.perf_counter_ns()
    for _ in range(n):
        await call()
    return time.perf_counter_ns() - start


def _time_sync(call: Call, n: int) -> int:
    start = time.perf_counter_ns()
    for _ in range(n):
        call()
    return time.perf_counter_ns() - start


async def _time(kind: Kind, call: Call, n: int) -> float:
    """Nanoseconds per call over ``n`` calls."""
    elapsed = await _time_async(call, n) if kind != "sync" else _time_sync(call, n)
    return elapsed / n


async def _iterations_for(kind: Kind, call: Call, target_s: float) -> int:
    """Enough calls for one repeat to last about ``target_s`` (at least 1000)."""
    per_call = await _time(kind, call, 200)
    return max(1000, int(target_s * 1e9 / max(per_call, 1.0)))


async def measure(
    names: Sequence[str],
    *,
    repeats: int,
    target_s: float,
    cases: dict[str, MicroCase] = MICRO_CASES,
    log: Callable[[str], None] = print,
) -> list[MicroSummary]:
    """Time ``names`` (baselines added), interleaved over ``repeats``; summaries per case."""
    wanted = list(dict.fromkeys([*BASELINES.values(), *names]))
    calls: dict[str, Call] = {}
    unavailable: dict[str, str] = {}
    for name in wanted:
        try:
            calls[name] = await cases[name].setup()
        except (CaseUnavailable, ImportError) as exc:
            unavailable[name] = str(exc)
    iterations = {
        name: await _iterations_for(cases[name].kind, call, target_s)
        for name, call in calls.items()
    }
    times: dict[str, list[float]] = {name: [] for name in calls}
    order = list(calls)
    for repeat in range(repeats):
        shift = repeat % len(order)
        for name in [*order[shift:], *order[:shift]]:
            gc.collect()
            times[name].append(await _time(cases[name].kind, calls[name], iterations[name]))
        log(f"micro repeat {repeat + 1}/{repeats} done")
    summaries = []
    for name in wanted:
        case = cases[name]
        if name in unavailable:
            summaries.append(
                MicroSummary(
                    case=name,
                    description=case.description,
                    group=case.group,
                    kind=case.kind,
                    per_call_ns=math.nan,
                    overhead_ns=math.nan,
                    overhead_min_ns=math.nan,
                    overhead_max_ns=math.nan,
                    best_overhead_ns=math.nan,
                    iterations=0,
                    repeats=0,
                    unavailable=unavailable[name],
                )
            )
            continue
        base = times[BASELINES[case.kind]]
        overheads = [t - b for t, b in zip(times[name], base, strict=True)]
        summaries.append(
            MicroSummary(
                case=name,
                description=case.description,
                group=case.group,
                kind=case.kind,
                per_call_ns=statistics.median(times[name]),
                overhead_ns=statistics.median(overheads),
                overhead_min_ns=min(overheads),
                overhead_max_ns=max(overheads),
                # Fastest repeat against fastest baseline: what is left when other processes
                # sharing the machine happened to stay away.
                best_overhead_ns=min(times[name]) - min(base),
                iterations=iterations[name],
                repeats=repeats,
            )
        )
    return summaries


def run_micro(
    names: Sequence[str], *, repeats: int, target_s: float, log: Callable[[str], None] = print
) -> list[MicroSummary]:
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(measure(names, repeats=repeats, target_s=target_s, log=log))
