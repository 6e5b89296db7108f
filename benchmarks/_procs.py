"""The processes a benchmark run owns: a private redis-server and uvicorn servers on loopback.

Every process is started on a free port of 127.0.0.1 and stopped by the harness; nothing here
touches a server the harness did not start (the machine's Redis on 6379 in particular).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

from loopback import RedisServer, free_port, wait_for_port

ROOT = Path(__file__).resolve().parent.parent


def stop_process(proc: subprocess.Popen[bytes], *, timeout: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class RedisProcess:
    """A private ``redis-server`` without persistence, on a free port, for one run.

    The same server the tests start (``loopback.RedisServer``), as a context manager.
    """

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.binary = binary
        self._dir = tempfile.TemporaryDirectory(prefix="bench-redis-")
        self._server = RedisServer(binary, Path(self._dir.name))

    @property
    def port(self) -> int:
        return self._server.port

    @property
    def url(self) -> str:
        return self._server.url

    @property
    def pid(self) -> int | None:
        proc = self._server.proc
        return proc.pid if proc is not None else None

    def version(self) -> str:
        out = subprocess.run([self.binary, "--version"], capture_output=True, text=True).stdout
        return out.strip()

    def __enter__(self) -> RedisProcess:
        self._server.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._server.stop()
        self._dir.cleanup()


def server_options() -> list[str]:
    """The uvicorn options every variant shares: one process, the same loop and HTTP parser.

    uvloop and httptools when both are installed (what production uses), else asyncio and h11;
    either way every variant of a run gets the same pair.
    """
    try:
        import httptools  # noqa: F401
        import uvloop  # noqa: F401
    except ImportError:
        loop, http = "asyncio", "h11"
    else:
        loop, http = "uvloop", "httptools"
    return ["--loop", loop, "--http", http, "--no-access-log", "--log-level", "warning"]


class UvicornServer:
    """``python -m uvicorn <app> --factory`` (one worker unless ``args`` say) on a free port."""

    def __init__(
        self,
        app_factory: str,
        *,
        env: Mapping[str, str],
        prefix: Sequence[str] = (),
        timeout_s: float = 20.0,
        args: Sequence[str] = (),
    ) -> None:
        self.port = free_port()
        #: ``prefix`` runs the server under another program (valgrind); ``timeout_s`` bounds
        #: its start and its stop.
        self._timeout_s = timeout_s
        self.argv = [
            *prefix,
            sys.executable,
            "-m",
            "uvicorn",
            app_factory,
            "--factory",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            *server_options(),
            *args,
        ]
        self._env = {**os.environ, **env}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError("the server is not running")
        return self.proc.pid

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, env=self._env, cwd=ROOT)
        wait_for_port(self.port, proc=self.proc, timeout=self._timeout_s)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout=self._timeout_s)
            self.proc = None
