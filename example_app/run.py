"""What ``make run`` runs: the example's inventory upstream, then the example app that calls it.

    python -m example_app.run [--host 127.0.0.1] [--port 8000] [--upstream-port 8001]

The app finds its upstream through ``EXAMPLE_INVENTORY_URL``, which is set here to the upstream
started here. A port that is already taken stops everything before it starts, naming the port
and a free one to use instead: with the upstream's port owned by another process, the app
would call that process as its inventory (and the README's ``_control`` request would go to it).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from types import FrameType

__all__ = ["DEMO_ADMIN_TOKEN", "main", "port_taken", "refusal"]

#: How long the upstream may take to listen before the launcher gives up.
UPSTREAM_START_TIMEOUT = 20.0


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m example_app.run", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="the example app's port")
    parser.add_argument("--upstream-port", type=int, default=8001, help="the upstream's port")
    return parser.parse_args(argv)


def port_taken(host: str, port: int) -> bool:
    """Whether a server could not listen on ``host:port`` now."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # As uvicorn binds: a port left in TIME_WAIT by the last run is free, a listener is not.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def _free_port_after(host: str, port: int, *, skip: int) -> int | None:
    return next(
        (p for p in range(port + 1, port + 100) if p != skip and not port_taken(host, p)), None
    )


def _taken_message(host: str, port: int, variable: str, *, other: int, why: str) -> str:
    message = f"make run: {host}:{port} is already in use.{why} Stop what listens there"
    instead = _free_port_after(host, port, skip=other)
    if instead is not None:
        message += f", or choose another port: make run {variable}={instead}"
    return message + "."


def refusal(host: str, port: int, upstream_port: int) -> str | None:
    """Why ``make run`` must not start with these ports, or ``None``."""
    if port == upstream_port:
        return f"make run: PORT and UPSTREAM_PORT are both {port}; give them different ports."
    if port_taken(host, upstream_port):
        why = " The example app would call whatever answers there as its inventory upstream."
        return _taken_message(host, upstream_port, "UPSTREAM_PORT", other=port, why=why)
    if port_taken(host, port):
        return _taken_message(host, port, "PORT", other=upstream_port, why="")
    return None


def _connect_host(host: str) -> str:
    # A server listening on every interface is reached on loopback.
    return {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)


def _url(host: str, port: int) -> str:
    host = _connect_host(host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _wait_listening(proc: subprocess.Popen[bytes], host: str, port: int) -> bool:
    """Whether ``proc`` listens on ``port`` before it exits or the time is up."""
    deadline = time.monotonic() + UPSTREAM_START_TIMEOUT
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with socket.create_connection((_connect_host(host), port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    # Unwinds through ``main``'s ``finally``, which stops both servers.
    raise SystemExit(128 + signum)


def _python(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, *args], env=env)


#: The admin API's and the dashboard's token when ``make run`` serves the example and the
#: environment sets none: published here, so for a demo on the loopback only.
DEMO_ADMIN_TOKEN = "demo-admin-token-change-me"


def _dashboard_notice(host: str, port: int, upstream_port: int) -> str:
    """Where to watch the example degrade and recover, the token to type there, and how to
    make the upstream fail."""
    token = (
        "$RESILIENCE_ADMIN_TOKEN" if "RESILIENCE_ADMIN_TOKEN" in os.environ else DEMO_ADMIN_TOKEN
    )
    return (
        f"\nmake run: the dashboard is at {_url(host, port)}/resilience/ (token: {token})\n"
        f"  fail the upstream:   curl -X POST {_url(host, upstream_port)}/_control "
        "-H 'content-type: application/json' -d '{\"failure_rate\": 1.0}'\n"
        f"  call the feature:    curl -i {_url(host, port)}/inventory/tea-earl-grey/live\n"
        "  heal it:             the same _control call with 0.0\n"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    host, port, upstream_port = args.host, args.port, args.upstream_port
    refused = refusal(host, port, upstream_port)
    if refused is not None:
        print(refused, file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    upstream: subprocess.Popen[bytes] | None = None
    app: subprocess.Popen[bytes] | None = None
    try:
        upstream = _python(
            "-m", "example_app.upstream", "--host", host, "--port", f"{upstream_port}"
        )
        if not _wait_listening(upstream, host, upstream_port):
            print(
                f"make run: the upstream did not listen on {host}:{upstream_port}.", file=sys.stderr
            )
            return 1
        env = {
            "RESILIENCE_ADMIN_TOKEN": DEMO_ADMIN_TOKEN,
            **os.environ,
            "EXAMPLE_INVENTORY_URL": _url(host, upstream_port),
        }
        app = _python(
            "-m", "uvicorn", "example_app.main:app", "--host", host, "--port", f"{port}", env=env
        )
        print(_dashboard_notice(host, port, upstream_port), file=sys.stderr, flush=True)
        try:
            return app.wait()
        except KeyboardInterrupt:
            # Ctrl-C in a terminal reached the app too: let it finish its own shutdown.
            try:
                return app.wait(timeout=10)
            except subprocess.TimeoutExpired:
                return 130
    finally:
        _stop(app)
        _stop(upstream)


if __name__ == "__main__":
    sys.exit(main())
