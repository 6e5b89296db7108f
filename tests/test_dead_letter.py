from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import redis.asyncio
from loopback import RedisServer

from fastapi_resilience import Retry
from fastapi_resilience.events import Event, EventBus
from fastapi_resilience.exceptions import (
    CircuitOpenError,
    ConfigurationError,
    ConflictError,
    RetryExhaustedError,
    UpstreamError,
)
from fastapi_resilience.outbound import (
    DeadLetter,
    DeadLetterQueue,
    MemoryDeadLetterQueue,
    RedisDeadLetterQueue,
    dead_letter_on_failure,
)
from fastapi_resilience.testing import ManualClock
from tests._asgi import in_request

pytestmark = pytest.mark.anyio


@pytest.fixture(name="events")
def _events() -> EventBus:
    return EventBus(log=False)


@pytest.fixture(name="clock")
def _clock() -> ManualClock:
    return ManualClock()


@pytest.fixture(name="queue", params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def _queue(
    request: pytest.FixtureRequest, clock: ManualClock, events: EventBus
) -> AsyncIterator[DeadLetterQueue]:
    if request.param == "memory":
        yield MemoryDeadLetterQueue(100, clock=clock, events=events)
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    queue = RedisDeadLetterQueue(server.url, stream="test:dlq", clock=clock, events=events)
    yield queue
    await queue.aclose()


def exhausted() -> RetryExhaustedError:
    try:
        try:
            raise UpstreamError("inventory answered 503")
        except UpstreamError as last:
            raise RetryExhaustedError("Gave up", extensions={"attempts": 3}) from last
    except RetryExhaustedError as error:
        return error


async def test_record_keeps_category_context_correlation_and_attempts(
    queue: DeadLetterQueue, clock: ManualClock
) -> None:
    """An entry keeps error code, cause, message, context, correlation ID and attempts."""

    async def record() -> DeadLetter:
        return await queue.record("reserve-stock", exhausted(), context={"sku": "a", "qty": 2})

    letter = await in_request("req-42", record)
    (stored,) = await queue.list()
    assert stored == letter
    assert stored.id
    assert stored.operation == "reserve-stock"
    assert stored.error_code == "retries_exhausted"
    assert stored.cause_code == "upstream_error"
    assert stored.message == "Gave up"
    assert stored.context == {"sku": "a", "qty": 2}
    assert stored.correlation_id == "req-42"
    assert stored.attempts == 3
    assert stored.recorded_at == clock.time()


async def test_list_is_oldest_first_and_limited(queue: DeadLetterQueue, clock: ManualClock) -> None:
    """list(limit) returns the oldest entries first, at most limit of them."""
    for n in range(5):
        clock.advance(1)
        await queue.record("op", UpstreamError(f"e{n}"))
    letters = await queue.list(3)
    assert [letter.message for letter in letters] == ["e0", "e1", "e2"]
    assert await queue.size() == 5


async def test_replay_success_removes_failure_requeues_with_attempts(
    queue: DeadLetterQueue, clock: ManualClock
) -> None:
    """Replay removes entries the handler accepts; a failing one moves to the end, attempts + 1."""
    good = await queue.record("op", UpstreamError("a"), context={"n": 1})
    bad = await queue.record("op", CircuitOpenError(), context={"n": 2})
    clock.advance(10)

    async def handler(letter: DeadLetter) -> None:
        if letter.context["n"] == 2:
            raise httpx.ConnectError("still down")

    report = await queue.replay(handler)
    assert report.succeeded == [good.id]
    (again,) = report.failed
    assert report.requeued_ids == {bad.id: again.id}
    assert again.attempts == bad.attempts + 1
    assert again.error_code == "httpx.ConnectError"
    assert again.last_failed_at == clock.time()
    assert again.recorded_at == bad.recorded_at
    assert [letter.id for letter in await queue.list()] == [again.id]
    assert await queue.get(bad.id) is None


async def test_replay_only_given_ids_with_a_sync_handler(queue: DeadLetterQueue) -> None:
    """replay(handler, ids=[...]) touches only those entries; a sync handler works too."""
    first = await queue.record("op", UpstreamError("a"))
    second = await queue.record("op", UpstreamError("b"))
    seen: list[str] = []
    report = await queue.replay(lambda letter: seen.append(letter.id), ids=[second.id, "0-999"])
    assert seen == [second.id]
    assert report.succeeded == [second.id]
    assert [letter.id for letter in await queue.list()] == [first.id]


async def test_unknown_ids_are_absent_not_errors(queue: DeadLetterQueue) -> None:
    """get/delete of an unknown or malformed id answer None/False."""
    assert await queue.get("1-1") is None
    assert await queue.get("not-an-id") is None
    assert await queue.delete("not-an-id") is False


async def test_decorator_records_final_failure_and_replays_it(queue: DeadLetterQueue) -> None:
    """A call failing for good is recorded with its arguments and re-raised; replay re-runs it."""
    clock = ManualClock()
    healthy = False
    done: list[str] = []

    @dead_letter_on_failure(queue, "reserve")
    @Retry(attempts=2, clock=clock)
    async def reserve(sku: str, *, qty: int) -> str:
        if not healthy:
            raise UpstreamError("down")
        done.append(f"{sku}x{qty}")
        return "ok"

    with pytest.raises(RetryExhaustedError):
        await reserve("a", qty=2)
    (letter,) = await queue.list()
    assert letter.context == {"args": ["a"], "kwargs": {"qty": 2}}
    assert letter.attempts == 2
    healthy = True
    report = await queue.replay(reserve.replay_handler)  # type: ignore[attr-defined]
    assert report.succeeded == [letter.id]
    assert done == ["ax2"]
    assert await queue.size() == 0


async def test_decorator_when_filters_what_is_recorded(queue: DeadLetterQueue) -> None:
    """when= keeps failures it rejects out of the queue (they still propagate)."""

    @dead_letter_on_failure(queue, "op", when=lambda e: not isinstance(e, CircuitOpenError))
    async def op() -> None:
        raise CircuitOpenError()

    with pytest.raises(CircuitOpenError):
        await op()
    assert await queue.size() == 0


async def test_error_category_names_codes_and_types(clock: ManualClock) -> None:
    """AppErrors are categorised by code, others by package and type name."""
    queue = MemoryDeadLetterQueue(100, clock=clock)
    for error in (CircuitOpenError(), httpx.ReadTimeout("t"), ValueError("v")):
        await queue.record("op", error)
    assert [letter.error_code for letter in await queue.list()] == [
        "circuit_open",
        "httpx.ReadTimeout",
        "ValueError",
    ]


async def test_memory_queue_is_bounded_and_says_so_once(
    clock: ManualClock, events: EventBus
) -> None:
    """Beyond max_entries the oldest entry is dropped and dlq.full is published once."""
    seen: list[Event] = []
    events.subscribe(seen.append)
    queue = MemoryDeadLetterQueue(2, clock=clock, events=events)
    for n in range(4):
        await queue.record("op", UpstreamError(f"e{n}"))
    assert [letter.message for letter in await queue.list()] == ["e2", "e3"]
    assert [e.kind for e in seen] == ["dlq.full"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "exactly one of url or client"),
        ({"url": "redis://127.0.0.1:1/0", "maxlen": 0}, "maxlen"),
        ({"url": "redis://127.0.0.1:1/0", "timeout": 0}, "timeout"),
        ({"url": "http://nope"}, "url"),
    ],
)
def test_redis_queue_arguments_are_checked(kwargs: dict[str, Any], match: str) -> None:
    """Bad RedisDeadLetterQueue arguments fail at construction, naming the argument."""
    with pytest.raises(ConfigurationError, match=match):
        RedisDeadLetterQueue(**kwargs)


@pytest.mark.redis
async def test_redis_stream_is_capped_at_maxlen(redis_server: RedisServer) -> None:
    """The stream never holds more than maxlen entries; the oldest go first."""
    queue = RedisDeadLetterQueue(redis_server.url, stream="capped", maxlen=3)
    try:
        for n in range(5):
            await queue.record("op", UpstreamError(f"e{n}"))
        assert [letter.message for letter in await queue.list()] == ["e2", "e3", "e4"]
    finally:
        await queue.aclose()


@pytest.mark.redis
async def test_redis_queue_is_shared_and_replay_is_exclusive(redis_server: RedisServer) -> None:
    """Two instances see one stream; a replay while another holds the lock raises ConflictError."""
    a = RedisDeadLetterQueue(redis_server.url, stream="shared")
    b = RedisDeadLetterQueue(redis_server.url, stream="shared")
    try:
        letter = await a.record("op", UpstreamError("x"), context={"k": "v"})
        assert [x.id for x in await b.list()] == [letter.id]

        async def nested(_: DeadLetter) -> None:
            with pytest.raises(ConflictError):
                await b.replay(lambda _: None)

        report = await a.replay(nested)
        assert report.succeeded == [letter.id]
        assert (await b.replay(lambda _: None)).succeeded == []  # lock released afterwards
    finally:
        await a.aclose()
        await b.aclose()


@pytest.mark.redis
async def test_redis_down_decorator_still_raises_the_original_error(
    redis_server: RedisServer, events: EventBus
) -> None:
    """With Redis killed, the caller sees its own error; dlq.storage_down is published once."""
    seen: list[Event] = []
    events.subscribe(seen.append)
    queue = RedisDeadLetterQueue(redis_server.url, stream="down", events=events, timeout=0.5)

    @dead_letter_on_failure(queue, "op")
    async def op() -> None:
        raise UpstreamError("upstream down")

    try:
        redis_server.kill()
        for _ in range(3):
            with pytest.raises(UpstreamError, match="upstream down"):
                await op()
        assert [e.kind for e in seen] == ["dlq.storage_down"]
        redis_server.start()
        await queue.record("op", UpstreamError("after"))
        assert [e.kind for e in seen] == ["dlq.storage_down", "dlq.storage_recovered"]
    finally:
        await queue.aclose()


async def test_a_failing_context_builder_never_hides_the_callers_error(
    clock: ManualClock, events: EventBus
) -> None:
    """A context builder that raises never hides the caller's error; dlq.record_failed says so."""
    seen: list[Event] = []
    events.subscribe(seen.append)
    queue = MemoryDeadLetterQueue(10, clock=clock, events=events)

    def broken_context(*args: Any, **kwargs: Any) -> dict[str, Any]:
        raise KeyError("oops")

    @dead_letter_on_failure(queue, "op", context=broken_context)
    async def op() -> None:
        raise UpstreamError("real problem")

    with pytest.raises(UpstreamError, match="real problem"):
        await op()
    assert [e.kind for e in seen] == ["dlq.record_failed"]
    assert await queue.size() == 0


def test_entries_written_by_a_newer_version_still_load() -> None:
    """Unknown fields in a stored entry are ignored, so the queue can still be listed."""
    raw = '{"operation":"op","error_code":"x","message":"m","attempts":2,"future_field":1}'
    letter = DeadLetter.from_json("1-1", raw)
    assert (letter.id, letter.operation, letter.attempts) == ("1-1", "op", 2)


async def test_a_key_is_recorded_once(queue: DeadLetterQueue) -> None:
    """A record() of a key the queue holds stores nothing and returns the entry under that key;
    a failed replay keeps the key on the requeued entry."""
    first = await queue.record("payments.capture", UpstreamError("503"), key="capture-7")
    again = await queue.record("payments.capture", UpstreamError("timeout"), key="capture-7")
    assert (again.id, again.key, again.message) == (first.id, "capture-7", "503")
    other = await queue.record("payments.capture", UpstreamError("503"))
    assert other.key not in (None, "capture-7")
    assert await queue.size() == 2

    def fails(letter: DeadLetter) -> None:
        raise UpstreamError("still down")

    report = await queue.replay(fails, ids=[first.id])
    requeued = report.failed[0]
    assert requeued.key == "capture-7"
    once_more = await queue.record("payments.capture", UpstreamError("503"), key="capture-7")
    assert (once_more.id, once_more.attempts) == (requeued.id, requeued.attempts)
    assert await queue.size() == 2


@pytest.mark.redis
async def test_records_that_raised_under_a_stall_are_stored_once_when_retried(
    redis_server: RedisServer,
) -> None:
    """Redis stalled (SIGSTOP): record() cannot confirm and raises, though Redis runs the
    commands it was sent when it resumes (some of the entries were stored). Retrying each
    record() that raised, with its key, leaves every entry in the queue exactly once."""
    queue = RedisDeadLetterQueue(redis_server.url, stream="stalled", timeout=0.2)
    try:
        # Connections opened beforehand carry their command to the stalled server at once.
        await asyncio.gather(*(queue.size() for _ in range(8)))
        redis_server.stall()
        try:
            outcomes = await asyncio.gather(
                *(queue.record("op", UpstreamError(f"n{n}"), key=f"op-{n}") for n in range(48)),
                return_exceptions=True,
            )
        finally:
            redis_server.resume()
        raised = [n for n, outcome in enumerate(outcomes) if isinstance(outcome, Exception)]
        assert len(raised) == 48
        for n in raised:
            await queue.record("op", UpstreamError(f"n{n}"), key=f"op-{n}")
        letters = await queue.list(limit=100)
    finally:
        await queue.aclose()
    assert sorted(letter.key or "" for letter in letters) == sorted(f"op-{n}" for n in range(48))


@pytest.mark.redis
async def test_a_record_without_a_key_that_raised_can_be_retried_with_the_key_it_made(
    redis_server: RedisServer,
) -> None:
    """record() without key= under a stalled Redis raises, with the key it made on the error
    (``dead_letter_key``); Redis runs the command when it resumes, and recording again with
    that key stores nothing more: one entry."""
    queue = RedisDeadLetterQueue(redis_server.url, stream="stalled", timeout=0.2)
    try:
        await queue.size()  # an open connection carries the command to the stalled server
        redis_server.stall()
        try:
            with pytest.raises(TimeoutError) as raised:
                await queue.record("charge", UpstreamError("boom"))
        finally:
            redis_server.resume()
        key = getattr(raised.value, "dead_letter_key", None)
        assert key is not None
        again = await queue.record("charge", UpstreamError("boom"), key=key)
        letters = await queue.list()
    finally:
        await queue.aclose()
    assert [(letter.id, letter.key) for letter in letters] == [(again.id, key)]


@dataclass(frozen=True)
class FrozenStorageError(Exception):
    """A storage's error type that takes no new attributes, as a frozen dataclass."""

    reason: str = "storage down"


class SealedStorageError(Exception):
    """A storage's error type that refuses attributes the way some C types do."""

    def __setattr__(self, name: str, value: object) -> None:
        raise TypeError(f"cannot set {name!r}")


class BrokenStorage(MemoryDeadLetterQueue):
    """A queue whose storage fails with a given error."""

    def __init__(self, failure: Exception) -> None:
        super().__init__(10)
        self.failure = failure

    async def _add(self, letter: DeadLetter) -> DeadLetter:
        raise self.failure


@pytest.mark.parametrize(
    "failure", [FrozenStorageError(), SealedStorageError("down")], ids=["frozen", "sealed"]
)
async def test_a_storage_error_that_takes_no_attributes_is_raised_as_it_is(
    failure: Exception,
) -> None:
    """record() puts the key on the storage's error when it can; an error type that takes no
    attributes is raised unchanged (not an AttributeError or TypeError of the library's),
    and the decorator still reports it and re-raises the caller's own error."""
    queue = BrokenStorage(failure)
    with pytest.raises(type(failure)) as raised:
        await queue.record("charge", UpstreamError("boom"), key="order-1")
    assert raised.value is failure

    @dead_letter_on_failure(queue, "charge")
    async def charge() -> None:
        raise UpstreamError("boom")

    seen: list[Event] = []
    queue.events = EventBus(log=False)
    queue.events.subscribe(seen.append)
    with pytest.raises(UpstreamError, match="boom"):
        await charge()
    assert [event.kind for event in seen] == ["dlq.record_failed"]


async def test_a_key_whose_entry_was_replayed_away_is_recorded_again(
    queue: DeadLetterQueue,
) -> None:
    """Once a key's entry has been replayed away, a new failure of that key is stored: a new
    entry that get() finds, in memory and in Redis alike (Redis dropped it, returning an
    entry that did not exist)."""
    first = await queue.record("charge", UpstreamError("first"), key="order-9")
    assert (await queue.replay(lambda letter: None)).succeeded == [first.id]
    later = await queue.record("charge", UpstreamError("second failure"), key="order-9")
    found = await queue.get(later.id)
    assert found is not None
    assert (found.key, found.message) == ("order-9", "second failure")
    assert await queue.size() == 1


@pytest.mark.parametrize("kind", ["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def test_a_key_whose_entry_was_trimmed_is_recorded_again(
    request: pytest.FixtureRequest, kind: str
) -> None:
    """A queue capped at two entries trims a key's entry; recording the key again stores a
    new entry, listed and found, in memory and in Redis alike."""
    if kind == "memory":
        queue: DeadLetterQueue = MemoryDeadLetterQueue(2)
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        queue = RedisDeadLetterQueue(server.url, stream="capped", maxlen=2)
    try:
        for n in (1, 2, 3):
            await queue.record("charge", UpstreamError(f"boom {n}"), key=f"order-{n}")
        again = await queue.record("charge", UpstreamError("boom again"), key="order-1")
        assert await queue.get(again.id) is not None
        assert [letter.key for letter in await queue.list()] == ["order-3", "order-1"]
    finally:
        if isinstance(queue, RedisDeadLetterQueue):
            await queue.aclose()


async def test_a_decorated_call_that_keeps_failing_is_queued_once(queue: DeadLetterQueue) -> None:
    """dead_letter_on_failure(key=...) keys each entry by the call's arguments: the same call
    failing three times is queued once, another call apart."""

    @dead_letter_on_failure(queue, "capture", key=lambda order_id: f"capture:{order_id}")
    async def capture(order_id: int) -> None:
        raise UpstreamError("payments down")

    for order_id in (7, 7, 7, 8):
        with pytest.raises(UpstreamError):
            await capture(order_id)
    assert sorted(letter.key or "" for letter in await queue.list()) == [
        "capture:7",
        "capture:8",
    ]


@pytest.mark.redis
async def test_entries_stored_without_a_key_are_still_replayed(redis_server: RedisServer) -> None:
    """An entry an older version stored (no key) is listed, replayed and requeued as before."""
    raw = '{"operation":"op","error_code":"x","message":"m","attempts":1}'
    client = redis.asyncio.Redis.from_url(redis_server.url)
    queue = RedisDeadLetterQueue(client=client, stream="old")
    try:
        await client.xadd("old", {"data": raw})
        (letter,) = await queue.list()
        assert letter.key is None

        def fails(letter: DeadLetter) -> None:
            raise UpstreamError("still down")

        (requeued,) = (await queue.replay(fails)).failed
        assert (requeued.key, requeued.attempts, await queue.size()) == (None, 2, 1)
        assert (await queue.replay(lambda _: None)).succeeded == [requeued.id]
    finally:
        await client.aclose()
