"""A headless Chromium for the browser tests: Debian's own binary, driven by Playwright.

Playwright's bundled browsers are never downloaded (``playwright install`` needs the internet):
the machine's ``chromium`` is launched instead. Like the other real services, a missing
browser skips the test on a laptop and fails it under ``CI=true``.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import pytest
from loopback import IN_CI

if TYPE_CHECKING:
    from playwright.sync_api import Browser

#: The names Debian and Ubuntu give the binary.
CHROMIUM_NAMES = ("chromium", "chromium-browser")


def _unavailable(message: str) -> None:
    if IN_CI:
        pytest.fail(f"CI=true and {message}")
    pytest.skip(message)


def find_chromium() -> str:
    """The browser's path; skip (laptop) or fail (CI) when it is not installed."""
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path is not None:
            return path
    _unavailable("chromium is not installed (apt-get install chromium)")
    raise AssertionError("unreachable")  # pytest.skip and pytest.fail raise


@contextmanager
def launch_chromium() -> Iterator[Browser]:
    """A headless Chromium, closed on the way out."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not installed (pip install -e '.[dev]')")
        raise
    executable = find_chromium()
    with sync_playwright() as playwright:
        # --no-sandbox: the tests run as root, where Chromium's sandbox refuses to start.
        browser = playwright.chromium.launch(
            executable_path=executable, headless=True, args=["--no-sandbox"]
        )
        try:
            yield browser
        finally:
            browser.close()
