"""The benchmark harness's own logic, on fixed text: no wrk, no server, no timing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from loopback import RedisServer

from benchmarks import _report
from benchmarks._wrk import WrkOutputError, parse_wrk
from benchmarks.apps import BODY, ROUTE, VARIANTS, BenchEnv, HttpVariant, bare
from benchmarks.capacity import CapacitySample, summarize_capacity, with_capacity
from benchmarks.http_bench import HttpSample, round_order, summarize
from benchmarks.micro import MICRO_CASES, Call, CaseUnavailable, MicroCase, measure
from benchmarks.run import select
from benchmarks.workers import storage_drive

WRK_OUTPUT = """\
Running 5s test @ http://127.0.0.1:41234/
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     6.04ms    1.20ms  30.00ms   90.00%
    Req/Sec    10.62k   500.00    11.00k    70.00%
  Latency Distribution
     50%  850.00us
     75%    6.20ms
     90%    7.00ms
     99%    1.02s
  52842 requests in 5.00s, 7.46MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 10
Requests/sec:  10565.17
Transfer/sec:      1.49MB
"""


def _sample(variant: str, round_: int, rps: float, p99: float = 5.0) -> HttpSample:
    return HttpSample(variant, round_, rps, 1.0, p99, int(rps), 0, 0)


def test_parse_wrk_reads_throughput_percentiles_and_errors() -> None:
    """Requests/sec, every percentile converted to ms, and both kinds of error are read."""
    result = parse_wrk(WRK_OUTPUT)
    assert result.requests_per_sec == 10565.17
    assert result.requests == 52842
    assert result.duration_s == 5.0
    assert result.latency_ms == {50: 0.85, 75: 6.2, 90: 7.0, 99: 1020.0}
    assert result.p99_ms == 1020.0
    assert (result.non_2xx, result.socket_errors) == (10, 3)
    assert not result.clean


def test_parse_wrk_clean_run_has_no_errors() -> None:
    """A report without error lines is a clean run."""
    text = WRK_OUTPUT.replace("  Socket errors: connect 0, read 2, write 0, timeout 1\n", "")
    result = parse_wrk(text.replace("  Non-2xx or 3xx responses: 10\n", ""))
    assert result.clean


def test_parse_wrk_rejects_a_report_without_latency() -> None:
    """Output of wrk run without --latency (or a failure) is refused, not read as zeros."""
    text = "\n".join(line for line in WRK_OUTPUT.splitlines() if "%" not in line)
    with pytest.raises(WrkOutputError):
        parse_wrk(text)


def test_summarize_takes_each_rounds_ratio_against_bare_of_that_round() -> None:
    """A variant's ratio is the median of per-round ratios, so drift between rounds cancels."""
    samples = [
        _sample("bare", 0, 1000.0),
        _sample("noop_asgi", 0, 900.0, p99=4.0),
        _sample("bare", 1, 2000.0),
        _sample("noop_asgi", 1, 1900.0, p99=8.0),
        _sample("bare", 2, 1000.0),
        _sample("noop_asgi", 2, 1000.0, p99=6.0),
    ]
    by_name = {s.variant: s for s in summarize(samples)}
    noop = by_name["noop_asgi"]
    assert noop.ratio == pytest.approx(0.95)
    assert (noop.ratio_min, noop.ratio_max) == (pytest.approx(0.9), pytest.approx(1.0))
    assert noop.requests_per_sec == 1000.0
    assert noop.p99_ms == 6.0
    assert by_name["bare"].ratio == 1.0


def test_summarize_needs_bare_in_the_same_run() -> None:
    """Without the baseline no ratio can be given, and the harness says so."""
    with pytest.raises(ValueError, match="bare"):
        summarize([_sample("noop_asgi", 0, 900.0)])


def test_capacity_is_requests_per_cpu_second_against_bare_of_the_same_round() -> None:
    """A variant's capacity ratio compares CPU per request within each round, not across."""
    samples = [
        CapacitySample("bare", 0, 1000, 0.5, 0, 0),  # 2000 per CPU-second
        CapacitySample("noop_asgi", 0, 900, 0.5, 0, 0),  # 1800: 0.9
        CapacitySample("bare", 1, 1000, 1.0, 0, 0),  # a slow round: 1000
        CapacitySample("noop_asgi", 1, 500, 0.5, 0, 0),  # 1000: 1.0
        CapacitySample("bare", 2, 1000, 0.5, 0, 0),
        CapacitySample("noop_asgi", 2, 950, 0.5, 0, 0),  # 0.95
    ]
    noop = summarize_capacity(samples)["noop_asgi"]
    assert noop.ratio == pytest.approx(0.95)
    assert (noop.ratio_min, noop.ratio_max) == (pytest.approx(0.9), pytest.approx(1.0))
    assert noop.cpu_us_per_request == pytest.approx(0.5 / 900 * 1e6)  # median of 556, 1000, 526
    with pytest.raises(ValueError, match="bare"):
        summarize_capacity(samples[1:2])


def test_http_section_shows_capacity_next_to_throughput() -> None:
    """The capacity columns carry the figure, its range and CPU per request."""
    summaries = summarize([_sample("bare", 0, 1000.0), _sample("noop_asgi", 0, 990.0)])
    capacity = summarize_capacity(
        [CapacitySample("bare", 0, 1000, 0.5, 0, 0), CapacitySample("noop_asgi", 0, 960, 0.5, 0, 0)]
    )
    text = _report.http_section(with_capacity(summaries, capacity))
    assert "| 0.99 | 0.99-0.99 | 521 | 0.960 | 0.960-0.960 | 0 | 0 |" in text


def test_round_order_puts_every_variant_in_every_position() -> None:
    """Rotating by one per round spreads position effects over all variants."""
    names = ["a", "b", "c"]
    orders = [round_order(names, r) for r in range(3)]
    assert orders == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    assert {order[0] for order in orders} == set(names)


def test_markdown_table_aligns_and_escapes_pipes() -> None:
    """The table writer emits GitHub Markdown with right-aligned figures."""
    table = _report.markdown_table(["name", "req/s"], [["a|b", "1,000"]], "lr")
    assert table == "| name | req/s |\n| :--- | ---: |\n| a\\|b | 1,000 |\n"


def test_http_section_starts_every_group_table_with_bare() -> None:
    """Each group's table carries bare for reference, and ratios are printed to two places."""
    samples = [
        _sample("bare", 0, 1000.0),
        _sample("resilience_errors_ids", 0, 980.0),
        _sample("slowapi_memory", 0, 350.0),
    ]
    text = _report.http_section(summarize(samples))
    foundation, rate_limit = text.split("### ")[1:]
    assert foundation.startswith("Correlation IDs")
    for section in (foundation, rate_limit):
        rows = [line for line in section.splitlines() if line.startswith("| `")]
        assert rows[0].startswith("| `bare` |")
    assert "| 980 | 5.00 | 0.98 | 0.98-0.98 | - | - | - | 0 | 0 |" in foundation
    assert "| 0.35 |" in rate_limit


def test_update_doc_rewrites_only_the_generated_block(tmp_path: Path) -> None:
    """The hand-written header survives a rewrite; the old figures do not."""
    doc = tmp_path / "benchmarks.md"
    doc.write_text(f"# Header\n\nMethod.\n\n{_report.BEGIN}\nold\n{_report.END}\n")
    _report.update_doc(doc, "new figures\n")
    text = doc.read_text()
    assert text.startswith("# Header\n\nMethod.\n\n")
    assert "new figures" in text
    assert "old" not in text
    _report.update_doc(doc, "newer\n")
    assert doc.read_text().count(_report.BEGIN) == 1


def test_update_doc_creates_a_missing_doc(tmp_path: Path) -> None:
    """A first run writes a default header and the generated block."""
    doc = tmp_path / "docs" / "benchmarks.md"
    _report.update_doc(doc, "figures\n")
    assert doc.read_text().startswith("# Benchmarks")


def test_select_filters_every_section_and_rejects_unknown_names() -> None:
    """--only picks names across sections; a typo fails instead of silently measuring nothing."""
    chosen = select("noop_asgi,circuitbreaker", ["http", "micro", "client"])
    assert chosen == {"http": ["noop_asgi"], "micro": ["circuitbreaker"]}
    with pytest.raises(SystemExit, match="no_such"):
        select("no_such", ["http"])


def test_variant_factory_accepts_an_import_string() -> None:
    """A registry entry may name its factory as ``module:function``."""
    by_string = HttpVariant("x", "benchmarks.apps:bare", "foundation")
    by_callable = HttpVariant("x", bare, "foundation")
    assert type(by_string.build(BenchEnv())) is type(by_callable.build(BenchEnv()))


@pytest.mark.anyio
@pytest.mark.parametrize("name", [name for name, spec in VARIANTS.items() if not spec.needs_redis])
async def test_every_variant_serves_the_same_body(name: str) -> None:
    """Variants differ only in what wraps the route: same status, same body, headers present."""
    spec = VARIANTS[name]
    app = spec.build(BenchEnv())
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        response = await client.get(ROUTE)
        again = await client.get(ROUTE)
    assert response.status_code == 200
    assert response.content == BODY
    assert all(h in response.headers for h in spec.expect_headers)
    # A flood variant refuses every request after its first; the others serve them all.
    assert again.status_code == (429 if spec.refuses else 200)


def test_registry_entries_are_complete() -> None:
    """Every variant has a description and a group, and bare is registered."""
    assert "bare" in VARIANTS
    for name, spec in VARIANTS.items():
        assert spec.description, name
        assert spec.group, name


async def _missing_library() -> Call:
    raise CaseUnavailable("needs a library that is not installed")


@pytest.mark.anyio
async def test_micro_measures_overhead_against_its_own_baseline() -> None:
    """Each case is compared with the baseline of its kind; a missing library is reported."""
    cases = {
        **MICRO_CASES,
        "missing": MicroCase("a peer that is absent", _missing_library, "breaker"),
    }
    summaries = await measure(
        ["asgi_noop", "missing"], repeats=2, target_s=0.001, cases=cases, log=lambda _: None
    )
    by_name = {s.case: s for s in summaries}
    assert set(by_name) == {"plain_await", "plain_call", "asgi_plain", "asgi_noop", "missing"}
    assert by_name["asgi_plain"].overhead_ns == 0.0
    assert by_name["asgi_noop"].per_call_ns > 0
    assert by_name["missing"].unavailable == "needs a library that is not installed"
    table = _report.micro_section(summaries)
    assert "not run: needs a library that is not installed" in table


def test_instructions_driver_sends_requests_in_process() -> None:
    """The callgrind driver runs a variant's app in process without a server."""
    from benchmarks.instructions import drive

    drive("resilience_errors_ids", 5)


def test_limiter_parts_drives_every_part_in_its_own_process() -> None:
    """Each part's app serves requests; the patching stays in the child process."""
    import subprocess
    import sys

    from benchmarks.limiter_parts import PARTS

    code = "from benchmarks.limiter_parts import drive\nimport sys\ndrive(sys.argv[1], 3)\n"
    for part in PARTS:
        done = subprocess.run(
            [sys.executable, "-c", code, part], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr[-2000:]
    bad = subprocess.run(
        [sys.executable, "-c", code, "nothing"], capture_output=True, text=True, timeout=60
    )
    assert "unknown part 'nothing'" in bad.stderr


@pytest.mark.anyio
async def test_gc_count_app_reports_its_collections_at_shutdown(tmp_path: Path) -> None:
    """The served app writes the collector's counts when the lifespan completes its shutdown."""
    import gc

    from benchmarks.gc_count import GcCounter, counting_app

    async def lifespan_app(scope: Any, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return

    counter = GcCounter()
    gc.callbacks.append(counter)
    try:
        cycle: list[Any] = []
        cycle.append(cycle)
        del cycle  # garbage only a collection can free
        gc.collect()
    finally:
        gc.callbacks.remove(counter)
    report = tmp_path / "gc.json"
    messages = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])

    async def receive() -> Any:
        return next(messages)

    async def send(message: Any) -> None:
        pass

    await counting_app(lifespan_app, counter, report)({"type": "lifespan"}, receive, send)
    figures = json.loads(report.read_text())
    assert figures["collections"][2] >= 1  # the full collection above
    assert figures["collected"] >= 1  # the cycle it freed
    assert figures["seconds"] > 0  # time from the "start" to the "stop" callback


def test_count_growth_reads_the_step_up_per_request_and_the_peak() -> None:
    """Requests leave 9 objects each until a round ends and frees them: rise 9, peak 27."""
    from benchmarks.gc_count import count_growth

    counts = [0, 9, 18, 27, 3, 12, 21, 2, 11]
    assert count_growth(counts) == {"rise": 9, "peak": 27}
    assert count_growth([5, 5, 1]) == {"rise": 0, "peak": 5}
    assert count_growth([]) == {"rise": 0, "peak": 0}


def test_gc_threshold_option_reaches_the_served_app(monkeypatch: pytest.MonkeyPatch) -> None:
    """BENCH_GC_THRESHOLD sets the gen-0 threshold of the server that builds the app."""
    import gc

    from benchmarks.apps import GC_THRESHOLD_ENV, VARIANT_ENV, create_app

    before = gc.get_threshold()
    monkeypatch.setenv(VARIANT_ENV, "bare")
    monkeypatch.setenv(GC_THRESHOLD_ENV, "7000")
    try:
        create_app()
        assert gc.get_threshold()[0] == 7000
    finally:
        gc.set_threshold(*before)


def test_the_harness_leaves_the_measured_process_context_empty() -> None:
    """Importing the harness must not set a context variable in the main context (pytest's
    import sets ``decimal``'s): every request's context starts from it, and a non-empty one
    changes what a context-variable write costs the collector (ADR 0044)."""
    import subprocess
    import sys

    code = (
        "import contextvars, benchmarks.run, benchmarks.gc_count, benchmarks.server_instructions\n"
        "print(len(contextvars.copy_context()))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "0"


def test_cpu_seconds_skips_a_thread_that_ended_while_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """A server's helper thread can end between listing its threads and reading its figure:
    the capacity pass must go on, not fail the run."""
    import os
    import subprocess
    import sys

    from benchmarks import capacity

    real_listdir = os.listdir
    monkeypatch.setattr(capacity.os, "listdir", lambda path: [*real_listdir(path), "2147483646"])
    assert capacity.cpu_seconds(os.getpid()) > 0
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        capacity.pin_process(child.pid, sorted(os.sched_getaffinity(0))[0])
    finally:
        child.kill()
        child.wait()


def test_idle_servers_option_defaults_to_zero_and_rejects_negatives(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``--idle-servers`` (the capacity experiment) starts no extra server unless asked."""
    from benchmarks.run import parse_args

    assert parse_args([]).idle_servers == 0
    assert parse_args(["--idle-servers", "13"]).idle_servers == 13
    with pytest.raises(SystemExit):
        parse_args(["--idle-servers", "-1"])
    assert "--idle-servers must be at least 0" in capsys.readouterr().err


def _chart_results() -> dict[str, Any]:
    """A small results structure shaped as ``benchmarks.run`` writes it."""

    def http(variant: str, description: str, group: str, capacity: float | None) -> dict[str, Any]:
        return {
            "variant": variant,
            "description": description,
            "group": group,
            "capacity_ratio": capacity,
            "capacity_min": None if capacity is None else capacity - 0.02,
            "capacity_max": None if capacity is None else capacity + 0.01,
        }

    def micro(case: str, description: str, group: str, overhead_ns: float) -> dict[str, Any]:
        return {
            "case": case,
            "description": description,
            "group": group,
            "overhead_ns": overhead_ns,
            "overhead_min_ns": overhead_ns * 0.9,
            "overhead_max_ns": overhead_ns * 1.1,
            "unavailable": None,
        }

    return {
        "info": {},
        "http": {
            "summaries": [
                http("bare", "FastAPI, nothing added", "foundation", 1.0),
                http("noop_asgi", "a no-op (reference)", "foundation", 0.99),
                http("resilience_errors_ids", "fastapi-resilience ids", "foundation", 0.9),
                http("asgi_correlation_id", "asgi-correlation-id (peer)", "foundation", 0.85),
                http("slowapi_memory", "slowapi (peer)", "rate_limit", 0.3),
                http("refused_memory", "fastapi-resilience refusals", "flood", None),
            ]
        },
        "micro": [
            micro("plain_await", "baseline", "baseline", 0.0),
            micro("resilience_breaker", "fastapi-resilience breaker", "breaker", 370.0),
            micro("pybreaker_async", "pybreaker (peer)", "breaker", 18_870.0),
            micro("resilience_retry", "fastapi-resilience retry", "retry", 340.0),
            {**micro("stamina_decorator", "stamina (peer)", "retry", 0.0), "unavailable": "no"},
        ],
    }


def test_charts_group_bars_as_the_tables_and_tell_peers_apart() -> None:
    """bare is the 1.0 line, not a bar; a variant without capacity is left out."""
    from benchmarks import _charts

    raw = _chart_results()
    capacity = _charts.capacity_bars(raw["http"]["summaries"])
    assert {g: [b.label for b in bars] for g, bars in capacity.items()} == {
        "foundation": ["noop_asgi", "resilience_errors_ids", "asgi_correlation_id"],
        "rate_limit": ["slowapi_memory"],
    }
    assert [b.kind for b in capacity["foundation"]] == ["reference", "library", "peer"]
    overhead = _charts.overhead_bars(raw["micro"])
    assert [b.label for b in overhead["retry"]] == ["resilience_retry"]  # stamina did not run
    assert overhead["breaker"][1].value == pytest.approx(18.87)


def test_charts_from_writes_both_pngs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--charts-from`` redraws both charts from a results file, without measuring."""
    from benchmarks import _charts
    from benchmarks.run import main

    results = tmp_path / "results.json"
    results.write_text(json.dumps(_chart_results()))
    assert main(["--charts-from", str(results), "--charts-dir", str(tmp_path / "images")]) == 0
    for name in (_charts.CAPACITY_PNG, _charts.OVERHEAD_PNG):
        data = (tmp_path / "images" / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
        assert len(data) > 10_000
    assert "skipped" not in capsys.readouterr().out


def test_charts_draw_what_the_results_hold_and_say_what_they_skip(tmp_path: Path) -> None:
    """A run without the micro section still gets its capacity chart."""
    from benchmarks import _charts

    raw = _chart_results()
    del raw["micro"]
    lines: list[str] = []
    written = _charts.draw_charts(raw, tmp_path, log=lines.append)
    assert [p.name for p in written] == [_charts.CAPACITY_PNG]
    assert not (tmp_path / _charts.OVERHEAD_PNG).exists()
    assert any(line.startswith(f"skipped {_charts.OVERHEAD_PNG}") for line in lines)


def test_charts_without_matplotlib_say_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """No traceback: one line naming the package, a non-zero exit, no file written."""
    import sys

    from benchmarks.run import main

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes ``import matplotlib`` fail
    results = tmp_path / "results.json"
    results.write_text(json.dumps(_chart_results()))
    assert main(["--charts-from", str(results), "--charts-dir", str(tmp_path / "images")]) == 1
    err = capsys.readouterr().err
    assert "matplotlib" in err
    assert "pip install" in err
    assert "Traceback" not in err
    assert not (tmp_path / "images").exists()


def test_charts_from_a_missing_file_is_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A wrong path is reported in one line, not a traceback."""
    from benchmarks.run import main

    assert main(["--charts-from", str(tmp_path / "nope.json")]) == 2
    assert "--charts-from" in capsys.readouterr().err


@pytest.mark.redis
def test_storage_drive_counts_every_check_redis_ran(redis_server: RedisServer) -> None:
    """The ceiling's Redis CPU per operation divides Redis's counters by the checks counted:
    between the two readings Redis ran exactly those checks, none from the warm-up or the
    tail (one EVALSHA a check)."""
    sample = storage_drive(redis_server.url, drivers=2, seconds=0.3, identities=50, concurrency=8)
    assert sample.operations > 0
    assert sample.redis.evalsha == sample.operations
