"""Providers' rate-limit headers, the quota gate and the outbound limit, unit by unit (ADR 0069).

The loopback must-shows are in ``test_provider_rate_limits.py``; here every form of every
header, and the gate and limiter on a manual clock.
"""

from __future__ import annotations

import logging

import httpx
import pytest

from fastapi_resilience import ConfigurationError, QuotaExhaustedError, ThrottledError
from fastapi_resilience.events import Event, EventBus
from fastapi_resilience.exceptions import StorageUnavailableError
from fastapi_resilience.outbound import (
    OutboundLimiter,
    QuotaGate,
    ResilientTransport,
    ResponseCache,
    parse_duration,
    provider_wait,
    quota_reset,
)
from fastapi_resilience.outbound._adaptive_throttle import refused_here
from fastapi_resilience.outbound._provider_limits import parse_retry_after, parse_retry_after_ms
from fastapi_resilience.ratelimit import Decision, LimitCheck, MemoryStorage
from fastapi_resilience.testing import ManualClock

NOW = 1_700_000_000.0


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("1s", 1.0),
        ("6m0s", 360.0),
        ("20ms", 0.02),
        ("1h2m3.5s", 3723.5),
        ("2h", 7200.0),
        ("1m", 60.0),
        ("1.5s", 1.5),
        ("0s", 0.0),
        ("1m30s", 90.0),
        ("1s500ms", 1.5),
        ("250us", 0.00025),
        ("250\u00b5s", 0.00025),
        ("100ns", 1e-7),
        ("2", 2.0),
        ("0.5", 0.5),
        ("17", 17.0),
        (" 3s ", 3.0),
    ],
)
def test_every_duration_form_is_read(value: str, seconds: float) -> None:
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "   ",
        "s",
        "ms",
        "-1s",
        "-2",
        "+2",
        "1h1x",
        "1S",
        "1sec",
        "1 s",
        "1s1h",  # units out of order
        "1s1s",  # a unit twice
        "1m1m",
        "1d",
        "1e3",
        "1e3s",
        ".5s",
        "1.s",
        "1,5s",
        "nan",
        "inf",
        "0x10",
        "\u0662s",  # an Arabic-Indic digit: not ASCII
        "\u00b2",
        "1\ns",
        "1s\x00",
        "1s; 2s",
        "9" * 65,
        "abc",
    ],
)
def test_a_malformed_duration_is_ignored(value: str | None) -> None:
    assert parse_duration(value) is None


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("1500", 1.5), ("20", 0.02), ("0", 0.0), ("12.5", 0.0125), ("-5", None), ("1s", None),
     ("", None), (None, None), ("1e3", None), ("\u00b2", None)],
)  # fmt: skip
def test_retry_after_ms(value: str | None, seconds: float | None) -> None:
    assert parse_retry_after_ms(value) == (pytest.approx(seconds) if seconds is not None else None)


def test_retry_after_reads_seconds_and_dates_and_never_raises() -> None:
    assert parse_retry_after("7", now=NOW) == 7.0
    assert parse_retry_after("Tue, 14 Nov 2023 22:13:40 GMT", now=NOW) == pytest.approx(20.0)
    assert parse_retry_after("Tue, 14 Nov 2023 22:00:00 GMT", now=NOW) == 0.0  # past: now
    for bad in ("\u00b2", "\u0663", "1.5", "-1", "soon", "Mon, 99 Foo 2023", "9" * 100, ""):
        assert parse_retry_after(bad, now=NOW) is None, bad


def headers(**values: str) -> httpx.Headers:
    return httpx.Headers({name.replace("_", "-"): value for name, value in values.items()})


def test_retry_after_ms_wins_over_retry_after_which_wins_over_the_reset_family() -> None:
    both = headers(retry_after_ms="1500", retry_after="30", x_ratelimit_reset_requests="9s")
    assert provider_wait(both, now=NOW) == pytest.approx(1.5)
    assert provider_wait(headers(retry_after="30", x_ratelimit_reset_requests="9s"), now=NOW) == 30
    assert provider_wait(headers(x_ratelimit_reset_requests="9s"), now=NOW) == 9.0
    assert provider_wait(headers(), now=NOW) is None


def test_a_malformed_header_falls_through_to_the_next() -> None:
    sent = headers(retry_after_ms="soon", retry_after="later", x_ratelimit_reset_tokens="6m0s")
    assert provider_wait(sent, now=NOW) == 360.0
    assert provider_wait(headers(retry_after_ms="x", retry_after="x"), now=NOW) is None


def test_the_family_waits_for_the_used_up_quota_else_the_earliest_reset() -> None:
    family = {"x_ratelimit_reset_requests": "1s", "x_ratelimit_reset_tokens": "6m0s"}
    # Nothing says which quota is gone: the earliest moment anything frees up.
    assert provider_wait(headers(**family), now=NOW) == 1.0
    tokens_gone = headers(**family, x_ratelimit_remaining_tokens="0")
    assert provider_wait(tokens_gone, now=NOW) == 360.0
    requests_gone = headers(**family, x_ratelimit_remaining_requests="0")
    assert provider_wait(requests_gone, now=NOW) == 1.0


def test_quota_reset_needs_a_zero_remaining_and_a_readable_reset() -> None:
    assert quota_reset(
        headers(x_ratelimit_remaining_requests="0", x_ratelimit_reset_requests="2s")
    ) == (2.0, "x-ratelimit-remaining-requests")
    both = headers(
        x_ratelimit_remaining_requests="0",
        x_ratelimit_reset_requests="2s",
        x_ratelimit_remaining_tokens="0",
        x_ratelimit_reset_tokens="1m",
    )
    assert quota_reset(both) == (60.0, "x-ratelimit-remaining-tokens")
    # Any casing on the wire, and a plain mapping as well as httpx's headers.
    mixed = httpx.Headers(
        [(b"X-RateLimit-Remaining-Tokens", b"0"), (b"X-RateLimit-Reset-Tokens", b"1s")]
    )
    assert quota_reset(mixed) == (1.0, "x-ratelimit-remaining-tokens")
    plain = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "3s"}
    assert quota_reset(plain) == (3.0, "x-ratelimit-remaining-requests")
    for remaining, reset in [("1", "2s"), ("0", None), ("0", "x"), ("-0", "2s"), (None, "2s")]:
        sent = {"x_ratelimit_remaining_requests": remaining, "x_ratelimit_reset_requests": reset}
        assert quota_reset(headers(**{k: v for k, v in sent.items() if v is not None})) is None


# --- the gate ---------------------------------------------------------------------------------


def recorded(bus: EventBus) -> list[Event]:
    seen: list[Event] = []
    bus.subscribe(seen.append)
    return seen


@pytest.mark.anyio
async def test_the_gate_waits_within_its_budget_and_publishes_one_pair_per_episode() -> None:
    clock, bus = ManualClock(), EventBus(log=False)
    seen = recorded(bus)
    gate = QuotaGate("api.example", clock=clock, events=bus)
    assert gate.time_left() == 0.0
    gate.close(2.0, reason="429")
    gate.close(1.0, reason="x-ratelimit-remaining-requests")  # shorter: changes nothing
    assert gate.time_left() == pytest.approx(2.0)
    assert gate.holds_calls_back()
    assert await gate.pass_within(5.0) == pytest.approx(2.0)
    assert clock.slept == [pytest.approx(2.0)]
    assert gate.time_left() == 0.0
    assert [(e.kind, e.level) for e in seen] == [
        ("outbound.quota_exhausted", logging.WARNING),
        ("outbound.quota_restored", logging.INFO),
    ]
    assert seen[0].attributes == {"wait": 2.0, "reason": "429"}
    assert seen[1].attributes == {"closed_for": 2.0}


@pytest.mark.anyio
async def test_the_gate_fails_fast_beyond_its_budget_and_sends_nothing() -> None:
    clock = ManualClock()
    gate = QuotaGate("api.example", clock=clock, events=EventBus(log=False))
    gate.close(30.0, reason="429")
    with pytest.raises(QuotaExhaustedError) as refused:
        await gate.pass_within(5.0)
    assert clock.slept == []  # no waiting for a refusal that was certain
    error = refused.value
    assert (error.status_code, error.code, error.retryable) == (503, "quota_exhausted", False)
    assert error.retry_after == pytest.approx(30.0)
    assert error.headers["Retry-After"] == "30"
    assert error.extensions == {"upstream": "api.example", "reason": "upstream_quota"}
    assert isinstance(error, ThrottledError)
    assert refused_here(error)  # breakers and adaptive throttling ignore it


def test_a_gate_ignores_nonsense_and_can_be_reopened_by_hand() -> None:
    clock, bus = ManualClock(), EventBus(log=False)
    seen = recorded(bus)
    gate = QuotaGate("api.example", clock=clock, events=bus)
    for nonsense in (0.0, -1.0, float("nan"), float("inf")):
        gate.close(nonsense, reason="429")
    assert not gate.holds_calls_back()
    gate.close(600.0, reason="429")
    gate.reopen()
    assert gate.time_left() == 0.0
    assert [e.kind for e in seen] == ["outbound.quota_exhausted", "outbound.quota_restored"]


def test_a_gate_closed_again_after_its_time_is_a_new_episode() -> None:
    clock, bus = ManualClock(), EventBus(log=False)
    seen = recorded(bus)
    gate = QuotaGate("api.example", clock=clock, events=bus)
    gate.close(1.0, reason="429")
    clock.advance(1.5)
    gate.close(1.0, reason="429")  # nobody looked in between: restored, then exhausted again
    assert [e.kind for e in seen] == [
        "outbound.quota_exhausted",
        "outbound.quota_restored",
        "outbound.quota_exhausted",
    ]


# --- the outbound limit -----------------------------------------------------------------------


@pytest.mark.anyio
async def test_the_limit_admits_its_amount_then_waits_for_room() -> None:
    clock = ManualClock()
    limiter = OutboundLimiter("api.example", "5/second", clock=clock)
    for _ in range(5):
        assert await limiter.acquire_within(0.0) == 0.0
    assert limiter.holds_units()
    with pytest.raises(QuotaExhaustedError) as refused:
        await limiter.acquire_within(0.5)
    assert refused.value.extensions["reason"] == "rate_limit"
    assert 1.0 <= (refused.value.retry_after or 0) <= 1.0 + 1 / 60 + 1e-9
    waited = await limiter.acquire_within(5.0)
    assert 1.0 <= waited <= 1.0 + 1 / 60 + 1e-9
    clock.advance(3.0)
    assert not limiter.holds_units()  # everything left the window: forgetting loses nothing


@pytest.mark.anyio
async def test_every_limit_of_a_string_applies() -> None:
    clock = ManualClock()
    limiter = OutboundLimiter("api.example", "2/second; 3/minute", clock=clock)
    for _ in range(2):
        await limiter.acquire_within(0.0)
    clock.advance(1.1)
    await limiter.acquire_within(0.0)
    clock.advance(1.1)
    with pytest.raises(QuotaExhaustedError) as refused:
        await limiter.acquire_within(10.0)  # the minute's limit: about 58 s away
    assert (refused.value.retry_after or 0) > 50


@pytest.mark.anyio
async def test_the_limit_counts_in_a_given_storage_and_lets_calls_go_when_it_is_down(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = ManualClock()
    storage = MemoryStorage(clock=clock)
    limiter = OutboundLimiter("api.example", "1/second", storage=storage, clock=clock)
    assert limiter.shared
    await limiter.acquire_within(0.0)
    with pytest.raises(QuotaExhaustedError):
        await limiter.acquire_within(0.0)

    class Down:
        calls: list[tuple[str, tuple[LimitCheck, ...]]] = []

        async def check(self, identity_tag: str, checks: tuple[LimitCheck, ...]) -> Decision:
            self.calls.append((identity_tag, tuple(checks)))
            raise StorageUnavailableError("redis stalled")

    down = Down()
    limiter = OutboundLimiter("api.example", "1/second", storage=down, clock=clock)  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger="fastapi_resilience.outbound"):
        for _ in range(3):
            assert await limiter.acquire_within(0.0) == 0.0
    assert len([r for r in caplog.records if "storage is unavailable" in r.getMessage()]) == 1
    tag, checks = down.calls[0]
    assert tag == "api.example"
    assert [(c.key, str(c.limit)) for c in checks] == [("outbound:api.example", "1/second")]


# --- options ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"rate_limit": "ten per second"}, "invalid limit string"),
        ({"rate_limit": 10}, "rate_limit must be a limit string"),
        ({"rate_limit_storage": MemoryStorage()}, "rate_limit_storage is given without"),
        ({"rate_limit": "1/second", "rate_limit_storage": object()}, "rate_limit_storage must"),
        ({"rate_limit_wait": -1}, "rate_limit_wait"),
        ({"rate_limit_wait": float("nan")}, "rate_limit_wait"),
        ({"rate_limit_wait": True}, "rate_limit_wait"),
        ({"on_retry": "print"}, "on_retry must be a callable"),
        ({"on_giveup": 3}, "on_giveup must be a callable"),
    ],
)
def test_a_bad_option_is_refused_when_the_transport_is_built(
    options: dict[str, object], named: str
) -> None:
    with pytest.raises(ConfigurationError, match=named):
        ResilientTransport(**options)  # type: ignore[arg-type]


def test_every_host_gets_a_gate_and_the_limit_when_asked() -> None:
    transport = ResilientTransport(rate_limit="10/second", rate_limit_wait=1.5)
    policy = transport.policy_for("api.example:443")
    assert isinstance(policy.gate, QuotaGate)
    assert isinstance(policy.limiter, OutboundLimiter)
    assert policy.limiter.name == "api.example:443"
    assert policy.rate_limit_wait == 1.5
    assert ResilientTransport().policy_for("other.example").limiter is None


@pytest.mark.anyio
async def test_a_cached_answer_is_served_stale_while_the_quota_is_gone() -> None:
    """The answer that said the quota is gone is cached; once it is stale, the gate refuses the
    refresh here and the stale answer is served, marked as never forwarded."""
    clock = ManualClock()
    calls = 0

    def provider(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        gone = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "10m"}
        return httpx.Response(200, json={"n": calls}, headers=gone)

    transport = ResilientTransport(
        httpx.MockTransport(provider),
        cache=ResponseCache(ttl=1, stale_ttl=600, clock=clock),
        clock=clock,
        events=EventBus(log=False),
    )
    async with httpx.AsyncClient(transport=transport, base_url="https://api.example") as client:
        assert (await client.get("/v1/models")).json() == {"n": 1}
        clock.advance(5)
        stale = await client.get("/v1/models")
    assert stale.json() == {"n": 1}
    assert calls == 1
    status = stale.headers["cache-status"]
    assert "fwd=stale" not in status
    assert "detail=quota_exhausted" in status
    assert repr(transport.policy_for("api.example").gate) == "QuotaGate(name='api.example', closed)"
