from __future__ import annotations

import pytest

from fastapi_resilience.clock import Clock, SystemClock
from fastapi_resilience.testing import ManualClock

pytestmark = pytest.mark.anyio


async def test_manual_clock_moves_only_when_told() -> None:
    """advance() and sleep() move monotonic and wall time together; nothing else does."""
    clock = ManualClock(start=10.0, wall_start=1000.0)
    assert isinstance(clock, Clock)
    assert (clock.monotonic(), clock.time()) == (10.0, 1000.0)
    clock.advance(2.5)
    await clock.sleep(0.5)
    assert (clock.monotonic(), clock.time()) == (13.0, 1003.0)
    assert clock.slept == [0.5]
    with pytest.raises(ValueError, match="back"):
        clock.advance(-1)


async def test_system_clock_is_a_clock() -> None:
    """The real clock satisfies the protocol and its readings advance."""
    clock = SystemClock()
    assert isinstance(clock, Clock)
    first = clock.monotonic()
    await clock.sleep(0)
    assert clock.monotonic() >= first
    assert clock.time() > 1_600_000_000
