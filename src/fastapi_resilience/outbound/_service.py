"""``ExternalService``: one upstream declared as a class, its guards and health check included.

A subclass names the upstream's ``base_url``, the named ``policy`` that guards it and,
optionally, a ``health_path``; its methods call ``self.get(...)`` / ``self.call(...)``. It gets
``self.client`` (``resilient_client(base_url, policy=policy)``), answers mapped to the library's
errors (:meth:`ExternalService.error_for`), and :meth:`ExternalService.register`, which adds the
upstream's readiness check with a recovery action and closes the clients at the app's shutdown.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Protocol

import httpx

from fastapi_resilience.clock import SYSTEM_CLOCK, Clock
from fastapi_resilience.exceptions import ConfigurationError, NotFoundError, UpstreamStatusError
from fastapi_resilience.outbound._transport import resilient_client

if TYPE_CHECKING:
    from starlette.applications import Starlette

    from fastapi_resilience.health._checks import HealthChecks

__all__ = ["ExternalService"]

#: Seconds a replaced client stays open for the calls still using it.
RETIRE_AFTER = 5.0


class _HasHealth(Protocol):
    """What :meth:`ExternalService.register` needs of ``install()``'s ``Resilience``."""

    health: HealthChecks


class ExternalService:
    """One upstream: subclass it, declare the class attributes, write one method per call.

    ::

        class Inventory(ExternalService):
            base_url = "https://inventory.internal"   # or Inventory(os.environ["INVENTORY_URL"])
            policy = "inventory"                      # declared in the settings
            health_path = "/health"

            async def stock(self, sku: str) -> dict[str, Any]:
                return await self.get(f"/stock/{sku}")

    Override :meth:`parse` (how an answer is read) and :meth:`error_for` (which answers are
    errors) to change what every call does.
    """

    #: The upstream's URL; the constructor's ``base_url`` wins over it.
    base_url: str = ""
    #: The named policy (``ResilienceSettings.policies``) that guards every request.
    policy: str = ""
    #: How errors and the health check name the upstream (default: the policy's name).
    name: str = ""
    #: A path the health check GETs (any 2xx is up); ``None``: no health check.
    health_path: str | None = None
    #: Whether the upstream being down makes the app ``unhealthy`` (503) or ``degraded``.
    health_critical: bool = True
    #: Seconds the check may take (default: the app's ``health_check_timeout``).
    health_timeout: float | None = None

    def __init__(
        self,
        base_url: str | None = None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        client_options: Mapping[str, Any] | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        cls = type(self)
        self.base_url = base_url if base_url is not None else cls.base_url
        if not self.base_url:
            raise ConfigurationError(f"{cls.__name__}: give a base_url (class or constructor)")
        if not cls.policy:
            raise ConfigurationError(f"{cls.__name__}: declare the named policy it uses")
        self.name = cls.name or cls.policy
        self._transport = transport
        self._client_options = dict(client_options or {})
        self._clock = clock
        self._client: httpx.AsyncClient | None = None
        self._probe: httpx.AsyncClient | None = None
        self._retiring: set[asyncio.Task[None]] = set()

    @property
    def client(self) -> httpx.AsyncClient:
        """``resilient_client(base_url, policy=policy)``, made on first use or by
        :meth:`register`: a module that builds a service at import asks nothing of the
        settings until the service is used (then an undeclared policy is refused)."""
        if self._client is None:
            self._client = self._new_client()
        return self._client

    @property
    def _probe_client(self) -> httpx.AsyncClient:
        # The health check's own pool, through no guard: a probe must neither count towards
        # the breaker nor be refused by it while it is open.
        if self._probe is None:
            self._probe = self._new_probe()
        return self._probe

    # -- hooks ---------------------------------------------------------------------------

    def parse(self, response: httpx.Response) -> Any:
        """What a call returns for an answer that is not an error: JSON, text, or ``None``."""
        if not response.content:
            return None
        if "json" in response.headers.get("content-type", ""):
            return response.json()
        return response.text

    def error_for(self, response: httpx.Response) -> Exception | None:
        """The error an answer stands for, or ``None``: 404 is :class:`NotFoundError` (the
        upstream's text is not passed on), 5xx the upstream's error, any other passes."""
        if response.status_code == 404:
            return NotFoundError(
                f"{self.name} has no such resource.", extensions={"upstream": self.name}
            )
        if response.status_code >= 500:
            # Only seen when the policy gives up without raising (the transport raises first).
            return UpstreamStatusError(response, self.name, None)
        return None

    # -- calls ---------------------------------------------------------------------------

    async def send(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        """One request through the policy; an answer :meth:`error_for` names is raised."""
        response = await self.client.request(method, url, **kwargs)
        error = self.error_for(response)
        if error is not None:
            raise error
        return response

    async def call(self, method: str, url: str, **kwargs: Any) -> Any:
        """:meth:`send`, then :meth:`parse`."""
        return self.parse(await self.send(method, url, **kwargs))

    async def get(self, url: str, **kwargs: Any) -> Any:
        return await self.call("GET", url, **kwargs)

    # -- health and life cycle -------------------------------------------------------------

    async def healthy(self) -> bool:
        """The readiness check: ``GET health_path`` answers 2xx."""
        assert self.health_path is not None
        response = await self._probe_client.get(self.health_path)
        return response.is_success

    async def reconnect(self) -> None:
        """The check's recovery action: new connection pools (the old ones may hold
        connections to a server that went away); calls in flight finish on the old ones."""
        old = [c for c in (self._client, self._probe) if c is not None]
        self._client, self._probe = self._new_client(), self._new_probe()
        task = asyncio.get_running_loop().create_task(_close_later(old, RETIRE_AFTER))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    def register(
        self,
        resilience: _HasHealth,
        *,
        app: Starlette | None = None,
        recover: Sequence[Callable[[], Awaitable[None]]] = (),
    ) -> None:
        """Add the health check (with ``health_path``) to ``resilience.health``, recovered by
        :meth:`reconnect` and then ``recover``; with ``app``, close the clients after its
        shutdown (call it after ``install()``, so the health monitor stops first).

        It makes the client, so the app's start-up refuses the policy if it is not declared.
        """
        if self._client is None:
            self._client = self._new_client()
        if self.health_path is not None:
            resilience.health.add(
                self.name,
                self.healthy,
                critical=self.health_critical,
                timeout=self.health_timeout,
                recover=[self.reconnect, *recover],
            )
        if app is not None:
            self._close_at_shutdown(app)

    async def aclose(self) -> None:
        """Close the clients, those replaced by :meth:`reconnect` included."""
        for task in tuple(self._retiring):
            task.cancel()  # closes its clients now
        await asyncio.gather(*self._retiring, return_exceptions=True)
        for client in (self._client, self._probe):
            if client is not None:
                await client.aclose()

    async def __aenter__(self) -> ExternalService:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def _new_client(self) -> httpx.AsyncClient:
        return resilient_client(
            self.base_url,
            policy=self.policy,
            transport=self._transport,
            clock=self._clock,
            client_options=self._client_options,
        )

    def _new_probe(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.base_url, transport=self._transport, **self._client_options
        )

    def _close_at_shutdown(self, app: Starlette) -> None:
        original = app.router.lifespan_context

        @asynccontextmanager
        async def lifespan(app_: Any) -> AsyncIterator[Any]:
            try:
                async with original(app_) as state:
                    yield state
            finally:
                await self.aclose()

        app.router.lifespan_context = lifespan

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.base_url!r}, policy={self.policy!r})"


async def _close_later(clients: Sequence[httpx.AsyncClient], after: float) -> None:
    try:
        await asyncio.sleep(after)
    finally:  # cancelled by aclose(): close them now
        for client in clients:
            await client.aclose()
