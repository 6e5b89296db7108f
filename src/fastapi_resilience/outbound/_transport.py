"""``ResilientTransport``: breaker, retry with a budget, timeout and bulkhead per upstream host.

Wraps any httpx async transport. Each host gets its own policy objects, built on first use
from the transport's options (or given explicitly), so one sick upstream cannot trip another's
breaker or spend another's retry budget. An attempt goes through, outermost first:

    cache (GET) -> retry (+ budget) -> adaptive throttle -> hedge -> quota gate
    -> outbound rate limit -> breaker -> bulkhead -> timeout (inherits the request deadline)
    -> the wrapped transport

The quota gate and the outbound rate limit (ADR 0069) hold an attempt back, before it takes a
breaker trial or a bulkhead slot, while the upstream has said its quota is used up or while this
client's own ``rate_limit`` is reached.

A request that no upstream could be sent (a scheme other than http, https, ws or wss, no host,
a port out of range, a header that breaks HTTP's framing) is refused before any of these, with
the httpx error that names the fault (ADR 0076).

Failures come out as the library's errors: a transport error is an :class:`UpstreamError`,
a timeout an :class:`UpstreamTimeoutError`, a 5xx answer an :class:`UpstreamError` after
retries (or the answer itself with ``raise_for_5xx=False``); retries that ran out raise
:class:`RetryExhaustedError` with the last error chained.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import random as _random
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any, TypedDict, Unpack, cast

import httpx

from fastapi_resilience._limits import RateLimitStorage
from fastapi_resilience._tally import OUTBOUND_DURATIONS, OUTBOUND_OBSERVERS
from fastapi_resilience.clock import SYSTEM_CLOCK, Clock
from fastapi_resilience.events import EventBus
from fastapi_resilience.exceptions import (
    AppError,
    ClientError,
    ConfigurationError,
    RateLimitedError,
    RetryExhaustedError,
    UpstreamError,
    UpstreamStatusError,
    UpstreamTimeoutError,
)
from fastapi_resilience.outbound._adaptive_throttle import AdaptiveThrottle, refused_here
from fastapi_resilience.outbound._breaker import (
    BreakerRegistry,
    CircuitBreaker,
    default_registry,
    holds_calls_back,
)
from fastapi_resilience.outbound._bulkhead import (
    Bulkhead,
    BulkheadRegistry,
    default_bulkhead_registry,
)
from fastapi_resilience.outbound._cache_sharing import SharingRules, credential_headers
from fastapi_resilience.outbound._deadline import (
    DEADLINE_EXCEEDED_DETAIL,
    effective_timeout,
    remaining,
    timeout_error,
)
from fastapi_resilience.outbound._headers import inject_outbound_headers
from fastapi_resilience.outbound._hedging import Hedge
from fastapi_resilience.outbound._policies import (
    Policy,
    PolicyGuards,
    caller_site,
    default_policies,
)
from fastapi_resilience.outbound._provider_limits import (
    DEFAULT_RATE_LIMIT_WAIT,
    OutboundLimiter,
    QuotaGate,
    parse_retry_after,
    provider_wait,
    quota_reset,
)
from fastapi_resilience.outbound._response_cache import (
    CACHE_STATUS_HEADER,
    ResponseCache,
    restore_response,
    snapshot_response,
)
from fastapi_resilience.outbound._retry import GiveupHook, Retry, RetryHook
from fastapi_resilience.outbound._retry_budget import RetryBudget
from fastapi_resilience.outbound._sendable import refuse_unsendable
from fastapi_resilience.outbound._stream import (
    DEFAULT_STREAM_IDLE_TIMEOUT,
    StreamAwareClient,
    guard_stream,
    is_streamed,
    observe_at_end,
)

logger = logging.getLogger("fastapi_resilience.outbound")

__all__ = [
    "HostPolicy",
    "PolicyOptions",
    "ResilientTransport",
    "UpstreamStatusError",
    "parse_retry_after",
    "resilient_client",
]

#: Methods safe to send twice at once (hedging): idempotent and without a body.
_HEDGE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class _UpstreamRateLimited(RateLimitedError):
    """The upstream answered 429: retried after its Retry-After, never counted by a breaker."""

    def __init__(self, response: httpx.Response, host: str, retry_after: float | None) -> None:
        super().__init__(
            f"Upstream {host} answered 429.",
            extensions={"upstream": host, "upstream_status": 429},
            retry_after=retry_after,
        )
        self.response = response
        self.upstream_status = 429


class _NotCacheable(ClientError):
    """Carries an answer that must not be cached (not 2xx) out of the cached call."""

    def __init__(self, response: httpx.Response) -> None:
        super().__init__("not cacheable")
        self.response = response


_PHASES = ("connect", "read", "write", "pool")


def _tighten_timeouts(request: httpx.Request, limit: float) -> None:
    """Cap httpx's per-phase timeouts for this request at ``limit`` seconds."""
    current = request.extensions.get("timeout")
    if current is None:
        request.extensions["timeout"] = dict.fromkeys(_PHASES, limit)
        return
    # The client builds a fresh dict per request, so it can be changed in place.
    for phase in _PHASES:
        value = current.get(phase)
        if value is None or value > limit:
            current[phase] = limit


class PolicyOptions(TypedDict, total=False):
    """The per-host policy options of :class:`ResilientTransport` and :func:`resilient_client`."""

    attempts: int
    base_delay: float
    max_delay: float
    jitter: bool | str
    retry_deadline: float | None
    retry_budget: bool | float
    retry_non_idempotent: bool
    failure_threshold: int | None
    recovery_timeout: float
    half_open_max_calls: int
    max_recovery_timeout: float | None
    timeout: float | None
    max_concurrent: int | None
    max_waiting: int
    wait_timeout: float | None
    adaptive_throttle: bool
    hedge_after: float | None
    hedge_percentile: float | None
    cache: ResponseCache | None
    cache_ttl: float | None
    credential_headers: Sequence[str]
    stream_idle_timeout: float | None
    rate_limit: str | None
    rate_limit_storage: RateLimitStorage | None
    rate_limit_wait: float
    on_retry: RetryHook | None
    on_giveup: GiveupHook | None


_DEFAULTS: PolicyOptions = {
    "attempts": 3,
    "base_delay": 0.1,
    "max_delay": 10.0,
    "jitter": True,
    "retry_deadline": None,
    "retry_budget": True,
    "retry_non_idempotent": False,
    "failure_threshold": 5,
    "recovery_timeout": 30.0,
    "half_open_max_calls": 1,
    "max_recovery_timeout": None,
    "timeout": 10.0,
    "max_concurrent": None,
    "max_waiting": 0,
    "wait_timeout": None,
    "adaptive_throttle": False,
    "hedge_after": None,
    "hedge_percentile": None,
    "cache": None,
    "cache_ttl": None,
    "credential_headers": (),
    "stream_idle_timeout": DEFAULT_STREAM_IDLE_TIMEOUT,
    "rate_limit": None,
    "rate_limit_storage": None,
    "rate_limit_wait": DEFAULT_RATE_LIMIT_WAIT,
    "on_retry": None,
    "on_giveup": None,
}


def _wait_bound(value: object) -> float:
    """``rate_limit_wait`` in seconds: a number >= 0."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise ConfigurationError(f"rate_limit_wait must be >= 0 seconds, got {value!r}")
    return float(value)


@dataclass(slots=True)
class HostPolicy:
    """The guards for one upstream host; any may be ``None`` (off).

    Build one yourself to share a breaker with the rest of the app, or let the transport
    build one per host from its options. ``credential_headers`` are request headers that
    make a cached answer someone's own, added to ``Authorization``, ``Cookie``,
    ``Proxy-Authorization`` and ``X-API-Key``, which always are. ``gate`` holds calls back while
    the upstream says its quota is used up, ``limiter`` is this client's own rate limit, and
    ``rate_limit_wait`` is how long a call may wait for either (ADR 0069); a policy built from
    options always has a gate.

    Raises:
        ConfigurationError: ``credential_headers`` is not a list of header names, or
            ``rate_limit_wait`` is below 0.
    """

    retry: Retry | None = None
    breaker: CircuitBreaker | None = None
    bulkhead: Bulkhead | None = None
    timeout: float | None = None
    throttle: AdaptiveThrottle | None = None
    hedge: Hedge | None = None
    cache: ResponseCache | None = None
    cache_ttl: float | None = None
    credential_headers: Sequence[str] = ()
    gate: QuotaGate | None = None
    limiter: OutboundLimiter | None = None
    rate_limit_wait: float = DEFAULT_RATE_LIMIT_WAIT
    #: Longest silence between two chunks of a streamed answer; ``None``: no limit.
    stream_idle_timeout: float | None = DEFAULT_STREAM_IDLE_TIMEOUT
    #: Who may share the cache's answers; built from the above.
    sharing: SharingRules | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        credential_headers(self.credential_headers)  # a bad name fails here, at start-up
        self.rate_limit_wait = _wait_bound(self.rate_limit_wait)

    def sharing_rules(self) -> SharingRules:
        """Who may share the cache's answers: built on first use, then kept."""
        if self.sharing is None:
            max_urls = self.cache.max_entries if self.cache is not None else 1
            names = credential_headers(self.credential_headers)
            self.sharing = SharingRules(names, max_urls=max_urls)
        return self.sharing

    @classmethod
    def build(
        cls,
        host: str,
        options: PolicyOptions,
        *,
        clock: Clock = SYSTEM_CLOCK,
        events: EventBus | None = None,
        random: Callable[[], float] = _random.random,
        register: bool = True,
    ) -> HostPolicy:
        """A fresh policy for ``host`` from ``options`` (missing keys take the defaults).

        The breaker and bulkhead are registered by name (``upstream:<host>``) so health
        checks and admin pages see them, unless ``register`` is false.
        """
        unknown = set(options) - set(_DEFAULTS)
        if unknown:
            raise ConfigurationError(f"unknown transport option(s): {', '.join(sorted(unknown))}")
        o: dict[str, Any] = {**_DEFAULTS, **options}
        retry = None
        if o["attempts"] != 1:  # 0 or less reaches Retry, which refuses it
            budget = None
            if o["retry_budget"] is not False:
                ratio = 0.1 if o["retry_budget"] is True else float(o["retry_budget"])
                budget = RetryBudget(ratio=ratio, name=host, clock=clock, events=events)
            retry = Retry(
                o["attempts"],
                base_delay=o["base_delay"],
                max_delay=o["max_delay"],
                jitter=o["jitter"],
                deadline=o["retry_deadline"],
                budget=budget,
                retry_non_idempotent=o["retry_non_idempotent"],
                name=host,
                clock=clock,
                random=random,
                events=events,
                on_retry=o["on_retry"],
                on_giveup=o["on_giveup"],
            )
        breaker = None
        if o["failure_threshold"] is not None:
            breaker = CircuitBreaker(
                f"upstream:{host}",
                failure_threshold=o["failure_threshold"],
                recovery_timeout=o["recovery_timeout"],
                half_open_max_calls=o["half_open_max_calls"],
                max_recovery_timeout=o["max_recovery_timeout"],
                clock=clock,
                events=events,
                registry=default_registry if register else None,
            )
        bulkhead = None
        if o["max_concurrent"] is not None:
            bulkhead = Bulkhead(
                f"upstream:{host}",
                max_concurrent=o["max_concurrent"],
                max_waiting=o["max_waiting"],
                wait_timeout=o["wait_timeout"],
                clock=clock,
                events=events,
                registry=default_bulkhead_registry if register else None,
            )
        throttle = (
            AdaptiveThrottle(name=host, clock=clock, random=random, events=events)
            if o["adaptive_throttle"]
            else None
        )
        hedge = None
        if o["hedge_after"] is not None or o["hedge_percentile"] is not None:
            hedge = Hedge(
                delay=o["hedge_after"], percentile=o["hedge_percentile"], name=host, clock=clock
            )
        if o["timeout"] is not None and (math.isnan(o["timeout"]) or o["timeout"] < 0):
            raise ConfigurationError(f"timeout must be >= 0 seconds or None, got {o['timeout']!r}")
        idle = o["stream_idle_timeout"]
        if idle is not None and (math.isnan(idle) or idle <= 0):
            raise ConfigurationError(
                f"stream_idle_timeout must be > 0 seconds or None, got {idle!r}"
            )
        limiter = None
        if o["rate_limit"] is not None:
            if not isinstance(o["rate_limit"], str):
                raise ConfigurationError(
                    f"rate_limit must be a limit string such as '10/second', "
                    f"got {o['rate_limit']!r}"
                )
            limiter = OutboundLimiter(
                host, o["rate_limit"], storage=o["rate_limit_storage"], clock=clock
            )
        elif o["rate_limit_storage"] is not None:
            raise ConfigurationError("rate_limit_storage is given without a rate_limit to count")
        return cls(
            retry,
            breaker,
            bulkhead,
            o["timeout"],
            throttle,
            hedge,
            o["cache"],
            o["cache_ttl"],
            o["credential_headers"],
            QuotaGate(host, clock=clock, events=events),
            limiter,
            o["rate_limit_wait"],  # checked once, by HostPolicy
            stream_idle_timeout=idle,
        )


#: How many hosts a transport keeps policies for, unless told otherwise.
DEFAULT_MAX_HOSTS = 1024
#: Busy policies passed over while looking for idle ones to forget, per new host beyond
#: ``max_hosts``.
_EVICTION_SCAN = 16


def _busy(policy: HostPolicy) -> bool:
    """Forgetting it would lose something: a breaker that keeps calls back (open with time
    left, or a half-open trial running: the next call would reach a sick upstream), a
    bulkhead with calls in it (more would be let in), a quota gate closed with time left, or
    an outbound limit counting in memory that still holds units (ADR 0069). An open breaker
    whose time is up, or a half-open one with no trial, would let the next call through anyway:
    not busy."""
    breaker, bulkhead = policy.breaker, policy.bulkhead
    if breaker is not None and holds_calls_back(breaker):
        return True
    if bulkhead is not None and (bulkhead.active > 0 or bulkhead.waiting > 0):
        return True
    gate, limiter = policy.gate, policy.limiter
    if gate is not None and gate.holds_calls_back():
        return True
    return limiter is not None and limiter.holds_units()


def _registered(registry: BreakerRegistry | BulkheadRegistry, name: str, guard: object) -> bool:
    """Whether ``registry`` holds ``guard`` itself under ``name``."""
    return name in registry and registry.get(name) is guard


class ResilientTransport(httpx.AsyncBaseTransport):
    """An httpx async transport that guards every upstream host on its own.

    ``httpx.AsyncClient(transport=ResilientTransport())``, or :func:`resilient_client`.
    Per host it applies, by default: 3 attempts with full-jitter backoff (idempotent methods
    only) under a retry budget of 10% of recent calls, a breaker opening after 5 failures in
    a row for 30 s, and a 10 s timeout per attempt that never outlives the request's
    deadline. It forwards the correlation ID and ``traceparent``, and honours an upstream's
    ``retry-after-ms``, ``Retry-After`` or ``x-ratelimit-reset-*`` on 429 and 503; while the
    upstream says its quota is used up, calls to it wait (``rate_limit_wait``) or fail fast
    with :class:`QuotaExhaustedError` instead of being sent (ADR 0069).

    Args:
        transport: the transport that talks to the network (default
            ``httpx.AsyncHTTPTransport()``).
        hosts: per-host policies, keyed by ``host`` or ``host:port``: a :class:`HostPolicy`,
            or a dict of options overriding the transport's.
        raise_for_5xx: after retries, raise :class:`UpstreamError` for a 5xx answer (default),
            or return the answer. Either way the breaker counts it as a failure.
        read_body: read the whole body inside the guards (default), so the timeout covers it
            and a failing read is retried; ``False`` streams a 2xx body to the caller. A
            streamed request (``client.stream(...)`` on :func:`resilient_client`'s client) is
            never read here: see ``docs/streaming.md``.
        header_name: the correlation ID header forwarded upstream.
        max_hosts: how many hosts' policies (breaker, bulkhead, retry budget...) to keep;
            beyond it the least recently used idle one is forgotten (ADR 0058). A policy whose
            breaker keeps calls back (open with time left, a half-open trial running) or whose
            bulkhead is in use is kept until it is idle; a policy that ``hosts`` gave is never
            lost (only its entry, found again on the next call). ``None``: keep every host
            (only for a fixed set of hosts).
        clock, random, events: injectable time, jitter source and event bus.
        **options: the default :class:`PolicyOptions` for every host.

    Raises:
        ConfigurationError: an option is unknown or out of range; the message names it.

    .. versionadded:: 0.1.0
    """

    def __init__(
        self,
        transport: httpx.AsyncBaseTransport | None = None,
        *,
        hosts: Mapping[str, HostPolicy | PolicyOptions] | None = None,
        raise_for_5xx: bool = True,
        read_body: bool = True,
        header_name: str = "X-Request-ID",
        max_hosts: int | None = DEFAULT_MAX_HOSTS,
        clock: Clock = SYSTEM_CLOCK,
        random: Callable[[], float] = _random.random,
        events: EventBus | None = None,
        **options: Unpack[PolicyOptions],
    ) -> None:
        if max_hosts is not None and (
            isinstance(max_hosts, bool) or not isinstance(max_hosts, int) or max_hosts < 1
        ):
            raise ConfigurationError(f"max_hosts must be an int >= 1 or None, got {max_hosts!r}")
        self.max_hosts = max_hosts
        self._transport = transport if transport is not None else httpx.AsyncHTTPTransport()
        # Only httpx's own HTTP transport is known to refuse other schemes.
        self._any_scheme = not isinstance(self._transport, httpx.AsyncHTTPTransport)
        self.raise_for_5xx = raise_for_5xx
        self.read_body = read_body
        self._header_name = header_name
        self._clock = clock
        self._random = random
        self._events = events
        # Build once, registering nothing, so that a bad option fails at start-up.
        HostPolicy.build("options-check", options, clock=clock, register=False)
        self._options = options
        self._explicit = dict(hosts or {})
        # Least recently used first. A policy ``hosts`` gave stays in ``_explicit`` whatever
        # happens here, so its entries (one per ``host:port`` it matches) may go like any.
        self._policies: OrderedDict[str, HostPolicy] = OrderedDict()
        self._given = frozenset(id(p) for p in self._explicit.values() if isinstance(p, HostPolicy))
        self._by_origin: dict[tuple[bytes, int | None], tuple[HostPolicy, str]] = {}
        self._origin_of: dict[str, tuple[bytes, int | None]] = {}

    def policy_for(self, host: str) -> HostPolicy:
        """The policy used for ``host`` (``host`` or ``host:port``), built on first use."""
        policy = self._policies.get(host)
        if policy is not None:
            self._policies.move_to_end(host)
            return policy
        bare = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
        explicit = self._explicit.get(host, self._explicit.get(bare))
        if isinstance(explicit, HostPolicy):
            policy = explicit
        else:
            options: PolicyOptions = {**self._options, **(explicit or {})}
            policy = HostPolicy.build(
                host, options, clock=self._clock, events=self._events, random=self._random
            )
        self._policies[host] = policy
        self._forget_idle(host)
        return policy

    def hosts(self) -> list[str]:
        """The hosts (``host`` or ``host:port``) it keeps a policy for, least recently used
        first."""
        return list(self._policies)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        # The app's own fault, before any guard: not retried, counted or timed (ADR 0076).
        refuse_unsendable(request, any_scheme=self._any_scheme)
        started = perf_counter()
        try:
            response = await self._handle(request)
        except Exception as exc:
            _observe(request, started, exc, None)
            raise
        # A streamed answer is timed, by how it ended, when it ends.
        if not (
            is_streamed(request)
            and observe_at_end(response, lambda exc: _observe(request, started, exc, response))
        ):
            _observe(request, started, None, response)
        return response

    async def _handle(self, request: httpx.Request) -> httpx.Response:
        inject_outbound_headers(request.headers, header_name=self._header_name)
        url = request.url
        found = self._by_origin.get((url.raw_host, url.port))
        if found is None:
            found = self._origin(url)
        else:
            self._policies.move_to_end(found[1])
        policy, host = found
        if policy.cache is not None and request.method == "GET" and not is_streamed(request):
            return await self._cached(policy, host, request)
        return await self._send(policy, host, request)

    def _origin(self, url: httpx.URL) -> tuple[HostPolicy, str]:
        host = url.netloc.decode("ascii")
        origin = (url.raw_host, url.port)
        found = self._by_origin[origin] = (self.policy_for(host), host)
        self._origin_of[host] = origin
        return found

    def _forget_idle(self, newest: str) -> None:
        """Beyond ``max_hosts``, forget least recently used idle policies; a busy one counts
        as used now. At most ``_EVICTION_SCAN`` busy ones are passed over per new host, so a
        table full of busy hosts costs each new one a bounded scan. Idle ones met are all
        forgotten: each was added by a new host once, so that work is bounded by the hosts
        added, and a table that grew while many breakers were open is back to the bound at
        the first new host after they fall idle."""
        if self.max_hosts is None:
            return
        policies = self._policies
        passed_over = 0
        while len(policies) > self.max_hosts and passed_over < _EVICTION_SCAN:
            host, policy = next(iter(policies.items()))
            given = id(policy) in self._given
            if host == newest or (not given and _busy(policy)):
                policies.move_to_end(host)
                passed_over += 1
            else:
                self._forget(host, policy, given)
        # A hard ceiling for what only quotas keep busy (a gate closed for an hour, a limiter
        # holding an hour's units, a hostile upstream's Retry-After): past twice the bound the
        # least recently used of those go. An open breaker still keeps its host (ADR 0058).
        scanned = 0
        while len(policies) > 2 * self.max_hosts and scanned < len(policies):
            host, policy = next(iter(policies.items()))
            scanned += 1
            breaker = policy.breaker
            if host == newest or (breaker is not None and holds_calls_back(breaker)):
                policies.move_to_end(host)
                continue
            self._forget(host, policy, id(policy) in self._given)

    def _forget(self, host: str, policy: HostPolicy, given: bool) -> None:
        del self._policies[host]
        origin = self._origin_of.pop(host, None)
        if origin is not None:
            del self._by_origin[origin]
        if given:
            return  # the user's policy: its guards stay where the user put them
        # The registries hold the newest object per name: another client's may be there.
        name = f"upstream:{host}"
        breaker, bulkhead = policy.breaker, policy.bulkhead
        if breaker is not None and _registered(default_registry, name, breaker):
            default_registry.unregister(name)
        if bulkhead is not None and _registered(default_bulkhead_registry, name, bulkhead):
            default_bulkhead_registry.unregister(name)

    async def _send(self, policy: HostPolicy, host: str, request: httpx.Request) -> httpx.Response:
        try:
            return await self._send_or_raise(policy, host, request)
        except UpstreamError as exc:
            response = self._answer_instead(exc)
            if response is None:
                raise
            return response

    async def _send_or_raise(
        self, policy: HostPolicy, host: str, request: httpx.Request
    ) -> httpx.Response:
        retry = policy.retry
        try:
            if (
                retry is not None
                and retry.allows_method(request.method)
                and isinstance(request.stream, httpx.ByteStream)  # a body we can send again
            ):
                return await retry.call(self._attempt, policy, host, request)
            return await self._attempt(policy, host, request)
        except _UpstreamRateLimited as exc:
            return exc.response
        except RetryExhaustedError as exc:
            if isinstance(exc.__cause__, _UpstreamRateLimited):
                return exc.__cause__.response
            raise

    def _answer_instead(self, exc: BaseException) -> httpx.Response | None:
        """With ``raise_for_5xx=False``, the 5xx answer to return instead of raising."""
        if self.raise_for_5xx:
            return None
        if isinstance(exc, RetryExhaustedError):
            exc = exc.__cause__  # type: ignore[assignment]
        return exc.response if isinstance(exc, UpstreamStatusError) else None

    async def _attempt(
        self, policy: HostPolicy, host: str, request: httpx.Request
    ) -> httpx.Response:
        throttle = policy.throttle
        if throttle is not None:
            return await throttle.call(self._hedged, policy, host, request)
        return await self._hedged(policy, host, request)

    async def _hedged(
        self, policy: HostPolicy, host: str, request: httpx.Request
    ) -> httpx.Response:
        hedge = policy.hedge
        if hedge is not None and request.method in _HEDGE_METHODS and not is_streamed(request):
            return await hedge.call(self._admitted, policy, host, request)
        return await self._admitted(policy, host, request)

    async def _admitted(
        self, policy: HostPolicy, host: str, request: httpx.Request
    ) -> httpx.Response:
        gate, limiter = policy.gate, policy.limiter
        breaker = policy.breaker
        if (limiter is not None or (gate is not None and gate.time_left() > 0.0)) and not (
            breaker is not None and holds_calls_back(breaker)
        ):
            # An open breaker refuses at once below: no quota is spent or waited for then.
            await _admit(policy, gate, limiter)
        return await self._guarded(policy, host, request)

    async def _guarded(
        self, policy: HostPolicy, host: str, request: httpx.Request
    ) -> httpx.Response:
        breaker = policy.breaker
        if is_streamed(request):
            # Breaker permit and bulkhead slot are held, and the verdict given, at the end.
            return await guard_stream(
                functools.partial(self._exchange, policy, host, request),
                breaker=breaker,
                bulkhead=policy.bulkhead,
                host=host,
                request=request,
                idle_timeout=policy.stream_idle_timeout,
            )
        if breaker is not None:
            return await breaker.call(self._bulkheaded, policy, host, request)
        return await self._bulkheaded(policy, host, request)

    async def _bulkheaded(
        self, policy: HostPolicy, host: str, request: httpx.Request
    ) -> httpx.Response:
        bulkhead = policy.bulkhead
        if bulkhead is not None:
            async with bulkhead:
                return await self._exchange(policy, host, request)
        return await self._exchange(policy, host, request)

    async def _exchange(
        self, policy: HostPolicy, host: str, request: httpx.Request
    ) -> httpx.Response:
        limit, by_deadline = effective_timeout(policy.timeout)
        try:
            if limit is None:
                response = await self._roundtrip(request)
            elif limit <= 0:
                raise timeout_error(
                    DEADLINE_EXCEEDED_DETAIL,
                    started=False,
                    by_deadline=by_deadline,
                    extensions={"upstream": host},
                )
            else:
                # The wrapped transport enforces the limit on every phase (connect, write,
                # read, pool) at no extra cost; a request deadline is also a hard bound on the
                # whole exchange, so a body that trickles in cannot outlive it.
                _tighten_timeouts(request, limit)
                if remaining() is not None:
                    async with asyncio.timeout(limit):
                        response = await self._roundtrip(request)
                else:
                    response = await self._roundtrip(request)
        except TimeoutError as exc:
            if isinstance(exc, UpstreamTimeoutError):
                raise
            detail = (
                DEADLINE_EXCEEDED_DETAIL
                if by_deadline
                else f"Upstream {host} did not answer within {limit:g}s."
            )
            raise timeout_error(
                detail,
                started=True,
                by_deadline=by_deadline,
                extensions={"upstream": host, "timeout": limit},
            ) from exc
        except httpx.TimeoutException as exc:
            # httpx's phase timeouts were capped at ``limit``; waiting for a pooled connection
            # is a call that has not reached the upstream yet.
            raise timeout_error(
                f"Upstream {host} timed out ({type(exc).__name__}).",
                started=not (by_deadline and isinstance(exc, httpx.PoolTimeout)),
                by_deadline=by_deadline,
                extensions={"upstream": host},
            ) from exc
        except httpx.TransportError as exc:
            raise UpstreamError(
                f"Upstream {host} could not be reached ({type(exc).__name__}).",
                extensions={"upstream": host},
            ) from exc
        status = response.status_code
        gate = policy.gate
        if gate is not None:
            exhausted = quota_reset(response.headers)
            if exhausted is not None:
                gate.close(exhausted[0], reason=exhausted[1])
        if status >= 500 or status == 429:
            if not isinstance(response.stream, httpx.ByteStream):  # a streamed request's
                await _read_error_body(response, limit)
            retry_after = (
                provider_wait(response.headers, now=self._clock.time())
                if status in (429, 503)
                else None
            )
            if status == 429:
                if gate is not None:
                    if retry_after is not None:
                        gate.close(retry_after, reason="429")
                    # A retry waits as long as the gate stays closed (a longer reset header
                    # may have closed it): past ``max_delay`` it gives the 429 back at once.
                    left = gate.time_left()
                    if left > (retry_after or 0.0):
                        retry_after = left
                raise _UpstreamRateLimited(response, host, retry_after)
            raise UpstreamStatusError(response, host, retry_after)
        return response

    async def _roundtrip(self, request: httpx.Request) -> httpx.Response:
        response = await self._transport.handle_async_request(request)
        if (
            self.read_body
            and not isinstance(response.stream, httpx.ByteStream)
            and not is_streamed(request)
        ):
            # Read the raw (still encoded) body here, inside the timeout, and hand the client
            # an in-memory stream; the client decodes it as usual.
            stream = cast(httpx.AsyncByteStream, response.stream)
            try:
                body = b"".join([chunk async for chunk in stream])
            finally:
                await stream.aclose()
            response.stream = httpx.ByteStream(body)
        return response

    async def _cached(
        self, policy: HostPolicy, host: str, request: httpx.Request
    ) -> httpx.Response:
        cache, sharing = policy.cache, policy.sharing_rules()
        assert cache is not None
        key = sharing.key(request)
        if key is None:
            return await self._send(policy, host, request)  # the upstream said Vary: *
        made_here = False

        async def fetch() -> dict[str, Any]:
            nonlocal made_here
            made_here = True
            # Always raise on 5xx here, so that a failure can be answered from the stale entry.
            response = await self._send_or_raise(policy, host, request)
            await response.aread()
            if not sharing.storable(key, response):
                raise _NotCacheable(response)
            return snapshot_response(response)

        try:
            result = await cache.call(key.key, fetch, ttl=policy.cache_ttl)
        except _NotCacheable as exc:
            # An answer that was not stored may be meant for its caller alone: a caller that
            # waited on another's call makes its own.
            return exc.response if made_here else await self._send(policy, host, request)
        except UpstreamError as exc:
            answer = self._answer_instead(exc)
            if answer is None:
                raise
            return answer if made_here else await self._send(policy, host, request)
        response = restore_response(result.value, request)
        response.headers[CACHE_STATUS_HEADER] = result.cache_status()
        return response

    async def aclose(self) -> None:
        await self._transport.aclose()


def resilient_client(
    base_url: str | httpx.URL = "",
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    hosts: Mapping[str, HostPolicy | PolicyOptions] | None = None,
    raise_for_5xx: bool = True,
    max_hosts: int | None = DEFAULT_MAX_HOSTS,
    events: EventBus | None = None,
    clock: Clock = SYSTEM_CLOCK,
    client_options: Mapping[str, Any] | None = None,
    policy: str | None = None,
    **options: Unpack[PolicyOptions],
) -> httpx.AsyncClient:
    """A resilient ``httpx.AsyncClient`` in one line.

    ``client = resilient_client("https://inventory.internal", attempts=3, timeout=2.0)``;
    options are :class:`PolicyOptions`, applied per host; ``client_options`` go to
    ``httpx.AsyncClient`` (headers, auth, ...). Close it with ``await client.aclose()`` or
    ``async with``. ``max_hosts`` bounds the hosts it keeps state for (see
    :class:`ResilientTransport`): keep it for a client that calls URLs its users supply.

    ``policy="inventory"``: every request goes through the named policy's guards (declared in
    the settings, see ``policy()``), those in force when it starts, instead of ``options``.

    .. versionadded:: 0.1.0
    """
    resilient: ResilientTransport
    if policy is not None:
        if options or hosts:
            raise ConfigurationError(
                f"resilient_client(policy={policy!r}): the named policy holds the options; "
                f"pass no others ({', '.join(sorted([*options, *(['hosts'] if hosts else [])]))})"
            )
        named = default_policies.get(policy, used_at=caller_site(), used_by=" (resilient_client)")
        resilient = _NamedPolicyTransport(
            named, transport, raise_for_5xx=raise_for_5xx, events=events, clock=clock
        )
        # Stream-aware like the client below: ``client.stream()`` must not be read whole.
        return StreamAwareClient(
            base_url=base_url, transport=resilient, **dict(client_options or {})
        )
    resilient = ResilientTransport(
        transport,
        hosts=hosts,
        raise_for_5xx=raise_for_5xx,
        max_hosts=max_hosts,
        events=events,
        clock=clock,
        **options,
    )
    # It marks the requests made with ``client.stream(...)`` so that they pass unbuffered.
    return StreamAwareClient(base_url=base_url, transport=resilient, **dict(client_options or {}))


class _NamedPolicyTransport(ResilientTransport):
    """Every host under one named policy: the guards in force when each request starts."""

    def __init__(self, named: Policy, transport: httpx.AsyncBaseTransport | None, **kw: Any):
        super().__init__(transport, max_hosts=None, **kw)
        self._named = named
        #: Each host's policy, built from the guards in force when it was built.
        self._in_force: OrderedDict[str, tuple[PolicyGuards, HostPolicy]] = OrderedDict()
        # A provider's quota is its own host's, whatever the policy in force: a gate per host,
        # kept across policy changes, the least recently used forgotten past the bound.
        self._gates: OrderedDict[str, QuotaGate] = OrderedDict()

    def policy_for(self, host: str) -> HostPolicy:
        guards = self._named.guards()
        found = self._in_force.get(host)
        if found is not None and found[0] is guards:
            self._in_force.move_to_end(host)
            return found[1]
        built = HostPolicy(
            guards.retry,
            guards.breaker,
            guards.bulkhead,
            guards.timeout,
            cache=guards.cache,
            gate=self._gate_of(host),
        )
        self._in_force[host] = (guards, built)
        self._in_force.move_to_end(host)
        while len(self._in_force) > DEFAULT_MAX_HOSTS:
            self._in_force.popitem(last=False)
        return built

    def _gate_of(self, host: str) -> QuotaGate:
        gate = self._gates.get(host)
        if gate is None:
            gate = self._gates[host] = QuotaGate(host, clock=self._clock, events=self._events)
            while len(self._gates) > DEFAULT_MAX_HOSTS:
                self._gates.popitem(last=False)
        self._gates.move_to_end(host)
        return gate

    async def _handle(self, request: httpx.Request) -> httpx.Response:
        inject_outbound_headers(request.headers, header_name=self._header_name)
        host = request.url.netloc.decode("ascii")
        policy = self.policy_for(host)
        if policy.cache is not None and request.method == "GET" and not is_streamed(request):
            return await self._cached(policy, host, request)
        return await self._send(policy, host, request)


#: The most of an error answer's body read for a streamed request (the caller gets the error).
_ERROR_BODY_LIMIT = 64 * 1024


async def _read_error_body(response: httpx.Response, limit: float | None) -> None:
    """Read a streamed request's error answer, bounded in time (the attempt's limit) and in
    size, and hand it back as an in-memory body: a body that trickles or never ends cannot
    hold the call past its deadline."""
    stream = cast(httpx.AsyncByteStream, response.stream)
    chunks: list[bytes] = []
    size = 0

    async def read() -> None:
        nonlocal size
        async for chunk in stream:
            chunks.append(chunk)
            size += len(chunk)
            if size >= _ERROR_BODY_LIMIT:
                break

    try:
        if limit is None:
            await read()
        else:
            async with asyncio.timeout(max(limit, 0.0)):
                await read()
    except (TimeoutError, httpx.HTTPError):
        pass  # the status says enough; what was read is kept
    finally:
        await stream.aclose()
    response.stream = httpx.ByteStream(b"".join(chunks)[:_ERROR_BODY_LIMIT])


async def _admit(
    policy: HostPolicy, gate: QuotaGate | None, limiter: OutboundLimiter | None
) -> None:
    """Hold an attempt back until the gate is open and it fits under the outbound limit,
    waiting at most ``rate_limit_wait`` and never past the request's deadline in all.

    Raises:
        QuotaExhaustedError: it could not go within that time; nothing was sent.
    """
    budget = policy.rate_limit_wait
    left = remaining()
    if left is not None:
        budget = max(0.0, min(budget, left))
    slept = 0.0
    if gate is not None:
        slept = await gate.pass_within(budget)
    if limiter is not None:
        waited = await limiter.acquire_within(budget - slept)
        if waited and gate is not None:
            # The gate may have closed while this call waited for room: look again.
            await gate.pass_within(budget - slept - waited)


def _observe(
    request: httpx.Request,
    started: float,
    exc: BaseException | None,
    response: httpx.Response | None,
) -> None:
    """Time the call by upstream and outcome, and tell the observers of a failure.

    ``rejected``: refused here without reaching the upstream (an open breaker, a full
    bulkhead, a throttle); ``failure``: a 5xx answer or an error on the way.
    """
    upstream = request.url.netloc.decode("ascii", "replace")
    if exc is None and response is not None and response.status_code < 500:
        OUTBOUND_DURATIONS.observe((upstream, "success"), perf_counter() - started)
        return
    outcome = "rejected" if exc is not None and refused_here(exc) else "failure"
    OUTBOUND_DURATIONS.observe((upstream, outcome), perf_counter() - started)
    if not OUTBOUND_OBSERVERS:
        return
    if isinstance(exc, AppError):
        code, status = exc.code, exc.status_code
    elif response is not None:
        code, status = "upstream_status", response.status_code
    else:
        code, status = "upstream_error", 502
    for observer in OUTBOUND_OBSERVERS:
        try:
            observer(upstream, outcome, code, status)
        except Exception:  # an observer must never change the call's outcome
            logger.exception("outbound observer %r failed", observer)
