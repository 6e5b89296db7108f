"""``python -m benchmarks.run``: HTTP, per-call and outbound benchmarks, then the report.

``make bench`` runs it with the defaults and rewrites ``docs/benchmarks.md``; a ``--quick`` or
``--only`` run prints the tables and keeps the doc unless ``--write-doc`` is given. Raw results
go to ``benchmarks/results/`` (not committed).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import io
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from benchmarks import _charts, _report
from benchmarks._loop import loop_name
from benchmarks._procs import ROOT, server_options
from benchmarks._wrk import WrkSettings, wrk_version
from benchmarks.apps import BASELINE_SRC_ENV, VARIANTS
from benchmarks.capacity import (
    LOAD_CPU,
    SERVER_CPU,
    can_pin,
    run_capacity,
    summarize_capacity,
    with_capacity,
)
from benchmarks.client import CLIENT_CASES, run_client
from benchmarks.http_bench import BASELINE, run_http, summarize
from benchmarks.micro import BASELINES, MICRO_CASES, run_micro

SECTIONS = ("http", "micro", "client")
RESULTS_DIR = ROOT / "benchmarks" / "results"
DOC_PATH = ROOT / "docs" / "benchmarks.md"
CHARTS_DIR = ROOT / "docs" / "images"

#: Distributions whose versions go into the report (missing ones are left out).
PACKAGES = (
    "fastapi-resilience",
    "fastapi",
    "starlette",
    "uvicorn",
    "uvloop",
    "httptools",
    "httpx",
    "httpcore",
    "asgi-correlation-id",
    "slowapi",
    "limits",
    "redis",
    "hiredis",
    "circuitbreaker",
    "purgatory",
    "aiobreaker",
    "pybreaker",
    "tornado",
    "tenacity",
    "stamina",
)


@dataclass(frozen=True, slots=True)
class Profile:
    """Durations and counts for one kind of run."""

    duration_s: int
    rounds: int
    warmup_s: int
    micro_repeats: int
    micro_target_s: float
    client_repeats: int
    client_requests: int
    capacity_rounds: int
    client_cpu_pairs: int


FULL = Profile(5, 3, 2, 7, 0.1, 5, 1000, 5, 201)
QUICK = Profile(1, 2, 1, 3, 0.02, 2, 200, 2, 5)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="short smoke run (seconds, not minutes)"
    )
    parser.add_argument("--only", default="", help="comma-separated names from --list")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="http,micro,client")
    parser.add_argument("--rounds", type=int, help="HTTP rounds, and repeats of the other sections")
    parser.add_argument("--duration", type=int, help="seconds of wrk per variant per round")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections")
    parser.add_argument("--concurrency", type=int, default=8, help="tasks of the outbound client")
    parser.add_argument(
        "--write-doc", action="store_true", help="rewrite the doc after --quick/--only"
    )
    parser.add_argument("--no-doc", action="store_true", help="never rewrite the doc")
    parser.add_argument(
        "--idle-servers",
        type=int,
        default=0,
        help="capacity: start this many more bare servers on the servers' CPU, never loaded",
    )
    parser.add_argument("--doc", type=Path, default=DOC_PATH, help="the Markdown file to rewrite")
    parser.add_argument(
        "--baseline",
        metavar="REF",
        help="also serve the full stack from this git commit, in the same run",
    )
    parser.add_argument(
        "--charts-from",
        type=Path,
        metavar="FILE",
        help="draw the PNG charts from this results JSON and exit, without measuring",
    )
    parser.add_argument(
        "--charts-dir", type=Path, default=CHARTS_DIR, help="where the PNG charts are written"
    )
    parser.add_argument("--list", action="store_true", help="list every registered name and exit")
    args = parser.parse_args(argv)
    for name in ("rounds", "duration", "connections", "concurrency"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be at least 1")
    if args.idle_servers < 0:
        parser.error("--idle-servers must be at least 0")
    return args


def select(only: str, sections: Sequence[str]) -> dict[str, list[str]]:
    """The names each section runs; ``--only`` filters all sections by name."""
    registries: dict[str, Sequence[str]] = {
        "http": list(VARIANTS),
        "micro": list(MICRO_CASES),
        "client": list(CLIENT_CASES),
    }
    unknown_sections = set(sections) - set(SECTIONS)
    if unknown_sections:
        raise SystemExit(f"unknown sections {sorted(unknown_sections)}; choose from {SECTIONS}")
    wanted = [n.strip() for n in only.split(",") if n.strip()]
    known = {n for names in registries.values() for n in names}
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise SystemExit(f"unknown names {unknown}; see --list")
    if BASELINE_SRC_ENV not in os.environ:
        # Without --baseline there is no earlier library to serve them.
        registries["http"] = [n for n in registries["http"] if not VARIANTS[n].baseline]
    chosen: dict[str, list[str]] = {}
    for section in sections:
        names = [n for n in registries[section] if not wanted or n in wanted]
        if names:
            chosen[section] = names
    return chosen


def _export_src(ref: str) -> Path:
    """The library's ``src/`` of commit ``ref``, written to a temporary directory."""
    import tarfile
    import tempfile

    target = Path(tempfile.mkdtemp(prefix="bench-baseline-"))
    archive = subprocess.run(
        ["git", "archive", "--format=tar", ref, "src/fastapi_resilience"],
        cwd=ROOT,
        capture_output=True,
        check=False,
    )
    if archive.returncode != 0:
        raise SystemExit(f"--baseline {ref}: {archive.stderr.decode().strip()}")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(target, filter="data")
    return target / "src"


def _git_commit() -> str:
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return done.stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + (" (with uncommitted changes)" if git("status", "--porcelain") else "")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(command: str, settings: WrkSettings | None) -> dict[str, Any]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    info: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": f"`{command}`",
        "commit": _git_commit(),
        "machine": f"{os.cpu_count()} cores, {_cpu_model()}, {platform.system()} "
        f"{platform.release()}",
        "load average at start (1, 5, 15 min)": ", ".join(f"{x:.2f}" for x in os.getloadavg()),
        "Python": f"{platform.python_implementation()} {platform.python_version()}",
        "server": "uvicorn, 1 process, " + " ".join(server_options()),
        "in-process loop": loop_name(),
    }
    if settings is not None:
        info["load generator"] = f"{wrk_version()}: `{settings.describe()}`, on 127.0.0.1"
    info["packages"] = versions
    return info


def _log(message: str) -> None:
    print(message, flush=True)


def draw_charts(raw: dict[str, Any], out_dir: Path) -> bool:
    """Draw the charts; without matplotlib, say so in one line instead of a traceback."""
    try:
        _charts.draw_charts(raw, out_dir, log=_log)
    except _charts.ChartsUnavailable as exc:
        print(f"no charts: {exc}", file=sys.stderr)
        return False
    return True


def charts_from(path: Path, out_dir: Path) -> int:
    """``--charts-from``: redraw the charts of an earlier run from its results JSON."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        print(f"--charts-from {path}: {exc}", file=sys.stderr)
        return 2
    return 0 if draw_charts(raw, out_dir) else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.charts_from is not None:
        return charts_from(args.charts_from, args.charts_dir)
    if args.list:
        for title, registry in (
            ("http", list(VARIANTS)),
            ("micro", list(MICRO_CASES)),
            ("client", list(CLIENT_CASES)),
        ):
            print(f"{title}: {', '.join(registry)}")
        return 0
    profile = QUICK if args.quick else FULL
    if args.baseline:
        os.environ[BASELINE_SRC_ENV] = str(_export_src(args.baseline))
    chosen = select(args.only, [s.strip() for s in args.sections.split(",") if s.strip()])
    command = shlex.join(
        ["python", "-m", "benchmarks.run", *(argv if argv is not None else sys.argv[1:])]
    )
    settings = None
    if "http" in chosen:
        settings = WrkSettings(
            connections=args.connections, duration_s=args.duration or profile.duration_s
        )
    info = machine_info(command, settings)
    started = time.monotonic()
    sections: list[str] = []
    raw: dict[str, Any] = {"info": info}

    if "http" in chosen:
        assert settings is not None
        names = list(dict.fromkeys([BASELINE, *chosen["http"]]))
        rounds = args.rounds or profile.rounds
        samples, redis_version = run_http(
            names, settings=settings, rounds=rounds, warmup_s=profile.warmup_s, log=_log
        )
        if redis_version:
            info["redis (private, free port)"] = redis_version
        summaries = summarize(samples)
        summaries.sort(key=lambda s: names.index(s.variant))
        capacity_rounds = args.rounds or profile.capacity_rounds
        capacity_samples = []
        if can_pin():
            capacity_samples = run_capacity(
                names,
                settings=settings,
                rounds=capacity_rounds,
                warmup_s=profile.warmup_s,
                idle=args.idle_servers,
                log=_log,
            )
            summaries = with_capacity(summaries, summarize_capacity(capacity_samples))
            info["capacity"] = (
                f"servers pinned to CPU {SERVER_CPU}, one wrk per server pinned to CPU {LOAD_CPU}, "
                f"each variant loaded at the same time as bare, {capacity_rounds} rounds"
                + (
                    f", {args.idle_servers} idle bare servers beside them"
                    if args.idle_servers
                    else ""
                )
            )
        else:
            info["capacity"] = "not measured: needs two CPUs and sched_setaffinity"
        sections.append(
            _report.http_section(summaries)
            + f"\n{settings.describe()}. Throughput: {rounds} rounds, one variant at a time in an "
            "order rotated each round; medians over rounds, each round's ratio against `bare` of "
            f"the same round. Capacity: {capacity_rounds} rounds in which each variant is loaded "
            "at the same time as `bare`, both servers on one shared core; server CPU time "
            "(schedstat) per request, and the ratio of requests per CPU-second against the `bare` "
            "beside it. "
            "Socket errors include wrk's timeouts (no answer within 2 s), a sign of a starved "
            "machine; non-2xx answers mean a variant refused or failed requests.\n"
        )
        raw["http"] = {
            "samples": [dataclasses.asdict(s) for s in samples],
            "capacity_samples": [dataclasses.asdict(s) for s in capacity_samples],
            "summaries": [dataclasses.asdict(s) for s in summaries],
        }
    if "micro" in chosen:
        repeats = args.rounds or profile.micro_repeats
        micro = run_micro(
            list(dict.fromkeys([*BASELINES.values(), *chosen["micro"]])),
            repeats=repeats,
            target_s=profile.micro_target_s,
            log=_log,
        )
        sections.append(
            _report.micro_section(micro)
            + f"\nMedian of {repeats} interleaved repeats of about {profile.micro_target_s}s each; "
            "overhead = a wrapped call minus the plain call timed in the same repeat; "
            "best-of = fastest repeat minus fastest baseline repeat.\n"
        )
        raw["micro"] = [dataclasses.asdict(s) for s in micro]
    if "client" in chosen:
        client = run_client(
            chosen["client"],
            repeats=args.rounds or profile.client_repeats,
            requests=profile.client_requests,
            concurrency=args.concurrency,
            cpu_pairs=profile.client_cpu_pairs,
            log=_log,
        )
        sections.append(_report.client_section(client))
        raw["client"] = [dataclasses.asdict(s) for s in client]

    info["duration of the run"] = f"{time.monotonic() - started:.0f} s"
    info["load average at end"] = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    generated = _report.render([_report.machine_section(info), *sections])
    print("\n" + generated)

    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    for path in (RESULTS_DIR / f"bench-{stamp}.json", RESULTS_DIR / "latest.json"):
        path.write_text(json.dumps(raw, indent=2, default=str), encoding="utf-8")
    print(f"raw results: {RESULTS_DIR / f'bench-{stamp}.json'}")

    partial = args.quick or bool(args.only) or args.sections != ",".join(SECTIONS)
    if not args.no_doc and (args.write_doc or not partial):
        _report.update_doc(args.doc, generated)
        print(f"rewrote {args.doc}")
        # Only with the doc: the images it shows then match its tables. A missing matplotlib
        # costs the charts, not the run just measured.
        draw_charts(raw, args.charts_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
