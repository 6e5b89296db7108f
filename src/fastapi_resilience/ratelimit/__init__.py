"""Rate limiting for implementers: the limiter, its storages and the identity resolver.

App authors need only ``install()``, ``RateLimitMiddleware`` and ``rate_limit`` from the top
level; a custom storage, resolver or limiter is built from the names here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi_resilience._exports import lazy_exports as _lazy_exports

if TYPE_CHECKING:
    from fastapi_resilience._limits import Limit, parse_limits
    from fastapi_resilience.ratelimit._guard import GuardedStorage
    from fastapi_resilience.ratelimit._identity import (
        ClientAddress,
        DefaultIdentityResolver,
        Identity,
        IdentityResolver,
    )
    from fastapi_resilience.ratelimit._limiter import (
        IdentityStateUnsupportedError,
        LimitOutcome,
        RateLimiter,
    )
    from fastapi_resilience.ratelimit._memory import MemoryStorage
    from fastapi_resilience.ratelimit._redis import RedisStorage
    from fastapi_resilience.ratelimit._routes import RateLimit
    from fastapi_resilience.ratelimit._setup import guarded_storage_from_url, storage_from_url
    from fastapi_resilience.ratelimit._storage import (
        Decision,
        IdentityStateStorage,
        LimitCheck,
        LimitState,
        RateLimitStorage,
    )

__all__ = [
    "ClientAddress",
    "Decision",
    "DefaultIdentityResolver",
    "GuardedStorage",
    "Identity",
    "IdentityResolver",
    "IdentityStateStorage",
    "IdentityStateUnsupportedError",
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

#: Each public name and the module it is imported from on first use.
_EXPORTS = {
    "Decision": "fastapi_resilience.ratelimit._storage",
    "DefaultIdentityResolver": "fastapi_resilience.ratelimit._identity",
    "GuardedStorage": "fastapi_resilience.ratelimit._guard",
    "Identity": "fastapi_resilience.ratelimit._identity",
    "IdentityResolver": "fastapi_resilience.ratelimit._identity",
    "IdentityStateStorage": "fastapi_resilience.ratelimit._storage",
    "IdentityStateUnsupportedError": "fastapi_resilience.ratelimit._limiter",
    "Limit": "fastapi_resilience._limits",
    "LimitCheck": "fastapi_resilience.ratelimit._storage",
    "LimitOutcome": "fastapi_resilience.ratelimit._limiter",
    "LimitState": "fastapi_resilience.ratelimit._storage",
    "MemoryStorage": "fastapi_resilience.ratelimit._memory",
    "RateLimit": "fastapi_resilience.ratelimit._routes",
    "RateLimitStorage": "fastapi_resilience.ratelimit._storage",
    "RateLimiter": "fastapi_resilience.ratelimit._limiter",
    "RedisStorage": "fastapi_resilience.ratelimit._redis",
    "guarded_storage_from_url": "fastapi_resilience.ratelimit._setup",
    "parse_limits": "fastapi_resilience._limits",
    "storage_from_url": "fastapi_resilience.ratelimit._setup",
    "ClientAddress": "fastapi_resilience.ratelimit._identity",
}
__getattr__, __dir__ = _lazy_exports(__name__, _EXPORTS)
