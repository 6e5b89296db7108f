from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from hypothesis import settings
from loopback import RedisServer, require_binary

# The one private import the tests keep: the library has no public handle on the registries
# that CircuitBreaker(name), Bulkhead(name) and resilient_client() register in by default, and
# tests that use them must take their breakers and bulkheads out again (and the named
# policies policy(name) keeps, likewise). Tests get them from the fixtures below, never from
# these modules.
from fastapi_resilience.outbound import (
    BreakerRegistry,
    BulkheadRegistry,
    default_bulkhead_registry,
    default_policies,
    default_registry,
)

if TYPE_CHECKING:
    from playwright.sync_api import Browser

# Property tests (tests/test_properties.py): the same examples on every run, a bounded number of
# them, and no per-example deadline (a shared CI core may pause any one of them).
settings.register_profile(
    "resilience", derandomize=True, max_examples=200, deadline=None, print_blob=True
)
settings.load_profile("resilience")


@pytest.fixture(name="redis_server")
def _redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh ``redis-server`` on a free port for one test (never the machine's own Redis)."""
    server = RedisServer(require_binary("redis-server"), tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(name="browser", scope="module")
def _browser() -> Iterator[Browser]:
    """A headless Chromium (the machine's own) for one test module.

    Module-scoped, not session-long: Playwright's sync API keeps an event loop of its own
    running, which must be gone before the next module's anyio tests start theirs.
    """
    from tests.browser import launch_chromium

    with launch_chromium() as browser:
        yield browser


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def default_breakers() -> BreakerRegistry:
    """The registry ``CircuitBreaker(name)`` registers in and ``get_breaker`` reads."""
    return default_registry


@pytest.fixture
def default_bulkheads() -> BulkheadRegistry:
    """The registry ``Bulkhead(name)`` registers in and ``get_bulkhead`` reads."""
    return default_bulkhead_registry


@pytest.fixture(autouse=True)
def _default_registries_left_as_found() -> Iterator[None]:
    """Breakers and bulkheads a test registers in the default registries are gone after it:
    an open breaker left behind would make every later app's readiness "degraded"."""
    breakers = {breaker.name: breaker for breaker in default_registry}
    bulkheads = {item.name: item for item in default_bulkhead_registry}
    yield
    for breaker in default_registry:
        if breakers.get(breaker.name) is not breaker:
            default_registry.unregister(breaker.name)
    for old_breaker in breakers.values():
        if old_breaker.name not in default_registry:
            default_registry.register(old_breaker)
    for item in default_bulkhead_registry:
        if bulkheads.get(item.name) is not item:
            default_bulkhead_registry.unregister(item.name)
    for old_item in bulkheads.values():
        if old_item.name not in default_bulkhead_registry:
            default_bulkhead_registry.register(old_item)


@pytest.fixture(autouse=True)
def _named_policies_left_as_found() -> Iterator[None]:
    """Policies a test asks for or declares are gone after it: a name that one test uses and
    leaves undeclared would stop every later app's start-up."""
    names = {found.name for found in default_policies}
    yield
    for found in default_policies:
        if found.name not in names:
            default_policies.forget(found.name)
