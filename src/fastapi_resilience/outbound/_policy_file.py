"""Reload the named policies when ``policies_file`` changes (the ``reload`` extra).

One asyncio task watches the file's directory with ``watchfiles`` (a directory, not the file:
editors and Kubernetes replace a file by renaming another over it, which a watch on the file
itself would miss). When the file's text changes, it is read and checked as at start-up and
merged under the environment and code read then; each policy that comes out different is
changed through :meth:`PolicyTable.change`, so the swap is atomic and the breaker keeps its
state. A bad file changes nothing: the policies in force stay.

Start-up decides which policies exist: one added to the file later, or one no longer declared
anywhere, is reported and not applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fastapi_resilience._policy_settings import PolicySettings
from fastapi_resilience.events import FALLBACK_EVENTS, EventBus
from fastapi_resilience.exceptions import InvalidInputError, NotFoundError
from fastapi_resilience.outbound._policies import POLICY_CHANGE_REJECTED, PolicyTable

__all__ = [
    "RELOADED_BY",
    "TASK_NAME",
    "PolicyFileWatcher",
    "reload_available",
    "warn_reload_missing",
]

logger = logging.getLogger("fastapi_resilience.policies")

#: The name of the watcher's task, for ``asyncio.all_tasks()`` and debuggers.
TASK_NAME = "fastapi-resilience-policies-file"
#: Who a reload's changes are made by (the events' ``client``).
RELOADED_BY = "policies_file"
#: Milliseconds without a change after which the file's text is compared anyway.
_LOOK_ANYWAY_MS = 2_000
#: How long :meth:`PolicyFileWatcher.stop` waits for the watch to end before cancelling it.
_STOP_TIMEOUT = 2.0


def reload_available() -> bool:
    """Whether ``watchfiles`` (the ``reload`` extra) is installed (found, not imported)."""
    try:
        return importlib.util.find_spec("watchfiles") is not None
    except (ImportError, ValueError):  # blocked with ``sys.modules[...] = None``
        return False


def warn_reload_missing(path: Path) -> None:
    """Say why edits to ``path`` will not be applied: reloading is on, its extra is not."""
    logger.warning(
        "policies_reload is on but watchfiles is not installed, so changes to %s apply only "
        "at the next start: pip install 'fastapi-resilience[reload]' (or set "
        "policies_reload=False, RESILIENCE_POLICIES_RELOAD=false, to say you do not want it)",
        path,
    )


class PolicyFileWatcher:
    """Watches ``path`` and applies its changes to ``table``'s policies.

    Args:
        path: the policies file.
        reread: reads the file and returns every policy's settings with the layers above the
            file laid over it, as at start-up; raises ``ValueError`` naming what is wrong.
        loaded: the policies' settings at start-up (what the file said then).
        table: the policies changed (default: the process's).
        events: where rejections are published.
    """

    def __init__(
        self,
        path: Path,
        reread: Callable[[], dict[str, PolicySettings]],
        *,
        loaded: Mapping[str, PolicySettings],
        table: PolicyTable,
        events: EventBus | None = None,
    ) -> None:
        self.path = path
        self._reread = reread
        #: What the file resolved to last time it was good: the base of the next differences.
        self._loaded = dict(loaded)
        #: The policies that exist: start-up's, whatever the file says later.
        self._names = frozenset(loaded)
        self._table = table
        self._events = events if events is not None else FALLBACK_EVENTS
        self._text = _read_text(path)
        self._stop: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        """Whether the background task is running."""
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Start watching in the running event loop; harmless when running.

        Raises:
            RuntimeError: no event loop is running.
        """
        if self.running:
            return
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._task = loop.create_task(self._watch(self._stop), name=TASK_NAME)

    async def stop(self) -> None:
        """Stop watching and wait for the task to end."""
        task, self._task = self._task, None
        if task is None:
            return
        if self._stop is not None:
            self._stop.set()  # the watch thread sees it within a step, 50 ms
        done, _ = await asyncio.wait([task], timeout=_STOP_TIMEOUT)
        if not done:
            task.cancel()
            await asyncio.wait([task])
        if not task.cancelled() and task.exception() is not None:
            logger.error("policies file watcher stopped on an error", exc_info=task.exception())

    async def _watch(self, stop: asyncio.Event) -> None:
        from watchfiles import awatch

        # Every change in the directory is a reason to look; the file's text says if it moved.
        # A quiet period is one too: an edit made before the watch began, as the app started,
        # or one a network filesystem did not report is applied all the same.
        async for _ in awatch(
            self.path.resolve().parent,
            watch_filter=None,
            stop_event=stop,
            recursive=False,
            rust_timeout=_LOOK_ANYWAY_MS,
            yield_on_timeout=True,
        ):
            try:
                await self.check()
            except Exception:  # one bad reload must not end the watch
                logger.exception("reloading %s failed", self.path)

    async def check(self) -> bool:
        """Reload the file if its text changed since it was last read; ``True`` if it was."""
        text = await asyncio.to_thread(_read_text, self.path)
        if text == self._text:
            return False
        self._text = text
        await self.reload()
        return True

    async def reload(self) -> None:
        """Read the file and apply every difference it makes to a policy."""
        try:
            policies = await asyncio.to_thread(self._reread)
        except ValueError as exc:
            self._reject(str(self.path), f"the policies in force are kept: {exc}")
            return
        for name in sorted(set(policies) - self._names - set(self._loaded)):
            self._reject(name, f"added to {self.path} after start-up: restart to declare it")
        for name in sorted((self._names & set(self._loaded)) - set(policies)):
            self._reject(
                name, f"no longer declared in {self.path}: kept in force until the next start"
            )
        for name in sorted(self._names & set(policies)):
            self._apply(name, policies[name])
        self._loaded = policies

    def _apply(self, name: str, settings: PolicySettings) -> None:
        before = self._loaded.get(name)
        if before is None:  # declared again after it was removed: compare with what is in force
            before = self._table.declared().get(name)
        changes = _changes(before, settings)
        if not changes:
            return
        # A refusal is published as policy.change_rejected by the table; the policy stays.
        with contextlib.suppress(InvalidInputError, NotFoundError):
            self._table.change(name, changes, by=RELOADED_BY)

    def _reject(self, name: str, reason: str) -> None:
        self._events.emit(
            POLICY_CHANGE_REJECTED, name, level=logging.WARNING, client=RELOADED_BY, reason=reason
        )


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        return None  # gone for now: reading it again says why, once it is reloaded


def _changes(before: PolicySettings | None, after: PolicySettings) -> dict[str, Any]:
    """What to lay over ``before`` to get ``after``: only the fields that differ, so a change
    made through the admin API to another field stays; everything when the criticality differs
    (a change naming one starts from its preset)."""
    new = after.model_dump()
    if before is None or before.criticality != after.criticality:
        return new
    return _diff(before.model_dump(), new)


def _diff(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    changed: dict[str, Any] = {}
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(old.get(key), dict):
            inner = _diff(old[key], value)
            if inner:
                changed[key] = inner
        elif old.get(key) != value:
            changed[key] = value
    return changed
