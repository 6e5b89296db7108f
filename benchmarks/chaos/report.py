"""What a chaos run shows: per phase, the answers, their latency, and each fault's recovery.

**Recovery** (ADR 0074). The baseline phase gives, for every route of the mix, the outcomes it
had (its status; a 200 that is a stale copy is its own outcome, ``200 stale``) and each
outcome's share. One second of send time *matches the baseline* when

1. every request sent in it was answered;
2. every answer's outcome is one its route had in the baseline;
3. for each route with at least ``MIN_ROUTE_REQUESTS`` requests in that second, each outcome's
   share differs from the route's baseline share by at most ``SHARE_TOLERANCE``.

The time to recover from a fault is ``k`` seconds when the seconds ``[end + k, end + k + 1)`` and
the one after it both match, and no earlier ``k`` does (``end``: when the fault was repaired).
"""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks._report import markdown_table
from benchmarks.chaos.load import MIX, Record
from benchmarks.chaos.scenario import RunResult, Span

__all__ = [
    "PhaseSummary",
    "baseline_profile",
    "matches",
    "outcome",
    "recovery_seconds",
    "render",
    "summarise",
]

MIN_ROUTE_REQUESTS = 5
SHARE_TOLERANCE = 0.25
#: Seconds after a fault's end in which a recovery is looked for: the rest of the phase.
Profile = dict[str, dict[str, float]]


def outcome(record: Record) -> str | None:
    """The status, ``200 stale`` for a stale copy, ``None`` for no answer."""
    if record.status is None:
        return None
    return f"{record.status} stale" if record.stale else str(record.status)


def baseline_profile(records: Iterable[Record]) -> Profile:
    """Per route, each outcome's share of the route's answers in the baseline."""
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    for record in records:
        result = outcome(record)
        if result is not None:
            counts[record.route][result] += 1
    return {route: {o: n / sum(c.values()) for o, n in c.items()} for route, c in counts.items()}


def matches(records: Sequence[Record], profile: Profile) -> bool:
    """Whether one second's requests match the baseline (the module's rules 1 to 3)."""
    if not records:
        return False
    by_route: dict[str, Counter[str]] = defaultdict(Counter)
    for record in records:
        result = outcome(record)
        if result is None or result not in profile.get(record.route, {}):
            return False
        by_route[record.route][result] += 1
    for route, counts in by_route.items():
        total = sum(counts.values())
        if total < MIN_ROUTE_REQUESTS:
            continue
        expected = profile[route]
        for result in set(expected) | set(counts):
            if abs(counts[result] / total - expected.get(result, 0.0)) > SHARE_TOLERANCE:
                return False
    return True


def recovery_seconds(records: Sequence[Record], span: Span, profile: Profile) -> int | None:
    """Seconds from the fault's end (``span.start``, a recovery span) to the first of two
    matching seconds; ``None``: not within the span."""
    seconds: dict[int, list[Record]] = defaultdict(list)
    for record in records:
        if span.start <= record.sent < span.end:
            seconds[int(record.sent - span.start)].append(record)
    whole = int(span.end - span.start)
    for k in range(whole - 1):
        if matches(seconds[k], profile) and matches(seconds[k + 1], profile):
            return k
    return None


@dataclass(frozen=True, slots=True)
class PhaseSummary:
    span: Span
    sent: int
    statuses: Counter[str]
    from_balancer: Counter[str]
    resent: Counter[str]
    stale: int
    p50_ms: float | None
    p99_ms: float | None
    no_answer: Counter[str]
    server_errors: int
    recovery: int | None

    @property
    def never_answered(self) -> int:
        return sum(self.no_answer.values())


def _percentile(values: list[float], q: int) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def summarise(result: RunResult) -> list[PhaseSummary]:
    by_phase: dict[str, list[Record]] = defaultdict(list)
    for record in result.records:
        by_phase[record.phase].append(record)
    profile = baseline_profile(by_phase["baseline"])
    summaries = []
    for span in result.spans:
        records = by_phase[span.name]
        latencies = [r.latency * 1000 for r in records if r.status is not None and r.latency]
        balancer = Counter(
            f"{r.status} {_target(r.route)}" for r in records if r.source == "balancer"
        )
        summaries.append(
            PhaseSummary(
                span=span,
                sent=len(records),
                statuses=Counter(str(r.status) for r in records if r.status is not None),
                from_balancer=balancer,
                resent=Counter(
                    f"{_target(r.route)} (answered {r.status or r.error})"
                    for r in records
                    if r.resent
                ),
                stale=sum(r.stale for r in records),
                p50_ms=_percentile(latencies, 50),
                p99_ms=_percentile(latencies, 99),
                no_answer=Counter(r.error for r in records if r.error is not None),
                server_errors=sum(r.status == 500 for r in records),
                recovery=recovery_seconds(result.records, span, profile)
                if span.kind == "recovery"
                else None,
            )
        )
    return summaries


def _target(route: str) -> str:
    target = next(t for _, t in MIX if t.route == route)
    return f"{target.method} {target.path}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def _statuses(counts: Counter[str]) -> str:
    return ", ".join(f"{status}: {n}" for status, n in sorted(counts.items())) or "-"


def table(summaries: Sequence[PhaseSummary]) -> str:
    rows = []
    for s in summaries:
        recovery = (
            "-"
            if s.span.kind != "recovery"
            else ("not within the phase" if s.recovery is None else f"{s.recovery} s")
        )
        rows.append(
            [
                s.span.name,
                f"{s.span.end - s.span.start:.0f}",
                str(s.sent),
                _statuses(s.statuses),
                str(s.stale),
                str(sum(s.resent.values())),
                str(sum(s.from_balancer.values())),
                _ms(s.p50_ms),
                _ms(s.p99_ms),
                str(s.never_answered),
                str(s.server_errors),
                recovery,
            ]
        )
    header = [
        "phase",
        "s",
        "sent",
        "answers by status",
        "stale",
        "re-sent by nginx",
        "answered by nginx",
        "p50 ms",
        "p99 ms",
        "never answered",
        "500s",
        "recovered after",
    ]
    return markdown_table(header, rows, "lrrlrrrrrrrr")


def render(result: RunResult, summaries: Sequence[PhaseSummary], command: str) -> str:
    """The generated section of docs/reliability.md."""
    plan = result.plan
    total = sum(s.sent for s in summaries)
    lines = [
        f"Written by `{command}`: {plan.rate:g} requests a second, open loop, for "
        f"{result.spans[-1].end - result.spans[0].start:.0f} s ({total} requests), through "
        "nginx to two example-app processes sharing one redis-server; phases of "
        f"{plan.baseline:g} s (baseline), {plan.fault:g} s (each fault) and {plan.recovery:g} s "
        f"(after each fault); breakers wait {plan.breaker_recovery:g} s before a trial call.",
        "",
        table(summaries),
        "",
        "What each phase did:",
        "",
    ]
    lines += [f"- `{s.span.name}`: {s.span.description}." for s in summaries]
    lines += _listing(
        "Requests nginx sent again to the other process (its log names both):",
        {s.span.name: s.resent for s in summaries},
    )
    lines += _listing(
        "Answers nginx gave itself, not an app process:",
        {s.span.name: s.from_balancer for s in summaries},
    )
    never = [s for s in summaries if s.never_answered]
    if never:
        lines += ["", "Requests never answered:", ""]
        lines += [
            f"- `{s.span.name}`: "
            + ", ".join(f"{k} x {n}" for k, n in sorted(s.no_answer.items()))
            + "."
            for s in never
        ]
    tracebacks = result.app_log.count("Traceback (most recent call last)")
    lines += ["", f"Tracebacks in the app processes' logs: {tracebacks}."]
    return "\n".join(lines) + "\n"


def _listing(title: str, by_phase: dict[str, Counter[str]]) -> list[str]:
    lines = ["", title, ""]
    found = {name: counts for name, counts in by_phase.items() if counts}
    lines += [
        f"- `{name}`: " + ", ".join(f"{k} x {n}" for k, n in sorted(counts.items())) + "."
        for name, counts in found.items()
    ]
    return lines if found else [*lines, "- none."]


def replace_between(path: Path, begin: str, end: str, generated: str) -> None:
    """Put ``generated`` between the two marker comments of ``path`` (which must hold both)."""
    text = path.read_text(encoding="utf-8")
    start, stop = text.find(begin), text.find(end)
    if start == -1 or stop < start:
        raise ValueError(f"{path} lacks the markers {begin} ... {end}")
    block = f"{begin}\n\n{generated.rstrip()}\n\n"
    path.write_text(text[:start] + block + text[stop:], encoding="utf-8")
