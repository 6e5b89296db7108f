"""The SSE parser on the examples of the WHATWG server-sent events section, and on the line
ends, BOM and field rules around them; fed whole and one character at a time."""

from __future__ import annotations

import pytest

from fastapi_resilience.exceptions import StreamCutError
from fastapi_resilience.outbound import ServerSentEvent, SSEParser


def parse(text: str, *, piecewise: bool = False) -> list[ServerSentEvent]:
    parser = SSEParser()
    if not piecewise:
        return parser.feed(text)
    return [event for char in text for event in parser.feed(char)]


@pytest.fixture(params=[False, True], ids=["whole", "by-character"])
def piecewise(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


def test_multi_line_data_is_joined_with_newlines(piecewise: bool) -> None:
    """The stock-ticker example: three data lines make one event."""
    text = "data: YHOO\ndata: +2\ndata: 10\n\n"
    assert parse(text, piecewise=piecewise) == [ServerSentEvent("message", "YHOO\n+2\n10")]


def test_comments_ids_and_one_leading_space(piecewise: bool) -> None:
    """The spec's second example: a comment, an id, an ``id`` without colon that clears it,
    and a value keeping its second space."""
    text = (
        ": test stream\n\n"
        "data: first event\nid: 1\n\n"
        "data:second event\nid\n\n"
        "data:  third event\n\n"
    )
    assert parse(text, piecewise=piecewise) == [
        ServerSentEvent("message", "first event", "1"),
        ServerSentEvent("message", "second event", ""),
        ServerSentEvent("message", " third event", ""),
    ]


def test_fields_without_colon_and_an_unfinished_event(piecewise: bool) -> None:
    """The spec's third example: two events, data "" and "\\n"; the last block has no blank
    line after it and is dropped."""
    text = "data\n\ndata\ndata\n\ndata:"
    assert parse(text, piecewise=piecewise) == [
        ServerSentEvent("message", ""),
        ServerSentEvent("message", "\n"),
    ]


def test_the_space_after_the_colon_is_optional(piecewise: bool) -> None:
    """The spec's fourth example: both blocks are the same event."""
    assert parse("data:test\n\ndata: test\n\n", piecewise=piecewise) == [
        ServerSentEvent("message", "test"),
        ServerSentEvent("message", "test"),
    ]


@pytest.mark.parametrize("end", ["\n", "\r\n", "\r"])
def test_every_line_end(end: str, piecewise: bool) -> None:
    text = f"event: add{end}data: a{end}data: b{end}{end}data: c{end}{end}"
    assert parse(text, piecewise=piecewise) == [
        ServerSentEvent("add", "a\nb"),
        ServerSentEvent("message", "c"),
    ]


def test_a_cr_and_lf_split_across_chunks_are_one_line_end() -> None:
    parser = SSEParser()
    assert parser.feed("data: a\r") == []
    assert parser.feed("\ndata: b\r\n\r\n") == [ServerSentEvent("message", "a\nb")]


def test_a_leading_bom_is_dropped_once() -> None:
    parser = SSEParser()
    events = parser.feed_bytes("\ufeffdata: x\n\n".encode()) + parser.feed_bytes(
        "\ufeffdata: y\n\n".encode()
    )
    # The first BOM goes; a later one is part of a field name nobody knows.
    assert events == [ServerSentEvent("message", "x")]


def test_utf8_split_between_chunks() -> None:
    parser = SSEParser()
    encoded = "data: héllo\n\n".encode()
    split = encoded.index(b"\xa9")  # inside the two bytes of "é"
    assert parser.feed_bytes(encoded[:split]) == []
    assert parser.feed_bytes(encoded[split:]) == [ServerSentEvent("message", "héllo")]


def test_retry_only_digits_and_events_without_data_are_not_dispatched() -> None:
    parser = SSEParser()
    assert parser.feed("retry: 1500\n\n") == []
    assert parser.retry == 1500
    assert parser.feed("retry: 2s\nretry: -1\nretry:\ndata: a\n\n") == [
        ServerSentEvent("message", "a")
    ]
    assert parser.retry == 1500
    assert parser.feed("retry: 300\ndata: b\n\n") == [ServerSentEvent("message", "b", "", 300)]


def test_ids_carry_over_and_an_id_with_null_is_ignored() -> None:
    parser = SSEParser()
    events = parser.feed("id: 7\ndata: a\n\ndata: b\n\nid: 8\0\ndata: c\n\n")
    assert [e.id for e in events] == ["7", "7", "7"]
    assert parser.last_event_id == "7"


def test_unknown_fields_and_a_lone_event_name_dispatch_nothing() -> None:
    assert parse("foo: bar\nevent: ping\n\n: keep-alive\n\n") == []


def test_restart_keeps_the_last_id_and_drops_the_unfinished_event() -> None:
    parser = SSEParser()
    assert parser.feed("id: 4\ndata: done\n\ndata: half") == [
        ServerSentEvent("message", "done", "4")
    ]
    parser.restart()
    assert parser.feed("data: next\n\n") == [ServerSentEvent("message", "next", "4")]


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
