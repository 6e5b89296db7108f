"""The HTTP benchmark: each variant in its own uvicorn process, loaded by wrk, interleaved.

All variant servers are started first and stay up. Each round then runs wrk once against every
variant, in an order rotated by one each round, so slow drift of the machine (other processes,
thermal state) spreads over all variants instead of landing on one. A variant's ratio is taken
per round against ``bare`` in that same round, and the median over rounds is reported.
"""

from __future__ import annotations

import http.client
import os
import statistics
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

from benchmarks._procs import ROOT, RedisProcess, UvicornServer
from benchmarks._wrk import WrkResult, WrkSettings, run_wrk
from benchmarks.apps import (
    BASELINE_SRC_ENV,
    BODY,
    REDIS_URL_ENV,
    ROUTE,
    VARIANT_ENV,
    VARIANTS,
    HttpVariant,
)

BASELINE = "bare"
APP_FACTORY = "benchmarks.apps:create_app"


@dataclass(frozen=True, slots=True)
class HttpSample:
    """One wrk run of one variant in one round."""

    variant: str
    round: int
    requests_per_sec: float
    p50_ms: float
    p99_ms: float
    requests: int
    non_2xx: int
    socket_errors: int


@dataclass(frozen=True, slots=True)
class HttpSummary:
    """A variant over all rounds: medians, and the spread of its ratio to ``bare``."""

    variant: str
    description: str
    group: str
    rounds: int
    requests_per_sec: float
    p99_ms: float
    ratio: float
    ratio_min: float
    ratio_max: float
    non_2xx: int
    socket_errors: int
    #: From the capacity run (``benchmarks.capacity``): each variant loaded beside ``bare``.
    cpu_us_per_request: float | None = None
    capacity_ratio: float | None = None
    capacity_min: float | None = None
    capacity_max: float | None = None


def sample_from(variant: str, round_: int, result: WrkResult) -> HttpSample:
    return HttpSample(
        variant=variant,
        round=round_,
        requests_per_sec=result.requests_per_sec,
        p50_ms=result.latency_ms.get(50, float("nan")),
        p99_ms=result.p99_ms,
        requests=result.requests,
        non_2xx=result.non_2xx,
        socket_errors=result.socket_errors,
    )


def summarize(
    samples: Sequence[HttpSample], variants: dict[str, HttpVariant] = VARIANTS
) -> list[HttpSummary]:
    """Medians per variant, with each round's ratio taken against ``bare`` of that round."""
    by_variant: dict[str, list[HttpSample]] = {}
    for sample in samples:
        by_variant.setdefault(sample.variant, []).append(sample)
    baseline = {s.round: s.requests_per_sec for s in by_variant.get(BASELINE, [])}
    if not baseline:
        raise ValueError(f"no {BASELINE!r} samples: ratios need the baseline in the same run")
    summaries = []
    for name, runs in by_variant.items():
        ratios = [s.requests_per_sec / baseline[s.round] for s in runs if s.round in baseline]
        spec = variants[name]
        summaries.append(
            HttpSummary(
                variant=name,
                description=spec.description,
                group=spec.group,
                rounds=len(runs),
                requests_per_sec=statistics.median(s.requests_per_sec for s in runs),
                p99_ms=statistics.median(s.p99_ms for s in runs),
                ratio=statistics.median(ratios),
                ratio_min=min(ratios),
                ratio_max=max(ratios),
                non_2xx=sum(s.non_2xx for s in runs),
                socket_errors=sum(s.socket_errors for s in runs),
            )
        )
    return summaries


def round_order(names: Sequence[str], round_: int) -> list[str]:
    """The variants rotated by ``round_``: each variant takes each position in turn."""
    shift = round_ % len(names)
    return [*names[shift:], *names[:shift]]


def check_variant(name: str, spec: HttpVariant, port: int) -> None:
    """One request before measuring: same body as every variant, and the variant is active."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", ROUTE)
        response = conn.getresponse()
        body = response.read()
        headers = {k.lower() for k, _ in response.getheaders()}
    finally:
        conn.close()
    if response.status != 200 or body != BODY:
        raise RuntimeError(f"variant {name}: answered {response.status} {body!r}, not 200 {BODY!r}")
    missing = [h for h in spec.expect_headers if h not in headers]
    if missing:
        raise RuntimeError(f"variant {name}: response lacks {missing}; is the variant active?")


@dataclass(slots=True)
class RunningServers:
    """The variants' servers, by name, and the private Redis's version and pid if one started."""

    servers: dict[str, UvicornServer]
    redis_version: str | None = None
    redis_pid: int | None = None


@contextmanager
def started_servers(
    names: Sequence[str], *, log: Callable[[str], None] = print
) -> Iterator[RunningServers]:
    """Start one uvicorn server per variant (and a private Redis if any needs it), checked."""
    specs = {name: VARIANTS[name] for name in names}
    with ExitStack() as stack:
        running = RunningServers({})
        redis_url = None
        if any(spec.needs_redis for spec in specs.values()):
            redis = stack.enter_context(RedisProcess())
            redis_url, running.redis_version = redis.url, redis.version()
            running.redis_pid = redis.pid
            log(f"private redis-server on 127.0.0.1:{redis.port}")
        for name, spec in specs.items():
            env = {VARIANT_ENV: name}
            if spec.baseline:
                # The earlier commit's package first; this tree's benchmarks from the cwd.
                env["PYTHONPATH"] = os.pathsep.join((os.environ[BASELINE_SRC_ENV], str(ROOT)))
            if spec.needs_redis and redis_url:
                env[REDIS_URL_ENV] = redis_url
            server = UvicornServer(APP_FACTORY, env=env)
            stack.callback(server.stop)
            server.start()
            check_variant(name, spec, server.port)
            running.servers[name] = server
        yield running


def run_http(
    names: Sequence[str],
    *,
    settings: WrkSettings,
    rounds: int,
    warmup_s: int,
    log: Callable[[str], None] = print,
) -> tuple[list[HttpSample], str | None]:
    """Measure ``names`` (``bare`` included) one after another; samples and Redis's version."""
    samples: list[HttpSample] = []
    with started_servers(names, log=log) as running:
        servers = running.servers
        for name, server in servers.items():
            log(f"warm-up {name} ({warmup_s}s)")
            run_wrk(settings, server.url, duration_s=warmup_s)
        for round_ in range(rounds):
            for name in round_order(list(servers), round_):
                result = run_wrk(settings, servers[name].url)
                sample = sample_from(name, round_, result)
                samples.append(sample)
                flag = "" if result.clean else f"  ERRORS non-2xx={result.non_2xx}"
                log(
                    f"round {round_ + 1}/{rounds} {name:<28} {result.requests_per_sec:>9.0f} req/s"
                    f"  p99 {result.p99_ms:6.2f} ms{flag}"
                )
    return samples, running.redis_version
