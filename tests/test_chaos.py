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

from benchmarks.chaos.cluster import Cluster
from benchmarks.chaos.report import PhaseSummary, render, summarise
from benchmarks.chaos.scenario import Plan, run_plan

pytestmark = [pytest.mark.slow, pytest.mark.redis]

Run = tuple[list[PhaseSummary], str]

#: About a minute in all: 4 s of baseline, then 2.5 s of each fault and 6 s after it.
SHORT = Plan(rate=40, baseline=4, fault=2.5, recovery=6, breaker_recovery=1)


@pytest.fixture(name="run", scope="module")
def _run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    require_binary("redis-server")
    require_binary("nginx")
    work = tmp_path_factory.mktemp("chaos")
    with Cluster(rate=SHORT.rate, breaker_recovery=SHORT.breaker_recovery, workdir=work) as c:
        result = run_plan(c, SHORT, Path(work) / "records.jsonl", log=lambda _: None)
    summaries = summarise(result)
    return summaries, render(result, summaries, "tests/test_chaos.py")


def test_every_request_sent_is_answered(run: Run) -> None:
    """No request is lost in any fault: none times out, none has its connection cut."""
    summaries, report = run
    never = {s.span.name: dict(s.no_answer) for s in summaries if s.never_answered}
    assert never == {}, report


def test_no_fault_becomes_a_500(run: Run) -> None:
    """Faults of Redis, the upstream or a worker are answered as what they are, never 500."""
    summaries, report = run
    errors = {s.span.name: s.server_errors for s in summaries if s.server_errors}
    assert errors == {}, report


def test_each_fault_recovers_to_the_baseline_mix(run: Run) -> None:
    """After each fault is repaired, the answers return to the baseline's mix by themselves
    (the definition is in benchmarks/chaos/report.py)."""
    summaries, report = run
    after = [s for s in summaries if s.span.kind == "recovery"]
    assert len(after) == 6
    assert [s.span.fault for s in after if s.recovery is None] == [], report
