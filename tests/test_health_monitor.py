from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from fastapi_resilience import ResilienceSettings, install
from fastapi_resilience.events import Event, EventBus
from fastapi_resilience.health import HealthChecks, HealthMonitor
from fastapi_resilience.testing import ManualClock

pytestmark = pytest.mark.anyio


# --- a clock that holds a background loop until the test moves time ----------------------------


class SteppedClock(ManualClock):
    """A :class:`ManualClock` whose ``sleep`` waits until ``advance()`` reaches its end.

    ``ManualClock.sleep`` moves time forward by itself and returns after one turn of the event
    loop: right for code that backs off once, but a background loop sleeping on it would run
    round after round, time racing ahead, whenever the test awaits anything. Here time moves
    only when the test says so, and a sleeper wakes when time passes its deadline.
    """

    def __init__(self) -> None:
        super().__init__()
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        sleeper = (self.monotonic() + seconds, asyncio.get_running_loop().create_future())
        self._sleepers.append(sleeper)
        try:
            await sleeper[1]
        finally:
            self._sleepers.remove(sleeper)

    def advance(self, seconds: float) -> None:
        super().advance(seconds)
        for deadline, waiter in self._sleepers:
            if deadline <= self.monotonic() + 1e-9 and not waiter.done():
                waiter.set_result(None)

    def next_wake(self) -> float | None:
        """The earliest deadline of a sleeper still waiting."""
        return min((d for d, w in self._sleepers if not w.done()), default=None)


async def settle(clock: SteppedClock) -> None:
    """Let the monitor work until it sleeps on ``clock`` again (real time: 5 s at most, so a
    recovery action that hangs until its timeout is waited for)."""
    give_up = time.monotonic() + 5
    while clock.next_wake() is None:
        assert time.monotonic() < give_up, "the monitor did not go back to sleep"
        await asyncio.sleep(0)


async def run_for(clock: SteppedClock, seconds: float) -> None:
    """Move time on by ``seconds``, waking each sleeper at its own deadline on the way."""
    end = clock.monotonic() + seconds
    await settle(clock)
    while (wake := clock.next_wake()) is not None and wake <= end + 1e-9:
        clock.advance(max(0.0, wake - clock.monotonic()))
        await settle(clock)
    clock.advance(max(0.0, end - clock.monotonic()))
    await settle(clock)


# --- an app and checks ----------------------------------------------------------------------


class Dependency:
    """A check that counts its runs and fails while ``healthy`` is off; its ``reconnect``
    recovery action heals it when ``fixable`` is on."""

    def __init__(self) -> None:
        self.healthy = True
        self.fixable = False
        self.runs = 0
        self.reconnects = 0

    async def check(self) -> bool:
        self.runs += 1
        return self.healthy

    async def reconnect(self) -> None:
        self.reconnects += 1
        if self.fixable:
            self.healthy = True


def _app(clock: SteppedClock) -> tuple[FastAPI, HealthChecks, EventBus, list[Event]]:
    app = FastAPI()
    resilience = install(app, ResilienceSettings(), clock=clock)
    seen: list[Event] = []
    resilience.events.subscribe(
        lambda event: seen.append(event) if event.kind.startswith("health.") else None
    )
    return app, resilience.health, resilience.events, seen


@asynccontextmanager
async def _client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        yield client


@asynccontextmanager
async def _running(monitor: HealthMonitor, clock: SteppedClock) -> AsyncIterator[HealthMonitor]:
    monitor.start()
    try:
        await settle(clock)
        yield monitor
    finally:
        await monitor.stop()


def _kinds(events: list[Event]) -> list[tuple[str, str]]:
    return [(e.kind, e.name) for e in events]


def _monitor_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name() == "fastapi_resilience.health_monitor"]


# --- background rounds and readiness ---------------------------------------------------------


async def test_checks_run_each_interval_and_ready_serves_the_latest_result() -> None:
    """The monitor runs a check at start and then every ``interval``; however often
    ``/health/ready`` is called meanwhile, it answers the latest result (with ``checked_at``)
    and never runs the check. Before start and after stop, readiness runs it as before."""
    clock = SteppedClock()
    app, health, bus, _ = _app(clock)
    database = Dependency()
    health.add("database", database.check)
    monitor = HealthMonitor(health, interval=10, clock=clock, events=bus)
    async with _client(app) as client:
        assert (await client.get("/health/ready")).json()["checks"]["database"]["status"] == "ok"
        assert database.runs == 1  # no monitor yet: run on demand
        clock.advance(5)

        async with _running(monitor, clock):
            assert database.runs == 2  # the first round, at once
            first_round_at = clock.time()
            answers = [await client.get("/health/ready") for _ in range(50)]
            assert database.runs == 2
            entry = answers[-1].json()["checks"]["database"]
            assert entry["status"] == "ok"
            assert entry["checked_at"] == first_round_at
            assert "recovery" not in entry
            assert "root_cause" not in entry

            await run_for(clock, 9.5)
            assert database.runs == 2
            await run_for(clock, 0.5)
            assert database.runs == 3
            await run_for(clock, 30)
            assert database.runs == 6

            database.healthy = False
            await run_for(clock, 10)
            failing = [await client.get("/health/ready") for _ in range(20)]
            assert database.runs == 7
            assert {r.status_code for r in failing} == {503}
            assert failing[0].json()["status"] == "unhealthy"
            assert failing[0].json()["checks"]["database"]["checked_at"] == clock.time()
            assert failing[0].json()["checks"]["database"]["status"] == "unhealthy"

        assert not monitor.running
        assert _monitor_tasks() == []
        database.healthy = True
        clock.advance(5)  # past the on-demand cache period
        after = await client.get("/health/ready")
        assert after.status_code == 200
        assert database.runs == 8  # stopped: on demand again


async def test_a_forgotten_check_is_run_on_demand_until_the_next_round() -> None:
    """``forget(name)`` (what ``install()`` does when the rate-limit storage goes down) drops
    the monitor's result too: readiness runs the check itself until the monitor runs it again."""
    clock = SteppedClock()
    health = HealthChecks(clock=clock)
    storage = Dependency()
    health.add("storage", storage.check, critical=False)
    monitor = HealthMonitor(health, interval=10, clock=clock, events=EventBus(log=False))
    async with _running(monitor, clock):
        assert storage.runs == 1
        assert (await health.run())[0] == "ok"
        assert storage.runs == 1
        storage.healthy = False
        health.forget("storage")
        assert (await health.run())[0] == "degraded"
        assert storage.runs == 2
        await run_for(clock, 10)
        assert storage.runs == 3
        assert (await health.run())[0] == "degraded"
        assert storage.runs == 3

        # Forgotten while the monitor's run waits for its answer: what that run found is not
        # served (it may be out of date), so readiness runs the check itself.
        answer = asyncio.Event()

        async def slow_storage() -> bool:
            storage.runs += 1
            await answer.wait()
            return storage.healthy

        health.add("storage", slow_storage, critical=False)
        clock.advance(10)  # the monitor's next round starts, and waits for the storage
        for _ in range(10):
            await asyncio.sleep(0)
        assert storage.runs == 4
        health.forget("storage")
        storage.healthy = True
        answer.set()
        await settle(clock)
        assert (await health.run())[0] == "ok"
        assert storage.runs == 5

        health.remove("storage")
        await run_for(clock, 10)
        assert monitor.snapshot() == {}


# --- recovery and backoff --------------------------------------------------------------------


async def test_recovery_backs_off_exponentially_then_heals_and_resets() -> None:
    """A failing check's recovery action runs at once, then the check again; while it still
    fails the next attempt waits 1, 2, 4, 8, 8... seconds (between the rounds: the interval is
    1,000 s). An attempt that heals it is verified and reported ``recovered``; readiness is ok
    again, and the next outage starts again from a 1 s wait."""
    clock = SteppedClock()
    app, health, bus, events = _app(clock)
    database = Dependency()
    database.healthy = False
    health.add("database", database.check, recover=[database.reconnect])
    monitor = HealthMonitor(
        health,
        interval=1000,
        recovery_backoff=1,
        recovery_backoff_max=8,
        clock=clock,
        events=bus,
    )
    async with _client(app) as client, _running(monitor, clock):
        # The round: the check fails, the action runs, the check runs again and still fails.
        assert (database.runs, database.reconnects) == (2, 1)
        waits = []
        for _ in range(6):
            recovery = monitor.snapshot()["database"]["recovery"]
            waits.append(recovery["next_attempt_in"])
            attempts = recovery["attempts"]
            await run_for(clock, waits[-1] - 0.25)
            assert monitor.snapshot()["database"]["recovery"]["attempts"] == attempts
            await run_for(clock, 0.25)
            assert monitor.snapshot()["database"]["recovery"]["attempts"] == attempts + 1
        assert waits == [1, 2, 4, 8, 8, 8]
        assert (database.runs, database.reconnects) == (8, 7)

        ready = await client.get("/health/ready")
        assert ready.status_code == 503
        assert ready.json()["checks"]["database"]["recovery"] == {
            "attempts": 7,
            "last_outcome": "failed",
            "next_attempt_in": 8.0,
        }
        clock_before = clock.monotonic()
        await run_for(clock, 3)
        assert (await client.get("/health/ready")).json()["checks"]["database"]["recovery"][
            "next_attempt_in"
        ] == 5.0
        assert clock.monotonic() - clock_before == 3

        database.fixable = True
        await run_for(clock, 5)
        assert database.healthy
        ready = await client.get("/health/ready")
        assert (ready.status_code, ready.json()["status"]) == (200, "ok")
        entry = ready.json()["checks"]["database"]
        assert entry["status"] == "ok"
        assert entry["recovery"] == {
            "attempts": 8,
            "last_outcome": "recovered",
            "next_attempt_in": None,
        }
        snapshot = monitor.snapshot()["database"]
        assert snapshot["consecutive_failures"] == 0
        assert snapshot["recoveries"] == {"recovered": 1, "failed": 7, "error": 0}
        attempted = [e for e in events if e.kind == "health.recovery_attempted"]
        assert [e.attributes["outcome"] for e in attempted] == ["failed"] * 7 + ["recovered"]
        assert [e.attributes["attempt"] for e in attempted] == list(range(1, 9))
        assert _kinds(events).count(("health.check_failed", "database")) == 1
        assert _kinds(events)[-1] == ("health.check_recovered", "database")
        assert events[-1].attributes["recovery_attempts"] == 8

        # A new outage: no attempt before the next round, then one at once and a 1 s wait.
        database.healthy, database.fixable = False, False
        reconnects = database.reconnects
        next_round = clock.next_wake()
        assert next_round is not None
        await run_for(clock, next_round - clock.monotonic())
        assert database.reconnects == reconnects + 1
        recovery = monitor.snapshot()["database"]["recovery"]
        assert recovery == {
            "attempts": 1,
            "last_outcome": "failed",
            "next_attempt_in": 1.0,
            "last_error": None,
        }
        assert _kinds(events).count(("health.check_failed", "database")) == 2


async def test_a_check_passing_again_by_itself_ends_its_backoff() -> None:
    """A check that passes at a round while waiting for its next attempt is recovered: no
    attempt is made any more, and the report says the last attempt failed with none to come."""
    clock = SteppedClock()
    health = HealthChecks(clock=clock)
    database = Dependency()
    database.healthy = False
    health.add("database", database.check, recover=[database.reconnect])
    events = EventBus(log=False)
    seen: list[Event] = []
    events.subscribe(seen.append)
    monitor = HealthMonitor(
        health, interval=5, recovery_backoff=4, recovery_backoff_max=60, clock=clock, events=events
    )
    async with _running(monitor, clock):
        await run_for(clock, 4)  # attempt 2 at +4, next at +12
        assert database.reconnects == 2
        database.healthy = True
        await run_for(clock, 1)  # the round at +5 finds it passing
        await run_for(clock, 60)
        assert database.reconnects == 2
        status, checks = await health.run()
    assert status == "ok"
    assert checks["database"]["recovery"] == {
        "attempts": 2,
        "last_outcome": "failed",
        "next_attempt_in": None,
    }
    assert [e.kind for e in seen][-1] == "health.check_recovered"


# --- dependencies and root cause -------------------------------------------------------------


async def test_a_dependency_down_is_reported_once_at_its_root() -> None:
    """``api`` depends on ``database`` and ``search`` on ``api``. With the database down,
    neither is run: both are reported failing with ``root_cause: "database"``, and one
    ``health.check_failed`` is published, for the database. Once it is back, they run again
    and only the database is reported recovered."""
    clock = SteppedClock()
    app, health, bus, events = _app(clock)
    database, api, search, cache = Dependency(), Dependency(), Dependency(), Dependency()
    health.add("search", search.check, depends_on=["api"], critical=False)
    health.add("api", api.check, depends_on=["database"])
    health.add("database", database.check)
    health.add("cache", cache.check, depends_on=[])
    monitor = HealthMonitor(health, interval=10, clock=clock, events=bus)
    async with _client(app) as client, _running(monitor, clock):
        assert (database.runs, api.runs, search.runs, cache.runs) == (1, 1, 1, 1)
        database.healthy = False
        await run_for(clock, 10)
        await run_for(clock, 10)
        ready = await client.get("/health/ready")
        assert (database.runs, api.runs, search.runs, cache.runs) == (3, 1, 1, 3)
        assert ready.status_code == 503
        checks = ready.json()["checks"]
        assert "root_cause" not in checks["database"]
        assert checks["database"]["status"] == "unhealthy"
        assert checks["api"]["status"] == "unhealthy"
        assert checks["api"]["root_cause"] == "database"
        assert checks["api"]["detail"] == "not run: depends on 'database', which is failing"
        assert checks["search"]["status"] == "degraded"  # not critical
        assert checks["search"]["root_cause"] == "database"
        assert checks["cache"]["status"] == "ok"
        assert _kinds(events) == [("health.check_failed", "database")]
        assert events[0].attributes["root_cause"] == "database"
        snapshot = monitor.snapshot()
        assert snapshot["api"]["root_cause"] == "database"
        assert snapshot["api"]["up"] is False
        assert snapshot["database"]["root_cause"] is None

        database.healthy = True
        await run_for(clock, 10)
        ready = await client.get("/health/ready")
        assert (database.runs, api.runs, search.runs) == (4, 2, 2)
        assert (ready.status_code, ready.json()["status"]) == (200, "ok")
        assert "root_cause" not in ready.json()["checks"]["api"]
        assert _kinds(events) == [
            ("health.check_failed", "database"),
            ("health.check_recovered", "database"),
        ]


async def test_dependents_run_as_soon_as_their_dependency_recovers() -> None:
    """A recovery that heals a dependency between two rounds runs its dependents at once, so
    they stop naming it as their root cause without waiting for the next round."""
    clock = SteppedClock()
    health = HealthChecks(clock=clock)
    database, api = Dependency(), Dependency()
    database.healthy = False
    health.add("database", database.check, recover=[database.reconnect])
    health.add("api", api.check, depends_on="database")  # one name, not a list of letters
    monitor = HealthMonitor(health, interval=60, clock=clock, events=EventBus(log=False))
    async with _running(monitor, clock):
        assert monitor.snapshot()["api"]["root_cause"] == "database"
        assert api.runs == 0
        database.fixable = True
        await run_for(clock, 1)
        assert api.runs == 1
        assert monitor.snapshot()["api"]["status"] == "ok"
        assert monitor.snapshot()["api"]["root_cause"] is None
        assert (await health.run())[0] == "ok"


async def test_no_recovery_is_attempted_while_a_dependency_is_down() -> None:
    """``api`` fails on its own and is waiting for its next attempt when the database it
    depends on goes down: while the database is down, ``api`` is neither run nor recovered
    (its own actions cannot help); once the database is back, ``api`` runs and, still failing,
    gets its attempt at once."""
    clock = SteppedClock()
    health = HealthChecks(clock=clock)
    database, api = Dependency(), Dependency()
    api.healthy = False
    health.add("database", database.check)
    health.add("api", api.check, depends_on=["database"], recover=[api.reconnect])
    bus = EventBus(log=False)
    events: list[Event] = []
    bus.subscribe(events.append)
    monitor = HealthMonitor(
        health, interval=10, recovery_backoff=4, recovery_backoff_max=4, clock=clock, events=bus
    )
    async with _running(monitor, clock):
        await run_for(clock, 9)  # attempts at +0, +4, +8; the next is due at +12
        assert api.reconnects == 3
        database.healthy = False
        await run_for(clock, 1)  # the round at +10: the database fails, api is not run
        runs = api.runs
        await run_for(clock, 30)
        assert (api.runs, api.reconnects) == (runs, 3)
        assert monitor.snapshot()["api"]["root_cause"] == "database"
        assert monitor.snapshot()["api"]["recovery"]["next_attempt_in"] is None
        database.healthy = True
        await run_for(clock, 10)
        assert (api.runs, api.reconnects) == (runs + 2, 4)  # run, recovered, run again
    failed = [e.name for e in events if e.kind == "health.check_failed"]
    assert failed == ["api", "database"]


# --- recovery actions that misbehave ---------------------------------------------------------


async def test_a_raising_or_hanging_recovery_action_does_not_stop_the_monitor() -> None:
    """An action that raises (its text, which names a password, is not reported) or hangs
    (cut at the check's timeout) is recorded as an ``error`` attempt, the actions after it
    are skipped, and the monitor goes on: rounds and attempts continue, and the checks heal
    once what they check is back."""
    clock = SteppedClock()
    health = HealthChecks(clock=clock)
    bus = EventBus(log=False)
    events: list[Event] = []
    bus.subscribe(events.append)
    broker, cache = Dependency(), Dependency()
    broker.healthy = cache.healthy = False
    later: list[str] = []
    never = asyncio.Event()

    async def raises() -> None:
        raise ConnectionError("amqp://admin:password=hunter2@broker.internal")

    async def hangs() -> None:
        await never.wait()

    async def afterwards() -> None:
        later.append("ran")

    health.add("broker", broker.check, recover=[raises, afterwards])
    health.add("cache", cache.check, recover=[hangs, afterwards], timeout=0.05)
    monitor = HealthMonitor(
        health,
        interval=10,
        recovery_backoff=1,
        recovery_backoff_max=2,
        clock=clock,
        events=bus,
    )
    async with _running(monitor, clock):
        snapshot = monitor.snapshot()
        broker_recovery, cache_recovery = (snapshot[n]["recovery"] for n in ("broker", "cache"))
        assert broker_recovery["last_outcome"] == cache_recovery["last_outcome"] == "error"
        assert broker_recovery["last_error"] == "recovery action 1 raised ConnectionError"
        assert cache_recovery["last_error"] == "recovery action 1 timed out after 0.05s"
        await run_for(clock, 10)
        assert monitor.running
        snapshot = monitor.snapshot()
        assert snapshot["broker"]["recoveries"]["error"] >= 5
        assert snapshot["cache"]["recoveries"]["error"] >= 5
        assert broker.runs == 8  # 1 + 1 (verified) at +0, at each attempt, and the round at +10
        assert later == []

        broker.healthy = cache.healthy = True
        await run_for(clock, 10)
        assert monitor.running
        assert (await health.run())[0] == "ok"
    assert "hunter2" not in repr([e.attributes for e in events])
    errors = {e.attributes.get("error") for e in events if e.kind == "health.recovery_attempted"}
    assert errors == {
        "recovery action 1 raised ConnectionError",
        "recovery action 1 timed out after 0.05s",
    }
    recovered = [e.name for e in events if e.kind == "health.check_recovered"]
    assert sorted(recovered) == ["broker", "cache"]


async def test_a_failing_check_without_recovery_actions_is_only_reported() -> None:
    """No action, no attempt: the entry has no ``recovery`` and nothing is scheduled."""
    clock = SteppedClock()
    health = HealthChecks(clock=clock)
    search = Dependency()
    search.healthy = False
    health.add("search", search.check, critical=False)
    monitor = HealthMonitor(health, interval=10, clock=clock, events=EventBus(log=False))
    async with _running(monitor, clock):
        await run_for(clock, 20)
        status, checks = await health.run()
        snapshot = monitor.snapshot()["search"]
    assert status == "degraded"
    assert "recovery" not in checks["search"]
    assert search.runs == 3
    assert snapshot["consecutive_failures"] == 3
    assert snapshot["recovery"]["attempts"] == 0
    assert snapshot["recovery"]["next_attempt_in"] is None


# --- configuration and life cycle ------------------------------------------------------------


async def test_unknown_dependencies_and_cycles_are_refused_naming_the_check() -> None:
    """A dependency on a name that is not registered is refused when the monitor starts;
    a cycle (or a check depending on itself) as soon as its last check is added."""

    async def check() -> bool:
        return True  # pragma: no cover

    health = HealthChecks()
    health.add("api", check, depends_on=["database"])  # may be registered later...
    monitor = HealthMonitor(health)
    with pytest.raises(ValueError, match="'api' depends on 'database'"):
        monitor.start()  # ...but is not
    assert not monitor.running
    health.add("database", check, depends_on=["network"])
    health.add("network", check)
    monitor.start()
    await monitor.stop()

    with pytest.raises(ValueError, match="health check 'network': dependency cycle"):
        health.add("network", check, depends_on=["api"])
    with pytest.raises(ValueError, match="health check 'loop': dependency cycle"):
        health.add("loop", check, depends_on=["loop"])
    assert "loop" not in health
    with pytest.raises(ValueError, match="health check 'x': recovery action 42"):
        health.add("x", check, recover=[42])  # type: ignore[list-item]

    health.remove("network")
    with pytest.raises(ValueError, match="'database' depends on 'network'"):
        HealthMonitor(health).start()


async def test_a_check_added_later_with_an_unknown_dependency_is_reported_not_run() -> None:
    """Added while the monitor runs, a check that depends on a name nobody registered is not
    run: it is reported failing on its own (no root cause), once."""
    clock = SteppedClock()
    health = HealthChecks(clock=clock)
    bus = EventBus(log=False)
    events: list[Event] = []
    bus.subscribe(events.append)
    late = Dependency()
    async with _running(HealthMonitor(health, interval=10, clock=clock, events=bus), clock):
        health.add("late", late.check, depends_on=["nowhere"], recover=[late.reconnect])
        await run_for(clock, 20)
        status, checks = await health.run()
    assert status == "unhealthy"
    assert checks["late"]["detail"] == "depends on 'nowhere', which is not a registered check"
    assert "root_cause" not in checks["late"]
    assert (late.runs, late.reconnects) == (0, 0)
    assert [(e.kind, e.name) for e in events] == [("health.check_failed", "late")]


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        ({"interval": 0}, "interval"),
        ({"interval": math.nan}, "interval"),
        ({"interval": math.inf}, "interval"),
        ({"recovery_backoff": -1}, "recovery_backoff"),
        ({"recovery_backoff_max": 0}, "recovery_backoff_max"),
        ({"recovery_backoff": 10, "recovery_backoff_max": 5}, "recovery_backoff_max"),
        ({"interval": "10"}, "interval"),
    ],
)
def test_bad_arguments_are_refused_naming_them(arguments: dict[str, Any], named: str) -> None:
    with pytest.raises(ValueError, match=f"^{named} must"):
        HealthMonitor(HealthChecks(), **arguments)


async def test_start_twice_and_stop_without_start_are_harmless() -> None:
    """One task however often ``start()`` is called; ``stop()`` before ``start()`` or twice
    does nothing; ``stop()`` while a recovery action hangs ends it and leaves no task."""
    clock = SteppedClock()
    health = HealthChecks(clock=clock)
    monitor = HealthMonitor(health, interval=5, clock=clock, events=EventBus(log=False))
    await monitor.stop()
    assert "stopped" in repr(monitor)

    hanging = asyncio.Event()
    released = asyncio.Event()

    async def reconnect() -> None:
        hanging.set()
        try:
            await released.wait()
        finally:
            hanging.clear()

    database = Dependency()
    database.healthy = False
    health.add("database", database.check, recover=[reconnect], timeout=60)
    monitor.start()
    monitor.start()
    assert len(_monitor_tasks()) == 1
    assert "running" in repr(monitor)
    await asyncio.wait_for(hanging.wait(), 5)
    await monitor.stop()
    assert not hanging.is_set()  # the action was cancelled with the task
    assert not monitor.running
    assert _monitor_tasks() == []
    await monitor.stop()
    # Started again, it carries on from what it knew.
    monitor.start()
    await asyncio.wait_for(hanging.wait(), 5)
    assert monitor.snapshot()["database"]["recovery"]["attempts"] == 2
    await monitor.stop()
    assert _monitor_tasks() == []


def test_start_needs_a_running_event_loop() -> None:
    monitor = HealthMonitor(HealthChecks())
    with pytest.raises(RuntimeError):
        monitor.start()
    assert not monitor.running
    with pytest.raises(ValueError, match=r"^checks must be a HealthChecks"):
        HealthMonitor({})  # type: ignore[arg-type]


async def test_the_snapshot_has_what_metrics_need() -> None:
    """Per check: status and ``up`` (``fastapi_resilience_health_check_up``), detail, root
    cause, ``checked_at``, consecutive failures, and recovery counts by outcome
    (``fastapi_resilience_health_recoveries_total``)."""
    clock = SteppedClock()
    health = HealthChecks(clock=clock)
    database = Dependency()
    database.healthy = False

    async def boom() -> bool:
        raise OSError("10.0.0.5:5432 password=x")

    health.add("database", database.check, recover=[database.reconnect])
    health.add("queue", boom, critical=False)
    monitor = HealthMonitor(health, interval=30, clock=clock, events=EventBus(log=False))
    assert monitor.snapshot() == {}
    async with _running(monitor, clock):
        snapshot = monitor.snapshot()
    assert snapshot["database"] == {
        "status": "unhealthy",
        "up": False,
        "detail": None,
        "root_cause": None,
        "checked_at": clock.time(),
        "consecutive_failures": 2,
        "recovery": {
            "attempts": 1,
            "last_outcome": "failed",
            "next_attempt_in": 1.0,
            "last_error": None,
        },
        "recoveries": {"recovered": 0, "failed": 1, "error": 0},
    }
    assert snapshot["queue"]["status"] == "degraded"
    assert snapshot["queue"]["detail"] == "raised OSError"
    assert snapshot["queue"]["consecutive_failures"] == 1
