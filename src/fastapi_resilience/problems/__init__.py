"""RFC 9457 problem details: the exception handlers and the response they send."""

from __future__ import annotations

from fastapi_resilience.problems._handlers import install_exception_handlers
from fastapi_resilience.problems._render import ProblemResponse

__all__ = ["ProblemResponse", "install_exception_handlers"]
