from __future__ import annotations

import gc
import logging
import tracemalloc
from collections.abc import Callable
from typing import Any

import pytest

from fastapi_resilience.events import Event, EventBus
from fastapi_resilience.operations import ErrorAnalytics
from fastapi_resilience.testing import ManualClock

#: ManualClock's wall time minus its monotonic time.
WALL = 1_700_000_000.0 - 1_000.0


def make(**kwargs: Any) -> tuple[ErrorAnalytics, ManualClock, list[Event]]:
    clock = ManualClock()
    bus = EventBus(log=False)
    events: list[Event] = []
    bus.subscribe(events.append)
    return ErrorAnalytics(clock=clock, events=bus, **kwargs), clock, events


def kinds(events: list[Event]) -> list[str]:
    return [e.kind for e in events]


def steady(analytics: ErrorAnalytics, clock: ManualClock, *, every: float, seconds: float) -> None:
    """One error every ``every`` seconds for ``seconds``."""
    for _ in range(round(seconds / every)):
        analytics.record("internal_error", 500, route="/orders", correlation_id=None)
        clock.advance(every)


# -- counting ------------------------------------------------------------------------------


def test_counts_per_code_and_route_in_the_window_sorted_by_count() -> None:
    analytics, clock, _ = make(window_seconds=60, bucket_seconds=10, spike_fast_seconds=10)
    for _ in range(3):
        analytics.record("not_found", 404, route="/orders/{id}", correlation_id=None)
    analytics.record("not_found", 404, route="/users/{id}", correlation_id=None)
    clock.advance(25)
    analytics.record("upstream_error", 502, route="/orders/{id}", correlation_id=None)
    analytics.record(
        "circuit_open", 503, route="inventory", correlation_id=None, direction="outbound"
    )

    snap = analytics.snapshot()
    assert snap["window_seconds"] == 60
    assert snap["bucket_seconds"] == 10
    assert snap["total"] == 6
    assert [(c["code"], c["status"], c["count"]) for c in snap["codes"]] == [
        ("not_found", 404, 4),
        ("circuit_open", 503, 1),
        ("upstream_error", 502, 1),
    ]
    # Six buckets, oldest first: the 404s two buckets and a half before the others.
    assert [c["trend"] for c in snap["codes"]] == [
        [0, 0, 0, 4, 0, 0],
        [0, 0, 0, 0, 0, 1],
        [0, 0, 0, 0, 0, 1],
    ]
    assert snap["routes"] == [
        {"code": "not_found", "route": "/orders/{id}", "direction": "inbound", "count": 3},
        {"code": "circuit_open", "route": "inventory", "direction": "outbound", "count": 1},
        {"code": "not_found", "route": "/users/{id}", "direction": "inbound", "count": 1},
        {"code": "upstream_error", "route": "/orders/{id}", "direction": "inbound", "count": 1},
    ]


def test_counts_fall_out_bucket_by_bucket_once_the_window_passes() -> None:
    analytics, clock, _ = make()  # 300 s of 10 s buckets
    assert len(analytics.snapshot()["codes"]) == 0
    analytics.record("not_found", 404, route="/a", correlation_id=None)
    clock.advance(100)
    analytics.record("not_found", 404, route="/a", correlation_id=None)
    snap = analytics.snapshot()
    assert snap["total"] == 2
    (code,) = snap["codes"]
    assert len(code["trend"]) == 30
    assert sum(code["trend"]) == 2
    assert code["trend"][-1] == 1
    assert code["trend"][-11] == 1

    clock.advance(199.9)  # the first error's bucket is still the oldest of the window
    assert analytics.snapshot()["total"] == 2
    clock.advance(0.1)  # now it is out
    snap = analytics.snapshot()
    assert snap["total"] == 1
    assert snap["codes"][0]["count"] == 1
    assert snap["routes"][0]["count"] == 1
    clock.advance(100)
    snap = analytics.snapshot()
    assert snap["total"] == 0
    assert snap["codes"] == []
    assert snap["routes"] == []


def test_a_recount_after_a_long_silence_starts_from_zero() -> None:
    """A tally written again after more than a window keeps none of its old counts."""
    analytics, clock, _ = make(window_seconds=30, bucket_seconds=10, spike_fast_seconds=10)
    for _ in range(5):
        analytics.record("conflict", 409, route="/a", correlation_id=None)
    clock.advance(1_000)
    analytics.record("conflict", 409, route="/a", correlation_id=None)
    clock.advance(10)
    analytics.record("conflict", 409, route="/a", correlation_id=None)
    snap = analytics.snapshot()
    assert snap["total"] == 2
    assert snap["codes"][0]["trend"] == [0, 1, 1]


def test_the_status_shown_for_a_code_is_the_last_seen() -> None:
    analytics, _, _ = make()
    analytics.record("upstream_error", 502, route="/a", correlation_id=None)
    analytics.record("upstream_error", 504, route="/b", correlation_id=None)
    assert analytics.snapshot()["codes"][0]["status"] == 504


# -- the spike detector --------------------------------------------------------------------


def test_a_burst_starts_one_spike_and_ends_it_once() -> None:
    """1 error per 10 s for 10 minutes, then 50 in 20 s, then calm again."""
    analytics, clock, events = make()
    steady(analytics, clock, every=10, seconds=600)
    assert not analytics.spiking
    assert events == []

    steady(analytics, clock, every=0.4, seconds=20)
    assert analytics.spiking
    assert kinds(events) == ["errors.spike_started"]
    started = events[0]
    assert started.name == "errors"
    assert started.level == logging.WARNING
    assert set(started.attributes) == {"rate", "baseline", "count"}
    assert started.attributes["rate"] >= 3 * started.attributes["baseline"]
    assert started.attributes["count"] >= 10
    snap = analytics.snapshot()
    # Found when the burst's first bucket closed, 610 s in.
    assert snap["spike"]["active"]
    assert snap["spike"]["since"] == WALL + 1_000 + 610
    assert snap["spike"]["rate"] > snap["spike"]["baseline"] > 0

    steady(analytics, clock, every=10, seconds=300)
    assert not analytics.spiking
    assert kinds(events) == ["errors.spike_started", "errors.spike_ended"]
    assert events[1].name == "errors"
    assert events[1].level == logging.INFO
    snap = analytics.snapshot()
    assert snap["spike"] == {
        "active": False,
        "rate": snap["spike"]["rate"],
        "baseline": snap["spike"]["baseline"],
        "since": None,
    }
    (spike,) = snap["spikes"]
    assert spike["started"] == WALL + 1_000 + 610
    # The burst ended 620 s in; three buckets later the last 30 s held 3 errors (< 10 / 2).
    assert spike["ended"] == WALL + 1_000 + 650
    assert spike["peak_rate"] >= started.attributes["rate"]


def test_a_steady_rate_never_spikes_even_a_high_one() -> None:
    """5 errors/s for 30 minutes: the baseline is that rate from the first bucket on."""
    analytics, clock, events = make()
    seen_spiking = False
    for _ in range(30 * 60):
        steady(analytics, clock, every=0.2, seconds=1)
        seen_spiking |= analytics.spiking
    assert events == []
    assert not seen_spiking
    snap = analytics.snapshot()
    assert snap["spikes"] == []
    assert snap["spike"]["rate"] == pytest.approx(5, rel=0.01)
    assert snap["spike"]["baseline"] == pytest.approx(5, rel=0.01)


def test_a_level_that_lasts_becomes_the_baseline() -> None:
    """After three hours of 1 error per 10 s, a tenfold step that stays: one spike, which
    ends by itself about half an hour later, as the baseline catches up."""
    analytics, clock, events = make()
    steady(analytics, clock, every=10, seconds=3 * 3600)
    steady(analytics, clock, every=1, seconds=3600)
    assert kinds(events) == ["errors.spike_started", "errors.spike_ended"]
    (spike,) = analytics.snapshot()["spikes"]
    assert 25 * 60 <= spike["ended"] - spike["started"] <= 35 * 60


def test_a_few_errors_after_a_long_silence_are_not_a_spike() -> None:
    """Under spike_min_errors (10) in the last 30 s, however far above the baseline."""
    analytics, clock, events = make()
    clock.advance(3_600)
    for _ in range(3):
        analytics.record("internal_error", 500, route="/a", correlation_id=None)
    clock.advance(60)
    for _ in range(9):
        analytics.record("internal_error", 500, route="/a", correlation_id=None)
    clock.advance(600)
    assert not analytics.spiking
    assert events == []
    assert analytics.snapshot()["spikes"] == []


def test_the_minimum_volume_is_reached_at_spike_min_errors() -> None:
    """Ten errors after silence are a spike; it ends when the clock is next read, at the time
    the quiet buckets closed rather than the time it was noticed."""
    analytics, clock, events = make()
    clock.advance(3_600)
    for _ in range(10):
        analytics.record("internal_error", 500, route="/a", correlation_id=None)
    clock.advance(10)
    assert analytics.spiking
    clock.advance(3_000)
    assert not analytics.spiking
    assert kinds(events) == ["errors.spike_started", "errors.spike_ended"]
    (spike,) = analytics.snapshot()["spikes"]
    assert spike["started"] == WALL + 1_000 + 3_610
    # Three buckets later the last 30 s hold no error: under half the minimum.
    assert spike["ended"] == WALL + 1_000 + 3_640


def test_spikes_history_is_bounded_newest_first() -> None:
    analytics, clock, events = make(spike_history=2)
    for _ in range(3):
        clock.advance(3_600)
        for _ in range(20):
            analytics.record("internal_error", 500, route="/a", correlation_id=None)
    clock.advance(3_600)
    assert not analytics.spiking
    assert kinds(events) == ["errors.spike_started", "errors.spike_ended"] * 3
    spikes = analytics.snapshot()["spikes"]
    assert len(spikes) == 2
    assert spikes[0]["started"] > spikes[1]["started"]
    assert all(s["ended"] is not None for s in spikes)


# -- the problems of one correlation ID ----------------------------------------------------


def test_problems_of_an_id_inbound_and_outbound_oldest_first() -> None:
    analytics, clock, _ = make()
    analytics.record(
        "upstream_timeout", 504, route="inventory", correlation_id="req-1", direction="outbound"
    )
    clock.advance(0.5)
    analytics.record(
        "circuit_open", 503, route="inventory", correlation_id="req-2", direction="outbound"
    )
    analytics.record("upstream_error", 502, route="/orders/{id}", correlation_id="req-1")
    analytics.record("not_found", 404, route="/users/{id}", correlation_id=None)

    assert analytics.problems_of("req-1") == [
        {
            "code": "upstream_timeout",
            "status": 504,
            "route": "inventory",
            "direction": "outbound",
            "at": WALL + 1_000,
        },
        {
            "code": "upstream_error",
            "status": 502,
            "route": "/orders/{id}",
            "direction": "inbound",
            "at": WALL + 1_000.5,
        },
    ]
    assert [p["code"] for p in analytics.problems_of("req-2")] == ["circuit_open"]
    assert analytics.problems_of("never-seen") == []
    # Newest (most recently active) first.
    recent = analytics.snapshot()["recent"]
    assert [r["correlation_id"] for r in recent] == ["req-1", "req-2"]
    assert recent[0]["problems"] == analytics.problems_of("req-1")


def test_evicted_ids_are_forgotten_and_each_id_keeps_its_latest_problems() -> None:
    analytics, _, _ = make(recent_ids=3, problems_per_id=2)
    for i in range(5):
        analytics.record(f"code_{i}", 500, route="/a", correlation_id="busy")
    for i in range(4):
        analytics.record("not_found", 404, route="/a", correlation_id=f"id-{i}")
    assert analytics.problems_of("busy") == []
    assert analytics.problems_of("id-0") == []
    assert [r["correlation_id"] for r in analytics.snapshot()["recent"]] == ["id-3", "id-2", "id-1"]

    analytics, _, _ = make(recent_ids=3, problems_per_id=2)
    for i in range(5):
        analytics.record(f"code_{i}", 500, route="/a", correlation_id="busy")
    assert [p["code"] for p in analytics.problems_of("busy")] == ["code_3", "code_4"]


def test_recent_ids_zero_keeps_no_id() -> None:
    analytics, _, _ = make(recent_ids=0)
    analytics.record("not_found", 404, route="/a", correlation_id="x")
    assert analytics.problems_of("x") == []
    assert analytics.snapshot()["recent"] == []
    assert analytics.snapshot()["total"] == 1


# -- bounds --------------------------------------------------------------------------------


def retained(fill: Callable[[], ErrorAnalytics]) -> tuple[ErrorAnalytics, int]:
    """What ``fill``'s analytics keeps, in bytes, once its garbage is gone."""
    gc.collect()
    tracing = tracemalloc.is_tracing()
    if not tracing:
        tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        analytics = fill()
        gc.collect()
        return analytics, tracemalloc.get_traced_memory()[0] - before
    finally:
        if not tracing:
            tracemalloc.stop()


def test_100k_distinct_routes_and_ids_stay_within_the_bounds() -> None:
    """Routes of 300 characters, each new, and a new correlation ID per record: the lists stay
    bounded, the total stays exact, and what is kept is under 512 KiB (about 225 KB measured
    on CPython 3.11)."""
    clock = ManualClock()

    def fill() -> ErrorAnalytics:
        analytics = ErrorAnalytics(clock=clock, events=EventBus(log=False))
        for i in range(100_000):
            analytics.record(
                "internal_error",
                500,
                route=f"/items/{i:06d}/" + "x" * 300,
                correlation_id=f"{i:032x}",
            )
        return analytics

    analytics, used = retained(fill)
    snap = analytics.snapshot()
    assert snap["total"] == 100_000
    assert sum(r["count"] for r in snap["routes"]) == 100_000
    assert snap["codes"][0]["count"] == 100_000
    # 200 routes one by one, the rest under "(other)".
    assert len(snap["routes"]) == 201
    assert snap["routes"][0] == {
        "code": "internal_error",
        "route": "(other)",
        "direction": "inbound",
        "count": 100_000 - 200,
    }
    assert all(len(r["route"]) <= 200 for r in snap["routes"])
    assert len(snap["recent"]) == 100
    assert snap["recent"][0]["correlation_id"] == f"{99_999:032x}"
    assert analytics.problems_of(f"{0:032x}") == []
    print(f"retained after 100k distinct records: {used} bytes")
    assert used < 512 * 1024, used


def bound(
    *, max_keys: int, buckets: int, recent_ids: int, problems_per_id: int, spike_history: int
) -> int:
    """The memory bound of ErrorAnalytics' docstring."""
    return (
        (2 * max_keys + 2) * (40 * buckets + 600)
        + recent_ids * (400 + 560 * problems_per_id)
        + 40 * buckets
        + 250 * spike_history
        + 4096
    )


def test_the_stated_memory_bound_is_about_1_9_mb_with_the_defaults() -> None:
    defaults = {"max_keys": 200, "recent_ids": 100, "problems_per_id": 20, "spike_history": 10}
    assert 1_850_000 < bound(buckets=30, **defaults) < 1_950_000


def test_the_stated_memory_bound_holds_in_the_worst_case() -> None:
    """Every key new and of the longest length, codes too (so "(other)" tallies fill up),
    counts over 256 in every bucket (an int object each), every ID and route of the longest
    length with a full list of problems: under the docstring's formula."""
    clock = ManualClock()
    settings = {"max_keys": 20, "recent_ids": 50, "problems_per_id": 5, "spike_history": 10}

    def fill() -> ErrorAnalytics:
        analytics = ErrorAnalytics(
            window_seconds=60,
            bucket_seconds=10,
            spike_fast_seconds=10,
            clock=clock,
            events=EventBus(log=False),
            **settings,
        )
        # 22 codes in 2 directions: 20 keys by name, 20 "(other)" tallies, 2 catch-alls.
        keys = [(f"c{k:03d}".ljust(90, "q"), f"/r/{k:04d}".ljust(300, "z")) for k in range(22)]
        for _ in range(6):
            for _ in range(257):
                for code, route in keys:
                    for direction in ("inbound", "outbound"):
                        analytics.record(
                            code, int("599"), route=route, correlation_id=None, direction=direction
                        )
            clock.advance(10)
        for i in range(50 * 5):
            analytics.record(
                f"x{i:05d}".ljust(90, "q"),
                int("599"),
                route=f"/p/{i:05d}".ljust(300, "z"),
                correlation_id=f"{i % 50:04d}".ljust(200, "i"),
            )
        return analytics

    analytics, used = retained(fill)
    snap = analytics.snapshot()
    assert len(snap["routes"]) == 2 * 20 + 2
    assert len(snap["recent"]) == 50
    assert all(len(r["problems"]) == 5 for r in snap["recent"])
    assert all(len(c["code"]) <= 64 for c in snap["codes"])
    assert all(len(r["correlation_id"]) <= 128 for r in snap["recent"])
    print(f"retained in the worst case: {used} of {bound(buckets=6, **settings)} bytes")
    assert used < bound(buckets=6, **settings), (used, bound(buckets=6, **settings))


def test_past_max_keys_new_routes_count_under_other_for_their_code() -> None:
    analytics, _, _ = make(max_keys=2)
    analytics.record("not_found", 404, route="/a", correlation_id=None)
    analytics.record("not_found", 404, route="/b", correlation_id=None)
    analytics.record("not_found", 404, route="/c", correlation_id=None)
    analytics.record("conflict", 409, route="/d", correlation_id=None)
    analytics.record("gone", 410, route="/e", correlation_id=None)  # a third new code
    analytics.record("teapot", 418, route="/f", correlation_id=None)
    snap = analytics.snapshot()
    assert snap["total"] == 6
    assert {(r["code"], r["route"], r["count"]) for r in snap["routes"]} == {
        ("not_found", "/a", 1),
        ("not_found", "/b", 1),
        ("not_found", "(other)", 1),
        ("conflict", "(other)", 1),
        ("(other)", "(other)", 2),
    }
    assert sum(c["count"] for c in snap["codes"]) == 6


def test_keys_idle_for_a_window_give_their_place_to_new_ones() -> None:
    """After a scan of random paths has left the window, real routes are counted by name."""
    analytics, clock, _ = make(max_keys=3)
    for i in range(10):
        analytics.record("not_found", 404, route=f"/scan/{i}", correlation_id=None)
    clock.advance(300)
    analytics.record("conflict", 409, route="/orders", correlation_id=None)
    assert analytics.snapshot()["routes"] == [
        {"code": "conflict", "route": "/orders", "direction": "inbound", "count": 1}
    ]


def test_record_never_raises_on_bad_input() -> None:
    class Unprintable:
        def __str__(self) -> str:
            raise RuntimeError("no")

    analytics, _, _ = make()
    analytics.record(None, "teapot", route=Unprintable(), correlation_id=123)  # type: ignore[arg-type]
    analytics.record("x" * 1_000, 500, route="/" * 1_000, correlation_id="i" * 1_000)
    analytics.record("ok", 500, route="/a", correlation_id=None, direction="sideways")  # type: ignore[arg-type]
    snap = analytics.snapshot()
    assert snap["total"] == 3
    assert {(r["code"], r["route"], r["direction"]) for r in snap["routes"]} == {
        ("None", "(unprintable)", "inbound"),
        ("x" * 64, "/" * 200, "inbound"),
        ("ok", "/a", "inbound"),
    }
    assert analytics.problems_of("123")[0]["status"] == 0
    assert len(analytics.problems_of("i" * 128)) == 1


# -- configuration -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"window_seconds": 0}, "window_seconds"),
        ({"window_seconds": float("nan")}, "window_seconds"),
        ({"window_seconds": "300"}, "window_seconds"),
        ({"bucket_seconds": -1}, "bucket_seconds"),
        ({"window_seconds": 300, "bucket_seconds": 7}, "window_seconds"),
        ({"window_seconds": 5, "bucket_seconds": 10}, "window_seconds"),
        ({"window_seconds": 86_400, "bucket_seconds": 1}, "window_seconds"),
        ({"max_keys": 0}, "max_keys"),
        ({"max_keys": 2.5}, "max_keys"),
        ({"recent_ids": -1}, "recent_ids"),
        ({"problems_per_id": 0}, "problems_per_id"),
        ({"spike_ratio": 1}, "spike_ratio"),
        ({"spike_end_ratio": 4}, "spike_end_ratio"),
        ({"spike_end_ratio": 0}, "spike_end_ratio"),
        ({"spike_min_errors": 0}, "spike_min_errors"),
        ({"spike_fast_seconds": 5}, "spike_fast_seconds"),
        ({"spike_fast_seconds": 600}, "spike_fast_seconds"),
        ({"spike_slow_seconds": 30}, "spike_slow_seconds"),
        ({"spike_history": 0}, "spike_history"),
        ({"spike_history": True}, "spike_history"),
    ],
)
def test_invalid_arguments_raise_value_error_naming_them(
    kwargs: dict[str, Any], named: str
) -> None:
    with pytest.raises(ValueError, match=named):
        ErrorAnalytics(**kwargs)


def test_defaults() -> None:
    analytics = ErrorAnalytics()
    assert (analytics.window_seconds, analytics.bucket_seconds, analytics.buckets) == (300, 10, 30)
    assert (analytics.max_keys, analytics.recent_ids, analytics.problems_per_id) == (200, 100, 20)
    assert (analytics.spike_ratio, analytics.spike_end_ratio, analytics.spike_min_errors) == (
        3,
        1.5,
        10,
    )
    assert (analytics.spike_fast_seconds, analytics.spike_slow_seconds) == (30, 1800)
    assert not analytics.spiking
