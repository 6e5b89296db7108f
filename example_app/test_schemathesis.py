"""Schemathesis against the example app's own OpenAPI schema, as a user would fuzz theirs.

The example app runs in a real uvicorn on loopback, its inventory upstream in another; every
operation in ``/openapi.json`` gets a bounded, derandomized set of generated requests (valid and
invalid ones), once without an API key and once with the demo keys. Every answer goes through
every check ``st run --checks all`` applies, with the repository's ``schemathesis.toml`` (the
5xx answers the schema documents pass ``not_a_server_error``; a 500 never does), and through
:func:`problem_details`.

The rate-limit tiers are raised for this server (same tiers and demo keys, larger numbers), so
that generated requests reach the routes instead of stopping at the tier's limit; ``POST /login``
keeps its own 5/minute, and each run goes past it, so 429 answers are checked too.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from itertools import cycle

import httpx
import pytest
import schemathesis
from loopback import UvicornProcess

from example_app.outbound import INVENTORY_URL_ENV
from example_app.rate_limits import API_KEYS, TIERS
from fastapi_resilience import ResilienceSettings
from tests._schemathesis import Tally, fuzz, load_schema, validate

pytestmark = pytest.mark.slow

#: Generated requests per operation, for valid and for invalid data each (``max_examples``).
MAX_EXAMPLES = 25
#: Fewer cases than this in one run means the fuzzing stopped testing much: the test fails.
MIN_CASES_PER_RUN = 300

API_KEY_HEADER = ResilienceSettings().rate_limit_api_key_header

#: Generated valid requests per outbound operation while the upstream fails.
FAILING_MAX_EXAMPLES = 10
#: The 5xx statuses the example's outbound routes document (``UPSTREAM_ANSWERS``).
ANSWERED = {502, 503, 504}

#: The example's tiers, each allowing far more than a fuzzing run sends.
ROOMY_TIERS = dict.fromkeys(TIERS, "100000/minute")


@pytest.fixture(name="upstream", scope="module")
def _upstream() -> Iterator[str]:
    """The example's inventory upstream, a uvicorn on loopback; its URL."""
    upstream = UvicornProcess("example_app.upstream:app")
    try:
        yield upstream.url
    finally:
        upstream.stop()


@pytest.fixture(name="example_servers", scope="module")
def _example_servers(upstream: str) -> Iterator[str]:
    """The example app, a uvicorn on loopback calling the upstream; its URL."""
    app = UvicornProcess(
        "example_app.main:app",
        env={
            INVENTORY_URL_ENV: upstream,
            "RESILIENCE_RATE_LIMIT_TIERS": json.dumps(ROOMY_TIERS),
            "RESILIENCE_RATE_LIMIT_API_KEYS": json.dumps(API_KEYS),
        },
    )
    try:
        yield app.url
    finally:
        app.stop()


@pytest.fixture(name="example_schema", scope="module")
def _example_schema(example_servers: str) -> schemathesis.BaseSchema:
    return load_schema(example_servers)


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
    print(tally.summary(run))
    total = sum(tally.operations.values())
    assert total >= MIN_CASES_PER_RUN, f"{run}: only {total} cases"


def test_every_answer_without_an_api_key(
    example_servers: str, example_schema: schemathesis.BaseSchema
) -> None:
    tally = fuzz(example_schema, example_servers, dict, MAX_EXAMPLES)
    past_the_login_limit(example_schema, example_servers, {}, tally)
    report("without an API key", tally)


def test_every_answer_with_the_demo_api_keys(
    example_servers: str, example_schema: schemathesis.BaseSchema
) -> None:
    keys = cycle(sorted(API_KEYS))
    tally = fuzz(
        example_schema, example_servers, lambda: {API_KEY_HEADER: next(keys)}, MAX_EXAMPLES
    )
    past_the_login_limit(example_schema, example_servers, {API_KEY_HEADER: next(keys)}, tally)
    report("with the demo API keys", tally)


def test_every_answer_while_the_inventory_fails(
    upstream: str, example_servers: str, example_schema: schemathesis.BaseSchema
) -> None:
    """The upstream fails every call: the routes that call it answer what their schema
    documents (502 after retries, 503 once the breaker opens, or a stale copy), and
    ``not_a_server_error`` lets those pass. Run last: the breaker stays open a while."""
    outbound = example_schema.include(tag="outbound")
    httpx.post(f"{upstream}/_control", json={"failure_rate": 1.0}).raise_for_status()
    try:
        tally = fuzz(outbound, example_servers, dict, FAILING_MAX_EXAMPLES, negative=False)
    finally:
        httpx.post(f"{upstream}/_control", json={"failure_rate": 0.0}).raise_for_status()
    print(tally.summary("while the inventory fails"))
    assert tally.statuses[502] + tally.statuses[503] >= 1
    assert not [status for status in tally.statuses if status >= 500 and status not in ANSWERED]
