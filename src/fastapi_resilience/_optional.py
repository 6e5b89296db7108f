"""Exceptions of libraries the package uses only in some apps, looked up when one is caught.

Importing httpx (with its command-line extras) or redis costs every app tens of milliseconds,
even one that never makes an outbound call or uses Redis. Code that only needs to recognise
their exceptions asks here: an exception of a library that was never imported cannot exist.
"""

from __future__ import annotations

import sys


class _NeverRaised(Exception):
    """Stands for an exception class of a library that is not imported: nothing raises it."""


def exception_of(module: str, name: str) -> type[BaseException]:
    """``module.name`` if ``module`` is imported, else a class that nothing raises."""
    loaded = sys.modules.get(module)
    found = getattr(loaded, name, None) if loaded is not None else None
    return found if isinstance(found, type) else _NeverRaised
