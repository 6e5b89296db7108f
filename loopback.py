"""Real servers on 127.0.0.1 for the tests and the benchmarks: ``redis-server``, uvicorn.

Each can be killed, stalled (``SIGSTOP``) and brought back, so fault tests use the real thing.
When a binary is missing the test is skipped on a laptop and fails under ``CI=true``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_binary(name: str) -> str:
    """The binary's path; skip (laptop) or fail (CI) when it is not installed."""
    path = shutil.which(name)
    if path is None:
        # Imported here: the benchmark harness imports this module too, and importing pytest
        # sets the ``decimal`` context variable in the main context, which changes what every
        # context-variable write costs in the process being measured.
        import pytest

        message = f"{name} is not installed (apt-get install {name})"
        if IN_CI:
            pytest.fail(f"CI=true and {message}")
        pytest.skip(message)
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(
    port: int, *, timeout: float = 10.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)  # start-up polling in a sync fixture, not in the code under test
    raise TimeoutError(f"nothing listened on 127.0.0.1:{port} within {timeout}s")


class RedisServer:
    """A private ``redis-server`` (no persistence) that a test may kill, stall and restart."""

    def __init__(self, binary: str, workdir: Path, *, args: Sequence[str] = ()) -> None:
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.args = tuple(args)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.launch()
        try:
            wait_for_port(self.port, proc=self.proc)
        except BaseException:
            self.kill()  # a server that never listened is not left running past its test
            raise

    def launch(self) -> None:
        """Start the process without waiting for its port (several nodes start at once)."""
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
                "--loglevel",
                "warning",
                *self.args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def kill(self) -> None:
        """Kill it outright (SIGKILL): connections drop, the port is refused."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def stall(self) -> None:
        """``kill -STOP``: the port stays open, nothing answers."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def restart(self) -> None:
        self.kill()
        self.start()

    def stop(self) -> None:
        if self.proc is not None:
            self.resume()
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self.proc = None


class RedisCluster:
    """A private Redis Cluster on loopback: ``masters`` masters with one replica each.

    Each node is a ``redis-server --cluster-enabled yes`` (no persistence, its own directory);
    ``redis-cli --cluster create`` joins them. A master may be killed (``SIGKILL``): after the
    node timeout its replica is promoted. Node commands go through redis-py's sync client.
    """

    def __init__(
        self,
        server_binary: str,
        cli_binary: str,
        workdir: Path,
        *,
        masters: int = 3,
        node_timeout_ms: int = 1000,
    ) -> None:
        self.cli_binary = cli_binary
        self.node_timeout_ms = node_timeout_ms
        self.nodes: list[RedisServer] = []
        for _ in range(2 * masters):
            node = RedisServer(server_binary, workdir)
            node.workdir = workdir / f"node-{node.port}"
            node.workdir.mkdir(parents=True, exist_ok=True)
            node.args = (
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                str(node.workdir / f"nodes-{node.port}.conf"),
                "--cluster-node-timeout",
                str(node_timeout_ms),
                # The bus port defaults to port + 10000, past 65535 for a high free port.
                "--cluster-port",
                str(free_port()),
                # Replicas sync at once rather than after the default 5 s, so that a replica is
                # in step (and may be promoted) as soon as the cluster is up.
                "--repl-diskless-sync-delay",
                "0",
            )
            self.nodes.append(node)

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes]

    @property
    def url(self) -> str:
        """``redis+cluster://`` with every node as a seed."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in self.ports)

    def start(self, timeout: float = 30.0) -> None:
        for node in self.nodes:
            node.launch()
        for node in self.nodes:
            wait_for_port(node.port, proc=node.proc)
        subprocess.run(
            [
                self.cli_binary,
                "--cluster",
                "create",
                *(f"127.0.0.1:{port}" for port in self.ports),
                "--cluster-replicas",
                "1",
                "--cluster-yes",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=timeout,
        )
        self.wait_ok(timeout)

    def _client(self, port: int) -> Any:
        import redis

        return redis.Redis(port=port, socket_timeout=1, socket_connect_timeout=1)

    def _live(self) -> list[RedisServer]:
        return [node for node in self.nodes if node.proc is not None]

    def command(self, port: int, *args: Any) -> Any:
        """One command on one node."""
        with self._client(port) as client:
            return client.execute_command(*args)

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Until every live node says ``cluster_state:ok``, sees all 16384 slots served, and
        agrees with the others on which node serves each slot, and every replica is in sync."""
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            try:
                if self._settled():
                    return
            except OSError as exc:  # redis-py's ConnectionError is an OSError too
                last = exc
            except Exception as exc:  # a node still loading answers with an error
                last = exc
            time.sleep(0.05)  # start-up polling in a sync fixture, not in the code under test
        raise TimeoutError(f"the cluster did not settle within {timeout}s ({last!r})")

    def _settled(self) -> bool:
        layouts = set()
        for node in self._live():
            info = self.command(node.port, "CLUSTER", "INFO")
            text = info.decode() if isinstance(info, bytes) else str(info)
            if "cluster_state:ok" not in text or "cluster_slots_ok:16384" not in text:
                return False
            role = self.command(node.port, "INFO", "replication")
            if role.get("role") == "slave" and role.get("master_link_status") != "up":
                return False  # a replica that never synced is not promoted when its master dies
            layouts.add(tuple(sorted(self.masters_of(node.port).items())))
        return len(layouts) == 1

    def masters_of(self, port: int) -> dict[int, int]:
        """Master port -> number of slots it serves, as node ``port`` sees it (live only)."""
        raw = self.command(port, "CLUSTER", "NODES")
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        masters: dict[int, int] = {}
        for line in text.splitlines():
            fields = line.split()
            if len(fields) < 8 or "master" not in fields[2] or "fail" in fields[2]:
                continue
            slots = 0
            for span in fields[8:]:
                if span.startswith("["):
                    continue  # a slot being migrated
                low, _, high = span.partition("-")
                slots += int(high or low) - int(low) + 1
            if slots:
                masters[int(fields[1].split("@")[0].rsplit(":", 1)[1])] = slots
        return masters

    def master_of(self, key: str) -> int:
        """The port of the master serving ``key``'s slot."""
        live = self._live()[0].port
        slot = int(self.command(live, "CLUSTER", "KEYSLOT", key))
        for row in self.command(live, "CLUSTER", "SLOTS"):
            if int(row[0]) <= slot <= int(row[1]):
                return int(row[2][1])
        raise LookupError(f"no node serves slot {slot}")

    def node(self, port: int) -> RedisServer:
        return next(node for node in self.nodes if node.port == port)

    def kill(self, port: int) -> None:
        """``SIGKILL`` one node; its replica takes over after the node timeout."""
        self.node(port).kill()

    def restart(self, port: int, timeout: float = 30.0) -> None:
        """Start a killed node again (it rejoins, as a replica once another took over)."""
        node = self.node(port)
        node.start()
        self.wait_ok(timeout)

    def flush(self) -> None:
        """``FLUSHALL`` on every master, so tests that share the cluster stay independent."""
        live = self._live()[0].port
        for port in self.masters_of(live):
            self.command(port, "FLUSHALL")
            # The scripts too: a test must not rely on one an earlier test loaded.
            self.command(port, "SCRIPT", "FLUSH")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


class UvicornProcess:
    """``python -m uvicorn <app>`` on a free loopback port, with the given environment."""

    def __init__(
        self,
        app: str,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        stderr: IO[bytes] | None = None,
        args: Sequence[str] = (),
    ) -> None:
        self.port = free_port()
        full_env = {**os.environ, **(env or {})}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                app,
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--log-level",
                "warning",
                "--no-access-log",
                *args,
            ],
            env=full_env,
            cwd=str(cwd) if cwd else None,
            stderr=stderr,
        )
        try:
            wait_for_port(self.port, timeout=20, proc=self.proc)
        except BaseException:
            self.stop()  # a server that never listened is not left running past its test
            raise

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
