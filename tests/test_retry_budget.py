from __future__ import annotations

import pytest

from fastapi_resilience import RetryBudget
from fastapi_resilience.events import Event, EventBus
from fastapi_resilience.exceptions import ConfigurationError
from fastapi_resilience.testing import ManualClock


def spend_all(budget: RetryBudget) -> int:
    granted = 0
    while budget.try_spend():
        granted += 1
        assert granted < 100_000
    return granted


def test_retries_are_at_most_ratio_of_calls_plus_floor() -> None:
    """With 1000 calls in the window, ratio 0.1 and a floor of 1/s over 10 s: 110 retries."""
    clock = ManualClock()
    budget = RetryBudget(ratio=0.1, min_retries_per_second=1, window=10, clock=clock)
    for _ in range(1000):
        budget.record_call()
    assert spend_all(budget) == 110


def test_floor_lets_a_quiet_client_retry() -> None:
    """With no traffic at all, the floor still allows min_retries_per_second * window retries."""
    budget = RetryBudget(ratio=0.2, min_retries_per_second=0.5, window=10, clock=ManualClock())
    assert spend_all(budget) == 5


def test_calls_and_retries_leave_the_window() -> None:
    """After a full window, old calls and retries no longer count."""
    clock = ManualClock()
    budget = RetryBudget(ratio=0.5, min_retries_per_second=0, window=10, clock=clock)
    for _ in range(10):
        budget.record_call()
    assert spend_all(budget) == 5
    clock.advance(10.5)
    assert not budget.try_spend()
    budget.record_call()
    budget.record_call()
    assert spend_all(budget) == 1


def test_window_slides_bucket_by_bucket() -> None:
    """Calls expire one slice (a tenth of the window) at a time, not all at once at the
    window's end."""
    clock = ManualClock(start=0.0)
    budget = RetryBudget(window=10, clock=clock)

    def calls() -> float:
        return budget.snapshot()["calls"]

    for second in range(10):
        budget.record_call()
        if second < 9:
            clock.advance(1)
    assert calls() == 10
    clock.advance(1)
    assert calls() == 9
    clock.advance(5)
    assert calls() == 4
    clock.advance(100)
    assert calls() == 0


def test_exhaustion_is_published_once_per_episode_and_recovery_once() -> None:
    """retry.budget_exhausted once when refused; retry.budget_recovered once a window later."""
    clock = ManualClock()
    bus = EventBus(log=False)
    seen: list[Event] = []
    bus.subscribe(seen.append)
    budget = RetryBudget(
        ratio=0.5, min_retries_per_second=0, window=10, clock=clock, events=bus, name="inventory"
    )
    for _ in range(20):
        budget.record_call()
        budget.try_spend()
        budget.try_spend()
    assert [(e.kind, e.name) for e in seen] == [("retry.budget_exhausted", "inventory")]
    assert budget.exhausted
    clock.advance(11)
    budget.record_call()
    budget.record_call()
    assert budget.try_spend()
    assert [e.kind for e in seen] == ["retry.budget_exhausted", "retry.budget_recovered"]
    assert not budget.exhausted


def test_snapshot_reports_the_window() -> None:
    """snapshot() gives the calls and retries counted in the window."""
    budget = RetryBudget(ratio=1, window=10, clock=ManualClock())
    budget.record_call()
    budget.try_spend()
    assert budget.snapshot() == {"calls": 1, "retries": 1}
    assert "ratio=1" in repr(budget)


@pytest.mark.parametrize(
    "kwargs",
    [{"ratio": -0.1}, {"ratio": float("nan")}, {"min_retries_per_second": -1}, {"window": 0}],
)
def test_bad_arguments(kwargs: dict[str, float]) -> None:
    """A negative ratio, floor or an empty window is a ConfigurationError."""
    with pytest.raises(ConfigurationError):
        RetryBudget(**kwargs)  # type: ignore[arg-type]


def test_without_a_bus_exhaustion_still_reaches_the_log(caplog: pytest.LogCaptureFixture) -> None:
    """A budget built without an event bus still logs retry.budget_exhausted once."""
    budget = RetryBudget(ratio=0, min_retries_per_second=0, name="quiet", clock=ManualClock())
    with caplog.at_level("WARNING", logger="fastapi_resilience.events"):
        assert not budget.try_spend()
        assert not budget.try_spend()
    lines = [r.getMessage() for r in caplog.records if "retry.budget_exhausted" in r.getMessage()]
    assert lines == ["retry.budget_exhausted quiet calls=0 retries=0 ratio=0 window=10.0"]
