"""``ResilienceSettings``: one pydantic-settings model, every field also ``RESILIENCE_<NAME>``."""

from __future__ import annotations

import copy
import ipaddress
import os
import re
from pathlib import Path
from typing import Any

from pydantic import (
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from fastapi_resilience._limits import parse_limits
from fastapi_resilience._optional import is_cluster_url, parse_cluster_url
from fastapi_resilience._policy_settings import (
    PolicySettings,
    merge_policies,
    read_policies_file,
    validate_policies,
)
from fastapi_resilience._text import without_password
from fastapi_resilience.correlation._ids import HEADER_NAME
from fastapi_resilience.exceptions import ConfigurationError
from fastapi_resilience.problems._render import DEFAULT_TYPE_BASE

__all__ = ["ENV_PREFIX", "ResilienceSettings"]

ENV_PREFIX = "RESILIENCE_"
#: Variables under this prefix set one field of one named policy (nested delimiter ``__``).
_POLICY_ENV_PREFIX = f"{ENV_PREFIX}POLICIES__"
_STORAGE_SCHEMES = (
    "memory://",
    "redis://",
    "rediss://",
    "unix://",
    "redis+cluster://",
    "rediss+cluster://",
)
#: What a route path never holds: a query, a fragment, whitespace or a control character.
_NOT_IN_A_PATH = re.compile(r"[?#\s\x00-\x1f\x7f]")
#: The routes ``install()`` serves under ``health_path``.
_HEALTH_ROUTES = ("/live", "/ready")
#: The shortest admin token accepted: a short one could be guessed through the API.
_MIN_TOKEN_LENGTH = 16

DEFAULT_TIERS = {
    "anonymous": "10/minute",
    "free": "60/minute",
    "standard": "300/minute",
    "premium": "1000/minute",
}


class ResilienceSettings(BaseSettings):
    """Every setting of the library, read from arguments or ``RESILIENCE_*`` variables.

    Nested values (dicts, lists) come from the environment as JSON; a named policy's fields
    also one variable each (``RESILIENCE_POLICIES__INVENTORY__BREAKER__FAILURE_THRESHOLD``).
    A bad value, from code or from the environment, raises :class:`ConfigurationError` at
    start-up, naming the setting.
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="forbid",
        validate_default=True,
        frozen=True,
        # Only ``policies`` takes nested variables: any other ``__`` name is refused as unknown.
        env_nested_delimiter="__",
    )

    # Errors and correlation IDs
    correlation_header: str = "X-Request-ID"
    expose_error_details: bool = False
    #: Raise an unhandled exception again after its 500 is answered, as Starlette does;
    #: ``None``: only under Starlette's ``TestClient``.
    raise_server_exceptions: bool | None = None
    problem_type_base: str = DEFAULT_TYPE_BASE
    #: A request without a valid correlation ID of its own takes its OpenTelemetry trace's ID
    #: (32 hex characters) when a span is current, instead of a new random one.
    correlation_id_from_trace: bool = False
    #: Add every event the library publishes to the current OpenTelemetry span as a span
    #: event (needs the ``otel`` extra; without OpenTelemetry installed it does nothing).
    trace_span_events: bool = True

    # Rate limiting
    rate_limit_enabled: bool = True
    rate_limit_storage: str = "memory://"
    rate_limit_tiers: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_TIERS))
    rate_limit_default_tier: str = "anonymous"
    rate_limit_api_keys: dict[str, str] = Field(default_factory=dict)
    rate_limit_fail_open: bool = True
    #: Default: the health and metrics paths, wherever ``health_path`` and ``metrics_path`` put
    #: them.
    rate_limit_exempt_paths: list[str] = Field(
        default_factory=lambda: ["/health/live", "/health/ready", "/metrics"]
    )
    #: Also exempt the app's documentation routes (``/openapi.json``, ``/docs``, ``/redoc``).
    rate_limit_exempt_docs: bool = True
    trusted_proxies: list[str] = Field(default_factory=list)
    rate_limit_api_key_header: str = "X-API-Key"
    rate_limit_storage_timeout: float = Field(default=0.25, gt=0, le=5.0)
    rate_limit_key_prefix: str = "rl:"
    rate_limit_shadow: bool = False
    rate_limit_headers_enabled: bool = True
    rate_limit_fallback: bool = True

    # Degraded mode
    #: Lists the features that are off on every response while the app is degraded; ``""``
    #: sends none.
    degraded_header: str = "X-Degraded"
    #: Features that start switched off (a kill switch that survives a restart).
    disabled_features: list[str] = Field(default_factory=list)

    # Request deadline (``RequestDeadlineMiddleware``)
    #: The header a client may shorten the request's budget with; ``""``: clients cannot.
    request_deadline_header: str = "X-Request-Timeout"
    #: The least budget a client may ask for, in seconds; a smaller value is raised to it.
    request_deadline_header_floor: float = Field(default=0.1, gt=0, allow_inf_nan=False)

    # Health and metrics
    health_path: str = "/health"
    #: List ``/health/live`` and ``/health/ready`` in the OpenAPI schema. Off by default: each
    #: listed route is one more entry every request of the app's own routes is tried against.
    health_in_schema: bool = False
    health_check_timeout: float = Field(default=1.0, gt=0)
    #: Seconds a readiness check's result is served again (callers meanwhile share one run),
    #: so a flood of readiness calls cannot become a flood of database checks; ``0``: never.
    health_cache_seconds: float = Field(default=1.0, ge=0)
    #: Seconds between the health monitor's rounds: every readiness check runs in the
    #: background and ``/health/ready`` reads the latest results; failing checks run their
    #: recovery actions. ``0`` (the default): no monitor, checks run when readiness is asked.
    health_monitor_interval: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    #: The first wait before a failing check's recovery is tried again; it doubles each time.
    health_recovery_backoff: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    #: The longest wait between recovery attempts.
    health_recovery_backoff_max: float = Field(default=60.0, gt=0, allow_inf_nan=False)
    metrics_enabled: bool = True
    metrics_path: str = "/metrics"
    #: Time every request into ``fastapi_resilience_request_duration_seconds`` (by route
    #: template and method). Off: the request path does no timing at all.
    metrics_request_duration: bool = True
    #: Also report the metrics through the OpenTelemetry metrics API when the application set
    #: a meter provider (or gave ``install()`` one).
    metrics_opentelemetry: bool = True

    # Error analytics (the admin API's /errors and the dashboard)
    #: Count problem answers per code and route, watch for spikes, keep recent IDs' problems.
    errors_enabled: bool = True
    #: The recent window the counts cover, in seconds; a whole number of buckets.
    errors_window_seconds: float = Field(default=300.0, gt=0, allow_inf_nan=False)
    #: The width of one bucket of the window (the trend's resolution), in seconds.
    errors_bucket_seconds: float = Field(default=10.0, gt=0, allow_inf_nan=False)
    #: How many recent correlation IDs keep their list of problems.
    errors_recent_ids: int = Field(default=100, ge=0)

    # Operations: the admin API and the dashboard
    #: The bearer token of the admin API and the dashboard under ``admin_path``. Unset (the
    #: default): nothing is served there. At least 16 characters; never logged.
    admin_token: SecretStr | None = None
    #: Where the admin API (``{admin_path}/api/...``) and the dashboard (``{admin_path}/``) live.
    admin_path: str = "/resilience"
    #: List the admin API in the OpenAPI schema. Off by default: it is for operators.
    admin_in_schema: bool = False

    # The OpenAPI schema
    #: Document in the app's OpenAPI schema the answers the library adds to its routes (422
    #: and 500 as problem+json, 429, 502, 503 and 504 where something in force can answer
    #: them, and the headers): docs/openapi.md. Off: FastAPI's schema as it is.
    openapi_responses: bool = True

    # Named outbound policies (``policy("inventory")``)
    #: Every named policy, each value in force: its criticality's preset, then the
    #: ``policies_file``, then the environment, then code, field by field.
    policies: dict[str, PolicySettings] = Field(default_factory=dict)
    #: A TOML file of policy tables (``[inventory.breaker] failure_threshold = 5``).
    policies_file: Path | None = None
    #: Reload ``policies_file`` when it changes (with the ``reload`` extra, ``watchfiles``).
    policies_reload: bool = True

    #: What the environment and code declared for ``policies``, before the file went under
    #: it: a reload merges the file's new tables under this again (ADR 0072).
    _policies_above_file: dict[str, Any] = PrivateAttr(default_factory=dict)

    def __init__(self, **values: Any) -> None:
        _reject_unknown_env(type(self))
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise ConfigurationError(_describe(exc)) from None
        except SettingsError as exc:
            # pydantic-settings' own error for unparsable JSON names the field in quotes.
            field = re.search(r'field "([a-z_]+)"', str(exc))
            name = field[1] if field else "?"
            raise ConfigurationError(
                "invalid fastapi-resilience settings:\n  "
                f"{name} (env {ENV_PREFIX}{name.upper()}): not valid JSON ({exc.__cause__})"
            ) from None

    @model_validator(mode="wrap")
    @classmethod
    def _merge_policies(cls, data: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        # Before the fields are checked: the file's tables go under what the environment and
        # code declared, and each policy's preset under both (ADR 0071).
        if not isinstance(data, dict) or not ("policies" in data or "policies_file" in data):
            return handler(data)
        path = data.get("policies_file")
        from_file = read_policies_file(Path(path)) if path not in (None, "") else {}
        declared = data.get("policies")
        settings = handler({**data, "policies": merge_policies(from_file, declared)})
        if isinstance(declared, dict):
            # Kept, so that a reload of the file leaves the layers above it winning.
            settings._policies_above_file = copy.deepcopy(declared)
        return settings

    def reread_policies(self) -> dict[str, PolicySettings]:
        """Every policy as ``policies_file`` says now, under the environment and code read at
        start-up (which still win, field by field); nothing else is read again.

        Raises:
            ValueError: the file cannot be read or is not valid (file and line or key named),
                or a policy with it is not (policy and key named).
        """
        if self.policies_file is None:
            raise ValueError("policies_file is not set")
        from_file = read_policies_file(self.policies_file)
        return validate_policies(merge_policies(from_file, self._policies_above_file))

    @field_validator("correlation_header", "rate_limit_api_key_header")
    @classmethod
    def _header_name(cls, value: str) -> str:
        if not HEADER_NAME.fullmatch(value):
            raise ValueError(f"{value!r} is not a valid HTTP header name")
        return value

    @field_validator("degraded_header", "request_deadline_header")
    @classmethod
    def _optional_header_name(cls, value: str) -> str:
        if value and not HEADER_NAME.fullmatch(value):
            raise ValueError(f"{value!r} is not a valid HTTP header name (or '' for none)")
        return value

    @field_validator("problem_type_base")
    @classmethod
    def _type_base(cls, value: str) -> str:
        if not value or any(c.isspace() for c in value):
            raise ValueError("must be a URI prefix without spaces, e.g. 'https://example.com/p/'")
        return value

    @field_validator("rate_limit_storage")
    @classmethod
    def _storage(cls, value: str) -> str:
        if not value.startswith(_STORAGE_SCHEMES):
            raise ValueError(
                f"{without_password(value)!r}: expected one of {', '.join(_STORAGE_SCHEMES)}..."
            )
        if is_cluster_url(value):
            # The node list is checked now, so a typo fails at start-up, not at a request.
            parse_cluster_url(value)
        return value

    @field_validator("rate_limit_tiers")
    @classmethod
    def _tiers(cls, value: dict[str, str]) -> dict[str, str]:
        if not value:
            raise ValueError("at least one tier is needed")
        for tier, limits in value.items():
            try:
                parse_limits(limits)
            except ConfigurationError as exc:
                raise ValueError(f"tier {tier!r}: {exc}") from None
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies(cls, value: list[str]) -> list[str]:
        for entry in value:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(f"{entry!r} is not an IP address or network") from None
        return value

    @field_validator("rate_limit_exempt_paths", "health_path", "metrics_path")
    @classmethod
    def _paths(cls, value: Any) -> Any:
        for path in value if isinstance(value, list) else [value]:
            if not path.startswith("/"):
                raise ValueError(f"{path!r} must start with '/'")
            if _NOT_IN_A_PATH.search(path):
                # Requests are matched on their path alone: such a value would never match.
                raise ValueError(f"{path!r} must be a path without a query, fragment or spaces")
        return value

    @field_validator("admin_token")
    @classmethod
    def _strong_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        secret = value.get_secret_value()
        # The value is never echoed: the message says what is wrong with it, not what it is.
        if len(secret) < _MIN_TOKEN_LENGTH:
            raise ValueError(f"must be at least {_MIN_TOKEN_LENGTH} characters long")
        if not secret.isascii() or any(c.isspace() or not c.isprintable() for c in secret):
            raise ValueError("must be printable ASCII without spaces (it travels in a header)")
        return value

    @field_validator("admin_path")
    @classmethod
    def _admin_path(cls, value: str) -> str:
        if not value.startswith("/") or value == "/" or value.endswith("/"):
            raise ValueError(f"{value!r} must start with '/' and not end with it, e.g. '/ops'")
        if _NOT_IN_A_PATH.search(value) or "{" in value or "}" in value:
            raise ValueError(f"{value!r} must be a fixed path without a query or parameters")
        return value

    @field_validator("health_path", "metrics_path")
    @classmethod
    def _fixed_paths(cls, value: str) -> str:
        if "{" in value or "}" in value:
            raise ValueError(f"{value!r} must be a fixed path, without '{{...}}' parameters")
        return value

    @model_validator(mode="after")
    def _metrics_off_the_health_routes(self) -> ResilienceSettings:
        # Both are served by the same fixed-path routes: one would replace the other.
        health = {f"{self.health_path}{route}" for route in _HEALTH_ROUTES}
        if self.metrics_path in health:
            raise ValueError(
                f"metrics_path (env {ENV_PREFIX}METRICS_PATH): {self.metrics_path!r} is a health "
                f"route (health_path {self.health_path!r} serves {', '.join(sorted(health))}); "
                "choose another metrics_path, e.g. '/metrics'"
            )
        return self

    @model_validator(mode="after")
    def _backoff_in_order(self) -> ResilienceSettings:
        if self.health_recovery_backoff_max < self.health_recovery_backoff:
            raise ValueError(
                f"health_recovery_backoff_max (env {ENV_PREFIX}HEALTH_RECOVERY_BACKOFF_MAX): "
                f"{self.health_recovery_backoff_max} is less than health_recovery_backoff "
                f"({self.health_recovery_backoff})"
            )
        return self

    @model_validator(mode="after")
    def _exempt_moved_fixed_paths(self) -> ResilienceSettings:
        # Left at its default, the exemption follows the health and metrics routes it names.
        if "rate_limit_exempt_paths" not in self.model_fields_set:
            paths = [f"{self.health_path}{route}" for route in _HEALTH_ROUTES]
            # Frozen: set once here, while the model is being built.
            object.__setattr__(self, "rate_limit_exempt_paths", [*paths, self.metrics_path])
        return self

    @model_validator(mode="after")
    def _tiers_known(self) -> ResilienceSettings:
        tiers = self.rate_limit_tiers
        if self.rate_limit_default_tier not in tiers:
            raise ValueError(
                f"rate_limit_default_tier: {self.rate_limit_default_tier!r} is not one of the "
                f"rate_limit_tiers ({', '.join(tiers)})"
            )
        unknown = {t for t in self.rate_limit_api_keys.values() if t not in tiers}
        if unknown:
            raise ValueError(
                f"rate_limit_api_keys: tier(s) {', '.join(sorted(unknown))} not in rate_limit_tiers"
            )
        return self


def _reject_unknown_env(cls: type[BaseSettings]) -> None:
    # A misspelt variable would otherwise be ignored in silence and the default used.
    known = {f"{ENV_PREFIX}{name}".upper() for name in cls.model_fields}
    unknown = sorted(
        k
        for k in os.environ
        if k.upper().startswith(ENV_PREFIX)
        and k.upper() not in known
        # A policy's fields are checked by its model, which refuses an unknown one.
        and not (k.upper().startswith(_POLICY_ENV_PREFIX) and "policies" in cls.model_fields)
    )
    if unknown:
        raise ConfigurationError(
            f"unknown fastapi-resilience setting(s) in the environment: {', '.join(unknown)}"
        )


def _describe(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = [str(part) for part in err.get("loc", ())]
        field = loc[0] if loc else ""
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        if field == "policies" and len(loc) > 1:
            env = "__".join(part.upper() for part in loc)
            lines.append(f"{'.'.join(loc)} (env {ENV_PREFIX}{env}): {msg}")
        elif field:
            where = f"{field} (env {ENV_PREFIX}{field.upper()})"
            if len(loc) > 1:
                where += f" at {'.'.join(loc[1:])}"
            lines.append(f"{where}: {msg}")
        else:
            lines.append(msg)
    return "invalid fastapi-resilience settings:\n  " + "\n  ".join(lines)
