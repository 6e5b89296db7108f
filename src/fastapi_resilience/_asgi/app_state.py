"""Where an app keeps what ``install()`` set up, and how code inside a request finds it."""

from __future__ import annotations

from typing import Any

__all__ = ["APP_STATE_NAME", "OUTER_STATE_NAME", "resilience_of"]

#: ``app.state.resilience`` holds the ``Resilience`` object after ``install``.
APP_STATE_NAME = "resilience"
#: On a mounted sub-app without its own ``install()``: the ``Resilience`` of the app around it.
OUTER_STATE_NAME = "fastapi_resilience_outer"


def resilience_of(app: Any) -> Any:
    """The ``Resilience`` that serves ``app``'s requests: its own, else that of the app it is
    mounted in (``None`` when neither called ``install()``)."""
    state = getattr(app, "state", None)
    own = getattr(state, APP_STATE_NAME, None)
    return own if own is not None else getattr(state, OUTER_STATE_NAME, None)
