"""The browser client (GET /client.js) in real Chromium: the README's example page, driven by Playwright.

The page is the README's, byte for byte but for the service's address, served by a tiny static
server on 127.0.0.1 of its own (another origin, as an app's page would be), so the module import
and the WebSocket both cross origins like they do in production.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import BrowserContext, Page

from scripts.redis_server import PrivateRedis
from tests.browser import TIMEOUT_MS, chromium, save_screenshot, screenshot_dir
from tests.support.publishers import SteadyPublisher
from tests.support.servers import ROOT, Service, reload_workers
from tests.support.waits import wait_until


def example_page(service: Service) -> str:
    readme = (ROOT / "README.md").read_text()
    found = re.search(r"<!-- example-page -->\n```html\n(.*?)```\n<!-- /example-page -->", readme, re.S)
    assert found, "README.md lost its example page (between the example-page markers)"
    return found.group(1).replace("127.0.0.1:8000", f"127.0.0.1:{service.port}")


@pytest.fixture(scope="module")
def browser() -> Iterator[BrowserContext]:
    with chromium() as launched:
        context = launched.new_context(viewport={"width": 800, "height": 600})
        try:
            yield context
        finally:
            context.close()


@pytest.fixture(scope="module")
def pages() -> Iterator[StaticPages]:
    static = StaticPages()
    try:
        yield static
    finally:
        static.close()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return screenshot_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def service(redis_server: PrivateRedis) -> Iterator[Service]:
    with Service(redis_server.url, workers=2) as svc:
        yield svc


class _Pages(http.server.ThreadingHTTPServer):
    """Serves the one page it was last given, at /example.html."""

    daemon_threads = True
    html = b""


class _PageHandler(http.server.BaseHTTPRequestHandler):
    server: _Pages

    def do_GET(self) -> None:
        found = self.path == "/example.html"
        self.send_response(200 if found else 404)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.end_headers()
        self.wfile.write(self.server.html if found else b"not found\n")

    def log_message(self, format: str, *args: Any) -> None:
        pass


class StaticPages:
    def __init__(self) -> None:
        self.server = _Pages(("127.0.0.1", 0), _PageHandler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def serve(self, html: str) -> str:
        self.server.html = html.encode()
        return f"http://127.0.0.1:{self.server.server_address[1]}/example.html"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


def open_example(browser: BrowserContext, pages: StaticPages, service: Service) -> Page:
    page = browser.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(pages.serve(example_page(service)))
    page.wait_for_function("window.client && window.client.state === 'connected'")
    assert not errors, errors
    return page


def flowing(page: Page, service: Service, channel: str = "news") -> None:
    """Publish markers until one shows on the page: the subscription is live."""

    def shown() -> bool:
        service.publish(channel, "marker")
        return bool(page.evaluate("document.body.innerText.includes('\"marker\"')"))

    wait_until(shown, 30, interval=0.2, what="a marker on the page")


def record(page: Page, channel: str) -> None:
    """Collect a channel's publications and the page's states and gaps into window globals."""
    page.evaluate(
        """(channel) => {
            window.got = []; window.states = []; window.gaps = []; window.acks = 0;
            client.on("state", (s) => states.push(s));
            client.on("gap", (c, info) => gaps.push([c, info]));
            client.on("subscribed", (c) => { if (c === channel) acks += 1; });
            client.subscribe(channel, (data, p) => got.push([data, p.offset, p.epoch]));
        }""",
        channel,
    )
    page.wait_for_function("window.acks >= 1")


def test_example_page_gets_every_publication_in_order(
    browser: BrowserContext, pages: StaticPages, service: Service, screenshots: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    response = service.get("/client.js")
    assert response.headers["content-type"].startswith("text/javascript")
    assert response.headers["access-control-allow-origin"] == "*"
    page = open_example(browser, pages, service)
    flowing(page, service)
    for i in range(30):
        assert service.publish("news", {"n": i}).status_code == 202
    page.wait_for_function("document.querySelectorAll('#log li').length >= 30")
    page.wait_for_function("document.body.innerText.includes('{\"n\":29}')")
    lines = page.eval_on_selector_all("#log li", "items => items.map(li => li.textContent)")
    numbered = [line.split(" ", 1)[1] for line in lines if '"n"' in line]
    assert numbered == [f'{{"n":{i}}}' for i in range(30)]
    assert page.inner_text("#state") == "connected"
    save_screenshot(page, screenshots, "example-page", capsys)
    page.close()


def test_channel_subscribed_after_connect(browser: BrowserContext, pages: StaticPages, service: Service) -> None:
    page = open_example(browser, pages, service)
    record(page, "late")
    for i in range(10):
        service.publish("late", i)
    page.wait_for_function("window.got.length >= 10")
    assert [row[0] for row in page.evaluate("window.got")] == list(range(10))
    page.close()


def test_duplicates_dropped_and_resubscribe_carries_since(
    browser: BrowserContext, pages: StaticPages, service: Service
) -> None:
    # Frames fed to the client as if from the server, then a reconnect: what it sends.
    page = open_example(browser, pages, service)
    sent: list[str] = []
    page.on("websocket", lambda ws: ws.on("framesent", lambda payload: sent.append(str(payload))))
    record(page, "dups")
    delivered = page.evaluate(
        """() => {
            const feed = (frame) => client._message(JSON.stringify(frame));
            for (const offset of [1, 2, 2, 1]) feed({channel: "dups", offset, epoch: "e1", data: offset});
            feed({op: "gap", channel: "dups", offset: 5, epoch: "e1"});
            for (const offset of [5, 6]) feed({channel: "dups", offset, epoch: "e1", data: offset});
            feed({op: "subscribed", channel: "dups", recovered: false, offset: 3, epoch: "e2"});
            feed({channel: "dups", offset: 4, epoch: "e2", data: "new epoch"});
            feed({channel: "dups", data: "raw"}); feed({channel: "dups", data: "raw"});
            return got.map(([data, offset]) => [data, offset ?? null]);
        }"""
    )
    assert delivered == [[1, 1], [2, 2], [6, 6], ["new epoch", 4], ["raw", None], ["raw", None]]
    assert page.evaluate("gaps.map(([c, info]) => [c, info.offset, info.reason])") == [
        ["dups", 5, "gap"],
        ["dups", 3, "not_recovered"],
    ]
    page.evaluate("client._ws.close(4999, 'test')")
    # acks: the first subscribe's, the fed one's, the resubscribe's.
    page.wait_for_function("states.join() === 'disconnected,connecting,connected' && acks >= 3")
    resubscribes = [f for f in sent if '"subscribe"' in f]
    assert '{"op":"subscribe","channel":"dups","since":{"offset":4,"epoch":"e2"}}' in resubscribes
    assert {json.loads(f)["channel"] for f in resubscribes[-2:]} == {"news", "dups"}  # every channel, at once
    page.close()


def test_policy_close_is_reported_and_not_retried_soon(
    browser: BrowserContext, pages: StaticPages, service: Service
) -> None:
    page = open_example(browser, pages, service)
    record(page, "abuse")
    page.evaluate("() => { window.errors = []; client.on('error', (e) => errors.push(e)); }")
    page.evaluate("() => { for (let i = 0; i < 12; i++) client._ws.send('not json'); }")  # closed with 1008
    page.wait_for_function("errors.some((e) => e.code === 1008) && client.state === 'disconnected'")
    assert page.evaluate("client.retryIn") >= 30_000
    assert "too_many_errors" in page.evaluate("errors.map((e) => e.error).join()")
    page.close()


def test_missing_pong_means_a_dead_connection(browser: BrowserContext, pages: StaticPages, service: Service) -> None:
    # Frozen workers keep the TCP connection open but answer nothing: only the ping notices.
    page = open_example(browser, pages, service)
    record(page, "frozen")
    page.evaluate("() => { client.options.pingInterval = 500; client.options.pongTimeout = 1500; }")
    page.evaluate("client._startPings()")
    frozen = service.worker_pids()
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    try:
        page.wait_for_function("window.states.includes('disconnected')")
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
    page.wait_for_function("states[states.length - 1] === 'connected' && acks >= 2", timeout=60_000)
    service.publish("frozen", "thawed")
    page.wait_for_function("got.some((row) => row[0] === 'thawed')")
    page.close()


def test_reload_under_a_steady_publisher_loses_nothing(
    browser: BrowserContext, pages: StaticPages, service: Service
) -> None:
    # Needs the server's recovery (offsets, since): until then publications are missed, and
    # arrive without offsets.
    page = open_example(browser, pages, service)
    page.evaluate("client.options.minDelay = 1000")  # the first reconnect waits up to a second
    record(page, "steady")
    publisher = SteadyPublisher(service, "steady")
    publisher.start()
    try:
        page.wait_for_function("window.got.length >= 10")
        reload_workers(service)
        page.wait_for_function("window.acks >= 2", timeout=60_000)
        seen = page.evaluate("window.got.length")
        page.wait_for_function(f"window.got.length >= {seen + 10}")
    finally:
        published = publisher.stop()
    # The last one arrives live; in order, everything before it must have arrived by then.
    page.wait_for_function(f"window.got.some((row) => row[0] === {published[-1]})")
    states = page.evaluate("window.states")
    assert states[:1] == ["disconnected"] and states[-1] == "connected"
    got = page.evaluate("window.got")
    assert [row[0] for row in got] == published
    offsets = [row[1] for row in got]
    assert offsets[0] is not None and offsets == list(range(offsets[0], offsets[0] + len(offsets)))
    assert page.evaluate("window.gaps") == []
    page.close()


def test_gap_reported_after_redis_lost_its_data(
    browser: BrowserContext,
    pages: StaticPages,
    own_redis: PrivateRedis,
    screenshots: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Needs the server's offsets and epochs: a restarted Redis starts a new epoch, a gap.
    with Service(own_redis.url, workers=1) as svc:
        page = open_example(browser, pages, svc)
        # A function, not an expression: Playwright would call the remover that on() returns.
        page.evaluate("() => { window.gaps = []; client.on('gap', (c, info) => gaps.push([c, info])); }")
        flowing(page, svc)
        for i in range(3):
            svc.publish("news", {"before": i})
        page.wait_for_function("document.body.innerText.includes('{\"before\":2}')")
        own_redis.stop()
        own_redis.start()
        svc.wait_ready(60)

        def gap_shown() -> bool:
            svc.publish("news", "after the restart")
            return bool(page.evaluate("window.gaps.length > 0"))

        try:
            wait_until(gap_shown, 30, interval=0.5, what="a gap event in the page")
            page.wait_for_function("document.body.innerText.includes('gap on news')")
            page.wait_for_function("document.body.innerText.includes('\"after the restart\"')")
        finally:
            save_screenshot(page, screenshots, "example-page-gap", capsys)
        assert page.evaluate("window.gaps[0][0]") == "news"
        page.close()
