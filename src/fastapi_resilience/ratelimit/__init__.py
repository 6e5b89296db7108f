"""Rate limiting for implementers: the limiter, its storages and the identity resolver.

App authors need only ``install()``, ``RateLimitMiddleware`` and ``rate_limit`` from the top
level; a custom storage, resolver or limiter is built from the names here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi_resilience._limits import Limit, parse_limits
from fastapi_resilience.ratelimit._guard import GuardedStorage
from fastapi_resilience.ratelimit._identity import (
    DefaultIdentityResolver,
    Identity,
    IdentityResolver,
)
from fastapi_resilience.ratelimit._limiter import LimitOutcome, RateLimiter
from fastapi_resilience.ratelimit._memory import MemoryStorage
from fastapi_resilience.ratelimit._routes import RateLimit
from fastapi_resilience.ratelimit._setup import guarded_storage_from_url, storage_from_url
from fastapi_resilience.ratelimit._storage import (
    Decision,
    LimitCheck,
    LimitState,
    RateLimitStorage,
)

if TYPE_CHECKING:
    from fastapi_resilience.ratelimit._redis import RedisStorage

__all__ = [
    "Decision",
    "DefaultIdentityResolver",
    "GuardedStorage",
    "Identity",
    "IdentityResolver",
    "Limit",
    "LimitCheck",
    "LimitOutcome",
    "LimitState",
    "MemoryStorage",
    "RateLimit",
    "RateLimitStorage",
    "RateLimiter",
    "RedisStorage",
    "guarded_storage_from_url",
    "parse_limits",
    "storage_from_url",
]


def __getattr__(name: str) -> Any:
    if name == "RedisStorage":
        # Imported on first use: redis is the optional ``redis`` extra.
        from fastapi_resilience.ratelimit._redis import RedisStorage

        return RedisStorage
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
