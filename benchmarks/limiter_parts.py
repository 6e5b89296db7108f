"""What each part of the rate limiter's lean path costs, in instructions per request.

``benchmarks.instructions`` counts whole variants. This counts the full memory stack
(``resilience_full_memory``) again with one part of the limiter's per-request work replaced by
the answer it gave on the first request (a constant), so the difference to the unchanged stack
is what that part costs:

- ``resolve``: identity resolution (the API-key header scan and the client address);
- ``try_admit``: counting in the sliding window (``MemoryStorage.try_admit``);
- ``headers``: the five rate-limit header fields, formatted and carried to the response (the
  limiter built with ``headers_enabled=False``; in process, no server checks them);
- ``try_check``: all of the limiter's decision for a tier-only request
  (``RateLimiter.try_check``): plan lookup, counting and the outcome object (the header fields
  are still formatted from it when the response starts);
- ``limiter``: all of the rate-limit step's work (its ``enter`` lets every request through
  undecided), leaving the pipeline, correlation step, errors, degraded-mode test and app.

Same method as ``benchmarks.instructions`` (callgrind, in process, after the lifespan
start-up; ``warm`` requests subtracted). About 1.5 minutes per part::

    python -m benchmarks.limiter_parts
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from starlette.types import ASGIApp

from benchmarks.apps import VARIANTS, BenchEnv
from benchmarks.instructions import counted_names, drive_app, per_request

PARTS = ("none", "resolve", "try_admit", "headers", "try_check", "limiter")


def _first_answer(owner: type, name: str) -> None:
    """Replace ``owner.name`` by a method that returns what the original returned first."""
    original: Callable[..., Any] = getattr(owner, name)
    kept: list[Any] = []

    def constant(self: object, *args: object) -> Any:
        if not kept:
            kept.append(original(self, *args))
        return kept[0]

    setattr(owner, name, constant)


def _headers_off(owner: type) -> None:
    """Build every ``owner`` (a ``RateLimiter``) with ``headers_enabled=False``."""
    original: Callable[..., None] = owner.__init__  # type: ignore[misc]

    def init(self: object, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **{**kwargs, "headers_enabled": False})

    owner.__init__ = init  # type: ignore[misc]


def build(part: str) -> ASGIApp:
    from fastapi_resilience.ratelimit import DefaultIdentityResolver, MemoryStorage, RateLimiter
    from fastapi_resilience.ratelimit._step import RateLimitStep

    if part == "headers":
        _headers_off(RateLimiter)
    app = VARIANTS["resilience_full_memory"].build(BenchEnv())
    if part == "resolve":
        _first_answer(DefaultIdentityResolver, "resolve")
    elif part == "try_admit":
        _first_answer(MemoryStorage, "try_admit")
    elif part == "try_check":
        _first_answer(RateLimiter, "try_check")
    elif part == "limiter":

        def enter(self: RateLimitStep, state: object) -> None:
            return None

        RateLimitStep.enter = enter  # type: ignore[method-assign]
    elif part not in ("none", "headers"):
        raise SystemExit(f"unknown part {part!r}; one of {', '.join(PARTS)}")
    return app


def drive(part: str, count: int) -> None:
    drive_app(build(part), count)


def main(argv: Sequence[str] | None = None) -> int:
    counted = counted_names(
        argv,
        prog="python -m benchmarks.limiter_parts",
        first="none",
        only=",".join(PARTS),
        requests=1000,
        drive=drive,
    )
    if counted is None:
        return 0
    parts, args = counted
    counts = per_request(
        parts, warm=args.warm, requests=args.requests, module="benchmarks.limiter_parts"
    )
    whole = counts["none"]
    print("\n| part made constant | instructions per request | the part's cost |")
    print("| :--- | ---: | ---: |")
    for part, value in counts.items():
        print(f"| `{part}` | {value:,.0f} | {whole - value:,.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
