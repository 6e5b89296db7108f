"""Limit strings in the slowapi / ``limits`` syntax: ``"10/minute"``, ``"100 per 2 hours"``."""

from __future__ import annotations

import re
from dataclasses import dataclass

from fastapi_resilience.exceptions import ConfigurationError

__all__ = ["Limit", "parse_limit", "parse_limits"]

_UNITS = {
    "second": 1,
    "minute": 60,
    "hour": 3600,
    "day": 86400,
    "month": 30 * 86400,
    "year": 365 * 86400,
}
_LIMIT = re.compile(
    r"\s*(?P<amount>\d+)\s*(?:/|\s+per\s+)\s*(?P<multiple>\d+)?\s*"
    r"(?P<unit>second|minute|hour|day|month|year)s?\s*",
    re.IGNORECASE,
)
_SEPARATORS = re.compile(r"[;,|]")


@dataclass(frozen=True, slots=True)
class Limit:
    """``amount`` requests (or cost units) per ``period`` seconds."""

    amount: int
    period: int

    def __str__(self) -> str:
        for unit, seconds in reversed(_UNITS.items()):
            if self.period % seconds == 0:
                multiple = self.period // seconds
                return (
                    f"{self.amount}/{unit}"
                    if multiple == 1
                    else (f"{self.amount} per {multiple} {unit}s")
                )
        return f"{self.amount} per {self.period} seconds"  # pragma: no cover - seconds divide all

    @property
    def policy_name(self) -> str:
        """A short token for headers: ``"100-60s"``."""
        return f"{self.amount}-{self.period}s"


def parse_limit(text: str) -> Limit:
    """Parse one limit string; raises ``ConfigurationError`` naming the string."""
    match = _LIMIT.fullmatch(text)
    if match is None:
        raise ConfigurationError(
            f"invalid limit string {text!r}: expected e.g. '10/minute' or '100 per 2 hours'"
        )
    amount = int(match["amount"])
    multiple = int(match["multiple"] or 1)
    if amount < 1 or multiple < 1:
        raise ConfigurationError(f"invalid limit string {text!r}: amount and period must be >= 1")
    return Limit(amount, multiple * _UNITS[match["unit"].lower()])


def parse_limits(text: str) -> tuple[Limit, ...]:
    """Parse one or more limits separated by ``;`` (or ``,``): ``"10/second; 300/hour"``."""
    parts = [p for p in _SEPARATORS.split(text) if p.strip()]
    if not parts:
        raise ConfigurationError(f"invalid limit string {text!r}: no limit in it")
    return tuple(parse_limit(p) for p in parts)
