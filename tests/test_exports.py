from __future__ import annotations

from importlib.metadata import version

import fastapi_resilience


def test_all_is_sorted_and_complete() -> None:
    """__all__ lists every public name once, sorted, and each resolves."""
    names = fastapi_resilience.__all__
    assert list(names) == sorted(names)
    assert len(set(names)) == len(names)
    # ``annotations`` is the ``from __future__`` import every module has.
    public = {n for n in vars(fastapi_resilience) if not n.startswith("_")} - {"annotations"}
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
