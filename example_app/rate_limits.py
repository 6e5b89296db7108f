"""Rate limiting for the example app: tiers, one demo API key per tier, a stricter ``/login``.

Wire it into ``create_app``::

    from example_app import rate_limits

    app = create_app(rate_limits.example_settings())
    app.include_router(rate_limits.router)

then try::

    curl -i 127.0.0.1:8000/orders/1                                  # anonymous: 10/minute
    curl -i 127.0.0.1:8000/orders/1 -H 'X-API-Key: demo-premium-key'  # premium: 1000/minute
    for i in 1 2 3 4 5 6; do
      curl -s -o /dev/null -w '%{http_code} ' -X POST 127.0.0.1:8000/login
    done
    # 200 200 200 200 200 429: the login limit, 5/minute, on top of the tier

``RESILIENCE_RATE_LIMIT_STORAGE=redis://127.0.0.1:6379/0 make run`` shares the counts through
Redis; any ``RESILIENCE_RATE_LIMIT_TIERS`` / ``..._API_KEYS`` in the environment win over the
defaults below.
"""

from __future__ import annotations

import os
from typing import Any

from fastapi import APIRouter, Depends

from fastapi_resilience import ResilienceSettings, rate_limit

#: tier -> limits. Premium also has a per-second burst limit.
TIERS = {
    "anonymous": "10/minute",
    "free": "60/minute",
    "standard": "300/minute",
    "premium": "1000/minute; 50/second",
}

#: Demo keys, one per tier (documented in the README; never use these in production).
API_KEYS = {
    "demo-free-key": "free",
    "demo-standard-key": "standard",
    "demo-premium-key": "premium",
}

#: The named outbound policies: ``catalog`` guards the inventory upstream's catalog reads
#: (``example_app.outbound.InventoryService``).
POLICIES: dict[str, Any] = {
    "catalog": {
        "breaker": {"failure_threshold": 3, "recovery_timeout": 10.0},
        "retry": {"attempts": 3, "base_delay": 0.05, "max_delay": 0.5},
        "timeout": 2.0,
        "cache": {"ttl": 5.0, "stale_ttl": 600.0},
    },
}

#: Five login attempts a minute per client, whatever its tier: password guessing stays slow.
login_limit = rate_limit("5/minute")

router = APIRouter(tags=["auth"])


@router.post("/login", dependencies=[Depends(login_limit)])
async def login() -> dict[str, str]:
    """A stand-in login: the point is its limit, checked with the tier's in one storage call."""
    return {"status": "logged in (demo)"}


def example_settings(**overrides: Any) -> ResilienceSettings:
    """Settings with the example's tiers, keys and policies, unless the environment sets its
    own.

    The admin API stays off unless ``RESILIENCE_ADMIN_TOKEN`` is set (``make run`` sets a
    demo one for the loopback)."""
    values: dict[str, Any] = {}
    if "RESILIENCE_HEALTH_MONITOR_INTERVAL" not in os.environ:
        values["health_monitor_interval"] = 5.0  # checks in the background, with recovery
    # Tiers from the environment replace these, and the demo keys with them (their tiers may
    # not exist there).
    if "RESILIENCE_RATE_LIMIT_TIERS" not in os.environ:
        values["rate_limit_tiers"] = TIERS
        if "RESILIENCE_RATE_LIMIT_API_KEYS" not in os.environ:
            values["rate_limit_api_keys"] = API_KEYS
    # Policies from the environment (or a file it names) replace these: code would win over
    # them field by field.
    if not any(key.startswith("RESILIENCE_POLICIES") for key in os.environ):
        values["policies"] = POLICIES
    values.update(overrides)
    return ResilienceSettings(**values)
