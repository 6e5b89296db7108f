"""How every piece of the library reads a request's path: one place, one rule.

A path in a setting or a declaration (exempt paths, a feature's ``paths``, a route limit's
template) is the app's own path: what its routes see, without the prefix a server or proxy adds
(``--root-path /api``). Two views of a scope exist:

- :func:`route_path`: the path the current router matches, without ``scope["root_path"]``. Inside
  a mounted sub-app ``root_path`` also holds the mount's prefix, so this is the sub-app's view.
- :func:`app_path`: the path the outermost app matches, without only the server's prefix
  (``app_root_path``, which Starlette keeps unchanged in every mounted sub-app's scope).

Before routing (in middleware) the two are the same.
"""

from __future__ import annotations

import re

from starlette.routing import compile_path
from starlette.types import Scope

__all__ = ["MountTemplates", "app_path", "mount_prefix", "route_path", "strip_prefix"]


def strip_prefix(path: str, prefix: str) -> str:
    """``path`` without ``prefix``, taken off only at a ``/`` boundary (as Starlette's routing
    does): ``/api/x`` without ``/api`` is ``/x``, ``/apix`` stays ``/apix``."""
    if not prefix or not path.startswith(prefix):
        return path
    if path == prefix:
        return ""
    return path[len(prefix) :] if path[len(prefix)] == "/" else path


def route_path(scope: Scope) -> str:
    """The path the current router sees: ``scope["path"]`` without ``root_path``."""
    path: str = scope["path"]
    root_path = scope.get("root_path")
    return strip_prefix(path, root_path) if root_path else path


def app_path(scope: Scope) -> str:
    """The path the outermost app sees: ``scope["path"]`` without the server's prefix.

    The same as :func:`route_path` before routing; inside a mounted sub-app it keeps the
    mount's prefix (``/v2/hello``, not ``/hello``).
    """
    server_root = scope.get("app_root_path", scope.get("root_path"))
    path: str = scope["path"]
    return strip_prefix(path, server_root) if server_root else path


def mount_prefix(scope: Scope) -> str:
    """The prefix of the mounts between the outermost app and the current router (``/v2``);
    ``""`` outside a mounted sub-app."""
    root_path: str = scope.get("root_path", "")
    server_root: str = scope.get("app_root_path", root_path)
    return root_path[len(server_root) :] if root_path.startswith(server_root) else ""


class MountTemplates:
    """The templates of an app's mounts, to name a mounted sub-app's routes by template.

    A sub-app mounted at ``/tenants/{tenant}`` sees ``root_path`` ``/tenants/acme``: keyed by
    that, each tenant would have a budget of its own. :meth:`template` turns the raw prefix
    back into ``/tenants/{tenant}``. ``install()`` adds the app's mounts at start-up.
    """

    __slots__ = ("_found", "_mounts")

    def __init__(self) -> None:
        self._mounts: list[tuple[re.Pattern[str], str]] = []
        self._found: dict[str, str] = {}

    def add(self, template: str) -> None:
        """Know the mount at ``template`` (``/tenants/{tenant}``, nested mounts joined)."""
        if template and all(template != known for _, known in self._mounts):
            regex, _, _ = compile_path(template)
            self._mounts.append((regex, template))
            self._found.clear()

    def template(self, prefix: str) -> str:
        """The template of the mount whose raw prefix is ``prefix``; ``prefix`` itself when no
        known mount matches it (a mount added after start-up)."""
        if not prefix or not self._mounts:
            return prefix
        found = self._found.get(prefix)
        if found is None:
            found = next((t for regex, t in self._mounts if regex.match(prefix)), prefix)
            if len(self._found) >= 1024:  # raw prefixes carry parameter values: stay bounded
                self._found.clear()
            self._found[prefix] = found
        return found
