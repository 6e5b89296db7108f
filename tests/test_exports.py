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
