from __future__ import annotations

import asyncio
from typing import Any

import pytest

from fastapi_resilience import CircuitBreaker, Retry, fallback
from fastapi_resilience.exceptions import (
    CircuitOpenError,
    ConfigurationError,
    NotFoundError,
    RetryExhaustedError,
    UpstreamError,
)
from fastapi_resilience.outbound import with_fallback
from fastapi_resilience.testing import ManualClock

pytestmark = pytest.mark.anyio


async def ok(sku: str) -> dict[str, Any]:
    return {"sku": sku, "stock": 5}


async def down(sku: str) -> dict[str, Any]:
    raise UpstreamError(f"inventory down for {sku}")


async def test_success_returns_the_calls_own_value() -> None:
    """When the call succeeds the fallback is not used."""
    used: list[BaseException] = []
    result = await with_fallback(ok, lambda e, sku: used.append(e), "a")
    assert result == {"sku": "a", "stock": 5}
    assert used == []


async def test_failure_calls_the_fallback_with_the_error_and_arguments() -> None:
    """The fallback receives the error first, then the call's own arguments."""
    seen: list[Any] = []

    def handler(error: BaseException, sku: str, *, region: str) -> dict[str, Any]:
        seen.append((type(error), sku, region))
        return {"sku": sku, "stock": None}

    async def regional(sku: str, *, region: str) -> dict[str, Any]:
        raise UpstreamError("down")

    result = await with_fallback(regional, handler, "a", region="eu")
    assert result == {"sku": "a", "stock": None}
    assert seen == [(UpstreamError, "a", "eu")]


async def test_async_fallback_is_awaited() -> None:
    """An async handler is awaited and its value returned."""

    async def handler(error: BaseException, sku: str) -> str:
        await asyncio.sleep(0)
        return f"default for {sku}"

    assert await with_fallback(down, handler, "b") == "default for b"


async def test_client_errors_are_not_answered_with_a_default() -> None:
    """By default a ClientError (404, 400...) propagates: a default answer would hide a bug."""

    async def missing(sku: str) -> None:
        raise NotFoundError("no such sku")

    with pytest.raises(NotFoundError):
        await with_fallback(missing, lambda e, sku: "x", "a")


async def test_on_chooses_which_failures_take_the_fallback() -> None:
    """on= narrows the fallback to the listed types; other errors propagate."""
    with pytest.raises(UpstreamError):
        await with_fallback(down, lambda e, sku: "x", "a", on=CircuitOpenError)
    assert await with_fallback(down, lambda e, sku: "x", "a", on=(UpstreamError,)) == "x"
    assert await with_fallback(down, lambda e, sku: "y", "a", on=lambda e: True) == "y"


async def test_cancellation_never_takes_the_fallback() -> None:
    """A cancelled call stays cancelled; the default fallback does not swallow it."""

    async def cancelled(sku: str) -> None:
        raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await with_fallback(cancelled, lambda e, sku: "x", "a")


async def test_failing_fallback_chains_the_original_error() -> None:
    """If the fallback itself fails, its error propagates with the call's error as context."""

    def broken(error: BaseException, sku: str) -> None:
        raise RuntimeError("fallback broke")

    with pytest.raises(RuntimeError) as info:
        await with_fallback(down, broken, "a")
    assert isinstance(info.value.__context__, UpstreamError)


async def test_decorator_sees_the_open_breakers_error() -> None:
    """Outside a breaker, the fallback answers at once with the CircuitOpenError in hand."""
    breaker = CircuitBreaker("fb-test", failure_threshold=2, registry=None, clock=ManualClock())
    calls = 0
    errors: list[str] = []

    @fallback(lambda e, sku: errors.append(type(e).__name__) or {"sku": sku, "stale": True})
    @breaker
    async def fetch(sku: str) -> dict[str, Any]:
        nonlocal calls
        calls += 1
        raise UpstreamError("down")

    for _ in range(4):
        assert await fetch("a") == {"sku": "a", "stale": True}
    assert breaker.state == "open"
    assert calls == 2  # the last two never reached the upstream
    assert errors == ["UpstreamError", "UpstreamError", "CircuitOpenError", "CircuitOpenError"]


async def test_decorator_sees_retry_exhausted() -> None:
    """Outside a retry, the fallback receives RetryExhaustedError with the last error chained."""
    clock = ManualClock()
    retry = Retry(attempts=3, clock=clock)
    received: list[BaseException] = []

    def handler(error: BaseException, sku: str) -> str:
        received.append(error)
        return "default"

    @fallback(handler, on=RetryExhaustedError)
    @retry
    async def fetch(sku: str) -> str:
        raise UpstreamError("down")

    assert await fetch("a") == "default"
    (error,) = received
    assert isinstance(error, RetryExhaustedError)
    assert isinstance(error.__cause__, UpstreamError)


@pytest.mark.parametrize("on", ["not a type", (ValueError, 3)])
def test_bad_on_fails_at_decoration(on: Any) -> None:
    """on= that is neither exception types nor a predicate raises ConfigurationError."""
    with pytest.raises(ConfigurationError, match="on must be"):
        fallback(lambda e: None, on=on)


def test_handler_must_be_callable() -> None:
    """A non-callable handler is refused when decorating."""
    with pytest.raises(ConfigurationError, match="handler"):
        fallback("default")  # type: ignore[arg-type]
