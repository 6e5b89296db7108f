"""``make chaos``: the full chaos run, its report written into docs/reliability.md.

python -m benchmarks.chaos [--rate 60] [--baseline 30] [--fault 20] [--recovery 20]
                           [--no-doc]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from benchmarks.chaos.cluster import ROOT, Cluster
from benchmarks.chaos.report import render, replace_between, summarise
from benchmarks.chaos.scenario import FAULTS, Plan, run_plan

DOC = ROOT / "docs" / "reliability.md"
BEGIN = "<!-- chaos report: begin (written by make chaos) -->"
END = "<!-- chaos report: end -->"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.chaos", description=__doc__)
    parser.add_argument("--rate", type=float, default=60.0, help="requests per second")
    parser.add_argument("--baseline", type=float, default=30.0, help="seconds")
    parser.add_argument("--fault", type=float, default=20.0, help="seconds of each fault")
    parser.add_argument("--recovery", type=float, default=20.0, help="seconds after each")
    parser.add_argument("--breaker-recovery", type=float, default=10.0, help="seconds")
    parser.add_argument("--no-doc", action="store_true", help="print the report only")
    parser.add_argument("--only", help="comma-separated fault names (implies --no-doc)")
    parser.add_argument("--keep", type=Path, help="keep logs and records in this directory")
    args = parser.parse_args(argv)
    plan = Plan(
        rate=args.rate,
        baseline=args.baseline,
        fault=args.fault,
        recovery=args.recovery,
        breaker_recovery=args.breaker_recovery,
        faults=[f for f in FAULTS if not args.only or f.name in args.only.split(",")],
    )
    if args.only:
        args.no_doc = True
    with tempfile.TemporaryDirectory(prefix="chaos-") as tmp:
        work = args.keep or Path(tmp)
        with Cluster(
            rate=plan.rate, breaker_recovery=plan.breaker_recovery, workdir=work
        ) as cluster:
            result = run_plan(cluster, plan, work / "records.jsonl", log=_log)
    summaries = summarise(result)
    report = render(result, summaries, "make chaos")
    print(report)
    if not args.no_doc:
        replace_between(DOC, BEGIN, END, report)
        print(f"written into {DOC.relative_to(ROOT)}", file=sys.stderr)
    bad = [s.span.name for s in summaries if s.never_answered or s.server_errors]
    unrecovered = [
        s.span.name for s in summaries if s.span.kind == "recovery" and s.recovery is None
    ]
    if bad or unrecovered:
        print(f"FAILED: unanswered or 500 in {bad}; no recovery in {unrecovered}", file=sys.stderr)
        return 1
    return 0


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
