"""Property tests: the parsers of what a request or a setting carries, the problem answers of
arbitrary error classes, and the rate-limit algorithm against an exact sliding log.

The examples are fixed and bounded by the ``resilience`` Hypothesis profile (tests/conftest.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import json
import re
from collections.abc import Sequence

import httpx
import pytest
from fastapi import FastAPI
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from loopback import RedisServer
from starlette.types import Receive, Scope, Send

from fastapi_resilience import (
    CorrelationIdMiddleware,
    get_correlation_id,
    install_exception_handlers,
)
from fastapi_resilience.exceptions import (
    AppError,
    ClientError,
    ConfigurationError,
    ConflictError,
    RateLimitedError,
    ServerError,
)
from fastapi_resilience.ratelimit import (
    DefaultIdentityResolver,
    Limit,
    LimitCheck,
    MemoryStorage,
    RedisStorage,
    parse_limits,
)
from fastapi_resilience.testing import ManualClock
from tests._asgi import http_get

# --- 1. Limit strings ---------------------------------------------------------------------------

_UNIT_SECONDS = {
    "second": 1,
    "minute": 60,
    "hour": 3600,
    "day": 86400,
    "month": 30 * 86400,
    "year": 365 * 86400,
}
#: Whitespace the parser skips (``\s``: Unicode whitespace included).
_SPACE = st.text(alphabet=" \t\n\u00a0", max_size=2)
_SPACE_1 = st.text(alphabet=" \t\n\u00a0", min_size=1, max_size=2)


def _any_case(word: str) -> st.SearchStrategy[str]:
    return st.sampled_from([word, word.upper(), word.title()])


@st.composite
def _limit_text(draw: st.DrawFn) -> tuple[str, Limit]:
    """One well-formed limit string (``"10/minute"``, ``" 007 PER 2 Hours "``) and its limit."""
    amount = draw(st.integers(1, 10**9))
    multiple = draw(st.none() | st.integers(1, 10**4))
    unit = draw(st.sampled_from(sorted(_UNIT_SECONDS)))
    zeros = "0" * draw(st.integers(0, 2))
    if draw(st.booleans()):
        separator = draw(_SPACE) + "/" + draw(_SPACE)
    else:
        separator = draw(_SPACE_1) + draw(_any_case("per")) + draw(_SPACE_1)
    period = "" if multiple is None else f"{multiple}{draw(_SPACE)}"
    text = (
        f"{draw(_SPACE)}{zeros}{amount}{separator}{period}"
        f"{draw(_any_case(unit))}{draw(st.sampled_from(['', 's', 'S']))}{draw(_SPACE)}"
    )
    return text, Limit(amount, (multiple or 1) * _UNIT_SECONDS[unit])


@st.composite
def _limits_text(draw: st.DrawFn) -> tuple[str, tuple[Limit, ...]]:
    """Several well-formed limits joined by the documented separators (empty parts allowed)."""
    parts = draw(st.lists(_limit_text(), min_size=1, max_size=4))
    text = ""
    for index, (part, _) in enumerate(parts):
        if index:
            text += draw(st.sampled_from([";", ",", "|", "; ", " , ", ";;"]))
        text += part
    text += draw(st.sampled_from(["", ";", "; ", ","]))
    return text, tuple(limit for _, limit in parts)


@given(_limits_text())
def test_well_formed_limit_strings_parse_to_what_they_say(
    case: tuple[str, tuple[Limit, ...]],
) -> None:
    """A well-formed limit string parses to exactly its limits, each of which prints back to
    a string that parses to an equal limit."""
    text, expected = case
    limits = parse_limits(text)
    assert limits == expected
    for limit in limits:
        assert parse_limits(str(limit)) == (limit,)


_ANY_PERIOD = st.integers(1, 10**12) | st.builds(
    int.__mul__, st.integers(1, 10**4), st.sampled_from(sorted(_UNIT_SECONDS.values()))
)


@given(st.builds(Limit, st.integers(1, 10**12), _ANY_PERIOD))
def test_every_limit_prints_to_a_string_that_parses_back(limit: Limit) -> None:
    """``str(limit)`` of any limit parses back to an equal limit."""
    assert parse_limits(str(limit)) == (limit,)


#: Text near the grammar: digits, separators, units, ``per`` and whitespace in any order.
_NEAR_LIMIT_TEXT = st.lists(
    st.sampled_from(["0", "1", "42", "/", " ", "per", "minute", "s", "hour", ";", ",", "|", "\t"]),
    max_size=10,
).map("".join)


@given(st.text() | _NEAR_LIMIT_TEXT)
@example("0/minute")
@example("10/0 minutes")
@example(";;")
def test_arbitrary_text_parses_or_raises_configuration_error(text: str) -> None:
    """Any text either parses to limits of at least one unit per at least one second, or
    raises ``ConfigurationError`` saying it is an invalid limit string; nothing else."""
    try:
        limits = parse_limits(text)
    except ConfigurationError as exc:
        refusal = str(exc)
    else:
        assert limits
        assert all(limit.amount >= 1 and limit.period >= 1 for limit in limits)
        return
    assert "invalid limit string" in refusal


@settings(max_examples=10)
@given(st.integers(4_301, 6_000).map(lambda digits: "1" * digits + "/minute"))
def test_numbers_of_any_length_parse_or_raise_configuration_error(text: str) -> None:
    """An amount of any number of digits parses or raises ``ConfigurationError``."""
    with contextlib.suppress(ConfigurationError):
        parse_limits(text)


# --- 2. Correlation IDs -------------------------------------------------------------------------

#: The documented rule (docs/correlation-ids.md): an incoming ID is kept only when it matches.
_VALID_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")

_HEADER_VALUE = (
    st.binary(max_size=200)
    | st.from_regex(rb"\A[A-Za-z0-9._:-]{1,130}\Z")
    | st.text(max_size=40).map(lambda text: text.encode("utf-8", "surrogatepass"))
    | st.sampled_from([b"abc\r\nSet-Cookie: x=1", b"ok-id\n", b" ok-id", b"a" * 129])
)


async def _echo_app(scope: Scope, receive: Receive, send: Send) -> None:
    """Answers the request's first ``x-request-id`` header, a line feed, and the context's ID."""
    seen = next((value for name, value in scope["headers"] if name == b"x-request-id"), b"-")
    body = seen + b"\n" + (get_correlation_id() or "").encode()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


@given(
    incoming=st.lists(_HEADER_VALUE, max_size=3),
    before=st.lists(st.tuples(st.sampled_from([b"accept", b"x-other"]), st.binary(max_size=20))),
)
def test_correlation_id_is_the_valid_incoming_one_or_a_new_valid_one(
    incoming: list[bytes], before: list[tuple[bytes, bytes]]
) -> None:
    """For any ``X-Request-ID`` header values, the response carries exactly one
    ``X-Request-ID``: the first incoming value when it is valid, else a new valid ID; it never
    holds a control character, and the app sees the same ID in its context and its request
    header."""
    headers = [*before, *((b"x-request-id", value) for value in incoming)]
    sent = asyncio.run(http_get(CorrelationIdMiddleware(_echo_app), headers))
    echoed = [value for name, value in sent[0]["headers"] if name.lower() == b"x-request-id"]
    assert len(echoed) == 1, sent[0]["headers"]
    answer = echoed[0]
    assert _VALID_ID.fullmatch(answer)
    assert not _CONTROL.search(answer)
    if incoming and _VALID_ID.fullmatch(incoming[0]):
        assert answer == incoming[0]
    else:
        assert answer not in incoming
    assert sent[1]["body"] == answer + b"\n" + answer


# --- 3. X-Forwarded-For -------------------------------------------------------------------------

_TRUSTED = ("10.0.0.0/8", "2001:db8::/32", "192.0.2.1")
_TRUSTED_NETWORKS = tuple(ipaddress.ip_network(entry) for entry in _TRUSTED)
_Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _normal(address: _Address) -> _Address:
    """The address a client is named by: an IPv4 address mapped into IPv6 is the IPv4 one."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _is_trusted(address: _Address) -> bool:
    return any(_normal(address) in network for network in _TRUSTED_NETWORKS)


@st.composite
def _spelled(draw: st.DrawFn, addresses: st.SearchStrategy[_Address]) -> tuple[str, _Address]:
    """An address as a server or a proxy may write it (port, brackets, case, mapped IPv4)."""
    address = draw(addresses)
    port = draw(st.integers(0, 65535))
    if isinstance(address, ipaddress.IPv4Address):
        mapped = f"::ffff:{address}"
        forms = [str(address), f"{address}:{port}", mapped, f"[{mapped}]:{port}", f"[{mapped}]"]
    else:
        forms = [
            str(address),
            address.exploded,
            str(address).upper(),
            f"[{address}]",
            f"[{address.exploded}]:{port}",
        ]
    return draw(st.sampled_from(forms)), address


_ANY_ADDRESS = st.ip_addresses() | st.sampled_from(
    [ipaddress.ip_address(a) for a in ("10.1.2.3", "2001:db8::7", "192.0.2.1", "203.0.113.9")]
)
_TRUSTED_ADDRESS = (
    st.ip_addresses(network="10.0.0.0/8")
    | st.ip_addresses(network="2001:db8::/32")
    | st.just(ipaddress.ip_address("192.0.2.1"))
)
_LATIN_1 = st.text(alphabet=st.characters(max_codepoint=255, exclude_characters=","), max_size=12)
#: A hop that is an address, a blank one (skipped), or one that names no one (``junk...``).
_HOP = st.one_of(
    _spelled(_ANY_ADDRESS | _TRUSTED_ADDRESS).map(lambda pair: ("address", *pair)),
    st.sampled_from(["", " ", "\t"]).map(lambda text: ("blank", text, None)),
    st.tuples(_LATIN_1, _LATIN_1).map(lambda pair: ("junk", f"{pair[0]} junk{pair[1]}", None)),
)


def _expected_client(peer: _Address, hops: Sequence[tuple[str, str, _Address | None]]) -> str:
    """The documented walk (ADR 0015, 0060): from the trusted peer right to left over the
    hops, skipping blank ones and trusted proxies; the first untrusted address is the client,
    and a hop that names no one leaves the client at the trusted hop that handed it over."""
    nearest = _normal(peer)
    if not _is_trusted(peer):
        return str(nearest)
    for kind, _, address in reversed(hops):
        if kind == "blank":
            continue
        if address is None:
            return str(nearest)
        if not _is_trusted(address):
            return str(_normal(address))
        nearest = _normal(address)
    return str(nearest)


def _resolve(peer: str | None, forwarded: Sequence[bytes]) -> str:
    resolver = DefaultIdentityResolver(trusted_proxies=_TRUSTED)
    scope = {
        "type": "http",
        "headers": [(b"x-forwarded-for", value) for value in forwarded],
        "client": None if peer is None else (peer, 5555),
    }
    return resolver.resolve(scope).key


def _assert_named_address(key: str) -> str:
    """``key`` is ``ip:`` and an address in its one normal spelling; returns the address."""
    assert key.startswith("ip:"), key
    written = key.removeprefix("ip:")
    address = ipaddress.ip_address(written)
    assert str(_normal(address)) == written
    return written


@given(
    peer=_spelled(_ANY_ADDRESS | _TRUSTED_ADDRESS),
    headers=st.lists(st.lists(_HOP, max_size=5), max_size=3),
)
def test_forwarded_for_names_the_documented_client(
    peer: tuple[str, _Address], headers: list[list[tuple[str, str, _Address | None]]]
) -> None:
    """For any peer address (in any spelling) and ``X-Forwarded-For`` headers of addresses,
    blank and junk hops, the identity is ``ip:`` and the client the documented walk names;
    an untrusted peer's headers are ignored (the identity is the peer's address)."""
    written, address = peer
    forwarded = [",".join(text for _, text, _ in hops).encode("latin-1") for hops in headers]
    key = _resolve(written, forwarded)
    _assert_named_address(key)
    if not _is_trusted(address):
        assert key == f"ip:{_normal(address)}"
    assert key == f"ip:{_expected_client(address, list(itertools.chain(*headers)))}"


@given(
    peer=st.none() | _spelled(_ANY_ADDRESS | _TRUSTED_ADDRESS),
    forwarded=st.lists(
        st.binary(max_size=80)
        | _LATIN_1.map(lambda text: text.encode("latin-1"))
        | st.lists(_spelled(_ANY_ADDRESS | _TRUSTED_ADDRESS), max_size=3).map(
            lambda pairs: ", ".join(text for text, _ in pairs).encode()
        ),
        max_size=3,
    ),
)
def test_forwarded_for_of_arbitrary_bytes_never_raises(
    peer: tuple[str, _Address] | None, forwarded: list[bytes]
) -> None:
    """For any header bytes, the identity is ``ip:<an address>`` (``ip:unknown`` without a
    peer) and resolving never raises; an untrusted peer's address is the identity."""
    key = _resolve(None if peer is None else peer[0], forwarded)
    if peer is None:
        assert key == "ip:unknown"
        return
    _assert_named_address(key)
    if not _is_trusted(peer[1]):
        assert key == f"ip:{_normal(peer[1])}"


# --- 4. Problem answers of arbitrary error classes ----------------------------------------------

_STANDARD = ("type", "title", "status", "detail", "instance", "code", "correlation_id")
_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=8,
)
_RAISED: list[AppError] = []


def _problem_app(*, correlation: bool) -> FastAPI:
    """An app whose ``/boom`` raises the error the example put in ``_RAISED``."""
    app = FastAPI()
    install_exception_handlers(app)
    if correlation:
        app.add_middleware(CorrelationIdMiddleware)

    @app.get("/boom")
    async def boom() -> None:
        raise _RAISED[-1]

    return app


_APPS = {flag: _problem_app(correlation=flag) for flag in (False, True)}


async def _get(app: FastAPI, path: str) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        return await client.get(path)


@st.composite
def _errors(draw: st.DrawFn) -> tuple[type[AppError], AppError]:
    """A generated ``AppError`` subclass and one instance of it."""
    base = draw(
        st.sampled_from([AppError, ClientError, ServerError, ConflictError, RateLimitedError])
    )
    cls: type[AppError] = type(
        "GeneratedError",
        (base,),
        {
            "status_code": draw(st.integers(400, 599)),
            "code": draw(st.text(max_size=30)),
            "title": draw(st.text(max_size=30)),
        },
    )
    keys = st.sampled_from(_STANDARD) | st.text(max_size=12)
    extensions = draw(st.dictionaries(keys, _JSON, max_size=5))
    return cls, cls(draw(st.none() | st.text(max_size=60)), extensions=extensions)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(case=_errors(), correlation=st.booleans())
def test_any_app_error_subclass_answers_valid_problem_json(
    case: tuple[type[AppError], AppError], correlation: bool
) -> None:
    """A route raising any ``AppError`` subclass answers its status with a problem+json body
    that parses, carries every standard member with its type and value (extensions never
    override one), every other extension as given, and the ``correlation_id`` of the one
    correlation header (with the correlation middleware or with the handlers alone)."""
    cls, error = case
    _RAISED.append(error)
    try:
        response = asyncio.run(_get(_APPS[correlation], "/boom"))
    finally:
        _RAISED.clear()
    assert response.status_code == cls.status_code
    assert response.headers["content-type"] == "application/problem+json"
    body = json.loads(response.content)
    assert isinstance(body, dict)
    expected_type = cls.type_uri or f"urn:fastapi-resilience:problem:{cls.code}"
    assert body["type"] == expected_type
    assert body["title"] == cls.title
    assert type(body["status"]) is int
    assert body["status"] == cls.status_code
    assert body["detail"] == error.detail
    assert body["instance"] == "/boom"
    assert body["code"] == cls.code
    assert isinstance(body["correlation_id"], str)
    assert response.headers.get_list("x-request-id") == [body["correlation_id"]]
    extra = {k: v for k, v in error.extensions.items() if k not in _STANDARD}
    assert {k: v for k, v in body.items() if k not in _STANDARD} == extra


# --- 5. The rate-limit algorithm against an exact sliding log -----------------------------------

#: Units a request may cost; a cost above a limit's amount is never admitted by it.
_COSTS = st.integers(1, 3) | st.just(1)
#: Periods whose buckets (1/60 of the period) are whole seconds, and short ones that are not.
_PERIODS = st.sampled_from([60, 120, 60, 1, 3])
#: Gaps between arrivals: whole seconds (bucket edges), about one or two periods of 60 s plus
#: a fraction (inside a bucket), and steps of 1/1024 s (exact in binary) up to 3 s or 150 s.
_GAPS = st.one_of(
    st.integers(0, 130),
    st.sampled_from([0, 1, 59, 60, 61, 62, 119, 120, 121, 122]),
    st.builds(
        lambda whole, steps: whole + steps / 1024,
        st.sampled_from([0, 1, 2, 59, 60, 119, 120]),
        st.integers(0, 1023),
    ),
    st.integers(0, 3 * 1024).map(lambda steps: steps / 1024),
    st.integers(0, 150 * 1024).map(lambda steps: steps / 1024),
)


@st.composite
def _scenarios(draw: st.DrawFn) -> tuple[list[LimitCheck], list[tuple[float, int]]]:
    """One to three limits (some report-only) and the requests: (gap before it, cost)."""
    limits = draw(
        st.lists(
            st.builds(Limit, st.integers(1, 20), _PERIODS), min_size=1, max_size=3, unique=True
        )
    )
    shadows = draw(st.lists(st.booleans(), min_size=len(limits), max_size=len(limits)))
    checks = [
        LimitCheck(f"id:{index}", limit, shadow=shadow)
        for index, (limit, shadow) in enumerate(zip(limits, shadows, strict=True))
    ]
    requests = draw(st.lists(st.tuples(_GAPS, _COSTS), min_size=1, max_size=120))
    return checks, requests


def _held(log: Sequence[tuple[float, int]], since: float, *, after: bool = True) -> int:
    """Units of the log admitted after (or at) ``since``."""
    return sum(cost for at, cost in log if (at > since if after else at >= since))


def _costed(checks: Sequence[LimitCheck], cost: int) -> list[LimitCheck]:
    return [LimitCheck(c.key, c.limit, cost=cost, shadow=c.shadow) for c in checks]


_ONE_PER_MINUTE = [LimitCheck("id:0", Limit(1, 60))]


@given(_scenarios())
# The edges of the documented precision: a unit is free one bucket after its period, not later
# (b), and not before its own period has passed, inside its bucket (a).
@example((_ONE_PER_MINUTE, [(0, 1), (61, 1)]))
@example((_ONE_PER_MINUTE, [(0.5, 1), (59.75, 1)]))
def test_memory_limiter_agrees_with_an_exact_sliding_log(
    scenario: tuple[list[LimitCheck], list[tuple[float, int]]],
) -> None:
    """For any arrivals, costs and limits: (a) no window of an enforced limit's period holds
    more admitted units than the limit; (b) whenever an exact sliding log that keeps each unit
    one bucket (1/60 of the period, docs/rate-limit-storage.md) longer has room for the
    request in every enforced limit, the storage admits it."""
    checks, requests = scenario
    clock = ManualClock()
    storage = MemoryStorage(clock=clock)
    log: list[tuple[float, int]] = []

    async def run() -> None:
        for gap, cost in requests:
            clock.advance(gap)
            now = clock.monotonic()
            decision = await storage.check("id", _costed(checks, cost))
            enforced = [check for check in checks if not check.shadow]
            room = all(
                _held(log, now - check.period - check.period / 60) + cost <= check.amount
                for check in enforced
            )
            if room:
                assert decision.allowed, (now, cost, log)
            if decision.allowed:
                log.append((now, cost))
            for check in enforced:
                assert _held(log, now - check.period) <= check.amount, (now, check, log)

    asyncio.run(run())


_EXAMPLE_IDS = itertools.count()


@pytest.mark.redis
@settings(max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    limits=st.lists(
        st.builds(Limit, st.integers(1, 8), st.sampled_from([3600, 7200, 86400])),
        min_size=1,
        max_size=3,
        unique=True,
    ),
    costs=st.lists(_COSTS, min_size=1, max_size=30),
)
def test_redis_limiter_admits_exactly_what_fits(
    redis_server: RedisServer, limits: list[Limit], costs: list[int]
) -> None:
    """Against a real Redis, requests arriving together (well within one bucket of hour or
    day limits) are admitted exactly when every limit has room: never more than the limit,
    never less than the exact log allows."""
    identity = f"p{next(_EXAMPLE_IDS)}"
    checks = [LimitCheck(f"{identity}:{index}", limit) for index, limit in enumerate(limits)]

    async def run() -> None:
        storage = RedisStorage.from_url(redis_server.url)
        try:
            used = 0
            for cost in costs:
                decision = await storage.check(identity, _costed(checks, cost))
                fits = all(used + cost <= limit.amount for limit in limits)
                assert decision.allowed == fits, (used, cost, limits)
                used += cost if decision.allowed else 0
        finally:
            await storage.aclose()

    asyncio.run(run())
