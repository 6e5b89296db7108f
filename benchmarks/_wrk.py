"""Running wrk and reading its ``--latency`` report."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field

_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}
_RPS = re.compile(r"^Requests/sec:\s+([\d.]+)\s*$", re.MULTILINE)
_TOTAL = re.compile(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m),", re.MULTILINE)
_PERCENTILE = re.compile(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s|m)\s*$", re.MULTILINE)
_NON_2XX = re.compile(r"^\s*Non-2xx or 3xx responses:\s+(\d+)", re.MULTILINE)
_SOCKET = re.compile(
    r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", re.MULTILINE
)


class WrkOutputError(ValueError):
    """wrk's output lacks a figure the harness needs (wrong flags, or wrk failed)."""


@dataclass(frozen=True, slots=True)
class WrkResult:
    """One wrk run: throughput, latency percentiles in milliseconds, and errors."""

    requests_per_sec: float
    requests: int
    duration_s: float
    latency_ms: dict[int, float] = field(default_factory=dict)
    non_2xx: int = 0
    socket_errors: int = 0

    @property
    def p99_ms(self) -> float:
        return self.latency_ms[99]

    @property
    def clean(self) -> bool:
        """Every request answered 2xx/3xx with no socket error."""
        return self.non_2xx == 0 and self.socket_errors == 0


def parse_wrk(text: str) -> WrkResult:
    """Read the figures from wrk's report (run with ``--latency``)."""
    rps = _RPS.search(text)
    total = _TOTAL.search(text)
    percentiles = {int(p): float(v) * _UNITS_MS[u] for p, v, u in _PERCENTILE.findall(text)}
    if rps is None or total is None or 99 not in percentiles:
        raise WrkOutputError(f"not a wrk --latency report:\n{text}")
    non_2xx = _NON_2XX.search(text)
    sockets = _SOCKET.search(text)
    return WrkResult(
        requests_per_sec=float(rps.group(1)),
        requests=int(total.group(1)),
        duration_s=float(total.group(2)) * _UNITS_MS[total.group(3)] / 1000.0,
        latency_ms=percentiles,
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=sum(int(n) for n in sockets.groups()) if sockets else 0,
    )


@dataclass(frozen=True, slots=True)
class WrkSettings:
    """How wrk loads the server: one thread, a fixed number of keep-alive connections."""

    connections: int = 64
    duration_s: int = 5  # wrk takes whole seconds
    threads: int = 1
    timeout_s: int = 2

    def argv(self, url: str, *, duration_s: int | None = None) -> list[str]:
        binary = shutil.which("wrk")
        if binary is None:
            raise RuntimeError("wrk is not installed (apt-get install wrk; `make bench` does it)")
        seconds = duration_s if duration_s is not None else self.duration_s
        return [
            binary,
            f"-t{self.threads}",
            f"-c{self.connections}",
            f"-d{seconds}s",
            "--timeout",
            f"{self.timeout_s}s",
            "--latency",
            url,
        ]

    def describe(self) -> str:
        return (
            f"wrk -t{self.threads} -c{self.connections} -d{self.duration_s}s "
            f"--timeout {self.timeout_s}s --latency"
        )


def start_wrk(
    settings: WrkSettings,
    url: str,
    *,
    duration_s: int | None = None,
    preexec_fn: Callable[[], None] | None = None,
) -> subprocess.Popen[str]:
    """wrk started in the background; ``finish_wrk`` waits for it and reads its report."""
    return subprocess.Popen(
        settings.argv(url, duration_s=duration_s),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=preexec_fn,
    )


def finish_wrk(proc: subprocess.Popen[str], *, timeout_s: float) -> WrkResult:
    out, err = proc.communicate(timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, proc.args))} failed ({proc.returncode}): {err}")
    return parse_wrk(out)


def run_wrk(settings: WrkSettings, url: str, *, duration_s: int | None = None) -> WrkResult:
    seconds = duration_s if duration_s is not None else settings.duration_s
    return finish_wrk(start_wrk(settings, url, duration_s=seconds), timeout_s=seconds + 60)


def wrk_version() -> str:
    binary = shutil.which("wrk")
    if binary is None:
        return "wrk (not installed)"
    # ``wrk -v`` prints its version line and exits non-zero.
    done = subprocess.run([binary, "-v"], capture_output=True, text=True)
    first = (done.stdout or done.stderr).strip().splitlines()
    return first[0] if first else "wrk"
