"""Markdown for ``docs/benchmarks.md``: the machine, the settings and one table per group.

The doc keeps a hand-written header; only the part between the two markers is rewritten.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.apps import GROUP_TITLES
from benchmarks.client import BASELINE as CLIENT_BASELINE
from benchmarks.client import ClientSummary
from benchmarks.http_bench import BASELINE as HTTP_BASELINE
from benchmarks.http_bench import HttpSummary
from benchmarks.micro import MicroSummary

BEGIN = "<!-- BEGIN GENERATED: python -m benchmarks.run rewrites from here -->"
END = "<!-- END GENERATED -->"

MICRO_GROUP_TITLES = {
    "baseline": "Baselines",
    "asgi": "ASGI middleware, one request in process (no server, no network)",
    "breaker": "Circuit breakers, closed state",
    "retry": "Retry, call that succeeds first time",
}

DEFAULT_HEADER = """# Benchmarks

Figures produced by `make bench` (`python -m benchmarks.run`); see `benchmarks/README.md`.
"""


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]], align: str) -> str:
    """A GitHub table; ``align`` has one letter per column, ``l`` or ``r``."""
    if len(align) != len(header):
        raise ValueError("align needs one letter per column")
    rules = ["---:" if a == "r" else ":---" for a in align]
    lines = [_row(header), _row(rules), *(_row(row) for row in rows)]
    return "\n".join(lines) + "\n"


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


def fmt_rate(value: float) -> str:
    return f"{value:,.0f}"


def fmt_ratio(value: float) -> str:
    return f"{value:.2f}"


def fmt_us(nanoseconds: float) -> str:
    if math.isnan(nanoseconds):
        return "n/a"
    return f"{nanoseconds / 1000:.2f}"


def _ordered_groups(groups: Iterable[str], titles: Mapping[str, str]) -> list[str]:
    present = set(groups)
    return [g for g in titles if g in present] + sorted(present - set(titles))


def http_section(summaries: Sequence[HttpSummary]) -> str:
    """One table per group, each starting with ``bare`` for reference."""
    bare = next((s for s in summaries if s.variant == HTTP_BASELINE), None)
    header = [
        "variant",
        "what it adds",
        "req/s",
        "p99 ms",
        "x bare (req/s)",
        "min-max",
        "CPU µs/req",
        "x bare (capacity)",
        "min-max",
        "non-2xx",
        "socket errors",
    ]
    parts = ["## HTTP: throughput, p99 latency and capacity, ratios to bare FastAPI\n"]
    for group in _ordered_groups((s.group for s in summaries), GROUP_TITLES):
        rows = [s for s in summaries if s.group == group and s.variant != HTTP_BASELINE]
        if bare is not None:
            rows.insert(0, bare)
        parts.append(f"### {GROUP_TITLES.get(group, group)}\n")
        parts.append(markdown_table(header, (_http_row(s) for s in rows), "llrrrrrrrrr"))
    return "\n".join(parts)


def _http_row(s: HttpSummary) -> list[str]:
    def optional(value: float | None, fmt: str = "{:.3f}") -> str:
        return "-" if value is None else fmt.format(value)

    capacity_range = (
        "-"
        if s.capacity_min is None or s.capacity_max is None
        else f"{s.capacity_min:.3f}-{s.capacity_max:.3f}"
    )
    return [
        f"`{s.variant}`",
        s.description,
        fmt_rate(s.requests_per_sec),
        f"{s.p99_ms:.2f}",
        fmt_ratio(s.ratio),
        f"{fmt_ratio(s.ratio_min)}-{fmt_ratio(s.ratio_max)}",
        optional(s.cpu_us_per_request, "{:.0f}"),
        optional(s.capacity_ratio),
        capacity_range,
        str(s.non_2xx),
        str(s.socket_errors),
    ]


def micro_section(summaries: Sequence[MicroSummary]) -> str:
    header = ["case", "what", "per call µs", "overhead µs", "min-max µs", "best-of µs"]
    parts = ["## Per-call overhead above a plain call (one process)\n"]
    for group in _ordered_groups((s.group for s in summaries), MICRO_GROUP_TITLES):
        parts.append(f"### {MICRO_GROUP_TITLES.get(group, group)}\n")
        rows = []
        for s in summaries:
            if s.group != group:
                continue
            if s.unavailable:
                rows.append(
                    [f"`{s.case}`", s.description, "n/a", f"not run: {s.unavailable}", "", ""]
                )
                continue
            rows.append(
                [
                    f"`{s.case}`",
                    s.description,
                    fmt_us(s.per_call_ns),
                    fmt_us(s.overhead_ns),
                    f"{fmt_us(s.overhead_min_ns)}-{fmt_us(s.overhead_max_ns)}",
                    fmt_us(s.best_overhead_ns),
                ]
            )
        parts.append(markdown_table(header, rows, "llrrrr"))
    return "\n".join(parts)


def client_section(summaries: Sequence[ClientSummary]) -> str:
    header = [
        "case",
        "what",
        "req/s",
        f"x {CLIENT_BASELINE} (req/s)",
        "min-max",
        "client CPU µs/req",
        f"x {CLIENT_BASELINE} (CPU)",
        "quartiles",
    ]
    rows = [
        [
            f"`{s.case}`",
            s.description,
            fmt_rate(s.requests_per_sec),
            fmt_ratio(s.ratio),
            f"{fmt_ratio(s.ratio_min)}-{fmt_ratio(s.ratio_max)}",
            "-" if s.cpu_us_per_request is None else f"{s.cpu_us_per_request:.0f}",
            "-" if s.cpu_ratio is None else f"{s.cpu_ratio:.3f}",
            "-"
            if s.cpu_ratio_q1 is None or s.cpu_ratio_q3 is None
            else f"{s.cpu_ratio_q1:.3f}-{s.cpu_ratio_q3:.3f}",
        ]
        for s in summaries
    ]
    first = summaries[0] if summaries else None
    how = (
        f"{first.requests} GETs per repeat from {first.concurrency} tasks, "
        f"median of {first.repeats} interleaved repeats (throughput). CPU: the client "
        "process's CPU time per request, one request at a time, in pairs of 50-request bursts "
        "(`httpx_plain`, then the case, alternating order), client pinned to one CPU and "
        "upstream to the other; `x (CPU)` is the median over pairs of the per-pair ratio, with "
        "its quartiles: the transport's own cost, which the upstream's speed does not hide.\n"
        if first
        else ""
    )
    return (
        "## Outbound: httpx client against a loopback upstream\n\n"
        + how
        + "\n"
        + markdown_table(header, rows, "llrrrrrr")
    )


#: Kept in the raw results, left out of the doc: a user doc holds no dates or commits (the run
#: diary is benchmarks/HISTORY.md).
_NOT_IN_DOC = ("date", "commit")


def machine_section(info: Mapping[str, Any]) -> str:
    """The run's conditions, as a list; package versions on one line each."""
    lines = [
        "## This run\n",
        "Figures from this machine only; compare ratios, not absolute numbers.\n",
    ]
    for key, value in info.items():
        if key in _NOT_IN_DOC:
            continue
        if isinstance(value, Mapping):
            lines.append(f"- {key}:")
            lines.extend(f"  - {k} {v}" for k, v in value.items())
        else:
            lines.append(f"- {key}: {value}")
    return "\n".join(lines) + "\n"


def render(sections: Sequence[str]) -> str:
    return "\n".join(section.rstrip("\n") + "\n" for section in sections if section)


def update_doc(path: Path, generated: str) -> None:
    """Replace what lies between the markers (or create the doc with a default header)."""
    block = f"{BEGIN}\n\n{generated.rstrip()}\n\n{END}\n"
    if path.exists():
        text = path.read_text(encoding="utf-8")
        start, end = text.find(BEGIN), text.find(END)
        if start != -1 and end > start:
            path.write_text(
                text[:start] + block + text[end + len(END) :].lstrip("\n"), encoding="utf-8"
            )
            return
        path.write_text(text.rstrip("\n") + "\n\n" + block, encoding="utf-8")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(DEFAULT_HEADER + "\n" + block, encoding="utf-8")
