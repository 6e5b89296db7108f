"""Rate-limit response headers: ``X-RateLimit-*`` and the IETF ``RateLimit-Policy`` / ``RateLimit``.

The IETF fields follow draft-ietf-httpapi-ratelimit-headers-11 (May 2026; ADR 0014): both are
structured-field Lists whose items are Strings naming a policy, ``RateLimit-Policy`` with the
``q`` (quota) and ``w`` (window, seconds) parameters, ``RateLimit`` with ``r`` (remaining) and
``t`` (seconds until the quota is back). Every static byte is built once per policy; a request
only formats its two numbers per policy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from fastapi_resilience._limits import Limit

__all__ = [
    "DIGITS",
    "DIGITS_KEPT",
    "DRAFT_VERSION",
    "QUOTA_EXCEEDED_TYPE",
    "RATE_LIMIT_FIELDS",
    "TEMPORARY_REDUCED_CAPACITY_TYPE",
    "HeaderPlan",
    "PolicyHeader",
    "ceil_seconds",
    "sf_string",
]

DRAFT_VERSION = "draft-ietf-httpapi-ratelimit-headers-11"
QUOTA_EXCEEDED_TYPE = "https://iana.org/assignments/http-problem-types#quota-exceeded"
TEMPORARY_REDUCED_CAPACITY_TYPE = (
    "https://iana.org/assignments/http-problem-types#temporary-reduced-capacity"
)

X_LIMIT = b"x-ratelimit-limit"
X_REMAINING = b"x-ratelimit-remaining"
X_RESET = b"x-ratelimit-reset"
IETF_POLICY = b"ratelimit-policy"
IETF_LIMIT = b"ratelimit"
RETRY_AFTER = b"retry-after"
#: The digits of the numbers below ``DIGITS_KEPT``, formatted once: the seconds an hour's window
#: can report (``t`` and ``X-RateLimit-Reset``, on every response), and the units left of
#: most limits. A list lookup instead of formatting an int.
DIGITS_KEPT = 3662
DIGITS = [b"%d" % number for number in range(DIGITS_KEPT)]
#: Every field name the rate limiter sets, lower case as they travel in ASGI.
RATE_LIMIT_FIELDS = frozenset({X_LIMIT, X_REMAINING, X_RESET, IETF_POLICY, IETF_LIMIT, RETRY_AFTER})


def sf_string(text: str) -> str:
    """``text`` as a structured-field String (RFC 8941 §3.3.3): quoted, ``"`` and ``\\`` escaped.

    Characters outside printable ASCII cannot appear in an sf-string; they become ``?``.
    """
    cleaned = "".join(c if " " <= c <= "~" else "?" for c in text)
    return '"' + cleaned.replace("\\", "\\\\").replace('"', '\\"') + '"'


def ceil_seconds(seconds: float) -> int:
    """Whole seconds, rounded up, never negative (the draft's ``t`` and ``X-RateLimit-Reset``)."""
    return math.ceil(seconds - 1e-9) if seconds > 0 else 0


@dataclass(frozen=True, slots=True)
class PolicyHeader:
    """The precomputed header bytes of one policy (one limit of a tier or a route)."""

    name: str
    limit: Limit
    #: ``"premium";q=1000;w=60``: one item of ``RateLimit-Policy``.
    policy_item: bytes
    #: ``"premium";r=``: the start of this policy's item in ``RateLimit``, to join with its two
    #: numbers' digits (``"premium";r=7;t=42``).
    remaining_prefix: bytes
    #: ``(x-ratelimit-limit, amount)``: the same pair on every response of this policy.
    limit_pair: tuple[bytes, bytes]

    @classmethod
    def build(cls, name: str, limit: Limit) -> PolicyHeader:
        quoted = sf_string(name).encode("ascii")
        amount = str(limit.amount).encode("ascii")
        return cls(
            name=name,
            limit=limit,
            policy_item=quoted + b";q=%d;w=%d" % (limit.amount, limit.period),
            remaining_prefix=quoted + b";r=",
            limit_pair=(X_LIMIT, amount),
        )


@dataclass(frozen=True, slots=True)
class HeaderPlan:
    """The headers of one combination of policies (a tier, plus a route's limits)."""

    policies: tuple[PolicyHeader, ...]
    #: ``(ratelimit-policy, every policy's item)``: the same pair on every response of this plan.
    policy_pair: tuple[bytes, bytes]

    @classmethod
    def build(cls, policies: Sequence[PolicyHeader]) -> HeaderPlan:
        field = b", ".join(p.policy_item for p in policies)
        return cls(tuple(policies), (IETF_POLICY, field))

    def one_policy(
        self, remaining: int, reset_after: float, *, legacy: bool = True
    ) -> list[tuple[bytes, bytes]]:
        """``headers`` of a plan with one policy, taking its two numbers as they are.

        The common case, kept short: it runs on every limited request.
        """
        policy = self.policies[0]
        left = remaining if remaining > 0 else 0
        # ``ceil_seconds`` inlined: one call less per request.
        reset = math.ceil(reset_after - 1e-9) if reset_after > 0 else 0
        left_digits = DIGITS[left] if left < DIGITS_KEPT else b"%d" % left
        reset_digits = DIGITS[reset] if reset < DIGITS_KEPT else b"%d" % reset
        item = b"".join((policy.remaining_prefix, left_digits, b";t=", reset_digits))
        # The unchanging pairs are shared by every response; only three are built here.
        if not legacy:
            return [self.policy_pair, (IETF_LIMIT, item)]
        return [
            self.policy_pair,
            (IETF_LIMIT, item),
            policy.limit_pair,
            (X_REMAINING, left_digits),
            (X_RESET, reset_digits),
        ]

    def headers(
        self, remaining: Sequence[int], reset_after: Sequence[float], *, legacy: bool = True
    ) -> list[tuple[bytes, bytes]]:
        """The header pairs for one response; the tightest policy decides ``X-RateLimit-*``.

        The tightest policy has the fewest units left, and of those the longest wait.
        ``remaining`` and ``reset_after`` are in the order of ``policies``.
        """
        policies = self.policies
        if len(policies) == 1:
            return self.one_policy(remaining[0], reset_after[0], legacy=legacy)
        resets = [ceil_seconds(r) for r in reset_after]
        lefts = [max(0, r) for r in remaining]
        items = [
            p.remaining_prefix + b"%d;t=%d" % (left, reset)
            for p, left, reset in zip(policies, lefts, resets, strict=True)
        ]
        out = [self.policy_pair, (IETF_LIMIT, b", ".join(items))]
        if legacy:
            tight = 0
            for i in range(1, len(policies)):
                if lefts[i] < lefts[tight] or (
                    lefts[i] == lefts[tight] and resets[i] > resets[tight]
                ):
                    tight = i
            out += [
                policies[tight].limit_pair,
                (X_REMAINING, b"%d" % lefts[tight]),
                (X_RESET, b"%d" % resets[tight]),
            ]
        return out
