"""Regressions found in review of the named policies, provider limits and streaming."""

from __future__ import annotations

import asyncio

import pytest

from fastapi_resilience import Bulkhead, ConfigurationError, ResilienceSettings
from fastapi_resilience.exceptions import StreamCutError
from fastapi_resilience.outbound import SSEParser

pytestmark = pytest.mark.anyio


async def test_a_smaller_bulkhead_lets_no_waiter_in_past_its_new_size() -> None:
    bulkhead = Bulkhead("fix17-shrink", max_concurrent=4, max_waiting=4, registry=None)
    for _ in range(4):
        await bulkhead.acquire()
    waiters = [asyncio.create_task(bulkhead.acquire()) for _ in range(4)]
    await asyncio.sleep(0)
    bulkhead.resize(max_concurrent=1, max_waiting=4)
    for _ in range(4):
        bulkhead.release()
    await asyncio.sleep(0)
    assert bulkhead.active <= 1
    assert sum(task.done() for task in waiters) == 1
    for task in waiters:
        task.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)


@pytest.mark.parametrize("criticality", [["critical"], {"a": 1}])
def test_a_criticality_that_is_not_a_name_is_a_named_configuration_error(
    criticality: object,
) -> None:
    with pytest.raises(ConfigurationError, match="criticality"):
        ResilienceSettings(policies={"inv": {"criticality": criticality}})


def test_a_line_that_never_ends_is_refused_not_held() -> None:
    parser = SSEParser()

    def flood() -> None:
        for _ in range(100):
            parser.feed("data: " + "x" * 65536)

    with pytest.raises(StreamCutError):
        flood()


def test_a_long_line_in_many_pieces_still_parses() -> None:
    parser = SSEParser()
    assert parser.feed("data: ") == []
    for _ in range(1000):
        assert parser.feed("y" * 100) == []
    (event,) = parser.feed("\n\n")
    assert event.data == "y" * 100_000
