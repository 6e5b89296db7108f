from __future__ import annotations

import asyncio

import pytest

from fastapi_resilience.exceptions import ConfigurationError, UpstreamError
from fastapi_resilience.outbound import Hedge
from fastapi_resilience.testing import ManualClock

pytestmark = pytest.mark.anyio


class Upstream:
    """Answers calls in order from a script: ("ok", value), ("hang", None) or ("fail", exc)."""

    def __init__(self, *script: tuple[str, object]) -> None:
        self.script = list(script)
        self.started = 0
        self.cancelled = 0

    async def __call__(self) -> object:
        action, value = self.script[self.started]
        self.started += 1
        try:
            if action == "hang":
                await asyncio.Event().wait()
            await asyncio.sleep(0)
            if action == "fail":
                assert isinstance(value, BaseException)
                raise value
            return value
        except asyncio.CancelledError:
            self.cancelled += 1
            raise


async def test_fast_call_is_not_hedged() -> None:
    """A call that answers before the delay makes one attempt only."""
    hedge = Hedge(delay=0.05, clock=ManualClock())

    async def fast() -> str:
        return "fast"

    assert await hedge.call(fast) == "fast"
    assert hedge.snapshot()["hedges"] == 0


async def test_slow_primary_is_hedged_and_loser_cancelled() -> None:
    """When the primary hangs past the delay, the backup wins and the primary is cancelled."""
    upstream = Upstream(("hang", None), ("ok", "backup"))
    hedge = Hedge(delay=0.05, clock=ManualClock())
    assert await hedge.call(upstream) == "backup"
    await asyncio.sleep(0)
    assert upstream.started == 2
    assert upstream.cancelled == 1
    assert hedge.snapshot()["hedge_wins"] == 1


async def test_backup_failure_waits_for_primary() -> None:
    """A failing backup does not fail the call while the primary can still succeed."""
    gate = asyncio.Event()

    calls = 0

    async def fn() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            await gate.wait()
            return "primary"
        gate.set()
        raise UpstreamError("backup broke")

    hedge = Hedge(delay=0.01, clock=ManualClock())
    assert await hedge.call(fn) == "primary"


async def test_all_attempts_failing_raises_the_primary_error() -> None:
    """When every attempt fails, the primary attempt's error is raised."""
    first = UpstreamError("primary")
    gate = asyncio.Event()
    calls = 0

    async def fn() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            await gate.wait()
            raise first
        gate.set()
        raise UpstreamError("backup")

    with pytest.raises(UpstreamError) as info:
        await Hedge(delay=0.01, clock=ManualClock()).call(fn)
    assert info.value is first


async def test_extra_load_is_capped() -> None:
    """With every call slow, backups stay within max_extra of calls (plus a burst of one)."""
    hedge = Hedge(delay=0.01, max_extra=0.1, clock=ManualClock())

    async def slow() -> int:
        for _ in range(10):
            await asyncio.sleep(0)
        return 1

    for _ in range(200):
        assert await hedge.call(slow) == 1
    hedges = hedge.snapshot()["hedges"]
    assert hedges is not None
    assert 10 <= hedges <= 200 * 0.1 + 1


async def test_percentile_delay_tracks_recent_latencies() -> None:
    """With percentile=0.9, the backup delay becomes the 90th percentile of recent latencies."""
    clock = ManualClock()
    hedge = Hedge(percentile=0.9, min_samples=10, clock=clock)
    assert hedge.current_delay() is None

    for latency in [0.01 * i for i in range(1, 11)]:

        async def timed(latency: float = latency) -> None:
            clock.advance(latency)

        await hedge.call(timed)
    assert hedge.current_delay() == pytest.approx(0.09)


async def test_caller_cancellation_cancels_every_attempt() -> None:
    """Cancelling the caller cancels both the primary and the backup."""
    upstream = Upstream(("hang", None), ("hang", None))
    task = asyncio.ensure_future(Hedge(delay=0.01, clock=ManualClock()).call(upstream))
    for _ in range(5):
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0)
    assert upstream.started == 2
    assert upstream.cancelled == 2


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"percentile": 1.5}, {"delay": -1}, {"delay": 1, "max_extra": 2}],
)
def test_bad_arguments(kwargs: dict[str, float]) -> None:
    """A hedge needs a delay or percentile in range."""
    with pytest.raises(ConfigurationError):
        Hedge(**kwargs)  # type: ignore[arg-type]
