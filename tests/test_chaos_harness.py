"""The chaos harness's parts, each checked in seconds (the run itself: tests/test_chaos.py).

What a chaos run reports is only as true as its set-up: the short form must run the example
with the example's own policies, nginx must serve whoever starts it, a failed run must leave
no process behind, and a request must never drop out of the counts.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from loopback import free_port, require_binary, wait_for_port

from benchmarks.chaos.cluster import ROOT, Cluster, nginx_binary, nginx_config
from benchmarks.chaos.load import read_records
from example_app.rate_limits import POLICIES, example_settings

pytestmark = [pytest.mark.slow, pytest.mark.redis]

#: A backend that reads any body and answers ``SIZE`` bytes: bodies this large go through
#: nginx's temp files, not its memory buffers.
SIZE = 200_000
BACKEND = f"""
import http.server, sys

class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        body = b"x" * {SIZE}
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""

#: A server whose every answer says it is gzip and is not: httpx cannot decode it.
UNDECODABLE = """
import http.server, sys

class Handler(http.server.BaseHTTPRequestHandler):
    def answer(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-encoding", "gzip")
        self.send_header("content-length", "9")
        self.end_headers()
        self.wfile.write(b"not gzip!")

    do_GET = do_POST = answer

    def log_message(self, *args):
        pass

http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


def _nginx() -> str:
    found = nginx_binary()
    return found if found is not None else require_binary("nginx")


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@contextmanager
def _python_server(source: str, port: int) -> Iterator[None]:
    proc = subprocess.Popen([sys.executable, "-c", source, str(port)])
    try:
        wait_for_port(port, proc=proc)
        yield
    finally:
        proc.kill()
        proc.wait()


def test_the_short_form_keeps_the_examples_policies(monkeypatch: pytest.MonkeyPatch) -> None:
    """A shorter breaker wait changes that and nothing else of the catalog's policy (its
    cache, timeout, retries and threshold are what the run's answers depend on)."""
    require_binary("redis-server")
    _nginx()
    cluster = Cluster(rate=40, breaker_recovery=1.0)
    try:
        env = cluster.app_env()
    finally:
        cluster.cleanup()
    for key in [k for k in os.environ if k.startswith("RESILIENCE_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        if key.startswith("RESILIENCE_"):
            monkeypatch.setenv(key, value)
    catalog = example_settings().policies["catalog"]
    expected = json.loads(json.dumps(POLICIES["catalog"]))
    expected["breaker"]["recovery_timeout"] = 1.0
    assert catalog.breaker.recovery_timeout == 1.0
    assert catalog.breaker.failure_threshold == expected["breaker"]["failure_threshold"]
    assert catalog.timeout == expected["timeout"]
    assert catalog.cache.ttl == expected["cache"]["ttl"]
    assert catalog.cache.stale_ttl == expected["cache"]["stale_ttl"]
    assert catalog.retry.attempts == expected["retry"]["attempts"]
    assert catalog.retry.max_delay == expected["retry"]["max_delay"]


def test_nginx_passes_bodies_too_large_for_its_buffers(tmp_path: Path) -> None:
    """Whoever starts it (root in CI), nginx can write its temp files in the run's private
    directory: a large request body and a large answer pass."""
    binary = _nginx()
    backend, port = free_port(), free_port()
    tmp_path.chmod(0o700)  # as private as a TemporaryDirectory
    config = tmp_path / "nginx.conf"
    config.write_text(nginx_config(tmp_path, port, [backend]))
    command = [binary, "-p", str(tmp_path), "-e", str(tmp_path / "nginx-error.log")]
    with _python_server(BACKEND, backend):
        nginx = subprocess.Popen([*command, "-c", str(config)])
        try:
            wait_for_port(port, proc=nginx)
            answer = httpx.post(f"http://127.0.0.1:{port}/", content=b"y" * SIZE, timeout=10)
        finally:
            nginx.terminate()
            nginx.wait(timeout=10)
    error_log = (tmp_path / "nginx-error.log").read_text(errors="replace")
    assert (answer.status_code, len(answer.content)) == (200, SIZE), error_log


def test_a_balancer_that_will_not_stop_leaves_no_process_behind(tmp_path: Path) -> None:
    """nginx frozen (SIGSTOP: it cannot act on SIGTERM): stopping the run still ends it, its
    worker, both app processes, the upstream and Redis."""
    require_binary("redis-server")
    _nginx()
    with Cluster(rate=10, workdir=tmp_path) as cluster:
        assert cluster.balancer is not None
        assert cluster.upstream is not None
        assert cluster.redis.proc is not None
        pids = [
            cluster.balancer.pid,
            cluster.upstream.pid,
            cluster.redis.proc.pid,
            *(app.pid for app in cluster.apps if app.pid is not None),
        ]
        assert len(pids) == 5
        ports = [cluster.port, cluster.upstream_port, cluster.redis.port]
        ports += [app.port for app in cluster.apps]
        os.kill(cluster.balancer.pid, signal.SIGSTOP)
    assert [pid for pid in pids if _running(pid)] == []
    assert [port for port in ports if _listening(port)] == []


def test_a_request_whose_answer_cannot_be_read_is_counted_as_never_answered(
    tmp_path: Path,
) -> None:
    """The load generator gives every request it sent a status or an error: one whose answer
    httpx cannot decode is never answered, not left out of both counts."""
    port = free_port()
    out = tmp_path / "records.jsonl"
    with _python_server(UNDECODABLE, port):
        load = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "benchmarks.chaos.load",
                *("--url", f"http://127.0.0.1:{port}", "--rate", "20", "--timeout", "5"),
                *("--out", str(out)),
            ],
            stdin=subprocess.PIPE,
            cwd=str(ROOT),
            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])},
            text=True,
        )
        time.sleep(0.5)
        load.communicate("stop\n", timeout=30)
    records = read_records(out)
    assert records
    assert [r.seq for r in records if r.status is None and r.error is None] == []
    assert {r.error for r in records} == {"client-error (DecodingError)"}
