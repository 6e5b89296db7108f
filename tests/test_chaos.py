"""The chaos run's short form: the example app, two processes behind nginx, under a steady
open-loop load from a second process, through every fault of ``make chaos``.

Faults: Redis killed and restarted, Redis stalled and continued, the upstream slow, failing and
flapping, one app process killed and restarted. Each is a few seconds here (tens of seconds in
``make chaos``, whose report is in docs/reliability.md); the promises are the same.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from loopback import require_binary

from benchmarks.chaos.cluster import Cluster, nginx_binary
from benchmarks.chaos.load import Record
from benchmarks.chaos.report import PhaseSummary, render, summarise
from benchmarks.chaos.scenario import FAULTS, Plan, run_plan, upstream_flapping

pytestmark = [pytest.mark.slow, pytest.mark.redis]

Run = tuple[list[PhaseSummary], str, list[Record]]
#: The example's client timeout for the upstream, seconds: an answer held longer waited on it.
UPSTREAM_TIMEOUT = 2.0

#: About a minute in all: 4 s of baseline, then 2.5 s of each fault and 6 s after it. The
#: upstream flaps every 0.8 s, so that it is slow and then failing within the fault's 2.5 s.
SHORT = Plan(
    rate=40,
    baseline=4,
    fault=2.5,
    recovery=6,
    breaker_recovery=1,
    faults=[upstream_flapping(0.8) if f.name == "upstream-flapping" else f for f in FAULTS],
)


@pytest.fixture(name="run", scope="module")
def _run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    require_binary("redis-server")
    if nginx_binary() is None:  # it looks in /usr/sbin too, which a user's PATH may lack
        require_binary("nginx")
    work = tmp_path_factory.mktemp("chaos")
    with Cluster(rate=SHORT.rate, breaker_recovery=SHORT.breaker_recovery, workdir=work) as c:
        result = run_plan(c, SHORT, Path(work) / "records.jsonl", log=lambda _: None)
    summaries = summarise(result)
    return summaries, render(result, summaries, "tests/test_chaos.py"), result.records


def test_every_request_sent_is_answered(run: Run) -> None:
    """No request is lost in any fault: none times out, none has its connection cut."""
    summaries, report, _ = run
    never = {s.span.name: dict(s.no_answer) for s in summaries if s.never_answered}
    assert never == {}, report


def test_no_fault_becomes_a_500(run: Run) -> None:
    """Faults of Redis, the upstream or a worker are answered as what they are, never 500."""
    summaries, report, _ = run
    errors = {s.span.name: s.server_errors for s in summaries if s.server_errors}
    assert errors == {}, report


def test_each_fault_recovers_to_the_baseline_mix(run: Run) -> None:
    """After each fault is repaired, the answers return to the baseline's mix by themselves
    (the definition is in benchmarks/chaos/report.py)."""
    summaries, report, _ = run
    after = [s for s in summaries if s.span.kind == "recovery"]
    assert len(after) == 6
    assert [s.span.fault for s in after if s.recovery is None] == [], report


def test_each_fault_shows_in_the_answers(run: Run) -> None:
    """Each fault did happen: the upstream's faults turn answers stale, into 502/503/504, or
    hold them past the example's timeout for the upstream (a 2.5 s fault is shorter than a
    read's timeout and retries: answers fresh from the cache, and retries that succeed once
    it is over, may be all it shows); the killed process's requests went to the other one
    (nginx's log names both), except a POST that was in it, answered 502 by nginx itself."""
    summaries, report, records = run
    by_name = {s.span.name: s for s in summaries if s.span.kind == "fault"}
    for name in ("upstream-slow", "upstream-failing", "upstream-flapping"):
        fault = by_name[name]
        failed = sum(fault.statuses[status] for status in ("502", "503", "504"))
        held = [r for r in records if r.phase == name and (r.latency or 0) >= UPSTREAM_TIMEOUT]
        assert fault.stale + failed + len(held) > 0, report
    killed = by_name["app-killed"]
    assert sum(killed.resent.values()) > 0, report
    assert all(answer.startswith("502 POST ") for answer in killed.from_balancer), report
