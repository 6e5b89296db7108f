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

from starlette.types import Scope

__all__ = ["app_path", "mount_prefix", "route_path", "strip_prefix"]


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
