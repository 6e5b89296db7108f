"""PNG charts of a run's results, for ``docs/benchmarks.md``.

Drawn from the raw results (``benchmarks/results/*.json``), the numbers the tables are written
from, so a chart never disagrees with the table beside it. matplotlib is imported only here, and
only when a chart is drawn: the rest of the harness, and the servers it starts, stay without it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks._report import MICRO_GROUP_TITLES
from benchmarks.apps import GROUP_TITLES
from benchmarks.http_bench import BASELINE as HTTP_BASELINE

CAPACITY_PNG = "bench-http-capacity.png"
OVERHEAD_PNG = "bench-outbound-overhead.png"

#: The micro groups the overhead chart shows: wrappers around an outbound call.
OVERHEAD_GROUPS = ("breaker", "retry")

#: Colour by kind of entry: this library, its peers, the harness's own references.
COLOURS = {"library": "#1f6fb4", "peer": "#e07b14", "reference": "#a0a0a0"}
LEGEND = {
    "library": "fastapi-resilience",
    "peer": "peer library",
    "reference": "reference",
}


#: Largest over smallest figure from which a chart's axis is logarithmic.
LOG_SPREAD = 20.0


class ChartsUnavailable(RuntimeError):
    """matplotlib is not installed; the message says how to install it."""


@dataclass(frozen=True, slots=True)
class Bar:
    """One horizontal bar: its figure and the spread around it."""

    label: str
    value: float
    low: float
    high: float
    kind: str


def kind_of(description: str) -> str:
    """The registries mark peers and references in their descriptions; the rest is ours."""
    if "(peer)" in description:
        return "peer"
    if "(reference)" in description:
        return "reference"
    return "library"


def capacity_bars(summaries: Sequence[Mapping[str, Any]]) -> dict[str, list[Bar]]:
    """Capacity ratio per variant, grouped as the HTTP tables are; ``bare`` is the 1.0 line."""
    groups: dict[str, list[Bar]] = {}
    for s in summaries:
        if s["variant"] == HTTP_BASELINE or s.get("capacity_ratio") is None:
            continue
        ratio = s["capacity_ratio"]
        bar = Bar(
            s["variant"],
            ratio,
            _or(s.get("capacity_min"), ratio),
            _or(s.get("capacity_max"), ratio),
            kind_of(s["description"]),
        )
        groups.setdefault(s["group"], []).append(bar)
    return {g: groups[g] for g in _ordered(groups, GROUP_TITLES)}


def overhead_bars(summaries: Sequence[Mapping[str, Any]]) -> dict[str, list[Bar]]:
    """Per-call overhead in µs of the breakers and retries; cases that did not run are left out."""
    groups: dict[str, list[Bar]] = {}
    for s in summaries:
        if s["group"] not in OVERHEAD_GROUPS or s.get("unavailable"):
            continue
        overhead = s["overhead_ns"]
        if overhead != overhead:  # NaN: no figure to draw
            continue
        bar = Bar(
            s["case"],
            overhead / 1000,
            s["overhead_min_ns"] / 1000,
            s["overhead_max_ns"] / 1000,
            kind_of(s["description"]),
        )
        groups.setdefault(s["group"], []).append(bar)
    return {g: groups[g] for g in OVERHEAD_GROUPS if g in groups}


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


def _ordered(groups: Mapping[str, Any], titles: Mapping[str, str]) -> list[str]:
    return [g for g in titles if g in groups] + sorted(set(groups) - set(titles))


def draw_charts(
    raw: Mapping[str, Any], out_dir: Path, log: Callable[[str], None] = print
) -> list[Path]:
    """Draw every chart the results allow into ``out_dir``; say what was skipped and why.

    Raises ``ChartsUnavailable`` when matplotlib is missing, before anything is written.
    """
    _require_matplotlib()
    written: list[Path] = []
    http = raw.get("http") or {}
    capacity = capacity_bars(http.get("summaries") or [])
    if capacity:
        written.append(
            _draw(
                capacity,
                out_dir / CAPACITY_PNG,
                title="HTTP capacity, ratio to bare FastAPI (higher is better)",
                xlabel="requests per CPU-second, x bare FastAPI (median, min-max over rounds)",
                titles=GROUP_TITLES,
                reference_line=1.0,
            )
        )
    else:
        log(f"skipped {CAPACITY_PNG}: the results hold no HTTP capacity figures")
    overhead = overhead_bars(raw.get("micro") or [])
    if overhead:
        written.append(
            _draw(
                overhead,
                out_dir / OVERHEAD_PNG,
                title="Per-call overhead of outbound wrappers (lower is better)",
                xlabel="µs per call above a plain call (median, min-max over repeats)",
                titles=MICRO_GROUP_TITLES,
                reference_line=0.0,
            )
        )
    else:
        log(f"skipped {OVERHEAD_PNG}: the results hold no breaker or retry figures")
    for path in written:
        log(f"drew {path}")
    return written


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise ChartsUnavailable(
            "charts need matplotlib, which is not installed: "
            "pip install 'matplotlib>=3.8' (or the project's `bench` extra)"
        ) from exc


def _draw(
    groups: Mapping[str, Sequence[Bar]],
    path: Path,
    *,
    title: str,
    xlabel: str,
    titles: Mapping[str, str],
    reference_line: float,
) -> Path:
    """One panel per group, stacked, sharing the x axis; panel heights follow their bar counts."""
    # The Agg canvas directly, not pyplot: no global figure state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    counts = [len(bars) for bars in groups.values()]
    figure = Figure(figsize=(9, 1.2 + 0.32 * sum(counts) + 0.5 * len(counts)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(counts), 1, sharex=True, height_ratios=counts, squeeze=False)
    values = [b.value for bars in groups.values() for b in bars]
    # Peers' overheads run to a hundred times ours: on a linear axis our bars would vanish.
    log_scale = min(values) > 0 and max(values) / min(values) >= LOG_SPREAD
    for ax, (group, bars) in zip(axes[:, 0], groups.items(), strict=True):
        _panel(ax, bars, titles.get(group, group), reference_line, log_scale=log_scale)
    axes[-1, 0].set_xlabel(xlabel + (", log scale" if log_scale else ""))
    kinds = [k for k in COLOURS if any(b.kind == k for bars in groups.values() for b in bars)]
    figure.legend(
        handles=[Patch(color=COLOURS[k], label=LEGEND[k]) for k in kinds],
        loc="outside lower center",
        ncols=len(kinds),
        frameon=False,
    )
    figure.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    # No "Software" entry: a redraw from the same results gives the same bytes.
    figure.savefig(path, dpi=110, metadata={"Software": None})
    return path


def _panel(
    ax: Any, bars: Sequence[Bar], title: str, reference_line: float, *, log_scale: bool
) -> None:
    positions = range(len(bars))
    values = [b.value for b in bars]
    # A median can sit outside a noisy min-max pair only by rounding; never draw a negative arm.
    spread = [
        [max(b.value - b.low, 0.0) for b in bars],
        [max(b.high - b.value, 0.0) for b in bars],
    ]
    ax.barh(
        positions,
        values,
        xerr=spread,
        color=[COLOURS[b.kind] for b in bars],
        error_kw={"ecolor": "#333333", "capsize": 3, "elinewidth": 1},
    )
    if log_scale:
        ax.set_xscale("log")
    else:
        ax.axvline(reference_line, color="#333333", linewidth=1, linestyle="--")
    for position, bar in zip(positions, bars, strict=True):
        # The figure as the table prints it, past the error bar so neither hides the other.
        ax.annotate(
            f"{bar.value:.2f}",
            (max(bar.high, bar.value), position),
            xytext=(6, 0),
            textcoords="offset points",
            va="center",
            fontsize=7,
        )
    ax.set_yticks(list(positions), [b.label for b in bars], fontfamily="monospace", fontsize=8)
    ax.invert_yaxis()  # the table's order, top to bottom
    ax.set_title(title, loc="left", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    ax.tick_params(axis="x", labelbottom=True)
