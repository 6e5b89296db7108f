"""``python -m benchmarks.workers``: N uvicorn workers on one host sharing one Redis (ADR 0075).

Two parts, both against one private ``redis-server`` on a free port:

* **Workers.** For N = 1, 2, 4, ``uvicorn --workers N`` serves the full stack with Redis storage
  (``resilience_full_redis``) and, beside it, bare FastAPI with the same N; wrk loads one at a
  time from loopback, in rounds whose order rotates. Per run: requests/s, p50/p99, the workers'
  CPU per request (schedstat of every worker), and from Redis itself (``INFO commandstats``,
  ``INFO cpu``) the round trips (``EVALSHA``) and commands per request and Redis's CPU per
  request. Medians over the rounds; the ratio to bare is taken per round, as in ADR 0030.
* **Redis's ceiling.** The one ``EVALSHA`` the app sends for a request (captured with
  ``MONITOR``) replayed by ``redis-benchmark`` with pipelining, for one busy identity; then
  ``RedisStorage`` itself from several processes, many concurrent checks over many identities.
  Redis's CPU per operation there is what one Redis core can carry, independent of the app.

A full run rewrites the block between the markers in ``docs/scaling.md`` (with the capacity
model's figures computed from this run) and appends a dated entry to ``benchmarks/HISTORY.md``;
``--quick`` and ``--no-doc`` only print. Raw results go to ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from benchmarks import _report
from benchmarks._procs import ROOT, RedisProcess, UvicornServer, server_options
from benchmarks._wrk import WrkSettings, run_wrk, wrk_version
from benchmarks.apps import HUGE_LIMIT, REDIS_URL_ENV, VARIANT_ENV, VARIANTS
from benchmarks.capacity import cpu_seconds
from benchmarks.http_bench import APP_FACTORY, check_variant, round_order
from benchmarks.run import _cpu_model, _git_commit

WORKER_COUNTS = (1, 2, 4)
APP = "resilience_full_redis"
BARE = "bare"
DOC_PATH = ROOT / "docs" / "scaling.md"
HISTORY_PATH = ROOT / "benchmarks" / "HISTORY.md"
RESULTS_DIR = ROOT / "benchmarks" / "results"
BEGIN = "<!-- BEGIN GENERATED: python -m benchmarks.workers rewrites from here -->"
END = "<!-- END GENERATED -->"
HISTORY_TOPIC = "## Workers sharing one Redis (ADR 0075)"
#: The share of a Redis core the capacity model plans for: headroom for bursts and queueing.
PLANNING_SHARE = 0.5
#: Cluster sizes the model's table shows.
SHARDS = (1, 3, 10)
PACKAGES = ("fastapi-resilience", "fastapi", "starlette", "uvicorn", "uvloop", "httptools", "redis")


@dataclass(frozen=True, slots=True)
class Profile:
    duration_s: int
    rounds: int
    warmup_s: int
    bench_ops: int  # redis-benchmark requests
    drive_s: float  # seconds of the RedisStorage drive
    drivers: int  # processes driving RedisStorage


FULL = Profile(duration_s=5, rounds=4, warmup_s=2, bench_ops=400_000, drive_s=5, drivers=2)
QUICK = Profile(duration_s=1, rounds=1, warmup_s=1, bench_ops=50_000, drive_s=1, drivers=2)


# ---- Redis's own figures ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RedisReading:
    """What Redis reports of itself at one moment: calls per command, CPU seconds, the time."""

    calls: dict[str, int]
    cpu_s: float
    at: float

    @classmethod
    def take(cls, client: Any) -> RedisReading:
        stats = client.info("commandstats")
        cpu = client.info("cpu")
        return cls(
            {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()},
            float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]),
            time.monotonic(),
        )


@dataclass(frozen=True, slots=True)
class RedisDelta:
    """Between two readings: commands executed (scripts' inner calls included), CPU, wall."""

    evalsha: int
    commands: int
    cpu_s: float
    wall_s: float

    @classmethod
    def between(cls, before: RedisReading, after: RedisReading) -> RedisDelta:
        delta = {k: after.calls.get(k, 0) - before.calls.get(k, 0) for k in after.calls}
        # The readings' own INFO calls are not the workload's.
        delta.pop("info", None)
        return cls(
            evalsha=delta.get("evalsha", 0),
            commands=sum(delta.values()),
            cpu_s=after.cpu_s - before.cpu_s,
            wall_s=after.at - before.at,
        )


def redis_client(url: str) -> Any:
    import redis

    return redis.Redis.from_url(url)


# ---- workers behind one port ------------------------------------------------------------


def child_pids(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (uvicorn's workers), read from /proc."""
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text(encoding="ascii")
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        # The command name (field 2) is in parentheses and may hold spaces: split after it.
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            children.append(int(entry))
    return children


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of ``pid`` and its children (schedstat, nanoseconds)."""
    total = 0.0
    for process in (pid, *child_pids(pid)):
        try:
            total += cpu_seconds(process)
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


@dataclass(frozen=True, slots=True)
class WorkerSample:
    """One wrk run of one app under N workers."""

    workers: int
    app: str
    round: int
    requests_per_sec: float
    p50_ms: float
    p99_ms: float
    requests: int
    non_2xx: int
    socket_errors: int
    worker_cpu_s: float
    redis: RedisDelta

    @property
    def reached_redis(self) -> bool:
        """Every request went to Redis: no worker's storage failed open during the run.

        After timeouts (a starved event loop) the guarded storage answers from memory until
        Redis answers its probe; those requests cost Redis nothing and would flatter it.
        """
        return self.app == BARE or self.redis.evalsha >= 0.995 * self.requests


@dataclass(frozen=True, slots=True)
class WorkerSummary:
    """One N over all rounds: medians, and the app's ratio to bare of the same round."""

    workers: int
    rounds: int
    bare_rps: float
    app_rps: float
    ratio: float
    ratio_min: float
    ratio_max: float
    app_p50_ms: float
    app_p99_ms: float
    bare_p99_ms: float
    bare_cpu_us: float
    app_cpu_us: float
    evalsha_per_request: float
    commands_per_request: float
    redis_cpu_us: float
    redis_share: float
    errors: int
    #: Runs in which a worker's storage failed open: left out of the Redis columns.
    failed_open_runs: int

    @property
    def app_rps_per_worker(self) -> float:
        return self.app_rps / self.workers


def wait_for_workers(server: UvicornServer, workers: int, timeout_s: float = 30) -> None:
    """uvicorn listens before its workers have imported the app: wait until all N run.

    With one worker uvicorn serves in its own process, with no child.
    """
    if workers == 1:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if len(child_pids(server.pid)) >= workers:
            return
        time.sleep(0.1)  # start-up polling, not a measurement
    raise RuntimeError(f"uvicorn --workers {workers} started {len(child_pids(server.pid))}")


@contextmanager
def worker_servers(
    counts: Sequence[int], redis_url: str, log: Callable[[str], None]
) -> Iterator[dict[tuple[int, str], UvicornServer]]:
    """``uvicorn --workers N`` for each N, bare and the app, all started and checked."""
    with ExitStack() as stack:
        servers: dict[tuple[int, str], UvicornServer] = {}
        for workers in counts:
            for app in (BARE, APP):
                env = {VARIANT_ENV: app, REDIS_URL_ENV: redis_url}
                server = UvicornServer(
                    APP_FACTORY, env=env, args=["--workers", str(workers)], timeout_s=30
                )
                stack.callback(server.stop)
                server.start()
                wait_for_workers(server, workers)
                check_variant(app, VARIANTS[app], server.port)
                servers[(workers, app)] = server
                log(f"started {app} with {workers} worker(s) on 127.0.0.1:{server.port}")
        yield servers


def run_workers(
    counts: Sequence[int],
    redis_url: str,
    *,
    settings: WrkSettings,
    rounds: int,
    warmup_s: int,
    log: Callable[[str], None],
) -> list[WorkerSample]:
    observer = redis_client(redis_url)
    samples: list[WorkerSample] = []
    with worker_servers(counts, redis_url, log) as servers:
        keys = list(servers)
        for key, server in servers.items():
            log(f"warm-up {key[1]} x{key[0]} ({warmup_s}s)")
            run_wrk(settings, server.url, duration_s=warmup_s)
        for round_ in range(rounds):
            for workers, app in round_order(keys, round_):
                server = servers[(workers, app)]
                cpu_before = tree_cpu_seconds(server.pid)
                before = RedisReading.take(observer)
                result = run_wrk(settings, server.url)
                # Requests still in flight when wrk stopped finish within milliseconds.
                time.sleep(0.1)
                after = RedisReading.take(observer)
                cpu = tree_cpu_seconds(server.pid) - cpu_before
                sample = WorkerSample(
                    workers=workers,
                    app=app,
                    round=round_,
                    requests_per_sec=result.requests_per_sec,
                    p50_ms=result.latency_ms.get(50, float("nan")),
                    p99_ms=result.p99_ms,
                    requests=result.requests,
                    non_2xx=result.non_2xx,
                    socket_errors=result.socket_errors,
                    worker_cpu_s=cpu,
                    redis=RedisDelta.between(before, after),
                )
                samples.append(sample)
                flag = "" if result.clean else f"  ERRORS non-2xx={result.non_2xx}"
                log(
                    f"round {round_ + 1}/{rounds} {app:<22} x{workers} "
                    f"{result.requests_per_sec:>8.0f} req/s  p99 {result.p99_ms:6.2f} ms{flag}"
                )
    observer.close()
    return samples


def summarize_workers(samples: Sequence[WorkerSample]) -> list[WorkerSummary]:
    summaries = []
    for workers in sorted({s.workers for s in samples}):
        bare = {s.round: s for s in samples if s.workers == workers and s.app == BARE}
        app = {s.round: s for s in samples if s.workers == workers and s.app == APP}
        ratios = [app[r].requests_per_sec / bare[r].requests_per_sec for r in app if r in bare]
        a, b = list(app.values()), list(bare.values())
        reached = [s for s in a if s.reached_redis] or a
        summaries.append(
            WorkerSummary(
                workers=workers,
                rounds=len(a),
                bare_rps=statistics.median(s.requests_per_sec for s in b),
                app_rps=statistics.median(s.requests_per_sec for s in a),
                ratio=statistics.median(ratios),
                ratio_min=min(ratios),
                ratio_max=max(ratios),
                app_p50_ms=statistics.median(s.p50_ms for s in a),
                app_p99_ms=statistics.median(s.p99_ms for s in a),
                bare_p99_ms=statistics.median(s.p99_ms for s in b),
                bare_cpu_us=statistics.median(s.worker_cpu_s / s.requests * 1e6 for s in b),
                app_cpu_us=statistics.median(s.worker_cpu_s / s.requests * 1e6 for s in a),
                evalsha_per_request=statistics.median(
                    s.redis.evalsha / s.requests for s in reached
                ),
                commands_per_request=statistics.median(
                    s.redis.commands / s.requests for s in reached
                ),
                redis_cpu_us=statistics.median(s.redis.cpu_s / s.requests * 1e6 for s in reached),
                redis_share=statistics.median(s.redis.cpu_s / s.redis.wall_s for s in reached),
                errors=sum(s.non_2xx + s.socket_errors for s in (*a, *b)),
                failed_open_runs=sum(not s.reached_redis for s in a),
            )
        )
    return summaries


# ---- Redis's ceiling ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CeilingSample:
    """Redis driven hard by one kind of client: operations, and what Redis spent on them."""

    name: str
    description: str
    operations: int
    seconds: float
    redis: RedisDelta

    @property
    def ops_per_sec(self) -> float:
        return self.operations / self.seconds

    @property
    def cpu_us_per_op(self) -> float:
        return self.redis.cpu_s / self.operations * 1e6

    @property
    def commands_per_op(self) -> float:
        return self.redis.commands / self.operations

    @property
    def redis_share(self) -> float:
        return self.redis.cpu_s / self.redis.wall_s

    @property
    def ops_per_core_second(self) -> float:
        """Operations one Redis core would carry at 100 %: 1 / Redis CPU per operation."""
        return self.operations / self.redis.cpu_s if self.redis.cpu_s > 0 else float("nan")


def capture_evalsha(redis_url: str, app_port: int) -> list[str]:
    """The ``EVALSHA`` (its arguments) the app sends Redis for one request, from ``MONITOR``."""
    import http.client

    client = redis_client(redis_url)
    with client.monitor() as monitor:

        def one_request() -> None:
            conn = http.client.HTTPConnection("127.0.0.1", app_port, timeout=10)
            try:
                conn.request("GET", "/")
                conn.getresponse().read()
            finally:
                conn.close()

        threading.Thread(target=one_request, daemon=True).start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            command = monitor.next_command()["command"]
            if command.startswith("EVALSHA "):
                client.close()
                return str(command).split()
    raise RuntimeError("the app sent no EVALSHA within 10 s")


def redis_benchmark(
    redis_url: str, port: int, command: Sequence[str], *, operations: int
) -> CeilingSample:
    """``redis-benchmark`` replaying ``command``: 50 connections, 16 pipelined each."""
    binary = shutil.which("redis-benchmark")
    if binary is None:
        raise RuntimeError("redis-benchmark is not installed (apt-get install redis-tools)")
    argv = [binary, "-h", "127.0.0.1", "-p", str(port), "-c", "50", "-P", "16"]
    argv += ["-n", str(operations), "--csv", *command]
    observer = redis_client(redis_url)
    before = RedisReading.take(observer)
    started = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, check=True)
    seconds = time.monotonic() - started
    after = RedisReading.take(observer)
    observer.close()
    rows = [line for line in done.stdout.splitlines() if line.startswith('"') and "rps" not in line]
    reported = float(rows[-1].split(",")[1].strip('"')) if rows else operations / seconds
    return CeilingSample(
        "redis_benchmark",
        "`redis-benchmark -c 50 -P 16`: the app's own `EVALSHA` for one busy identity",
        operations,
        operations / reported,
        RedisDelta.between(before, after),
    )


def drive_storage(args: argparse.Namespace) -> int:
    """A driver process (``--drive URL``): many concurrent ``RedisStorage.check`` calls."""
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    return asyncio.run(_drive(args))


async def _drive(args: argparse.Namespace) -> int:
    from fastapi_resilience.ratelimit import Limit, LimitCheck, RedisStorage

    amount, _, period = HUGE_LIMIT.partition("/")
    limit = Limit(int(amount), {"hour": 3600}[period])
    checks = (LimitCheck("tier:anonymous", limit),)
    storage = RedisStorage.from_url(args.drive, timeout=5.0)
    identities = [f"ip:10.{args.drive_id}.{i // 256}.{i % 256}" for i in range(args.identities)]
    count = 0
    running = True

    async def task(offset: int) -> None:
        nonlocal count
        i = offset
        while running:
            await storage.check(identities[i % len(identities)], checks)
            count += 1
            i += args.concurrency

    async def drive(seconds: float) -> None:
        nonlocal running
        running = True
        tasks = [asyncio.create_task(task(k)) for k in range(args.concurrency)]
        await asyncio.sleep(seconds)
        running = False
        await asyncio.gather(*tasks)  # the checks in flight finish, and are counted

    # Connections opened, script cached; then idle, so that Redis's counters read before "go"
    # and after the result line hold exactly the checks counted.
    await drive(0.5)
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    count, started = 0, time.monotonic()
    await drive(args.drive_seconds)
    done, seconds = count, time.monotonic() - started
    print(json.dumps({"checks": done, "seconds": seconds}), flush=True)
    await storage.aclose()
    return 0


def storage_drive(
    redis_url: str, *, drivers: int, seconds: float, identities: int, concurrency: int
) -> CeilingSample:
    """``drivers`` processes of ``RedisStorage`` checks, started together, measured together."""
    argv = [sys.executable, "-m", "benchmarks.workers", "--drive", redis_url]
    argv += ["--drive-seconds", str(seconds), "--identities", str(identities)]
    argv += ["--concurrency", str(concurrency)]
    procs = [
        subprocess.Popen(
            [*argv, "--drive-id", str(k)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for k in range(drivers)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError("a RedisStorage driver did not start")
        observer = redis_client(redis_url)
        before = RedisReading.take(observer)
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        # Each driver prints its result once its checks are done: read Redis then, before the
        # processes' shutdown adds wall time (Redis's share of a core) but no checks.
        results = [json.loads(proc.stdout.readline()) for proc in procs if proc.stdout]
        after = RedisReading.take(observer)
        observer.close()
        for proc in procs:
            proc.communicate(timeout=60)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return CeilingSample(
        "redis_storage",
        f"`RedisStorage` from {drivers} processes, {concurrency} concurrent checks each, "
        f"over {identities:,} identities",
        sum(r["checks"] for r in results),
        max(r["seconds"] for r in results),
        RedisDelta.between(before, after),
    )


# ---- the report --------------------------------------------------------------------------


def cores_note(workers: int, cores: int) -> str:
    if workers < cores:
        return "a core left for wrk and Redis"
    if workers == cores:
        return "workers, wrk and Redis share every core"
    return f"oversubscribed: {workers} workers on {cores} cores"


def workers_table(summaries: Sequence[WorkerSummary], cores: int) -> str:
    header = [
        "workers",
        "bare req/s",
        "Redis stack req/s",
        "per worker",
        "x bare",
        "min-max",
        "p50 ms",
        "p99 ms",
        "worker CPU µs/req (bare)",
        "EVALSHA/req",
        "Redis commands/req",
        "Redis CPU µs/req",
        "Redis CPU, share of a core",
        "cores",
    ]
    rows = [
        [
            str(s.workers),
            _report.fmt_rate(s.bare_rps),
            _report.fmt_rate(s.app_rps),
            _report.fmt_rate(s.app_rps_per_worker),
            _report.fmt_ratio(s.ratio),
            f"{s.ratio_min:.2f}-{s.ratio_max:.2f}",
            f"{s.app_p50_ms:.2f}",
            f"{s.app_p99_ms:.2f}",
            f"{s.app_cpu_us:.0f} ({s.bare_cpu_us:.0f})",
            f"{s.evalsha_per_request:.3f}",
            f"{s.commands_per_request:.2f}",
            f"{s.redis_cpu_us:.1f}",
            f"{s.redis_share:.0%}",
            cores_note(s.workers, cores),
        ]
        for s in summaries
    ]
    return _report.markdown_table(header, rows, "rrrrrrrrrrrrrl")


def failed_open_note(summaries: Sequence[WorkerSummary]) -> str:
    if not any(s.failed_open_runs for s in summaries):
        return ""
    where = ", ".join(
        f"{n} of {s.rounds} with {s.workers}" for s in summaries if (n := s.failed_open_runs)
    )
    return (
        f"In some runs ({where} worker(s)) a worker's storage timed out (0.25 s, its event loop "
        "starved of CPU) and failed open, answering from memory until Redis answered its probe: "
        "fewer `EVALSHA`s than requests. Those runs are left out of the Redis columns. "
    )


def workers_section(summaries: Sequence[WorkerSummary], cores: int) -> str:
    errors = sum(s.errors for s in summaries)
    text = (
        "## Workers on one host, one Redis\n\n"
        f"`uvicorn --workers N` serving `{APP}` (`install()` with Redis storage, headers on) and "
        "bare FastAPI with the same N, loaded by wrk from loopback one at a time.\n\n"
        + workers_table(summaries, cores)
        + "\nMedians over the rounds; *x bare* is the per-round ratio to bare FastAPI with the "
        "same N. *Worker CPU* is every worker's CPU time (schedstat) per request answered. "
        "*Redis commands* counts every command Redis executed, the script's own calls included "
        "(`INFO commandstats`); *EVALSHA* is the round trips (a little over 1: the requests in "
        "flight when wrk stops are answered and reach Redis, but wrk does not count them). "
        "*Redis CPU* is `used_cpu_user` + `used_cpu_sys` (`INFO cpu`) per request answered, "
        "and its share of one core over the run. Every request of wrk comes from one address: "
        "one identity, one key, a busy one. "
        + failed_open_note(summaries)
        + (f"{errors} non-2xx answers or socket errors in all." if errors else "")
    )
    return text.rstrip() + "\n\n"


def ceiling_table(samples: Sequence[CeilingSample]) -> str:
    header = [
        "driven by",
        "operations/s",
        "Redis CPU, share of a core",
        "Redis CPU µs/op",
        "Redis commands/op",
        "operations/s at one full Redis core",
    ]
    rows = [
        [
            s.description,
            _report.fmt_rate(s.ops_per_sec),
            f"{s.redis_share:.0%}",
            f"{s.cpu_us_per_op:.1f}",
            f"{s.commands_per_op:.2f}",
            _report.fmt_rate(s.ops_per_core_second),
        ]
        for s in samples
    ]
    return _report.markdown_table(header, rows, "lrrrrr")


def ceiling_section(samples: Sequence[CeilingSample]) -> str:
    return (
        "## Redis driven hard with the limiter's script\n\n"
        + ceiling_table(samples)
        + "\nAn operation is one `EVALSHA` of the check script (one request's rate-limit check). "
        "The last column is 1 / Redis CPU per operation: what one Redis core carries when the "
        "clients are not the limit. Where Redis's share stays well below one core, the clients "
        "(on the same cores) were the limit, not Redis.\n"
    )


def model_section(summaries: Sequence[WorkerSummary], ceiling: Sequence[CeilingSample]) -> str:
    """The capacity model's figures from this run: requests/s per shard and per cluster."""
    sources: list[tuple[str, float]] = []
    if summaries:
        worst = max(summaries, key=lambda s: s.redis_cpu_us)
        sources.append(
            (f"served requests (the highest of the N above, {worst.workers} worker(s))",
             worst.redis_cpu_us)
        )  # fmt: skip
    for sample in ceiling:
        sources.append((sample.description, sample.cpu_us_per_op))
    header = [
        "Redis CPU per request measured with",
        "µs",
        "one shard at 100%",
        f"one shard at {PLANNING_SHARE:.0%}",
        *(f"{k} shards at {PLANNING_SHARE:.0%}" for k in SHARDS if k > 1),
    ]
    rows = []
    for label, cpu_us in sources:
        per_shard = 1e6 / cpu_us
        rows.append(
            [
                label,
                f"{cpu_us:.1f}",
                _report.fmt_rate(per_shard),
                _report.fmt_rate(per_shard * PLANNING_SHARE),
                *(_report.fmt_rate(k * per_shard * PLANNING_SHARE) for k in SHARDS if k > 1),
            ]
        )
    workers = ""
    one = next((s for s in summaries if s.workers == 1), None)
    if one is not None and sources:
        per_worker = 1e6 / one.app_cpu_us
        per_shard = 1e6 / sources[0][1] * PLANNING_SHARE
        workers = (
            f"\nOne worker at a full core: 1 / worker CPU per request with 1 worker = "
            f"{_report.fmt_rate(per_worker)} requests/s (bare FastAPI: "
            f"{_report.fmt_rate(1e6 / one.bare_cpu_us)}). One shard at {PLANNING_SHARE:.0%} by the "
            f"first row keeps up with about {per_shard / per_worker:.0f} such workers.\n"
        )
    return (
        "## The model's figures from this run\n\n"
        "Limited requests per second, from Redis CPU per request alone (see "
        "[the model](#the-capacity-model) for what this assumes).\n\n"
        + _report.markdown_table(header, rows, "lr" + "r" * (len(header) - 2))
        + workers
    )


def machine_info(command: str, settings: WrkSettings, redis_version: str) -> dict[str, Any]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": f"`{command}`",
        "commit": _git_commit(),
        "machine": f"{os.cpu_count()} cores, {_cpu_model()}, {platform.system()} "
        f"{platform.release()}",
        "load average at start (1, 5, 15 min)": ", ".join(f"{x:.2f}" for x in os.getloadavg()),
        "Python": f"{platform.python_implementation()} {platform.python_version()}",
        "server": "uvicorn --workers N, " + " ".join(server_options()) + ", no pinning",
        "load generator": f"{wrk_version()}: `{settings.describe()}`, on 127.0.0.1",
        "redis (private, free port, no persistence)": redis_version,
        "packages": versions,
    }


def history_entry(
    info: dict[str, Any],
    summaries: Sequence[WorkerSummary],
    ceiling: Sequence[CeilingSample],
    cores: int,
) -> str:
    """A dated entry for HISTORY.md: the run's conditions and its two tables."""
    conditions = (
        f"{info['command']} on commit {info['commit']}: {info['machine']}; "
        f"load average {info['load average at start (1, 5, 15 min)']} at start, "
        f"{info['load average at end']} at end; {info['duration of the run']}."
    )
    note = f" {info['note'][0].upper()}{info['note'][1:]}." if "note" in info else ""
    return (
        f"### {info['date']}\n\n{conditions}{note}\n\n"
        + workers_table(summaries, cores)
        + (f"\n{failed_open_note(summaries).rstrip()}\n" if failed_open_note(summaries) else "")
        + "\n"
        + ceiling_table(ceiling)
    )


def update_history(path: Path, entry: str) -> None:
    """Append ``entry`` at the end of this benchmark's topic (created at the end if missing)."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmark history\n"
    start = text.find(HISTORY_TOPIC)
    if start == -1:
        path.write_text(f"{text.rstrip()}\n\n{HISTORY_TOPIC}\n\n{entry.rstrip()}\n", "utf-8")
        return
    following = text.find("\n## ", start + len(HISTORY_TOPIC))
    end = len(text) if following == -1 else following
    head, tail = text[:end].rstrip(), text[end:]
    path.write_text(f"{head}\n\n{entry.rstrip()}\n{tail}", encoding="utf-8")


def update_doc(path: Path, generated: str) -> None:
    text = path.read_text(encoding="utf-8")
    start, end = text.find(BEGIN), text.find(END)
    if start == -1 or end < start:
        raise SystemExit(f"{path} lacks the markers {BEGIN!r} and {END!r}")
    block = f"{BEGIN}\n\n{generated.rstrip()}\n\n{END}"
    path.write_text(text[:start] + block + text[end + len(END) :], encoding="utf-8")


# ---- the command ----------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.workers", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short smoke run; keeps the docs")
    parser.add_argument("--rounds", type=int, help="rounds of wrk over every (N, app)")
    parser.add_argument("--duration", type=int, help="seconds of wrk per run")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections")
    parser.add_argument(
        "--workers", default=",".join(map(str, WORKER_COUNTS)), help="worker counts, e.g. 1,2,4"
    )
    parser.add_argument("--no-doc", action="store_true", help="print only: no doc, no history")
    parser.add_argument("--write-doc", action="store_true", help="write them after --quick")
    parser.add_argument("--doc", type=Path, default=DOC_PATH, help="the doc with the markers")
    parser.add_argument("--history", type=Path, default=HISTORY_PATH)
    # A driver process of the ceiling measure (started by the run itself).
    parser.add_argument("--drive", metavar="REDIS_URL", help=argparse.SUPPRESS)
    parser.add_argument("--drive-id", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--drive-seconds", type=float, default=5, help=argparse.SUPPRESS)
    parser.add_argument("--identities", type=int, default=10_000, help=argparse.SUPPRESS)
    parser.add_argument("--concurrency", type=int, default=256, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("rounds", "duration", "connections"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be at least 1")
    try:
        args.worker_counts = [int(n) for n in args.workers.split(",") if n.strip()]
    except ValueError:
        parser.error("--workers takes whole numbers, e.g. 1,2,4")
    if not args.worker_counts or min(args.worker_counts) < 1:
        parser.error("--workers takes whole numbers of at least 1, e.g. 1,2,4")
    return args


def _log(message: str) -> None:
    print(message, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.drive:
        return drive_storage(args)
    profile = QUICK if args.quick else FULL
    settings = WrkSettings(
        connections=args.connections, duration_s=args.duration or profile.duration_s
    )
    rounds = args.rounds or profile.rounds
    cores = os.cpu_count() or 1
    command = shlex.join(
        ["python", "-m", "benchmarks.workers", *(argv if argv is not None else sys.argv[1:])]
    )
    started = time.monotonic()
    with RedisProcess() as redis:
        _log(f"private redis-server on 127.0.0.1:{redis.port}")
        info = machine_info(command, settings, redis.version())
        samples = run_workers(
            args.worker_counts,
            redis.url,
            settings=settings,
            rounds=rounds,
            warmup_s=profile.warmup_s,
            log=_log,
        )
        _log("Redis's ceiling: redis-benchmark with the app's EVALSHA")
        with worker_servers([1], redis.url, _log) as one:
            command_argv = capture_evalsha(redis.url, one[(1, APP)].port)
        ceiling = [
            redis_benchmark(redis.url, redis.port, command_argv, operations=profile.bench_ops)
        ]
        _log("Redis's ceiling: RedisStorage from several processes")
        ceiling.append(
            storage_drive(
                redis.url,
                drivers=profile.drivers,
                seconds=profile.drive_s,
                identities=10_000,
                concurrency=256,
            )
        )
    summaries = summarize_workers(samples)
    info["duration of the run"] = f"{time.monotonic() - started:.0f} s"
    info["load average at end"] = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    oversubscribed = [n for n in args.worker_counts if n > cores]
    if oversubscribed:
        info["note"] = (
            f"this machine has {cores} cores: N = {', '.join(map(str, oversubscribed))} is "
            "oversubscribed (more workers than cores), and wrk and Redis share the same cores "
            "at every N"
        )
    generated = _report.render(
        [
            _report.machine_section(info),
            workers_section(summaries, cores),
            ceiling_section(ceiling),
            model_section(summaries, ceiling),
        ]
    )
    print("\n" + generated)

    raw = {
        "info": info,
        "workers": [dataclasses.asdict(s) for s in samples],
        "summaries": [dataclasses.asdict(s) for s in summaries],
        "ceiling": [dataclasses.asdict(s) for s in ceiling],
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS_DIR / f"workers-{stamp}.json"
    path.write_text(json.dumps(raw, indent=2, default=str), encoding="utf-8")
    print(f"raw results: {path}")
    if not args.no_doc and (args.write_doc or not args.quick):
        update_doc(args.doc, generated)
        print(f"rewrote {args.doc}")
        entry = history_entry(info, summaries, ceiling, cores)
        update_history(args.history, entry)
        print(f"appended to {args.history}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
