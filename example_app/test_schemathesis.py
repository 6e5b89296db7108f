"""Schemathesis against the example app's own OpenAPI schema, as a user would fuzz theirs.

The example app runs in a real uvicorn on loopback, its inventory upstream in another; every
operation in ``/openapi.json`` gets a bounded, derandomized set of generated requests (valid and
invalid ones), once without an API key and once with the demo keys. What must hold of every
answer is :data:`CHECKS`.

The rate-limit tiers are raised for this server (same tiers and demo keys, larger numbers), so
that generated requests reach the routes instead of stopping at the tier's limit; ``POST /login``
keeps its own 5/minute, and each run goes past it, so 429 answers are checked too.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator
from itertools import cycle

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from loopback import UvicornProcess
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from example_app.outbound import INVENTORY_URL_ENV
from example_app.rate_limits import API_KEYS, TIERS
from fastapi_resilience import ResilienceSettings

pytestmark = pytest.mark.slow

#: Switch on once the app's OpenAPI schema documents every answer the library adds (the
#: problem+json media type, the 422/429/503/504/500 answers): then every check that
#: ``st run --checks all`` runs applies here too, besides :data:`CHECKS`.
ALL_SCHEMATHESIS_CHECKS = False

#: Generated requests per operation, for valid and for invalid data each (``max_examples``).
MAX_EXAMPLES = 25
#: Fewer cases than this in one run means the fuzzing stopped testing much: the test fails.
MIN_CASES_PER_RUN = 300

_settings = ResilienceSettings()
CORRELATION_HEADER = _settings.correlation_header.lower()
API_KEY_HEADER = _settings.rate_limit_api_key_header
PROBLEM_JSON = "application/problem+json"

#: The example's tiers, each allowing far more than a fuzzing run sends.
ROOMY_TIERS = dict.fromkeys(TIERS, "100000/minute")


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


#: What every answer must satisfy; with ``ALL_SCHEMATHESIS_CHECKS``, every built-in check too.
CHECKS: list[Callable[..., bool | None]] = [not_a_server_error, problem_details]


def validate(case: schemathesis.Case, base_url: str, headers: dict[str, str]) -> int:
    """Send one generated request and apply the checks; the answer's status."""
    if ALL_SCHEMATHESIS_CHECKS:
        response = case.call_and_validate(
            base_url, headers=headers, additional_checks=[problem_details]
        )
    else:
        response = case.call_and_validate(base_url, headers=headers, checks=CHECKS)
    return int(response.status_code)


@pytest.fixture(name="example_servers", scope="module")
def _example_servers() -> Iterator[str]:
    """The inventory upstream and the example app, each a uvicorn on loopback; the app's URL."""
    upstream = UvicornProcess("example_app.upstream:app")
    try:
        app = UvicornProcess(
            "example_app.main:app",
            env={
                INVENTORY_URL_ENV: upstream.url,
                "RESILIENCE_RATE_LIMIT_TIERS": json.dumps(ROOMY_TIERS),
                "RESILIENCE_RATE_LIMIT_API_KEYS": json.dumps(API_KEYS),
            },
        )
        try:
            yield app.url
        finally:
            app.stop()
    finally:
        upstream.stop()


@pytest.fixture(name="example_schema", scope="module")
def _example_schema(example_servers: str) -> schemathesis.BaseSchema:
    """The schema the running app serves (what ``st run <url>/openapi.json`` reads)."""
    return schemathesis.openapi.from_url(f"{example_servers}/openapi.json")


#: Derandomized: the same cases on every run; no per-case deadline (a shared CI core may
#: pause any one request). Shrinking stays on, so a failure is reported at its smallest.
FUZZ_SETTINGS = settings(
    max_examples=MAX_EXAMPLES,
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


def fuzz_operation(
    operation: schemathesis.APIOperation,
    mode: GenerationMode,
    base_url: str,
    headers: Callable[[], dict[str, str]],
    tally: Tally,
) -> None:
    """One operation, with valid or with invalid data."""

    @FUZZ_SETTINGS
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
    schema: schemathesis.BaseSchema, base_url: str, headers: Callable[[], dict[str, str]]
) -> Tally:
    """Every operation of ``schema``, with valid and with invalid data."""
    tally = Tally()
    for result in schema.get_all_operations():
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            fuzz_operation(result.ok(), mode, base_url, headers, tally)
    return tally


def past_the_login_limit(
    schema: schemathesis.BaseSchema, base_url: str, headers: dict[str, str], tally: Tally
) -> None:
    """``POST /login`` (no parameters: one generated case) sent until its 5/minute is spent:
    the 429 answers go through the checks too."""
    login = schema["/login"]["POST"]
    for _ in range(6):
        tally.operations[login.label] += 1
        tally.statuses[validate(login.Case(), base_url, headers)] += 1
    assert tally.statuses[429] >= 1


def report(run: str, tally: Tally) -> None:
    """A summary line (shown with ``pytest -rA`` or ``-s``), then the run's minimum."""
    total = sum(tally.operations.values())
    problems = sum(n for status, n in tally.statuses.items() if status >= 400)
    checks = "all" if ALL_SCHEMATHESIS_CHECKS else ", ".join(c.__name__ for c in CHECKS)
    print(
        f"schemathesis {run}: {total} cases over {len(tally.operations)} operations, "
        f"{problems} answered 4xx/5xx (checks: {checks}); "
        f"statuses {dict(sorted(tally.statuses.items()))}"
    )
    assert total >= MIN_CASES_PER_RUN, f"{run}: only {total} cases"


def test_every_answer_without_an_api_key(
    example_servers: str, example_schema: schemathesis.BaseSchema
) -> None:
    tally = fuzz(example_schema, example_servers, dict)
    past_the_login_limit(example_schema, example_servers, {}, tally)
    report("without an API key", tally)


def test_every_answer_with_the_demo_api_keys(
    example_servers: str, example_schema: schemathesis.BaseSchema
) -> None:
    keys = cycle(sorted(API_KEYS))
    tally = fuzz(example_schema, example_servers, lambda: {API_KEY_HEADER: next(keys)})
    past_the_login_limit(example_schema, example_servers, {API_KEY_HEADER: next(keys)}, tally)
    report("with the demo API keys", tally)
