"""Named outbound policies as settings: the models, the presets, the file and the merge.

A policy names one dependency and holds the settings of its guards. Where its values come
from, the later winning field by field: the preset of its ``criticality`` < the TOML file
named by ``policies_file`` < the environment (``RESILIENCE_POLICIES__<NAME>__...``) < code.

These are settings only: the guards are built from them in ``outbound/_policies.py``.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = [
    "CRITICALITIES",
    "PRESETS",
    "BreakerSettings",
    "BulkheadSettings",
    "CacheSettings",
    "Criticality",
    "PolicySettings",
    "RetrySettings",
    "error_path",
    "merge_policies",
    "read_policies_file",
    "resolve_policy",
    "validate_policies",
]

Criticality = Literal["critical", "standard", "best_effort"]
CRITICALITIES: tuple[Criticality, ...] = ("critical", "standard", "best_effort")
#: The criticality of a policy that does not name one.
DEFAULT_CRITICALITY: Criticality = "standard"
#: A policy's name: what an environment variable can spell (lower case, as they are read).
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")


class _Table(BaseModel):
    # A misspelt key must not be ignored in silence: the preset's value would stay in force.
    model_config = ConfigDict(extra="forbid", frozen=True)


class BreakerSettings(_Table):
    """The policy's circuit breaker (see ``CircuitBreaker``)."""

    failure_threshold: int = Field(ge=1)
    recovery_timeout: float = Field(ge=0, allow_inf_nan=False)
    half_open_max_calls: int = Field(ge=1)
    success_threshold: int = Field(ge=1)


class RetrySettings(_Table):
    """The policy's retries: ``attempts`` counts the first (1: no retry); ``budget`` is the
    retry budget's ratio (retries per recent call, plus a floor of one per second)."""

    attempts: int = Field(ge=1, le=100)
    base_delay: float = Field(ge=0, allow_inf_nan=False)
    max_delay: float = Field(ge=0, allow_inf_nan=False)
    budget: float = Field(ge=0, le=1000, allow_inf_nan=False)

    @model_validator(mode="after")
    def _delays_in_order(self) -> RetrySettings:
        if self.max_delay < self.base_delay:
            raise ValueError(
                f"max_delay ({self.max_delay:g}) must be >= base_delay ({self.base_delay:g})"
            )
        return self


class BulkheadSettings(_Table):
    """The policy's bulkhead: calls running at once, and calls that may wait for a slot."""

    max_concurrent: int = Field(ge=1)
    max_waiting: int = Field(ge=0)


class CacheSettings(_Table):
    """The policy's response cache: ``ttl`` seconds fresh (``0``: no cache), then
    ``stale_ttl`` seconds served when the dependency fails."""

    ttl: float = Field(ge=0, allow_inf_nan=False)
    stale_ttl: float = Field(ge=0, allow_inf_nan=False)


class PolicySettings(_Table):
    """One named policy, every value in force (the preset filled what was not declared)."""

    criticality: Criticality
    breaker: BreakerSettings
    retry: RetrySettings
    #: Seconds one attempt may take (never more than the request's deadline leaves).
    timeout: float = Field(gt=0, allow_inf_nan=False)
    bulkhead: BulkheadSettings
    cache: CacheSettings


#: The values a policy starts from, by criticality (ADR 0071 says why these).
PRESETS: dict[Criticality, dict[str, Any]] = {
    # The request cannot be answered without it: trip late, probe back soon, retry more
    # (within a larger budget), and let many calls in, since refusing them fails requests.
    "critical": {
        "breaker": {
            "failure_threshold": 10,
            "recovery_timeout": 10.0,
            "half_open_max_calls": 3,
            "success_threshold": 2,
        },
        "retry": {"attempts": 3, "base_delay": 0.05, "max_delay": 1.0, "budget": 0.2},
        "timeout": 5.0,
        "bulkhead": {"max_concurrent": 100, "max_waiting": 100},
        "cache": {"ttl": 0.0, "stale_ttl": 0.0},
    },
    # ResilientTransport's own defaults, plus a bulkhead.
    "standard": {
        "breaker": {
            "failure_threshold": 5,
            "recovery_timeout": 30.0,
            "half_open_max_calls": 1,
            "success_threshold": 1,
        },
        "retry": {"attempts": 3, "base_delay": 0.1, "max_delay": 2.0, "budget": 0.1},
        "timeout": 10.0,
        "bulkhead": {"max_concurrent": 50, "max_waiting": 50},
        "cache": {"ttl": 0.0, "stale_ttl": 0.0},
    },
    # The answer is fine without it: give up fast, never retry, never queue, stay away long.
    "best_effort": {
        "breaker": {
            "failure_threshold": 3,
            "recovery_timeout": 60.0,
            "half_open_max_calls": 1,
            "success_threshold": 1,
        },
        "retry": {"attempts": 1, "base_delay": 0.1, "max_delay": 1.0, "budget": 0.05},
        "timeout": 2.0,
        "bulkhead": {"max_concurrent": 10, "max_waiting": 0},
        "cache": {"ttl": 0.0, "stale_ttl": 0.0},
    },
}


def deep_merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``top`` laid over it, table by table, field by field."""
    merged = dict(base)
    for key, value in top.items():
        below = merged.get(key)
        if isinstance(value, Mapping) and isinstance(below, Mapping):
            merged[key] = deep_merge(below, value)
        else:
            merged[key] = value
    return merged


def _criticality_of(*layers: Mapping[str, Any]) -> Any:
    found: Any = DEFAULT_CRITICALITY
    for layer in layers:
        found = layer.get("criticality", found)
    return found


def resolve_policy(*layers: Mapping[str, Any]) -> dict[str, Any]:
    """The raw values in force: the preset of the last ``criticality`` named, then each layer.

    An unknown criticality is left for validation to name (its preset is then the default's).
    """
    criticality = _criticality_of(*layers)
    # Anything but a known name (a list, a table: unhashable) is left for validation to name.
    preset = PRESETS.get(criticality) if isinstance(criticality, str) else None  # type: ignore[call-overload]
    merged: dict[str, Any] = dict(preset or PRESETS[DEFAULT_CRITICALITY])
    merged["criticality"] = criticality
    for layer in layers:
        merged = deep_merge(merged, layer)
    return merged


def error_path(err: Mapping[str, Any]) -> str:
    """The dotted key path of one pydantic error inside a policy table."""
    return ".".join(str(part) for part in err.get("loc", ()))


def _check_name(name: str, where: str) -> None:
    if not _NAME.fullmatch(name):
        raise ValueError(
            f"{where}: policy name {name!r} must be lower-case letters, digits, '_' or '-' "
            "(what an environment variable can name), at most 63 characters"
        )


def read_policies_file(path: Path) -> dict[str, dict[str, Any]]:
    """The policy tables of a TOML file, each checked on its own (over its preset).

    Raises:
        ValueError: the file cannot be read, a line is not TOML (file and line named), or a
            value is bad (file and key path named).
    """
    where = f"policies_file (env RESILIENCE_POLICIES_FILE) {str(path)!r}"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"{where}: cannot be read ({exc.strerror or exc})") from None
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{where}: {_syntax_error(str(exc))}") from None
    tables: dict[str, dict[str, Any]] = {}
    for name, table in document.items():
        if not isinstance(table, dict):
            raise ValueError(
                f"{where}: {name!r} must be a table ([{name}]) holding a policy's settings"
            )
        _check_name(name, where)
        try:
            PolicySettings.model_validate(resolve_policy(table))
        except ValidationError as exc:
            problems = "; ".join(
                f"{name}.{error_path(err)}: {_message(err)}" for err in exc.errors()
            )
            raise ValueError(f"{where}: {problems}") from None
        tables[name] = table
    return tables


def _syntax_error(message: str) -> str:
    """tomllib's message as ``line N, column M: what``."""
    found = re.search(r"\s*\(at line (\d+), column (\d+)\)$", message)
    if found is None:
        return message
    return f"line {found[1]}, column {found[2]}: {message[: found.start()]}"


def _message(err: Mapping[str, Any]) -> str:
    return str(err.get("msg", "invalid")).removeprefix("Value error, ")


def merge_policies(
    from_file: Mapping[str, Mapping[str, Any]], declared: Any
) -> dict[str, Any] | Any:
    """Every policy's raw values: preset < file < ``declared`` (environment and code).

    ``declared`` is what pydantic-settings gathered for ``policies``; anything but a mapping
    of tables is passed on untouched, for validation to name.
    """
    if declared is None:
        declared = {}
    if not isinstance(declared, Mapping):
        return declared
    merged: dict[str, Any] = {}
    for name in [*from_file, *(n for n in declared if n not in from_file)]:
        top = declared.get(name, {})
        if isinstance(top, BaseModel):
            top = top.model_dump()
        if not isinstance(top, Mapping):
            merged[name] = top
            continue
        _check_name(str(name), "policies")
        merged[name] = resolve_policy(from_file.get(name, {}), top)
    return merged


def validate_policies(merged: Any) -> dict[str, PolicySettings]:
    """``merge_policies``' result, each policy validated.

    Raises:
        ValueError: naming each bad value by its key path (``inventory.retry.max_delay``).
    """
    if not isinstance(merged, Mapping):
        raise ValueError(f"policies: expected a table of policies, got {type(merged).__name__}")
    policies: dict[str, PolicySettings] = {}
    problems: list[str] = []
    for name, values in merged.items():
        try:
            policies[name] = PolicySettings.model_validate(values)
        except ValidationError as exc:
            problems += [f"{name}.{error_path(err)}: {_message(err)}" for err in exc.errors()]
    if problems:
        raise ValueError("; ".join(problems))
    return policies
