"""GET /dashboard: Basic auth with ADMIN_TOKEN, absent without it, and the live page in real Chromium."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import httpx
import pytest
from playwright.sync_api import HttpCredentials, Page
from websockets.sync.client import connect

from scripts.redis_server import PrivateRedis
from tests.browser import TIMEOUT_MS, chromium, save_screenshot, screenshot_dir
from tests.support.servers import ADMIN_TOKEN, Service

PATHS = ("/dashboard", "/dashboard/dashboard.js", "/dashboard/cluster")


@pytest.fixture(scope="module")
def service(redis_server: PrivateRedis) -> Iterator[Service]:
    with Service(redis_server.url, workers=2) as svc:
        yield svc


def _get(service: Service, path: str, auth: httpx.Auth | None = None, **headers: str) -> httpx.Response:
    return httpx.get(service.base + path, auth=auth, headers=headers, timeout=10)


def test_dashboard_needs_the_admin_token_as_basic_password(service: Service) -> None:
    for path in PATHS:
        for auth, headers in (
            (None, {}),
            (httpx.BasicAuth("operator", "wrong"), {}),
            (httpx.BasicAuth(ADMIN_TOKEN, ""), {}),
            (None, {"Authorization": f"Bearer {ADMIN_TOKEN}"}),  # the health paths' scheme is not this one's
            (None, {"Authorization": "Basic %%%"}),
        ):
            response = _get(service, path, auth, **headers)
            assert response.status_code == 401, (path, auth, headers, response.text)
            assert response.headers["www-authenticate"].startswith("Basic realm="), response.headers
            assert "ADMIN_TOKEN" in response.text
    good = httpx.BasicAuth("any-user-name", ADMIN_TOKEN)
    page = _get(service, "/dashboard", good)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html"), page
    assert "dashboard/dashboard.js" in page.text
    script = _get(service, "/dashboard/dashboard.js", good)
    assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript"), script
    cluster = _get(service, "/dashboard/cluster", good)
    assert cluster.status_code == 200 and cluster.headers["content-type"] == "application/json", cluster
    doc = cluster.json()
    assert doc["totals"]["workers"] == 2
    assert all("delivered" in w["counters"] and "recovered" in w["history"] for w in doc["workers"]), doc
    assert _get(service, "/dashboard/nothing-here", good).status_code == 404


def test_dashboard_is_absent_without_admin_token(redis_server: PrivateRedis) -> None:
    with Service(redis_server.url, workers=1, admin_token="") as svc:
        for path in PATHS:
            for auth in (None, httpx.BasicAuth("operator", ADMIN_TOKEN), httpx.BasicAuth("operator", "")):
                response = _get(svc, path, auth)
                assert response.status_code == 404, (path, auth, response.text)
                assert "www-authenticate" not in response.headers


class _Publisher(threading.Thread):
    """Publishes on one channel every 50 ms until stopped, so the page has deliveries to show."""

    def __init__(self, service: Service, channel: str) -> None:
        super().__init__(daemon=True)
        self.service, self.channel = service, channel
        self.stopped = threading.Event()
        self.sent = 0

    def run(self) -> None:
        while not self.stopped.wait(0.05):
            assert self.service.publish(self.channel, {"n": self.sent}).status_code == 202
            self.sent += 1

    def stop(self) -> None:
        self.stopped.set()
        self.join(10)


def _shows(page: Page, element: str, value: str) -> None:
    """Wait until the page's element ``element`` holds ``value`` (its data-value: the figure, unformatted)."""
    script = "([id, value]) => document.getElementById(id)?.dataset.value === value"
    page.wait_for_function(script, arg=[element, value], timeout=TIMEOUT_MS)


def _open(stack: contextlib.ExitStack, service: Service) -> tuple[Page, list[str]]:
    """The dashboard in a Chromium of its own, signed in; the list collects the page's errors (CSP included)."""
    browser = stack.enter_context(chromium())
    credentials: HttpCredentials = {"username": "operator", "password": ADMIN_TOKEN}
    context = browser.new_context(http_credentials=credentials, viewport={"width": 1280, "height": 800})
    stack.callback(context.close)
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.goto(service.base + "/dashboard")
    return page, errors


def test_page_follows_the_connection_total(
    service: Service, tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    publisher = _Publisher(service, "dash")
    with contextlib.ExitStack() as stack:
        stack.callback(publisher.stop)
        page, errors = _open(stack, service)
        _shows(page, "t-workers", "2")
        _shows(page, "t-connections", "0")
        url = f"{service.ws_base}/ws?channels=dash"
        # Nobody reads their publications: an unbounded receive queue keeps them answering pings and closes.
        clients = [stack.enter_context(connect(url, open_timeout=10, max_queue=None)) for _ in range(6)]
        _shows(page, "t-connections", "6")
        assert page.locator("#workers tbody tr").count() == 2
        per_worker = page.eval_on_selector_all(
            "#workers tbody td[data-value]", "cells => cells.map(c => Number(c.dataset.value))"
        )
        assert sum(per_worker) == 6, per_worker
        publisher.start()
        page.wait_for_function("() => Number(document.getElementById('t-deliveries').dataset.value) > 0")
        page.wait_for_function("() => Number(document.getElementById('t-publications').dataset.value) > 0")
        for ws in clients[2:]:
            ws.close()
        _shows(page, "t-connections", "2")
        assert page.locator("#status").inner_text() == "ok"
        assert page.locator("#chart-connections path").count() >= 3  # the total and one line per worker
        save_screenshot(page, screenshot_dir(tmp_path_factory), "dashboard", capsys)
        assert not errors, errors


def test_page_shows_a_cluster_whose_redis_is_gone(
    own_redis: PrivateRedis, tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    with contextlib.ExitStack() as stack:
        svc = stack.enter_context(Service(own_redis.url, workers=1))
        page, errors = _open(stack, svc)
        _shows(page, "t-workers", "1")
        own_redis.stop()
        page.wait_for_function("() => document.getElementById('status').textContent === 'failing'")
        assert "Redis unreachable" in page.locator("#reasons").inner_text()
        assert page.locator("#t-workers").get_attribute("data-value") == ""
        save_screenshot(page, screenshot_dir(tmp_path_factory), "dashboard-redis-gone", capsys)
        own_redis.start()
        _shows(page, "t-workers", "1")  # the worker's next heartbeat, in the Redis that came back
        assert page.locator("#status").inner_text() == "ok"
        assert not errors, errors
