"""``Retry(on_retry=..., on_giveup=...)`` and the per-retry INFO line, on a manual clock.

Through the HTTP client against a real upstream: ``test_provider_rate_limits.py``.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest

from fastapi_resilience import (
    NotFoundError,
    RateLimitedError,
    Retry,
    RetryBudget,
    RetryExhaustedError,
    UpstreamError,
)
from fastapi_resilience.correlation import set_correlation_id
from fastapi_resilience.events import Event, EventBus
from fastapi_resilience.testing import ManualClock

pytestmark = pytest.mark.anyio


class Flaky:
    """Raises the given errors in turn, then answers ``"ok"``."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


class Hooks:
    def __init__(self, *, fail: bool = False, is_async: bool = False) -> None:
        self.retried: list[tuple[int, float, BaseException]] = []
        self.gave_up: list[tuple[int, BaseException]] = []
        self.fail = fail
        self.is_async = is_async

    def _retry(self, attempt: int, delay: float, error: BaseException) -> None:
        self.retried.append((attempt, delay, error))
        if self.fail:
            raise RuntimeError("on_retry broke")

    def _giveup(self, attempts: int, error: BaseException) -> None:
        self.gave_up.append((attempts, error))
        if self.fail:
            raise RuntimeError("on_giveup broke")

    def options(self) -> dict[str, Any]:
        if not self.is_async:
            return {"on_retry": self._retry, "on_giveup": self._giveup}

        async def on_retry(attempt: int, delay: float, error: BaseException) -> None:
            self._retry(attempt, delay, error)

        async def on_giveup(attempts: int, error: BaseException) -> None:
            self._giveup(attempts, error)

        return {"on_retry": on_retry, "on_giveup": on_giveup}


def retry(hooks: Hooks, **options: Any) -> Retry:
    settings: dict[str, Any] = {"attempts": 3, "base_delay": 0.1, "jitter": False}
    return Retry(**{**settings, **options}, clock=ManualClock(), **hooks.options())


@pytest.mark.parametrize("is_async", [False, True])
async def test_hooks_are_told_each_retry_and_the_give_up(is_async: bool) -> None:
    hooks = Hooks(is_async=is_async)
    errors = [UpstreamError("one"), UpstreamError("two"), UpstreamError("three")]
    with pytest.raises(RetryExhaustedError) as failed:
        await retry(hooks).call(Flaky(*errors))
    assert hooks.retried == [(2, 0.1, errors[0]), (3, 0.2, errors[1])]
    assert hooks.gave_up == [(3, errors[2])]
    assert failed.value.__cause__ is errors[2]


async def test_a_success_after_a_retry_gives_nothing_up() -> None:
    hooks = Hooks()
    error = UpstreamError("blip")
    assert await retry(hooks).call(Flaky(error)) == "ok"
    assert hooks.retried == [(2, 0.1, error)]
    assert hooks.gave_up == []


@pytest.mark.parametrize("is_async", [False, True])
async def test_a_hook_that_raises_changes_no_outcome(
    is_async: bool, caplog: pytest.LogCaptureFixture
) -> None:
    hooks = Hooks(fail=True, is_async=is_async)
    assert await retry(hooks).call(Flaky(UpstreamError("blip"))) == "ok"
    with pytest.raises(RetryExhaustedError):
        await retry(hooks).call(Flaky(*[UpstreamError("down")] * 3))
    assert len(hooks.retried) == 3
    assert len(hooks.gave_up) == 1
    failures = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(failures) == 4
    assert all(r.name == "fastapi_resilience.retry" for r in failures)
    assert all("hook" in r.getMessage() and r.exc_info for r in failures)


async def test_an_error_never_retried_calls_no_hook_but_one_after_a_retry_gives_up() -> None:
    hooks = Hooks()
    with pytest.raises(NotFoundError):
        await retry(hooks).call(Flaky(NotFoundError("gone")))
    assert (hooks.retried, hooks.gave_up) == ([], [])
    late = NotFoundError("gone now")
    with pytest.raises(NotFoundError):
        await retry(hooks).call(Flaky(UpstreamError("blip"), late))
    assert hooks.gave_up == [(2, late)]


async def test_a_wait_longer_than_max_delay_is_a_give_up() -> None:
    hooks = Hooks()
    error = RateLimitedError("come back in a minute", retry_after=60)
    with pytest.raises(RateLimitedError):
        await retry(hooks, max_delay=5.0).call(Flaky(error))
    assert hooks.gave_up == [(1, error)]
    assert hooks.retried == []


async def test_a_deadline_or_a_spent_budget_is_a_give_up() -> None:
    hooks = Hooks()
    with pytest.raises(RetryExhaustedError) as failed:
        await retry(hooks, deadline=0.05).call(Flaky(UpstreamError("slow")))
    assert failed.value.extensions["reason"] == "deadline"
    assert [attempts for attempts, _ in hooks.gave_up] == [1]
    budget = RetryBudget(ratio=0.0, min_retries_per_second=0.0, clock=ManualClock())
    with pytest.raises(RetryExhaustedError) as failed:
        await retry(hooks, budget=budget).call(Flaky(UpstreamError("down")))
    assert failed.value.extensions["reason"] == "retry_budget_exhausted"
    assert [attempts for attempts, _ in hooks.gave_up] == [1, 1]


async def test_each_retry_is_one_info_line_with_the_correlation_id_and_an_escaped_cause(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bus = EventBus(log=False)
    events: list[Event] = []
    bus.subscribe(events.append)
    token = set_correlation_id("req-7")
    try:
        caplog.set_level(logging.INFO, logger="fastapi_resilience.retry")
        forged = UpstreamError("bad\nINFO forged line")
        policy = Retry(3, base_delay=0.25, jitter=False, name="pay\nments", clock=ManualClock())
        policy.events = bus
        assert await policy.call(Flaky(forged)) == "ok"
    finally:
        set_correlation_id(None)
        del token
    (record,) = [r for r in caplog.records if r.name == "fastapi_resilience.retry"]
    assert record.levelno == logging.INFO
    assert record.getMessage() == (
        "retry pay\\x0aments attempt=2/3 wait=0.250s "
        "cause=UpstreamError: bad\\x0aINFO forged line correlation_id=req-7"
    )
    assert record.correlation_id == "req-7"  # type: ignore[attr-defined]
    # The DEBUG event stays as it was.
    assert [(e.kind, e.level, e.attributes["attempt"]) for e in events] == [
        ("retry.attempt", logging.DEBUG, 2)
    ]
