"""RFC 9457 problem details: the exception handlers and the response they send."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi_resilience._exports import lazy_exports as _lazy_exports

if TYPE_CHECKING:
    from fastapi_resilience.problems._handlers import install_exception_handlers
    from fastapi_resilience.problems._render import ProblemResponse

__all__ = ["ProblemResponse", "install_exception_handlers"]

#: Each public name and the module it is imported from on first use.
_EXPORTS = {
    "ProblemResponse": "fastapi_resilience.problems._render",
    "install_exception_handlers": "fastapi_resilience.problems._handlers",
}
__getattr__, __dir__ = _lazy_exports(__name__, _EXPORTS)
