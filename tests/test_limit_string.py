from __future__ import annotations

import re

import pytest

from fastapi_resilience import ConfigurationError
from fastapi_resilience.ratelimit import Limit, parse_limits


@pytest.mark.parametrize(
    ("text", "limit"),
    [
        ("10/minute", Limit(10, 60)),
        ("10/second", Limit(10, 1)),
        ("5 / hour", Limit(5, 3600)),
        ("100 per 2 hours", Limit(100, 7200)),
        ("1 per day", Limit(1, 86400)),
        ("7/2 minutes", Limit(7, 120)),
        ("3 PER MINUTE", Limit(3, 60)),
        ("2/month", Limit(2, 30 * 86400)),
    ],
)
def test_slowapi_syntax_is_accepted(text: str, limit: Limit) -> None:
    """The slowapi / limits syntax parses to amount and period in seconds."""
    assert parse_limits(text) == (limit,)


def test_several_limits_and_round_trip_to_text() -> None:
    """Limits separated by ';' parse in order and print back in the same syntax."""
    limits = parse_limits("10/second; 300/hour ;100 per 2 hours")
    assert limits == (Limit(10, 1), Limit(300, 3600), Limit(100, 7200))
    assert [str(x) for x in limits] == ["10/second", "300/hour", "100 per 2 hours"]
    assert limits[1].policy_name == "300-3600s"


@pytest.mark.parametrize(
    "text", ["", ";", "ten/minute", "10/fortnight", "10 minute", "0/minute", "10/0 minutes", "-1/s"]
)
def test_bad_strings_are_named_in_the_error(text: str) -> None:
    """A bad limit string raises ConfigurationError quoting the string."""
    with pytest.raises(ConfigurationError, match="invalid limit string"):
        parse_limits(text)


def _days_said(page: str, pattern: str) -> int:
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / page).read_text()
    found = re.search(pattern, " ".join(text.split()))
    assert found is not None, f"docs/{page} does not say {pattern!r}"
    return int(found[1])


def test_docs_say_how_long_a_month_and_a_year_are() -> None:
    """docs/rate-limiting.md says what `1/month` and `1/year` are here, and parse_limits
    agrees; docs/migrating-from-slowapi.md says what `limits` (under slowapi) counts a year
    as, and `limits` agrees."""
    year = _days_said("rate-limiting.md", r"`1/year` is (\d+) days")
    month = _days_said("rate-limiting.md", r"`1/month` is (\d+) days")
    assert parse_limits("1/year") == (Limit(1, year * 86400),)
    assert parse_limits("1/month") == (Limit(1, month * 86400),)
    assert (year, month) == (365, 30)
    theirs = _days_said("migrating-from-slowapi.md", r"`limits` counts `1/year` as (\d+) days")
    here = _days_said("migrating-from-slowapi.md", r"here `1/year` is (\d+) days")
    assert here == year
    limits = pytest.importorskip("limits")
    assert limits.parse("1/year").GRANULARITY.seconds == theirs * 86400
