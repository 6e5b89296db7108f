from __future__ import annotations

from importlib.metadata import version

import fastapi_resilience


def test_all_is_sorted_and_complete() -> None:
    """__all__ lists every public name once, sorted, and each resolves."""
    names = fastapi_resilience.__all__
    assert list(names) == sorted(names)
    assert len(set(names)) == len(names)
    # ``annotations`` is the ``from __future__`` import every module has.
    public = {n for n in vars(fastapi_resilience) if not n.startswith("_")}
    public -= {"annotations", "TYPE_CHECKING", "Any"}
    # Names resolved lazily by the module's __getattr__ (optional extras).
    public |= {"RedisStorage"}
    for name in names:
        assert getattr(fastapi_resilience, name) is not None
    modules = {n for n in public if type(getattr(fastapi_resilience, n)).__name__ == "module"}
    assert public - modules == set(names)


def test_contract_names_are_importable() -> None:
    """The names CONTRACT.md promises so far import from the top level."""
    for name in [
        "ResilienceSettings",
        "install",
        "Resilience",
        "CorrelationIdMiddleware",
        "install_exception_handlers",
        "get_correlation_id",
        "AppError",
        "NotFoundError",
    ]:
        assert hasattr(fastapi_resilience, name), name


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
from fastapi import FastAPI

def outcome(call):
    try:
        call()
    except Exception as exc:
        return [type(exc).__name__, isinstance(exc, ImportError), str(exc)]
    return ["ok", False, ""]

def import_redis_storage():
    from fastapi_resilience import RedisStorage  # noqa: F401

def import_breaker_store():
    from fastapi_resilience import RedisBreakerStore  # noqa: F401

url = "redis://127.0.0.1:1/0"
print(json.dumps({
    "RedisStorage": outcome(import_redis_storage),
    "RedisBreakerStore": outcome(import_breaker_store),
    "storage_from_url": outcome(lambda: fr.storage_from_url(url)),
    "RedisDeadLetterQueue": outcome(lambda: fr.RedisDeadLetterQueue(url)),
    "ResponseCache": outcome(lambda: fr.ResponseCache(ttl=1, redis_url=url)),
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
