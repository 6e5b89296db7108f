"""Schemathesis over a running app's own schema, as ``st run --checks all`` checks it.

Shared by ``example_app/test_schemathesis.py`` (the example app) and ``tests/test_openapi.py``
(an app with every feature on). Every generated answer goes through every built-in check, with
the repository's ``schemathesis.toml``, and through :func:`problem_details`.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.config import SchemathesisConfig

from fastapi_resilience import ResilienceSettings

#: What ``st run`` reads when it runs in the repository. ``not_a_server_error`` passes the
#: 502, 503 and 504 answers, which ``status_code_conformance`` allows only on an operation
#: whose schema documents them; a 500 fails both.
SCHEMATHESIS_CONFIG = Path(__file__).resolve().parent.parent / "schemathesis.toml"

CORRELATION_HEADER = ResilienceSettings().correlation_header.lower()
PROBLEM_JSON = "application/problem+json"


def load_schema(base_url: str) -> schemathesis.BaseSchema:
    """The schema the running app serves (what ``st run <url>/openapi.json`` reads)."""
    return schemathesis.openapi.from_url(
        f"{base_url}/openapi.json", config=SchemathesisConfig.from_path(SCHEMATHESIS_CONFIG)
    )


def problem_details(
    ctx: schemathesis.CheckContext, response: schemathesis.Response, case: schemathesis.Case
) -> bool | None:
    """Every 4xx/5xx answer is RFC 9457 problem+json with ``type``, ``title``, ``status`` equal
    to the HTTP status, and ``correlation_id`` equal to the answer's correlation header."""
    status = response.status_code
    if status < 400:
        return None
    content_type = response.headers.get("content-type", [""])[0]
    assert content_type.split(";")[0].strip() == PROBLEM_JSON, (
        f"{status} answered as {content_type!r}, not {PROBLEM_JSON}"
    )
    body = json.loads(response.content)
    assert isinstance(body, dict), f"{status} problem is not a JSON object: {body!r}"
    for member in ("type", "title"):
        assert isinstance(body.get(member), str), f"no {member!r} in {body!r}"
        assert body[member], f"an empty {member!r} in {body!r}"
    assert body.get("status") == status, f"problem status {body.get('status')!r} != {status}"
    header = response.headers.get(CORRELATION_HEADER, [None])[0]
    assert header, f"{status} answer without a {CORRELATION_HEADER} header"
    assert body.get("correlation_id") == header, (
        f"correlation_id {body.get('correlation_id')!r} != {CORRELATION_HEADER} {header!r}"
    )
    return None


def validate(case: schemathesis.Case, base_url: str, headers: dict[str, str]) -> int:
    """Send one generated request, apply every built-in check (those the schema's config
    enables: all of them) and :func:`problem_details`; the answer's status."""
    response = case.call_and_validate(
        base_url, headers=headers, additional_checks=[problem_details]
    )
    return int(response.status_code)


def fuzz_settings(max_examples: int) -> settings:
    """Derandomized: the same cases on every run; no per-case deadline (a shared CI core may
    pause any one request). Shrinking stays on, so a failure is reported at its smallest."""
    return settings(
        max_examples=max_examples,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )


class Tally:
    """What one run sent: cases per operation, answers per status."""

    def __init__(self) -> None:
        self.operations: Counter[str] = Counter()
        self.statuses: Counter[int] = Counter()

    def summary(self, run: str) -> str:
        total = sum(self.operations.values())
        problems = sum(n for status, n in self.statuses.items() if status >= 400)
        return (
            f"schemathesis {run}: {total} cases over {len(self.operations)} operations, "
            f"{problems} answered 4xx/5xx (checks: all, problem_details); "
            f"statuses {dict(sorted(self.statuses.items()))}"
        )


def fuzz_operation(
    operation: schemathesis.APIOperation,
    mode: GenerationMode,
    base_url: str,
    headers: Callable[[], dict[str, str]],
    tally: Tally,
    max_examples: int,
) -> None:
    """One operation, with valid or with invalid data."""

    @fuzz_settings(max_examples)
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: schemathesis.Case) -> None:
        tally.operations[operation.label] += 1
        tally.statuses[validate(case, base_url, headers())] += 1

    try:
        run()
    except Unsatisfiable:
        # No parameters and no body (``GET /whoami``): no invalid request to make.
        if mode is GenerationMode.POSITIVE:
            raise


def fuzz(
    schema: schemathesis.BaseSchema,
    base_url: str,
    headers: Callable[[], dict[str, str]],
    max_examples: int,
    *,
    negative: bool = True,
) -> Tally:
    """Every operation of ``schema``, with valid and (unless ``negative`` is off) invalid
    data."""
    tally = Tally()
    modes = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE][: 2 if negative else 1]
    for result in schema.get_all_operations():
        for mode in modes:
            fuzz_operation(result.ok(), mode, base_url, headers, tally, max_examples)
    return tally
