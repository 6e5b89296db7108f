from __future__ import annotations

import importlib
from importlib.metadata import version

import pytest

import fastapi_resilience


def test_all_lists_every_top_level_name_once() -> None:
    """__all__ lists every public name of the top level once, and each resolves."""
    names = fastapi_resilience.__all__
    assert len(set(names)) == len(names)
    # ``annotations`` is the ``from __future__`` import every module has; the typing names
    # are for type checkers.
    public = {n for n in dir(fastapi_resilience) if not n.startswith("_")}
    public -= {"annotations", "Any", "TYPE_CHECKING"}
    for name in names:
        assert getattr(fastapi_resilience, name) is not None
    modules = {n for n in public if type(getattr(fastapi_resilience, n)).__name__ == "module"}
    assert public - modules == set(names)


def test_importing_the_package_imports_no_part_until_it_is_used() -> None:
    """``import fastapi_resilience`` loads only the error classes; a name loads its own
    modules: the breaker does not bring in the rate limiter, httpx or the settings."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import fastapi_resilience\n"
        "first = sorted(m for m in sys.modules if m.startswith('fastapi_resilience.'))\n"
        "from fastapi_resilience import CircuitBreaker\n"
        "after = [m for m in ('httpx', 'fastapi_resilience.ratelimit._limiter',"
        " 'fastapi_resilience._settings') if m in sys.modules]\n"
        "print(first, after)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.stdout.strip() == (
        "['fastapi_resilience._exports', 'fastapi_resilience.exceptions'] []"
    ), result.stderr


def test_every_error_class_is_at_the_top_and_in_exceptions() -> None:
    """Each error class lives in ``fastapi_resilience.exceptions`` and imports from the top."""
    from fastapi_resilience import exceptions

    for name in exceptions.__all__:
        error = getattr(exceptions, name)
        assert isinstance(error, type), name
        assert issubclass(error, Exception), name
        assert getattr(fastapi_resilience, name) is error, name


@pytest.mark.parametrize(
    "module",
    [
        "fastapi_resilience.ratelimit",
        "fastapi_resilience.outbound",
        "fastapi_resilience.health",
        "fastapi_resilience.operations",
        "fastapi_resilience.problems",
        "fastapi_resilience.correlation",
        "fastapi_resilience.testing",
    ],
)
def test_public_submodules_resolve_every_name_they_list(module: str) -> None:
    imported = importlib.import_module(module)
    for name in imported.__all__:
        assert getattr(imported, name) is not None, (module, name)


def test_contract_names_are_importable() -> None:
    """The names CONTRACT.md names import from the top level."""
    for name in [
        "ResilienceSettings",
        "install",
        "Resilience",
        "CorrelationIdMiddleware",
        "RateLimitMiddleware",
        "RequestDeadlineMiddleware",
        "DegradedMode",
        "install_exception_handlers",
        "get_correlation_id",
        "rate_limit",
        "requires_feature",
        "breaker_dependency",
        "resilient_client",
        "Bulkhead",
        "CircuitBreaker",
        "Retry",
        "AppError",
        "ClientError",
        "NotFoundError",
        "RateLimitedError",
        "CircuitOpenError",
        "BulkheadFullError",
        "RetryExhaustedError",
    ]:
        assert hasattr(fastapi_resilience, name), name


def test_importing_the_package_leaves_the_optional_extras_unimported() -> None:
    """``import fastapi_resilience`` imports none of redis, prometheus-client, OpenTelemetry's
    SDK or watchfiles: an app that never uses them does not pay for them."""
    import subprocess
    import sys

    code = (
        "import sys, fastapi_resilience\n"
        "print(sorted(m for m in ('redis', 'prometheus_client', 'opentelemetry.sdk', 'watchfiles')"
        " if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.stdout.strip() == "[]", result.stderr


def test_version_comes_from_package_metadata() -> None:
    """__version__ is the installed distribution's version."""
    assert fastapi_resilience.__version__ == version("fastapi-resilience")


def test_package_imports_without_the_optional_extras() -> None:
    """Without redis or prometheus-client installed, the package still imports."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "for mod in ('redis', 'prometheus_client'):\n"
        "    sys.modules[mod] = None\n"
        "import fastapi_resilience\n"
        "from fastapi import FastAPI\n"
        "fastapi_resilience.install(FastAPI())\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.stdout.strip() == "ok", result.stderr


_WITHOUT_REDIS = """
import json, sys
sys.modules["redis"] = None  # not installed, as far as imports can tell
import fastapi_resilience as fr
import fastapi_resilience.outbound as ob
import fastapi_resilience.ratelimit as rl
from fastapi import FastAPI

def outcome(call):
    try:
        call()
    except Exception as exc:
        return [type(exc).__name__, isinstance(exc, ImportError), str(exc)]
    return ["ok", False, ""]

def import_redis_storage():
    from fastapi_resilience.ratelimit import RedisStorage

def import_breaker_store():
    from fastapi_resilience.outbound import RedisBreakerStore

url = "redis://127.0.0.1:1/0"
print(json.dumps({
    "RedisStorage": outcome(import_redis_storage),
    "RedisBreakerStore": outcome(import_breaker_store),
    "storage_from_url": outcome(lambda: rl.storage_from_url(url)),
    "RedisDeadLetterQueue": outcome(lambda: ob.RedisDeadLetterQueue(url)),
    "ResponseCache": outcome(lambda: ob.ResponseCache(ttl=1, redis_url=url)),
    "install": outcome(
        lambda: fr.install(FastAPI(), fr.ResilienceSettings(rate_limit_storage=url))
    ),
}))
"""

EXTRA = "pip install 'fastapi-resilience[redis]'"


def test_redis_parts_without_redis_name_the_extra() -> None:
    """Without redis installed, every Redis part fails where it is set up with a message that
    names the extra: importing RedisStorage (an ImportError still), and building a storage, a
    dead-letter queue, a cache or an app that names a redis:// URL (ConfigurationError).
    RedisBreakerStore imports: it takes a client, which needs redis in the caller's code."""
    import json
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_REDIS],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    outcomes = json.loads(result.stdout)
    name, is_import_error, message = outcomes.pop("RedisStorage")
    assert (name, is_import_error) == ("ModuleNotFoundError", True)
    assert EXTRA in message
    assert outcomes.pop("RedisBreakerStore") == ["ok", False, ""]
    for part, (name, _, message) in outcomes.items():
        assert name == "ConfigurationError", (part, message)
        assert EXTRA in message, (part, message)
    assert "rate_limit_storage" in outcomes["install"][2]


def test_named_policies_are_at_the_top_and_in_outbound() -> None:
    """``policy`` (what an app author types) is at the top level and in ``outbound`` with the
    names that build on it; the same function in both."""
    from fastapi_resilience import outbound

    assert fastapi_resilience.policy is outbound.policy
    for name in ("Policy", "PolicyGuards", "PolicySettings", "PolicyTable", "default_policies"):
        assert name in outbound.__all__, name


def test_external_service_is_at_the_top_and_in_outbound() -> None:
    """``ExternalService`` sits next to ``resilient_client`` at the top level and in
    ``outbound``: the same class in both."""
    from fastapi_resilience import outbound

    assert "ExternalService" in fastapi_resilience.__all__
    assert fastapi_resilience.ExternalService is outbound.ExternalService
