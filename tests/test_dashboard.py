"""The operator dashboard in a real browser, against a real server.

The page is driven in headless Chromium and talks to an app under ``install()`` served by
uvicorn on the loopback: the library's own page and admin API, nothing stood in.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import httpx
import pytest
from fastapi import Depends, FastAPI
from loopback import UvicornProcess
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.types import ASGIApp

from fastapi_resilience import (
    Bulkhead,
    CircuitBreaker,
    ResilienceSettings,
    install,
    requires_feature,
)

if TYPE_CHECKING:
    from playwright.sync_api import Browser, ConsoleMessage, Page
    from playwright.sync_api import Request as PageRequest

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOT = ROOT / "docs" / "images" / "dashboard.png"
ADMIN_PATH = "/resilience"
#: Names that would run code if the page ever rendered them as markup.
SCRIPT_NAME = "<script>window.__xss = 1</script>"
IMG_NAME = '<img src=x onerror="window.__xss = 2">'
BREAKERS = ("inventory", "payments", SCRIPT_NAME, IMG_NAME)
#: Each feature and the breakers it needs.
FEATURES = {"inventory": ("inventory",), "recommendations": ()}
WAIT_MS = 5000
PREMIUM_KEY = "dashboard-premium-key"


# ---- the app: the library's own admin API and page ----


def make_app(token: str, admin_path: str = ADMIN_PATH) -> FastAPI:
    """An app under ``install()`` with the admin token, and the breakers, features and
    bulkheads the tests name; ``/work`` and ``/inventory`` give the panels traffic."""
    app = FastAPI()
    settings = ResilienceSettings(
        admin_token=token,
        admin_path=admin_path,
        rate_limit_tiers={"anonymous": "1000/minute", "premium": "5000/minute"},
        rate_limit_api_keys={PREMIUM_KEY: "premium"},
    )
    resilience = install(app, settings)
    for name in BREAKERS:
        CircuitBreaker(name, failure_threshold=3, recovery_timeout=600)
    for name, needs in FEATURES.items():
        resilience.degraded.feature(name, depends_on=list(needs))
    for name in ("db", SCRIPT_NAME):
        Bulkhead(name, max_concurrent=4)

    @app.get("/work")
    async def work() -> dict[str, bool]:
        return {"done": True}

    @app.get("/inventory/{sku}", dependencies=[Depends(requires_feature("inventory"))])
    async def stock(sku: str) -> dict[str, str]:
        return {"sku": sku}

    return app


# ---- serving it ----


def app_from_environment() -> ASGIApp:
    """What uvicorn serves (``--factory``): ``make_app``, under a path prefix when asked."""
    app = make_app(
        os.environ["DASHBOARD_TOKEN"], os.environ.get("DASHBOARD_ADMIN_PATH", ADMIN_PATH)
    )
    prefix = os.environ.get("DASHBOARD_PREFIX", "")
    # A proxy's prefix, as the browser sees it: the page must find its API under it.
    return Starlette(routes=[Mount(prefix, app=app)]) if prefix else app


@dataclass
class Served:
    server: UvicornProcess
    token: str
    page_path: str

    @property
    def origin(self) -> str:
        return self.server.url

    @property
    def page_url(self) -> str:
        return self.server.url + self.page_path

    @property
    def api_url(self) -> str:
        return self.page_url + "api"


def _serve(prefix: str = "", admin_path: str = ADMIN_PATH) -> Served:
    token = secrets.token_urlsafe(24)
    env = {"DASHBOARD_TOKEN": token, "DASHBOARD_ADMIN_PATH": admin_path, "DASHBOARD_PREFIX": prefix}
    server = UvicornProcess(
        "tests.test_dashboard:app_from_environment", env=env, cwd=ROOT, args=["--factory"]
    )
    return Served(server, token, f"{prefix}{admin_path}/")


def _traffic(served: Served) -> None:
    """Requests of two tiers, and two problem answers with their correlation IDs."""
    with httpx.Client(base_url=served.origin, timeout=10) as client:
        for _ in range(5):
            client.get("/work").raise_for_status()
            client.get("/work", headers={"X-API-Key": PREMIUM_KEY}).raise_for_status()
        for _ in range(2):
            assert client.get("/nowhere").status_code == 404


@pytest.fixture(name="served", scope="module")
def _served() -> Iterator[Served]:
    served = _serve()
    try:
        _traffic(served)
        yield served
    finally:
        served.server.stop()


@pytest.fixture(autouse=True)
def _fresh_state(request: pytest.FixtureRequest) -> None:
    """Every breaker closed and every feature on, through the API itself (any app)."""
    if "served" not in request.fixturenames:
        return
    served: Served = request.getfixturevalue("served")
    auth = {"Authorization": f"Bearer {served.token}"}
    with httpx.Client(base_url=served.api_url, headers=auth, timeout=10) as client:
        for name in BREAKERS:
            client.post(f"/breakers/{_quote(name)}/close").raise_for_status()
        for name in FEATURES:
            client.post(f"/features/{_quote(name)}/on").raise_for_status()


def _quote(name: str) -> str:
    return quote(name, safe="")


# ---- the page ----


@dataclass
class Watched:
    """A page with everything it asked for and every complaint it made."""

    page: Page
    requests: list[PageRequest] = field(default_factory=list)
    policy_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)

    def on_request(self, request: PageRequest) -> None:
        self.requests.append(request)

    def on_console(self, message: ConsoleMessage) -> None:
        text = message.text
        if "Content Security Policy" in text or "Trusted" in text:
            self.policy_errors.append(text)


def expect(target: Any) -> Any:
    """Playwright's ``expect``, imported once the browser fixture has found Playwright."""
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(target)


@pytest.fixture(name="watched")
def _watched(browser: Browser, served: Served) -> Iterator[Watched]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    watched = Watched(page)
    page.on("request", watched.on_request)
    page.on("console", watched.on_console)
    page.on("pageerror", lambda error: watched.page_errors.append(str(error)))
    try:
        yield watched
        # Whatever the test did, the page broke none of its own rules.
        assert watched.policy_errors == []
        assert watched.page_errors == []
        assert page.evaluate("window.__xss") is None
    finally:
        context.close()


def open_page(watched: Watched, served: Served) -> Page:
    page = watched.page
    page.goto(served.page_url)
    return page


def sign_in(page: Page, token: str) -> None:
    page.fill("#token", token)
    page.click("#sign-in")


def breaker_row(page: Page, name: str) -> Any:
    return page.locator("tr[data-breaker]").filter(has=page.get_by_text(name, exact=True))


def feature_row(page: Page, name: str) -> Any:
    return page.locator(f'tr[data-feature="{name}"]')


def test_page_is_served_with_a_strict_policy(served: Served) -> None:
    answer = httpx.get(served.page_url)
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "text/html; charset=utf-8"
    assert answer.headers["cache-control"] == "no-store"
    assert answer.headers["x-content-type-options"] == "nosniff"
    assert answer.headers["referrer-policy"] == "no-referrer"
    policy = answer.headers["content-security-policy"]
    assert "'unsafe-inline'" not in policy
    assert "default-src 'none'" in policy
    assert "connect-src 'self'" in policy


def test_policy_allows_exactly_the_pages_own_script_and_style(served: Served) -> None:
    """The policy names by hash the one inline script and the one inline style the page
    holds: nothing else could run, even injected."""
    answer = httpx.get(served.page_url)
    directives = dict(
        d.split(" ", 1) for d in answer.headers["content-security-policy"].split("; ")
    )
    html = answer.text
    for tag, directive in (("script", "script-src"), ("style", "style-src")):
        bodies = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.S)
        assert len(bodies) == 1, tag
        digest = base64.b64encode(hashlib.sha256(bodies[0].encode()).digest()).decode()
        assert directives[directive] == f"'sha256-{digest}'"


def test_page_fetches_nothing_from_elsewhere(served: Served) -> None:
    """No CDN, font, image or script URL: the page is one file."""
    html = httpx.get(served.page_url).text
    for marker in ("http://", "https://", "src=", "@import", "url(", "innerHTML", "localStorage"):
        if marker == "http://":
            # The SVG namespace is a name, not something fetched.
            html = html.replace("http://www.w3.org/2000/svg", "")
        assert marker not in html, marker


@pytest.mark.chromium
def test_page_asks_for_the_token_first(watched: Watched, served: Served) -> None:
    page = open_page(watched, served)
    expect(page.locator("#token")).to_be_visible()
    expect(page.locator("#token")).to_have_attribute("type", "password")
    expect(page.locator("#sign-in")).to_be_visible()
    expect(page.locator("#dashboard")).to_be_hidden()
    page.wait_for_timeout(300)
    # Without a token the page calls nothing.
    assert [r.url for r in watched.requests] == [served.page_url]


@pytest.mark.chromium
def test_wrong_token_shows_the_form_again(watched: Watched, served: Served) -> None:
    page = open_page(watched, served)
    sign_in(page, "not-the-token")
    expect(page.locator("#sign-in-message")).to_contain_text("not accepted")
    expect(page.locator("#token")).to_be_visible()
    assert page.evaluate("sessionStorage.length") == 0


@pytest.mark.chromium
def test_right_token_renders_every_panel(watched: Watched, served: Served) -> None:
    page = open_page(watched, served)
    sign_in(page, served.token)
    expect(page.locator("tr[data-breaker]")).to_have_count(len(BREAKERS))
    expect(page.locator('tr[data-breaker="inventory"] .state')).to_have_text("closed")
    expect(page.locator("body")).to_have_attribute("data-health", "ok")
    expect(page.locator('tr[data-feature="recommendations"] .available')).to_have_text("yes")
    expect(page.locator("#tiers tr")).to_have_count(2)  # anonymous and premium
    expect(page.locator("#bulkheads tr")).to_have_count(2)
    expect(page.locator("#req-p50")).to_contain_text("ms")
    expect(page.locator("#req-p99")).to_contain_text("ms")
    expect(page.locator("#checks tr")).not_to_have_count(0)
    expect(page.locator("#recent details")).not_to_have_count(0)
    expect(page.locator("#updated")).to_contain_text("last updated")
    # The token is kept for the tab only.
    assert page.evaluate("localStorage.length") == 0
    assert page.evaluate("Object.values(sessionStorage)") == [served.token]


@pytest.mark.chromium
def test_opening_a_breaker_shows_it_open_and_degraded(watched: Watched, served: Served) -> None:
    page = open_page(watched, served)
    sign_in(page, served.token)
    row = page.locator('tr[data-breaker="inventory"]')
    expect(row.locator(".state")).to_have_text("closed")
    row.locator('button[data-action="open"]').click()
    expect(row.locator(".state")).to_have_text("open", timeout=WAIT_MS)
    expect(page.locator("body")).to_have_attribute("data-health", "degraded", timeout=WAIT_MS)
    expect(page.locator("#degraded-list")).to_have_text("inventory")
    expect(feature_row(page, "inventory").locator(".available")).to_have_text("no")
    # What the page shows is what the app says: readiness is degraded, naming the breaker.
    ready = httpx.get(served.origin + "/health/ready", timeout=10).json()
    assert ready["status"] == "degraded"
    assert "inventory" in ready["checks"]["breakers"]["detail"]
    refused = httpx.get(served.origin + "/inventory/tea", timeout=10)
    assert refused.json()["code"] == "feature_unavailable"
    assert refused.headers["x-degraded"] == "inventory"
    if os.environ.get("DASHBOARD_SCREENSHOT") == "1":
        for _ in range(12):  # a degraded moment has errors to show
            httpx.get(served.origin + "/inventory/tea", timeout=10)
        page.wait_for_timeout(2500)  # the next poll shows them
        page.locator("#recent details").first.click()
        page.evaluate("window.scrollTo(0, 0)")
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOT))
    row.locator('button[data-action="close"]').click()
    expect(row.locator(".state")).to_have_text("closed", timeout=WAIT_MS)
    expect(page.locator("body")).to_have_attribute("data-health", "ok", timeout=WAIT_MS)
    assert httpx.get(served.origin + "/health/ready", timeout=10).json()["status"] == "ok"


@pytest.mark.chromium
def test_switching_a_feature_off_and_on(watched: Watched, served: Served) -> None:
    page = open_page(watched, served)
    sign_in(page, served.token)
    row = feature_row(page, "recommendations")
    expect(row.locator(".available")).to_have_text("yes")
    row.locator('[data-role="seconds"]').fill("60")
    row.locator('button[data-action="off"]').click()
    expect(row.locator(".available")).to_have_text("no", timeout=WAIT_MS)
    expect(page.locator("body")).to_have_attribute("data-health", "degraded", timeout=WAIT_MS)
    row.locator('button[data-action="on"]').click()
    expect(row.locator(".available")).to_have_text("yes", timeout=WAIT_MS)
    row.locator('[data-role="seconds"]').fill("")
    row.locator('button[data-action="off"]').click()
    expect(row.locator(".available")).to_have_text("no", timeout=WAIT_MS)
    offs = [r for r in watched.requests if r.url.endswith("/features/recommendations/off")]
    assert [r.post_data for r in offs] == ['{"seconds":60}', None]


@pytest.mark.chromium
def test_names_render_as_text(watched: Watched, served: Served) -> None:
    page = open_page(watched, served)
    sign_in(page, served.token)
    for name in (SCRIPT_NAME, IMG_NAME):
        cell = breaker_row(page, name).locator("td.name")
        expect(cell).to_have_text(name)
    assert page.locator("main script, main img").count() == 0
    # A name with markup and a slash still reaches its own breaker.
    row = breaker_row(page, SCRIPT_NAME)
    row.locator('button[data-action="open"]').click()
    expect(row.locator(".state")).to_have_text("open", timeout=WAIT_MS)


@pytest.mark.chromium
def test_requests_stay_on_the_server_and_keep_the_token_out_of_urls(
    watched: Watched, served: Served
) -> None:
    page = open_page(watched, served)
    sign_in(page, served.token)
    expect(page.locator("tr[data-breaker]")).to_have_count(len(BREAKERS))
    page.locator('tr[data-breaker="payments"] button[data-action="reset"]').click()
    page.wait_for_timeout(2500)  # at least one scheduled poll after the first
    polls = [r for r in watched.requests if r.url == served.api_url + "/overview"]
    assert len(polls) >= 2
    for request in watched.requests:
        assert request.url.startswith(served.origin + "/"), request.url
        assert served.token not in request.url
    for request in watched.requests:
        if request.url.startswith(served.api_url):
            assert request.all_headers()["authorization"] == f"Bearer {served.token}"


@pytest.mark.chromium
def test_a_refused_token_mid_session_asks_again(watched: Watched, served: Served) -> None:
    page = open_page(watched, served)
    sign_in(page, served.token)
    expect(page.locator("tr[data-breaker]")).to_have_count(len(BREAKERS))
    # The token was rotated on the server: the next poll is refused.
    page.evaluate("Object.keys(sessionStorage).forEach(k => sessionStorage.setItem(k, 'old'))")
    expect(page.locator("#sign-in-message")).to_contain_text("not accepted", timeout=WAIT_MS)
    assert page.evaluate("sessionStorage.length") == 0
    sign_in(page, served.token)
    expect(page.locator("tr[data-breaker]")).to_have_count(len(BREAKERS))


@pytest.mark.chromium
def test_sign_out_forgets_the_token(watched: Watched, served: Served) -> None:
    page = open_page(watched, served)
    sign_in(page, served.token)
    expect(page.locator("#sign-out")).to_be_visible()
    page.click("#sign-out")
    expect(page.locator("#token")).to_be_visible()
    assert page.evaluate("sessionStorage.length") == 0
    page.reload()
    expect(page.locator("#token")).to_be_visible()


@pytest.mark.chromium
def test_lost_connection_is_shown_and_polling_goes_on(watched: Watched, served: Served) -> None:
    page = open_page(watched, served)
    sign_in(page, served.token)
    expect(page.locator("body")).to_have_attribute("data-connection", "live")
    page.route("**/api/overview", lambda route: route.abort())
    expect(page.locator("#connection")).to_contain_text("connection lost", timeout=WAIT_MS)
    expect(page.locator("body")).to_have_attribute("data-connection", "lost")
    page.unroute("**/api/overview")
    expect(page.locator("body")).to_have_attribute("data-connection", "live", timeout=WAIT_MS)


@pytest.mark.chromium
def test_a_failed_action_shows_the_problem_detail(watched: Watched, served: Served) -> None:
    page = open_page(watched, served)
    sign_in(page, served.token)
    problem = {"title": "Not found", "detail": "No breaker is named 'payments'.", "status": 404}
    page.route(
        "**/breakers/payments/open",
        lambda route: route.fulfill(
            status=404,
            content_type="application/problem+json",
            body=json.dumps({**problem, "code": "not_found"}),
        ),
    )
    page.locator('tr[data-breaker="payments"] button[data-action="open"]').click()
    expect(page.locator("#alert")).to_be_visible()
    expect(page.locator("#alert-text")).to_have_text(problem["detail"])


@pytest.mark.chromium
def test_page_finds_its_api_under_a_prefix_and_another_admin_path(browser: Browser) -> None:
    served = _serve(prefix="/ops", admin_path="/admin-x")
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(served.page_url)
        sign_in(page, served.token)
        expect(page.locator("tr[data-breaker]")).to_have_count(len(BREAKERS))
        expect(page.locator("body")).to_have_attribute("data-health", "ok")
    finally:
        context.close()
        served.server.stop()
