from __future__ import annotations

import pytest

from fastapi_resilience import ConfigurationError, ResilienceSettings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.upper().startswith("RESILIENCE_"):
            monkeypatch.delenv(key)


def test_defaults_match_the_contract() -> None:
    """The documented defaults hold."""
    s = ResilienceSettings()
    assert s.correlation_header == "X-Request-ID"
    assert s.rate_limit_enabled is True
    assert s.rate_limit_storage == "memory://"
    assert s.rate_limit_tiers == {
        "anonymous": "10/minute",
        "free": "60/minute",
        "standard": "300/minute",
        "premium": "1000/minute",
    }
    assert s.rate_limit_default_tier == "anonymous"
    assert s.rate_limit_api_keys == {}
    assert s.rate_limit_fail_open is True
    assert {"/health/live", "/health/ready", "/metrics"} <= set(s.rate_limit_exempt_paths)
    assert s.trusted_proxies == []
    assert s.expose_error_details is False


def test_environment_overrides_with_json_for_nested_values(monkeypatch: pytest.MonkeyPatch) -> None:
    """RESILIENCE_* variables set every field; dicts and lists come as JSON."""
    monkeypatch.setenv(
        "RESILIENCE_RATE_LIMIT_TIERS",
        '{"free": "5/second; 100/hour", "gold": "1/s"'.replace('"1/s"', '"1 per 2 seconds"}'),
    )
    monkeypatch.setenv("RESILIENCE_RATE_LIMIT_DEFAULT_TIER", "free")
    monkeypatch.setenv("RESILIENCE_RATE_LIMIT_API_KEYS", '{"k1": "gold"}')
    monkeypatch.setenv("RESILIENCE_TRUSTED_PROXIES", '["10.0.0.0/8", "::1"]')
    monkeypatch.setenv("RESILIENCE_RATE_LIMIT_FAIL_OPEN", "false")
    s = ResilienceSettings()
    assert s.rate_limit_tiers["gold"] == "1 per 2 seconds"
    assert s.rate_limit_api_keys == {"k1": "gold"}
    assert s.trusted_proxies == ["10.0.0.0/8", "::1"]
    assert s.rate_limit_fail_open is False


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        ({"rate_limit_tiers": {"free": "ten per minute"}}, ["rate_limit_tiers", "ten per minute"]),
        ({"rate_limit_tiers": {"free": "0/minute"}}, ["rate_limit_tiers", "0/minute"]),
        ({"rate_limit_tiers": {}}, ["rate_limit_tiers"]),
        ({"rate_limit_default_tier": "gold"}, ["rate_limit_default_tier", "gold"]),
        ({"rate_limit_api_keys": {"k": "platinum"}}, ["rate_limit_api_keys", "platinum"]),
        (
            {"rate_limit_storage": "mongodb://x"},
            ["rate_limit_storage", "RESILIENCE_RATE_LIMIT_STORAGE"],
        ),
        ({"trusted_proxies": ["not-an-ip"]}, ["trusted_proxies", "not-an-ip"]),
        ({"correlation_header": "X Bad"}, ["correlation_header"]),
        ({"rate_limit_exempt_paths": ["health"]}, ["rate_limit_exempt_paths"]),
        ({"health_check_timeout": 0}, ["health_check_timeout"]),
        ({"rate_limit_enabled": "maybe"}, ["rate_limit_enabled"]),
        ({"no_such_setting": 1}, ["no_such_setting"]),
    ],
)
def test_bad_values_from_code_name_the_setting(kwargs: dict[str, object], names: list[str]) -> None:
    """A bad value fails at construction with a message naming the setting and the value."""
    with pytest.raises(ConfigurationError) as info:
        ResilienceSettings(**kwargs)
    for name in names:
        assert name in str(info.value)


def test_bad_value_from_environment_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bad environment value names the variable to fix."""
    monkeypatch.setenv("RESILIENCE_RATE_LIMIT_FAIL_OPEN", "perhaps")
    with pytest.raises(ConfigurationError, match="RESILIENCE_RATE_LIMIT_FAIL_OPEN"):
        ResilienceSettings()


def test_malformed_json_in_environment_is_a_configuration_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Broken JSON for a nested value fails with ConfigurationError, not a raw traceback."""
    monkeypatch.setenv("RESILIENCE_RATE_LIMIT_TIERS", "{free: 1/minute")
    with pytest.raises(ConfigurationError, match="RESILIENCE_RATE_LIMIT_TIERS"):
        ResilienceSettings()


def test_misspelt_environment_variable_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """An unknown RESILIENCE_* variable is an error, not a silently ignored typo."""
    monkeypatch.setenv("RESILIENCE_RATE_LIMT_TIERS", "{}")
    with pytest.raises(ConfigurationError, match="RESILIENCE_RATE_LIMT_TIERS"):
        ResilienceSettings()


def test_settings_are_immutable() -> None:
    """Settings are frozen once built, so no request sees a half-changed configuration."""
    s = ResilienceSettings()
    with pytest.raises(Exception, match="frozen"):
        s.rate_limit_enabled = False  # type: ignore[misc]


@pytest.mark.parametrize("name", ["health_path", "metrics_path"])
def test_health_and_metrics_paths_must_be_fixed(name: str) -> None:
    """They become fixed-path routes: a template is refused at start-up, naming the setting."""
    with pytest.raises(ConfigurationError, match=name):
        ResilienceSettings(**{name: "/status/{part}"})


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"RESILIENCE_METRICS_PATH": "/health/live"}, ["metrics_path", "/health/live"]),
        ({"RESILIENCE_METRICS_PATH": "/health/ready"}, ["metrics_path", "/health/ready"]),
        (
            {"RESILIENCE_HEALTH_PATH": "/status", "RESILIENCE_METRICS_PATH": "/status/ready"},
            ["metrics_path", "/status/ready", "health_path"],
        ),
        (
            {"RESILIENCE_HEALTH_PATH": "/metrics", "RESILIENCE_METRICS_PATH": "/metrics/live"},
            ["metrics_path", "/metrics/live", "health_path"],
        ),
    ],
)
def test_metrics_path_may_not_be_a_health_route(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], names: list[str]
) -> None:
    """Metrics on a health route would replace it: refused at start-up, naming the setting."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigurationError) as info:
        ResilienceSettings()
    for name in [*names, "RESILIENCE_METRICS_PATH"]:
        assert name in str(info.value)


def test_metrics_path_next_to_the_health_routes_is_fine() -> None:
    s = ResilienceSettings(health_path="/health", metrics_path="/health/metrics")
    assert s.metrics_path == "/health/metrics"


@pytest.mark.parametrize("name", ["health_path", "metrics_path", "rate_limit_exempt_paths"])
@pytest.mark.parametrize(
    "path", ["/metrics?format=text", "/metrics#top", "/my metrics", "/metrics ", "/a\tb", "/a\x00"]
)
def test_paths_with_a_query_fragment_or_space_are_refused(name: str, path: str) -> None:
    """A route path never holds a query, a fragment or whitespace: such a setting would never
    match a request, so it is refused at start-up, naming the setting."""
    value: object = [path] if name == "rate_limit_exempt_paths" else path
    with pytest.raises(ConfigurationError) as info:
        ResilienceSettings(**{name: value})
    assert name in str(info.value)
    assert repr(path) in str(info.value)


def test_default_exemptions_follow_moved_health_and_metrics_paths() -> None:
    """Left at its default, ``rate_limit_exempt_paths`` names the health and metrics routes
    where ``health_path`` and ``metrics_path`` put them; a value given is kept as given."""
    moved = ResilienceSettings(health_path="/_health", metrics_path="/_metrics")
    assert moved.rate_limit_exempt_paths == ["/_health/live", "/_health/ready", "/_metrics"]
    assert ResilienceSettings().rate_limit_exempt_paths == [
        "/health/live",
        "/health/ready",
        "/metrics",
    ]
    given = ResilienceSettings(health_path="/_health", rate_limit_exempt_paths=["/static/*"])
    assert given.rate_limit_exempt_paths == ["/static/*"]


@pytest.mark.anyio
async def test_moved_health_routes_are_never_counted() -> None:
    import httpx
    from fastapi import FastAPI

    from fastapi_resilience import install

    app = FastAPI()
    install(
        app,
        ResilienceSettings(health_path="/_health", rate_limit_tiers={"anonymous": "1/minute"}),
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        answers = [await client.get("/_health/ready") for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 200]
