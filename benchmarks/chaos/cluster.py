"""The processes of a chaos run: redis-server, the upstream, two app processes, nginx.

Everything listens on a free port of 127.0.0.1 and is stopped by the run; nothing here touches
a server the run did not start. Each can be faulted from outside: Redis killed, restarted,
stalled (``SIGSTOP``) and continued; the upstream told to be slow or failing through its
``POST /_control``; an app process killed (``SIGKILL``) and started again on its port.
"""

from __future__ import annotations

import copy
import grp
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import httpx
from loopback import RedisServer, free_port, wait_for_port

from benchmarks.chaos.load import BULK_KEY, METERED_KEY, METERED_SHARE
from example_app.rate_limits import POLICIES

__all__ = ["AppProcess", "Cluster", "nginx_binary", "nginx_config"]

ROOT = Path(__file__).resolve().parents[2]

#: Seconds nginx leaves an app process alone after a failed attempt to reach it.
FAIL_TIMEOUT = 2


def nginx_binary() -> str | None:
    # Debian installs it in /usr/sbin, which is not on every user's PATH.
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")


def nginx_config(workdir: Path, port: int, backends: list[int]) -> str:
    """Round robin over the app processes, as a production balancer would be set up (ADR 0074).

    - A request whose connection to a process fails is sent to the other one, whatever its
      method (``proxy_next_upstream error``: it was never sent); that process is then left
      alone for ``FAIL_TIMEOUT`` seconds (``max_fails=1``), and tried again after.
    - A request that reached a process which died before answering is sent to the other one
      when its method is idempotent (GET); a POST is not (it may have been done): nginx answers
      it 502 itself.
    - Keep-alive connections to the processes, as in production.
    """
    servers = "\n".join(
        f"        server 127.0.0.1:{backend} max_fails=1 fail_timeout={FAIL_TIMEOUT}s;"
        for backend in backends
    )
    temp = "\n".join(
        f"    {kind}_temp_path {workdir / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""worker_processes 1;
daemon off;
{_worker_user()}
pid {workdir / "nginx.pid"};
error_log {workdir / "nginx-error.log"} warn;
events {{
    worker_connections 4096;
}}
http {{
    # One line per request: the load generator's sequence number, the processes tried.
    log_format chaos 'chaos $http_x_chaos_seq $request_method $status "$upstream_addr" '
                     '"$upstream_status"';
    access_log {workdir / "nginx-access.log"} chaos;
{temp}
    upstream apps {{
{servers}
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://apps;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_next_upstream error timeout;
            proxy_connect_timeout 1s;
            proxy_read_timeout 30s;
        }}
    }}
}}
"""


def _worker_user() -> str:
    """Started as root (as in CI), nginx runs its workers as ``nobody``, who cannot write the
    temp paths in a private work directory (a request body too large for memory would be
    answered 500 by nginx); they run as the user who owns that directory instead. Not root:
    the workers are that user already, and the directive would only draw a warning."""
    if os.geteuid() != 0:
        return ""
    user = pwd.getpwuid(os.geteuid()).pw_name
    group = grp.getgrgid(os.getegid()).gr_name
    return f"user {user} {group};"


class AppProcess:
    """One uvicorn process of the example app on a fixed port, so it can come back there."""

    def __init__(self, env: dict[str, str], log: IO[bytes], port: int | None = None) -> None:
        self.port = port or free_port()
        self.env = env
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "example_app.main:app",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--log-level",
                "warning",
                "--no-access-log",
            ],
            env=self.env,
            cwd=str(ROOT),
            stdout=self.log,
            stderr=self.log,
        )
        wait_for_port(self.port, timeout=30, proc=self.proc)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def kill(self) -> None:
        """SIGKILL: no shutdown, the connections in flight die with it."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def _stop(
    proc: subprocess.Popen[bytes] | None, timeout: float = 5.0, *, group: bool = False
) -> None:
    """SIGTERM, and SIGKILL when it has not ended after ``timeout`` seconds: to its whole
    process group when ``group`` (nginx's workers outlive a master killed outright)."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        if group:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
        proc.wait()


class Cluster:
    """The whole system under test; a context manager that stops all of it."""

    def __init__(
        self,
        *,
        rate: float,
        breaker_recovery: float = 10.0,
        runtime_stats: bool = False,
        workdir: Path | None = None,
        app_env: dict[str, str] | None = None,
    ) -> None:
        redis = shutil.which("redis-server")
        nginx = nginx_binary()
        if redis is None or nginx is None:
            missing = "redis-server" if redis is None else "nginx"
            raise RuntimeError(f"{missing} is not installed (apt-get install {missing})")
        self._tmp = tempfile.TemporaryDirectory(prefix="chaos-") if workdir is None else None
        self.workdir = workdir or Path(self._tmp.name)  # type: ignore[union-attr]
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.nginx_bin = nginx
        self.redis = RedisServer(redis, self.workdir)
        self.upstream_port = free_port()
        self.port = free_port()
        self._logs: list[IO[bytes]] = []
        self.upstream: subprocess.Popen[bytes] | None = None
        self.balancer: subprocess.Popen[bytes] | None = None
        self.rate = rate
        self.breaker_recovery = breaker_recovery
        self.runtime_stats = runtime_stats
        #: More environment for the app processes only (``PYTHONTRACEMALLOC``...).
        self.extra_app_env = dict(app_env or {})
        self.apps: list[AppProcess] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def upstream_url(self) -> str:
        return f"http://127.0.0.1:{self.upstream_port}"

    def metered_limit(self) -> int:
        """Half of what the metered key sends per second: about half its requests refused."""
        return max(1, round(self.rate * METERED_SHARE / 2))

    def app_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RESILIENCE_", "EXAMPLE_"))}
        tiers = {
            "anonymous": "10/minute",
            "bulk": "1000000/minute",
            "metered": f"{self.metered_limit()}/second",
        }
        env.update(
            {
                "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
                "RESILIENCE_RATE_LIMIT_STORAGE": self.redis.url,
                "RESILIENCE_RATE_LIMIT_TIERS": json.dumps(tiers),
                "RESILIENCE_RATE_LIMIT_API_KEYS": json.dumps(
                    {BULK_KEY: "bulk", METERED_KEY: "metered"}
                ),
                "EXAMPLE_INVENTORY_URL": self.upstream_url,
                "EXAMPLE_INVENTORY_RECOVERY_SECONDS": str(self.breaker_recovery),
            }
        )
        if self.breaker_recovery != 10.0:
            # The catalog policy's breaker waits as long as the inventory's. The whole policy
            # is given: any RESILIENCE_POLICIES* variable replaces the example's policies, so a
            # lone RECOVERY_TIMEOUT would leave the catalog without its cache, timeout, retry
            # settings and threshold.
            policies = copy.deepcopy(POLICIES)
            policies["catalog"]["breaker"]["recovery_timeout"] = self.breaker_recovery
            env["RESILIENCE_POLICIES"] = json.dumps(policies)
        if self.runtime_stats:
            env["EXAMPLE_RUNTIME_STATS"] = "1"
        env.update(self.extra_app_env)
        return env

    def _log(self, name: str) -> IO[bytes]:
        sink = (self.workdir / f"{name}.log").open("ab")
        self._logs.append(sink)
        return sink

    def start(self) -> None:
        self.redis.start()
        self.upstream = subprocess.Popen(
            [sys.executable, "-m", "example_app.upstream", "--port", str(self.upstream_port)],
            cwd=str(ROOT),
            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])},
            stdout=self._log("upstream"),
            stderr=subprocess.STDOUT,
        )
        wait_for_port(self.upstream_port, timeout=30, proc=self.upstream)
        env = self.app_env()
        self.apps = [AppProcess(env, self._log(f"app{n}")) for n in (1, 2)]
        for app in self.apps:
            app.start()
        config = self.workdir / "nginx.conf"
        config.write_text(nginx_config(self.workdir, self.port, [app.port for app in self.apps]))
        self.balancer = subprocess.Popen(
            [
                self.nginx_bin,
                "-p",
                str(self.workdir),
                "-e",
                str(self.workdir / "nginx-error.log"),
                "-c",
                str(config),
            ],
            stdout=self._log("nginx"),
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: see _stop
        )
        wait_for_port(self.port, timeout=10, proc=self.balancer)
        self.wait_until_serving()

    def wait_until_serving(self, timeout: float = 20.0) -> None:
        """Until ten requests in a row are answered by the app processes through the balancer."""
        deadline = time.monotonic() + timeout
        in_a_row = 0
        with httpx.Client(base_url=self.url, timeout=2.0) as client:
            while in_a_row < 10:
                if time.monotonic() > deadline:
                    raise TimeoutError("the balancer did not serve the app processes in time")
                try:
                    ok = client.get("/orders/1", headers={"X-API-Key": BULK_KEY}).status_code
                except httpx.HTTPError:
                    ok = 0
                in_a_row = in_a_row + 1 if ok == 200 else 0
                if not in_a_row:
                    time.sleep(0.1)

    # The faults -----------------------------------------------------------------------------

    def control(self, **change: Any) -> None:
        """Tell the upstream how to behave (``failure_rate``, ``latency_ms``, ``reset``...)."""
        with httpx.Client(timeout=5.0) as client:
            client.post(f"{self.upstream_url}/_control", json=change).raise_for_status()

    def upstream_healthy(self) -> None:
        self.control(failure_rate=0.0, latency_ms=0, hang=False)

    def kill_app(self, index: int) -> None:
        self.apps[index].kill()

    def restart_app(self, index: int) -> None:
        self.apps[index].start()

    def stop(self) -> None:
        """Stop every process the run started, each even when stopping another failed."""
        try:
            _stop(self.balancer, group=True)
            self.balancer = None
        finally:
            try:
                for app in self.apps:
                    app.stop()
            finally:
                try:
                    _stop(self.upstream)
                    self.upstream = None
                finally:
                    self.redis.stop()
                    for sink in self._logs:
                        sink.close()

    def balancer_log(self) -> dict[int, tuple[int, str, str]]:
        """Per request sequence number: how many more processes nginx tried, the statuses it
        had from each (``502`` for none), the processes."""
        seen: dict[int, tuple[int, str, str]] = {}
        for line in (self.workdir / "nginx-access.log").read_text(errors="replace").splitlines():
            head, _, rest = line.partition(' "')
            words = head.split()
            if len(words) == 4 and words[0] == "chaos" and words[1].isdigit():
                addresses, _, statuses = rest.partition('" "')
                tried = addresses.count(",")
                seen[int(words[1])] = (tried, statuses.rstrip('"'), addresses)
        return seen

    def app_log_text(self) -> str:
        return "\n".join((self.workdir / f"app{n}.log").read_text(errors="replace") for n in (1, 2))

    def cleanup(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> Cluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            self.cleanup()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        self.cleanup()
