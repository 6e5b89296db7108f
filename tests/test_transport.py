"""ResilientTransport against a real HTTP upstream served by uvicorn on loopback.

The upstream counts the requests that reach it, on its side, so amplification and "no call
while open" are measured where they happen.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from loopback import RedisServer, free_port
from starlette.types import Receive, Scope, Send

from fastapi_resilience import (
    CorrelationIdMiddleware,
    RequestDeadlineMiddleware,
    deadline,
    get_breaker,
    install_exception_handlers,
    resilient_client,
)
from fastapi_resilience.events import Event, EventBus
from fastapi_resilience.exceptions import (
    BulkheadFullError,
    CircuitOpenError,
    ConfigurationError,
    DeadlineCutError,
    RetryExhaustedError,
    ThrottledError,
    UpstreamError,
    UpstreamStatusError,
    UpstreamTimeoutError,
)
from fastapi_resilience.outbound import (
    BreakerRegistry,
    BulkheadRegistry,
    HostPolicy,
    ResilientTransport,
    ResponseCache,
)
from fastapi_resilience.testing import ManualClock
from tests._asgi import in_request

pytestmark = pytest.mark.anyio

#: How many hosts a transport keeps by default (``max_hosts``, docs/http-client.md).
DEFAULT_MAX_HOSTS = 1024


class Upstream:
    """A tiny raw-ASGI HTTP service whose answers a test scripts, counting hits on arrival."""

    def __init__(self) -> None:
        self.hits = 0
        self.status = 200
        self.retry_after: str | None = None
        self.hang = False
        self.released = asyncio.Event()
        self.headers: list[dict[str, str]] = []
        self.url = ""
        self.on_hit: Callable[[], None] | None = None
        #: Extra response header fields, e.g. ``[("vary", "X-Tenant")]``.
        self.response_headers: list[tuple[str, str]] = []
        #: A request header whose value the body repeats as ``"echo"``.
        self.echo: str | None = None

    def script(self, status: int = 200, *, retry_after: str | None = None) -> None:
        self.status = status
        self.retry_after = retry_after

    async def app(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        self.hits += 1
        self.headers.append({k.decode(): v.decode() for k, v in scope["headers"]})
        if self.on_hit is not None:
            self.on_hit()
        while (await receive()).get("more_body"):
            pass
        if self.hang:
            await self.released.wait()
        answer: dict[str, Any] = {"hit": self.hits}
        if self.echo is not None:
            answer["echo"] = self.headers[-1].get(self.echo.lower())
        body = json.dumps(answer, separators=(",", ":")).encode()
        headers = [(b"content-type", b"application/json")]
        headers += [(k.lower().encode(), v.encode()) for k, v in self.response_headers]
        if self.retry_after:
            headers.append((b"retry-after", self.retry_after.encode()))
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


@pytest.fixture(name="upstream")
async def _upstream() -> AsyncIterator[Upstream]:
    """The upstream, served by an in-process uvicorn on a free loopback port."""
    upstream = Upstream()
    port = free_port()
    config = uvicorn.Config(
        upstream.app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        lifespan="off",
        interface="asgi3",
    )
    server = uvicorn.Server(config)
    task = asyncio.ensure_future(server.serve())
    for _ in range(500):
        if server.started:
            break
        await asyncio.sleep(0.01)  # start-up polling, not the behaviour under test
    upstream.url = f"http://127.0.0.1:{port}"
    try:
        yield upstream
    finally:
        upstream.released.set()
        server.should_exit = True
        await task


@pytest.fixture(autouse=True)
def _clean_registry(default_breakers: BreakerRegistry, default_bulkheads: BulkheadRegistry) -> Any:
    """Breakers and bulkheads built per host register by name; forget them between tests."""
    yield
    for name in list(default_breakers.names()):
        if name.startswith("upstream:"):
            default_breakers.unregister(name)
    for bulkhead in list(default_bulkheads):
        if bulkhead.name.startswith("upstream:"):
            default_bulkheads.unregister(bulkhead.name)


class RecordingCache(ResponseCache):
    """A response cache that also keeps every value it is given to store."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.stored: list[Any] = []

    async def set(self, key: str, value: Any, **options: Any) -> None:
        self.stored.append(value)
        await super().set(key, value, **options)


def client(upstream: Upstream, **options: Any) -> httpx.AsyncClient:
    options.setdefault("clock", ManualClock())
    return resilient_client(upstream.url, **options)


async def test_success_passes_through_once(upstream: Upstream) -> None:
    """A 200 answer comes back unchanged, with one request upstream."""
    async with client(upstream) as http:
        response = await http.get("/item")
    assert response.status_code == 200
    assert response.json() == {"hit": 1}
    assert upstream.hits == 1


async def test_correlation_id_arrives_at_the_upstream(upstream: Upstream) -> None:
    """The current correlation ID is sent upstream as X-Request-ID."""

    async def call_upstream() -> None:
        async with client(upstream) as http:
            await http.get("/item")

    await in_request("req-42", call_upstream)
    assert upstream.headers[0]["x-request-id"] == "req-42"


async def test_5xx_is_retried_then_raised_as_retry_exhausted(upstream: Upstream) -> None:
    """A failing upstream gets `attempts` requests, then RetryExhaustedError from the 5xx."""
    upstream.script(500)
    async with client(upstream, attempts=3) as http:
        with pytest.raises(RetryExhaustedError) as info:
            await http.get("/item")
    assert upstream.hits == 3
    cause = info.value.__cause__
    assert isinstance(cause, UpstreamStatusError)
    assert cause.upstream_status == 500
    assert info.value.extensions["attempts"] == 3


async def test_raise_for_5xx_false_returns_the_last_answer(upstream: Upstream) -> None:
    """With raise_for_5xx=False the last 5xx answer is returned after the retries."""
    upstream.script(502)
    async with client(upstream, attempts=2, raise_for_5xx=False) as http:
        response = await http.get("/item")
    assert response.status_code == 502
    assert response.json() == {"hit": 2}


async def test_post_is_not_retried(upstream: Upstream) -> None:
    """A non-idempotent POST is sent once; its 5xx is an UpstreamError."""
    upstream.script(503)
    async with client(upstream, attempts=3) as http:
        with pytest.raises(UpstreamError) as info:
            await http.post("/item", json={"a": 1})
    assert not isinstance(info.value, RetryExhaustedError)
    assert upstream.hits == 1


async def test_post_is_retried_when_told(upstream: Upstream) -> None:
    """retry_non_idempotent=True retries a POST with a body."""
    upstream.script(503)
    async with client(upstream, attempts=2, retry_non_idempotent=True) as http:
        with pytest.raises(RetryExhaustedError):
            await http.post("/item", content=b"payload")
    assert upstream.hits == 2
    assert upstream.headers[1]["content-length"] == "7"


async def test_upstream_retry_after_is_honoured_on_503(upstream: Upstream) -> None:
    """A 503 with Retry-After: 2 is retried after 2 s, not after the backoff."""
    clock = ManualClock()
    upstream.script(503, retry_after="2")
    async with client(upstream, attempts=2, base_delay=0.01, clock=clock) as http:
        with pytest.raises(RetryExhaustedError):
            await http.get("/item")
    assert clock.slept == [2.0]


async def test_upstream_429_is_retried_then_returned(upstream: Upstream) -> None:
    """An upstream 429 is retried after Retry-After, then handed back, never opening a breaker."""
    clock = ManualClock()
    upstream.script(429, retry_after="1")
    async with client(upstream, attempts=3, failure_threshold=1, clock=clock) as http:
        response = await http.get("/item")
        assert response.status_code == 429
        assert clock.slept == [1.0, 1.0]
        assert (await http.get("/item")).status_code == 429
    assert upstream.hits == 6


async def test_breaker_opens_and_no_call_is_made_while_open(upstream: Upstream) -> None:
    """After failure_threshold failures the breaker opens: CircuitOpenError, no upstream hit."""
    upstream.script(500)
    async with client(upstream, attempts=1, failure_threshold=3, recovery_timeout=30) as http:
        for _ in range(3):
            with pytest.raises(UpstreamError):
                await http.get("/item")
        assert upstream.hits == 3
        with pytest.raises(CircuitOpenError) as info:
            await http.get("/item")
    assert upstream.hits == 3
    assert info.value.retry_after is not None
    assert info.value.retry_after > 0


async def test_open_breaker_ends_retries_with_circuit_open(upstream: Upstream) -> None:
    """With retries on, an open breaker still gives CircuitOpenError (503), not a 502."""
    upstream.script(500)
    async with client(upstream, attempts=3, failure_threshold=2, base_delay=0.0) as http:
        with pytest.raises(CircuitOpenError):
            await http.get("/item")
        assert upstream.hits == 2
        with pytest.raises(CircuitOpenError) as info:
            await http.get("/item")
    assert upstream.hits == 2
    assert info.value.headers["Retry-After"] == "30"


async def test_a_full_bulkhead_neither_opens_the_breaker_nor_throttles(upstream: Upstream) -> None:
    """A burst beyond the host's bulkhead is refused here (BulkheadFullError) and never reaches
    the upstream: the host's breaker (threshold 2) does not count those refusals, adaptive
    throttling does not take them for the upstream's, and the next callers are served."""
    arrived = asyncio.Event()
    upstream.on_hit = arrived.set
    upstream.hang = True
    options = {"failure_threshold": 2, "max_concurrent": 1, "adaptive_throttle": True}
    async with client(upstream, attempts=1, max_waiting=0, **options) as http:
        held = asyncio.create_task(http.get("/item"))
        await arrived.wait()
        for _ in range(20):
            with pytest.raises(BulkheadFullError):
                await http.get("/item")
        upstream.released.set()
        assert (await held).status_code == 200
        upstream.hang = False
        after = [(await http.get("/item")).status_code for _ in range(5)]
    assert after == [200] * 5
    assert upstream.hits == 6


async def test_connect_error_is_an_upstream_error() -> None:
    """Nothing listening: the caller gets an UpstreamError (after retries), not an httpx error."""
    http = resilient_client(f"http://127.0.0.1:{free_port()}", attempts=2, clock=ManualClock())
    async with http:
        with pytest.raises(RetryExhaustedError) as info:
            await http.get("/item")
    assert type(info.value.__cause__) is UpstreamError
    assert isinstance(info.value.__cause__.__cause__, httpx.ConnectError)


async def test_timeout_is_an_upstream_timeout(upstream: Upstream) -> None:
    """An upstream that hangs past the timeout gives UpstreamTimeoutError in time."""
    upstream.hang = True
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with client(upstream, attempts=1, timeout=0.2) as http:
        with pytest.raises(UpstreamTimeoutError):
            await http.get("/item")
    assert loop.time() - started < 1.0


async def test_request_deadline_bounds_every_attempt(upstream: Upstream) -> None:
    """Inside a 0.3 s request deadline, a hanging upstream fails in time, retries included."""
    upstream.hang = True
    loop = asyncio.get_running_loop()
    async with resilient_client(upstream.url, attempts=5, timeout=10) as http:
        started = loop.time()
        with deadline(0.3), pytest.raises(UpstreamError):
            await http.get("/item")
        elapsed = loop.time() - started
    assert elapsed < 0.3 + 0.1


async def test_a_spent_deadline_sends_nothing_and_answers_upstream_timeout(
    upstream: Upstream,
) -> None:
    """With the request's deadline spent, no attempt is made and none retried: the caller
    gets UpstreamTimeoutError (504), not RetryExhaustedError, and the breaker stays closed."""
    clock = ManualClock()
    async with client(upstream, attempts=3, failure_threshold=1) as http:
        with deadline(1.0, clock=clock):
            clock.advance(1.0)
            for _ in range(3):
                with pytest.raises(UpstreamTimeoutError):
                    await http.get("/item")
        assert (await http.get("/item")).status_code == 200
    assert upstream.hits == 1


async def test_outage_amplification_with_and_without_budget(upstream: Upstream) -> None:
    """1000 calls into a total outage: <= 1.2 upstream calls per call with the budget, 3 without."""
    upstream.script(503)
    ratios = {}
    # Without the budget the figure is exactly `attempts` per call, so 200 calls show it.
    for budget, calls in ((True, 1000), (False, 200)):
        upstream.hits = 0
        options: dict[str, Any] = {
            "attempts": 3,
            "base_delay": 0.0,
            "jitter": False,
            "failure_threshold": None,
            "retry_budget": budget,
        }
        async with client(upstream, **options) as http:
            for _ in range(calls):
                with pytest.raises(UpstreamError):
                    await http.get("/item")
        ratios[budget] = upstream.hits / calls
    print(f"amplification: with budget {ratios[True]:.3f}, without {ratios[False]:.3f}")
    assert ratios[True] <= 1.2
    assert ratios[False] == 3.0


async def _calls_reaching_a_503ing_upstream(
    upstream: Upstream, rounds: int, impatient: int, **options: Any
) -> int:
    """Upstream hits of ``rounds`` ordinary calls to an upstream that answers 503, each
    followed by ``impatient`` calls whose client-chosen deadline is already spent (each cut
    before it is sent, or dropped by the throttle: none reaches the upstream)."""
    upstream.hits = 0
    upstream.script(503)
    transport = ResilientTransport(
        failure_threshold=None, base_delay=0.0, jitter=False, clock=ManualClock(), **options
    )
    async with httpx.AsyncClient(transport=transport, base_url=upstream.url) as http:
        for _ in range(rounds):
            with contextlib.suppress(UpstreamError, ThrottledError):
                await http.get("/item")
            for _ in range(impatient):
                with (
                    deadline(0.0, from_client=True),
                    pytest.raises((DeadlineCutError, ThrottledError)),
                ):
                    await http.get("/item")
    return upstream.hits


async def test_calls_the_clients_deadline_ended_buy_no_retries(upstream: Upstream) -> None:
    """A call that a client's spent X-Request-Timeout stopped before it was sent puts nothing
    into the host's retry budget: 100 failing calls reach the upstream as often (first attempts
    and the retries the budget allows) with five such calls after each as without them."""
    alone = await _calls_reaching_a_503ing_upstream(upstream, 100, 0, attempts=3)
    mixed = await _calls_reaching_a_503ing_upstream(upstream, 100, 5, attempts=3)
    assert mixed == alone


async def test_calls_the_clients_deadline_ended_do_not_hold_throttling_off(
    upstream: Upstream,
) -> None:
    """A call that a client's spent X-Request-Timeout stopped before it was sent is neither an
    accept nor a refusal for adaptive throttling: against an upstream refusing everything,
    ordinary calls are dropped locally as often with such calls between them as without."""
    options: dict[str, Any] = {"attempts": 1, "adaptive_throttle": True, "random": lambda: 0.5}
    alone = await _calls_reaching_a_503ing_upstream(upstream, 50, 0, **options)
    mixed = await _calls_reaching_a_503ing_upstream(upstream, 50, 1, **options)
    assert alone < 50
    assert mixed == alone


async def test_budget_exhaustion_is_published_once(upstream: Upstream) -> None:
    """During an outage, retry.budget_exhausted is published once for the host."""
    upstream.script(500)
    bus = EventBus(log=False)
    seen: list[Event] = []
    bus.subscribe(seen.append)
    async with client(upstream, attempts=3, failure_threshold=None, events=bus) as http:
        for _ in range(60):
            with pytest.raises(UpstreamError):
                await http.get("/item")
    kinds = [e.kind for e in seen]
    assert kinds.count("retry.budget_exhausted") == 1


async def test_stale_answer_served_when_upstream_fails(upstream: Upstream) -> None:
    """With a cache, a failing upstream is answered from the stale entry, marked by Cache-Status."""
    clock = ManualClock()
    cache = ResponseCache(ttl=1, stale_ttl=60, clock=clock)
    async with client(upstream, attempts=1, cache=cache, clock=clock) as http:
        first = await http.get("/item")
        assert first.json() == {"hit": 1}
        assert (await http.get("/item")).json() == {"hit": 1}  # fresh hit, no call
        assert upstream.hits == 1
        clock.advance(5)
        upstream.script(500)
        stale = await http.get("/item")
    assert stale.status_code == 200
    assert stale.json() == {"hit": 1}
    assert "fwd=stale" in stale.headers["cache-status"]
    assert upstream.hits == 2


async def test_cache_keeps_callers_with_different_credentials_apart(upstream: Upstream) -> None:
    """An answer cached for one Authorization header is never served to another caller."""
    cache = ResponseCache(ttl=60, clock=ManualClock())
    async with client(upstream, cache=cache) as http:
        alice = await http.get("/item", headers={"Authorization": "Bearer alice"})
        bob = await http.get("/item", headers={"Authorization": "Bearer bob"})
        alice_again = await http.get("/item", headers={"Authorization": "Bearer alice"})
    assert (alice.json(), bob.json(), alice_again.json()) == ({"hit": 1}, {"hit": 2}, {"hit": 1})
    assert upstream.hits == 2


async def test_cache_keeps_callers_with_different_api_keys_apart(upstream: Upstream) -> None:
    """X-API-Key (this library's own credential header) is part of the key: one key's answer
    never serves another key."""
    cache = ResponseCache(ttl=60, clock=ManualClock())
    upstream.echo = "X-API-Key"
    async with client(upstream, cache=cache) as http:
        answers = [
            (await http.get("/item", headers={"X-API-Key": key})).json()
            for key in ("alice", "bob", "alice", "bob")
        ]
    assert [a["echo"] for a in answers] == ["alice", "bob", "alice", "bob"]
    assert [a["hit"] for a in answers] == [1, 2, 1, 2]
    assert upstream.hits == 2


async def test_configured_credential_headers_join_the_key(upstream: Upstream) -> None:
    """credential_headers adds headers of one's own to the four that are always in the key."""
    cache = ResponseCache(ttl=60, clock=ManualClock())
    upstream.echo = "X-Tenant"
    async with client(upstream, cache=cache, credential_headers=["X-Tenant"]) as http:
        a = await http.get("/item", headers={"X-Tenant": "a", "Authorization": "Bearer t"})
        b = await http.get("/item", headers={"X-Tenant": "b", "Authorization": "Bearer t"})
        other = await http.get("/item", headers={"X-Tenant": "a", "Authorization": "Bearer u"})
        again = await http.get("/item", headers={"X-Tenant": "a", "Authorization": "Bearer t"})
    assert [r.json() for r in (a, b, other, again)] == [
        {"hit": 1, "echo": "a"},
        {"hit": 2, "echo": "b"},
        {"hit": 3, "echo": "a"},
        {"hit": 1, "echo": "a"},
    ]


async def test_clients_keyed_by_other_headers_never_share_an_entry(upstream: Upstream) -> None:
    """Two clients share one cache; one also keys by X-Tenant. What the other fetched for a
    caller of tenant a (to it, X-Tenant does not matter) never serves the first client's
    caller without a tenant."""
    cache = ResponseCache(ttl=60, clock=ManualClock())
    upstream.echo = "X-Tenant"
    async with client(upstream, cache=cache) as plain:
        tenant_a = await plain.get("/item", headers={"X-Tenant": "a"})
    async with client(upstream, cache=cache, credential_headers=["X-Tenant"]) as keyed:
        anonymous = await keyed.get("/item")
    assert tenant_a.json() == {"hit": 1, "echo": "a"}
    assert anonymous.json() == {"hit": 2, "echo": None}


@pytest.mark.redis
async def test_entries_an_older_version_stored_are_never_served(
    upstream: Upstream, redis_server: RedisServer
) -> None:
    """An older version keyed an X-API-Key caller's answer by method and URL alone, in the Redis
    level that instances share during a rolling deploy; a new instance never hands that entry
    to another caller: it asks the upstream."""
    upstream.echo = "X-API-Key"
    url = f"{upstream.url}/item"
    # What the transport stores for Alice's answer, as the older version stored it too.
    recording = RecordingCache(ttl=60)
    async with client(upstream, cache=recording) as http:
        await http.get("/item", headers={"X-API-Key": "alice"})
    (alices,) = recording.stored
    older = ResponseCache(ttl=60, redis_url=redis_server.url)
    await older.set(f"GET {url}", alices)
    await older.aclose()
    cache = ResponseCache(ttl=60, redis_url=redis_server.url)
    try:
        async with client(upstream, cache=cache) as http:
            anonymous = await http.get("/item")
    finally:
        await cache.aclose()
    assert anonymous.json() == {"hit": 2, "echo": None}


async def test_the_upstreams_vary_splits_the_entry_per_named_header(upstream: Upstream) -> None:
    """Vary: X-Tenant makes X-Tenant part of that entry's key: each tenant gets its own answer,
    and the answer that taught the cache the Vary is not stored under a key without it."""
    cache = ResponseCache(ttl=60, clock=ManualClock())
    upstream.echo = "X-Tenant"
    upstream.response_headers = [("Vary", "Accept-Language, x-tenant")]
    async with client(upstream, cache=cache) as http:
        answers = [
            (await http.get("/item", headers={"X-Tenant": tenant})).json()
            for tenant in ("a", "b", "a", "b", "a")
        ]
        bare = (await http.get("/item")).json()
    assert [a["echo"] for a in answers] == ["a", "b", "a", "b", "a"]
    assert [a["hit"] for a in answers] == [1, 2, 3, 2, 3]
    assert bare == {"hit": 4, "echo": None}


@pytest.mark.parametrize(
    "headers",
    [
        [("Vary", "*")],
        [("Cache-Control", "private")],
        [("Cache-Control", 'max-age=60, Private="Set-Cookie"')],
        [("Cache-Control", "public"), ("Cache-Control", "no-store")],
        [("Cache-Control", "no-cache")],
        [("Set-Cookie", "session=abc")],
    ],
    ids=["vary-star", "private", "private-fields", "no-store", "no-cache", "set-cookie"],
)
async def test_answers_meant_for_one_caller_are_never_cached(
    upstream: Upstream, headers: list[tuple[str, str]]
) -> None:
    """Vary: *, Cache-Control private / no-store / no-cache, and an answer that sets a cookie
    are not stored: every call reaches the upstream."""
    cache = ResponseCache(ttl=60, clock=ManualClock())
    upstream.response_headers = headers
    async with client(upstream, cache=cache) as http:
        answers = [(await http.get("/item")).json() for _ in range(3)]
    assert answers == [{"hit": 1}, {"hit": 2}, {"hit": 3}]
    assert upstream.hits == 3


async def test_a_caller_waiting_on_another_never_gets_its_unstored_answer(
    upstream: Upstream,
) -> None:
    """Two callers for one URL at once share one call, but when that answer is not stored
    (here: it varies on a header the key did not hold yet) the second caller makes its own
    call and gets its own answer."""
    cache = ResponseCache(ttl=60, clock=ManualClock())
    upstream.echo = "X-Tenant"
    upstream.response_headers = [("Vary", "X-Tenant")]
    upstream.hang = True
    async with client(upstream, cache=cache) as http:
        arrived = asyncio.Event()
        upstream.on_hit = arrived.set
        first = asyncio.create_task(http.get("/item", headers={"X-Tenant": "a"}))
        await arrived.wait()
        second = asyncio.create_task(http.get("/item", headers={"X-Tenant": "b"}))
        for _ in range(20):
            await asyncio.sleep(0)  # let the second caller join the first's call
        upstream.released.set()
        a, b = await asyncio.gather(first, second)
    assert (a.json()["echo"], b.json()["echo"]) == ("a", "b")
    assert upstream.hits == 2


async def test_callers_sharing_a_fetch_are_not_cut_by_its_leaders_deadline(
    upstream: Upstream,
) -> None:
    """A caller whose own short deadline (a client's X-Request-Timeout) leads a cached fetch is
    cut (DeadlineCutError); the five callers that joined that fetch with time of their own make
    one call of their own together and are served."""
    cache = ResponseCache(ttl=60, clock=ManualClock())
    hit = [asyncio.Event(), asyncio.Event()]
    upstream.on_hit = lambda: hit[upstream.hits - 1].set()
    upstream.hang = True
    async with client(upstream, attempts=1, cache=cache) as http:

        async def impatient() -> httpx.Response:
            with deadline(0.2, from_client=True):
                return await http.get("/item")

        async def patient() -> httpx.Response:
            with deadline(30.0):
                return await http.get("/item")

        leader = asyncio.create_task(impatient())
        await hit[0].wait()
        followers = asyncio.gather(*(patient() for _ in range(5)), return_exceptions=True)
        with pytest.raises(DeadlineCutError):
            await leader
        # Their own call reaches the upstream (or, before the fix, they all failed with it).
        second = asyncio.create_task(hit[1].wait())
        await asyncio.wait([second, followers], return_when=asyncio.FIRST_COMPLETED)
        upstream.released.set()
        answers = await followers
        second.cancel()
    served = [a for a in answers if isinstance(a, httpx.Response)]
    assert [type(a).__name__ for a in answers if a not in served] == []
    assert [a.status_code for a in served] == [200] * 5
    assert {a.json()["hit"] for a in served} == {2}
    assert upstream.hits == 2


@pytest.mark.parametrize("bad", ["X-Tenant", ["X Tenant"], [""]])
def test_bad_credential_headers_fail_at_construction(bad: Any) -> None:
    """credential_headers must be a list of header names (a bare string is refused)."""
    with pytest.raises(ConfigurationError, match="credential_headers"):
        ResilientTransport(credential_headers=bad)


async def test_hedging_through_the_transport(upstream: Upstream) -> None:
    """With hedge_after, a slow first request is backed up by a second; the answer arrives."""
    upstream.hang = True

    # The first request hangs until the backup has arrived.
    upstream.on_hit = lambda: upstream.released.set() if upstream.hits >= 2 else None
    async with resilient_client(upstream.url, attempts=1, hedge_after=0.02) as http:
        response = await http.get("/item")
    assert response.status_code == 200
    assert upstream.hits == 2


async def test_route_answers_problem_details_for_upstream_failures(upstream: Upstream) -> None:
    """A route using the client answers 502, then 503 circuit_open with Retry-After, then 504."""
    app = FastAPI()
    install_exception_handlers(app)
    app.add_middleware(RequestDeadlineMiddleware, timeout=0.3)
    app.add_middleware(CorrelationIdMiddleware)
    http = resilient_client(
        upstream.url, attempts=2, base_delay=0.0, failure_threshold=2, timeout=5.0
    )

    @app.get("/stock")
    async def stock() -> Any:
        return (await http.get("/item")).json()

    async with (
        http,
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as api,
    ):
        assert (await api.get("/stock", headers={"X-Request-ID": "abc-123"})).status_code == 200
        assert upstream.headers[-1]["x-request-id"] == "abc-123"
        upstream.script(500)
        failed = await api.get("/stock")
        assert failed.status_code == 502
        assert failed.json()["code"] == "retries_exhausted"
        opened = await api.get("/stock")
        assert opened.status_code == 503
        assert opened.json()["code"] == "circuit_open"
        assert opened.headers["retry-after"] == "30"
        hits = upstream.hits
        get_breaker(f"upstream:{upstream.url.removeprefix('http://')}").reset()
        upstream.script(200)
        upstream.hang = True
        loop = asyncio.get_running_loop()
        started = loop.time()
        timed_out = await api.get("/stock")
        elapsed = loop.time() - started
    assert timed_out.status_code == 504
    assert timed_out.json()["code"] == "upstream_timeout"
    assert elapsed < 0.3 + 0.1
    assert upstream.hits == hits + 1


def test_per_host_policies_are_separate() -> None:
    """Each host gets its own breaker and budget; an explicit HostPolicy is used as given."""
    mine = HostPolicy(timeout=1.0)
    transport = ResilientTransport(hosts={"pay.internal": mine, "slow.internal": {"timeout": 30}})
    a = transport.policy_for("a.internal")
    b = transport.policy_for("b.internal:8080")
    assert a.breaker is not b.breaker
    assert a.retry is not None
    assert b.retry is not None
    assert a.retry.budget is not b.retry.budget
    assert transport.policy_for("pay.internal:443") is mine
    assert transport.policy_for("slow.internal").timeout == 30
    assert transport.policy_for("a.internal") is a


async def test_per_host_state_stays_bounded_but_keeps_what_is_in_use(
    upstream: Upstream, default_breakers: BreakerRegistry, default_bulkheads: BulkheadRegistry
) -> None:
    """A client calling 60 hosts with max_hosts=8 keeps at most 8 hosts' breakers and bulkheads
    registered; a host whose breaker is open keeps failing fast, and a host whose bulkhead
    holds a call still refuses a second one."""
    port = upstream.url.rsplit(":", 1)[1]
    # Loopback addresses other than 127.0.0.1: nothing listens there, a call is refused at once.
    refused = [f"http://127.0.0.{n}:{port}/item" for n in range(2, 60)]
    sick = refused[0]
    arrived = asyncio.Event()
    upstream.on_hit = arrived.set
    upstream.hang = True
    http = resilient_client(
        attempts=1, failure_threshold=2, max_concurrent=1, max_hosts=8, clock=ManualClock()
    )
    async with http:
        for _ in range(2):
            with pytest.raises(UpstreamError):
                await http.get(sick)
        held = asyncio.create_task(http.get(f"{upstream.url}/item"))
        await arrived.wait()
        for url in refused[1:]:
            with pytest.raises(UpstreamError):
                await http.get(url)
        breakers = [n for n in default_breakers.names() if n.endswith(f":{port}")]
        bulkheads = [b.name for b in default_bulkheads if b.name.endswith(f":{port}")]
        assert len(breakers) <= 8
        assert len(bulkheads) <= 8
        assert f"upstream:127.0.0.2:{port}" in breakers
        with pytest.raises(CircuitOpenError):
            await http.get(sick)
        with pytest.raises(BulkheadFullError):
            await http.get(f"{upstream.url}/item")
        upstream.released.set()
        assert (await held).status_code == 200
    assert upstream.hits == 1


async def test_hosts_whose_breaker_opened_are_forgotten_once_it_would_let_calls_through(
    upstream: Upstream, default_breakers: BreakerRegistry
) -> None:
    """60 dead hosts (max_hosts=8) open their breakers and are kept while open. Once their
    recovery time is up a fresh breaker would let the next call through anyway, so they are
    forgotten as new hosts come: 8 breakers registered again after the next host, and no
    breaker.half_open event for a host nobody called."""
    port = upstream.url.rsplit(":", 1)[1]
    dead = [f"http://127.0.0.{n}:{port}/item" for n in range(2, 62)]
    clock = ManualClock()
    bus = EventBus(log=False)
    seen: list[Event] = []
    bus.subscribe(seen.append)
    http = resilient_client(attempts=1, failure_threshold=1, max_hosts=8, clock=clock, events=bus)
    async with http:
        for url in dead:
            with pytest.raises(UpstreamError):
                await http.get(url)
        assert len([n for n in default_breakers.names() if n.endswith(f":{port}")]) == 60
        clock.advance(31)
        assert (await http.get(f"{upstream.url}/item")).status_code == 200
    kept = [n for n in default_breakers.names() if n.endswith(f":{port}")]
    assert len(kept) == 8
    assert [e.name for e in seen if e.kind == "breaker.half_open"] == []


async def test_a_given_policy_is_shared_by_every_port_without_growing_the_table() -> None:
    """A HostPolicy given for a bare host serves every port of it; calls to 40 ports of that
    host keep at most max_hosts entries, and each port still gets the policy given."""
    given = HostPolicy(timeout=1.0)
    transport = ResilientTransport(hosts={"127.0.0.1": given}, max_hosts=8)
    async with httpx.AsyncClient(transport=transport) as http:
        for _ in range(40):
            with pytest.raises(UpstreamError):
                await http.get(f"http://127.0.0.1:{free_port()}/")  # nothing listens there
    assert len(transport.hosts()) <= 8
    assert transport.policy_for(f"127.0.0.1:{free_port()}") is given


def test_a_transport_keeps_the_most_recently_used_hosts_by_default(
    default_breakers: BreakerRegistry, default_bulkheads: BulkheadRegistry
) -> None:
    """Beyond DEFAULT_MAX_HOSTS hosts the least recently used idle one is forgotten, breaker
    and bulkhead registration included; a host used again counts as new."""
    transport = ResilientTransport(max_concurrent=2)
    for i in range(DEFAULT_MAX_HOSTS):
        transport.policy_for(f"h{i}.example:443")
    first = transport.policy_for("h0.example:443")
    for i in range(DEFAULT_MAX_HOSTS, DEFAULT_MAX_HOSTS + 100):
        transport.policy_for(f"h{i}.example:443")
    breakers = [n for n in default_breakers.names() if n.endswith(".example:443")]
    bulkheads = [b.name for b in default_bulkheads if b.name.endswith(".example:443")]
    assert len(breakers) == len(bulkheads) == DEFAULT_MAX_HOSTS
    assert "upstream:h0.example:443" in breakers
    assert "upstream:h1.example:443" not in breakers
    assert transport.policy_for("h0.example:443") is first
    assert transport.policy_for("h1.example:443").breaker is not None


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_bad_max_hosts_fails_at_construction(bad: Any) -> None:
    """max_hosts must be a whole number of hosts >= 1 (or None)."""
    with pytest.raises(ConfigurationError, match="max_hosts"):
        ResilientTransport(max_hosts=bad)


@pytest.mark.parametrize(
    "options", [{"attempts": 0}, {"timeout": -1}, {"colour": "blue"}, {"failure_threshold": 0}]
)
def test_bad_options_fail_at_construction(options: dict[str, Any]) -> None:
    """A bad option raises ConfigurationError when the transport is built, not on first use."""
    with pytest.raises(ConfigurationError):
        ResilientTransport(**options)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("3", 3.0),
        ("Tue, 14 Nov 2023 22:13:30 GMT", 10.0),
        ("soon", None),
        (None, None),
        ("Tue, 14 Nov 2023 22:13:00 GMT", 0.0),
    ],
)
async def test_parse_retry_after(
    upstream: Upstream, value: str | None, expected: float | None
) -> None:
    """An upstream 503's Retry-After is read as seconds or as an HTTP date relative to now."""
    clock = ManualClock(wall_start=1_700_000_000.0)
    upstream.script(503, retry_after=value)
    async with client(upstream, attempts=1, clock=clock) as http:
        with pytest.raises(UpstreamError) as info:
            await http.get("/item")
    error = info.value if isinstance(info.value, UpstreamStatusError) else info.value.__cause__
    assert isinstance(error, UpstreamStatusError)
    assert error.upstream_status == 503
    assert error.retry_after == expected


async def test_streaming_body_still_works(upstream: Upstream) -> None:
    """A response read by streaming comes through the buffered transport intact."""
    async with client(upstream) as http, http.stream("GET", "/item") as response:
        body = b"".join([chunk async for chunk in response.aiter_bytes()])
    assert body == b'{"hit":1}'


@pytest.mark.parametrize(
    ("url", "headers", "error", "names"),
    [
        ("ftp://127.0.0.1/item", {}, httpx.InvalidURL, "the scheme must be http, https, ws"),
        ("http://127.0.0.1:99999/item", {}, httpx.InvalidURL, "the port is not in 1-65535"),
        ("/item", {"x-note": "a\r\nX-Admin: yes"}, httpx.LocalProtocolError, "CR, LF, NUL"),
        ("/item", {"x-note": " b"}, httpx.LocalProtocolError, "a space or tab at either end"),
        ("/item", {"x note": "b"}, httpx.LocalProtocolError, "is not a token"),
        # httpx refuses this one itself, before any transport: nothing wraps it either.
        ("/item/\x14", {}, httpx.InvalidURL, "non-printable"),
    ],
)
async def test_a_request_no_upstream_could_take_is_the_apps_error(
    upstream: Upstream, url: str, headers: dict[str, str], error: type[Exception], names: str
) -> None:
    """A request that cannot be sent is raised as the httpx error naming the fault, at once:
    not an UpstreamError, never retried, never counted by the host's breaker (threshold 2),
    and no header value in the message."""
    retried: list[object] = []
    options = {"failure_threshold": 2, "on_retry": lambda *a: retried.append(a)}
    async with client(upstream, attempts=3, base_delay=0.0, **options) as http:
        for _ in range(5):
            with pytest.raises(error, match=names) as info:
                await http.get(url, headers=headers)
            assert not isinstance(info.value, UpstreamError)
            assert "X-Admin" not in str(info.value)
        assert retried == []
        assert upstream.hits == 0
        assert (await http.get("/item")).status_code == 200  # the breaker stayed closed
    assert upstream.hits == 1


@pytest.mark.parametrize("scheme", ["ws", "wss"])
async def test_a_websocket_url_is_sent_as_httpx_sends_it(upstream: Upstream, scheme: str) -> None:
    """httpx's transport sends ws:// and wss:// (an HTTP/1.1 upgrade, as httpx-ws does): the
    resilient client passes them on, not refused as unsendable (wss here: a TLS error)."""
    url = upstream.url.replace("http://", f"{scheme}://") + "/item"
    async with client(upstream, attempts=1) as http:
        if scheme == "ws":
            assert (await http.get(url)).status_code == 200
        else:
            with pytest.raises(UpstreamError):  # the plain-HTTP upstream cannot speak TLS
                await http.get(url)
    assert upstream.hits == (1 if scheme == "ws" else 0)


async def test_an_apps_own_inner_transport_may_serve_other_schemes() -> None:
    """A scheme httpx's transport does not send is the inner transport's to judge when the app
    gives its own (a test's ``mock://``, a unix-socket ``http+unix://``)."""
    seen: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(200, json={"ok": True})

    transport = ResilientTransport(
        transport=httpx.MockTransport(answer), failure_threshold=None, clock=ManualClock()
    )
    async with httpx.AsyncClient(transport=transport) as http:
        assert (await http.get("mock://inventory/item")).json() == {"ok": True}
    assert seen == ["mock://inventory/item"]


async def test_a_relative_url_without_a_base_url_says_so() -> None:
    async with resilient_client(attempts=3, clock=ManualClock()) as http:
        with pytest.raises(httpx.InvalidURL, match="relative URL: give the client a base_url"):
            await http.get("/item")


async def test_a_route_whose_call_cannot_be_sent_answers_500_not_502(upstream: Upstream) -> None:
    """The app's own fault is an internal error (500, logged with its traceback), not an
    upstream's failure (502 retries_exhausted) that would blame the upstream."""
    app = FastAPI()
    install_exception_handlers(app)
    app.add_middleware(CorrelationIdMiddleware)
    http = resilient_client(upstream.url.replace("http://", "ftp://"), base_delay=0.0)

    @app.get("/stock")
    async def stock() -> Any:
        return (await http.get("/item")).json()

    async with (
        http,
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as api,
    ):
        answer = await api.get("/stock")
    assert answer.status_code == 500
    assert answer.json()["code"] == "internal_error"
    assert upstream.hits == 0
