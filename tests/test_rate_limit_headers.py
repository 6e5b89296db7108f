"""Rate-limit header bytes: draft-ietf-httpapi-ratelimit-headers-11 fields and X-RateLimit-*."""

from __future__ import annotations

import pytest

from fastapi_resilience.ratelimit import Limit
from fastapi_resilience.ratelimit._headers import (
    HeaderPlan,
    PolicyHeader,
    ceil_seconds,
    sf_string,
)


def test_policy_item_is_a_structured_field_string_with_q_and_w() -> None:
    """A policy is a quoted sf-string with the q (quota) and w (window) parameters."""
    policy = PolicyHeader.build("premium", Limit(1000, 60))
    assert policy.policy_item == b'"premium";q=1000;w=60'


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("plain", '"plain"'),
        ('say "hi"', '"say \\"hi\\""'),
        ("back\\slash", '"back\\\\slash"'),
        ("caf\u00e9\n", '"caf??"'),
    ],
)
def test_sf_string_escapes(text: str, expected: str) -> None:
    """Quotes and backslashes are escaped; characters an sf-string cannot hold are replaced."""
    assert sf_string(text) == expected


def test_plan_lists_every_policy_and_the_tightest_decides_legacy_headers() -> None:
    """RateLimit lists all policies; X-RateLimit-* describe the one with the fewest units left."""
    plan = HeaderPlan.build(
        [PolicyHeader.build("free", Limit(60, 60)), PolicyHeader.build("/login", Limit(5, 60))]
    )
    headers = dict(plan.headers([40, 2], [12.2, 30.0]))
    assert headers[b"ratelimit-policy"] == b'"free";q=60;w=60, "/login";q=5;w=60'
    assert headers[b"ratelimit"] == b'"free";r=40;t=13, "/login";r=2;t=30'
    assert headers[b"x-ratelimit-limit"] == b"5"
    assert headers[b"x-ratelimit-remaining"] == b"2"
    assert headers[b"x-ratelimit-reset"] == b"30"


def test_equal_remaining_prefers_the_longest_wait() -> None:
    """Between policies with as much left, the one that frees a slot later decides."""
    plan = HeaderPlan.build(
        [PolicyHeader.build("a", Limit(10, 1)), PolicyHeader.build("b", Limit(100, 3600))]
    )
    headers = dict(plan.headers([0, 0], [0.5, 1800.0]))
    assert headers[b"x-ratelimit-limit"] == b"100"
    assert headers[b"x-ratelimit-reset"] == b"1800"


def test_legacy_headers_can_be_left_out() -> None:
    """legacy=False gives only the IETF fields."""
    plan = HeaderPlan.build([PolicyHeader.build("a", Limit(10, 1))])
    names = [name for name, _ in plan.headers([3], [1.0], legacy=False)]
    assert names == [b"ratelimit-policy", b"ratelimit"]


@pytest.mark.parametrize(
    ("seconds", "expected"), [(0.0, 0), (-1.0, 0), (0.2, 1), (1.0, 1), (59.0001, 60)]
)
def test_ceil_seconds(seconds: float, expected: int) -> None:
    """Header seconds are whole, rounded up, and never negative."""
    assert ceil_seconds(seconds) == expected


def test_a_percent_sign_in_a_policy_name_is_sent_as_is() -> None:
    """The RateLimit item is formatted from a template; a ``%`` in the name is not a field."""
    policy = PolicyHeader.build("50%off", Limit(10, 60))
    headers = dict(HeaderPlan.build([policy]).one_policy(3, 12.5))
    assert headers[b"ratelimit"] == b'"50%off";r=3;t=13'


@pytest.mark.parametrize("reset_after", [0.0, 0.2, 59.5, 3661.0, 3661.5, 86_400.0])
def test_one_policy_figures_for_short_and_long_windows(reset_after: float) -> None:
    """``t`` and X-RateLimit-Reset are the reset rounded up, for any window length."""
    plan = HeaderPlan.build([PolicyHeader.build("daily", Limit(10_000, 86_400))])
    reset = ceil_seconds(reset_after)
    assert dict(plan.one_policy(9_999, reset_after)) == {
        b"ratelimit-policy": b'"daily";q=10000;w=86400',
        b"ratelimit": b'"daily";r=9999;t=%d' % reset,
        b"x-ratelimit-limit": b"10000",
        b"x-ratelimit-remaining": b"9999",
        b"x-ratelimit-reset": b"%d" % reset,
    }
    assert plan.one_policy(-3, reset_after, legacy=False) == [
        (b"ratelimit-policy", b'"daily";q=10000;w=86400'),
        (b"ratelimit", b'"daily";r=0;t=%d' % reset),
    ]
