"""Real Chromium for the browser tests: Debian's /usr/bin/chromium driven by Playwright for Python.

Playwright never downloads a browser here (no ``playwright install``): it is pointed at the
system's chromium with ``executable_path``. ``scripts/test`` installs chromium with apt-get when it
is missing and it can; a test that finds none fails with one line saying so, it is never skipped.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, sync_playwright

CHROMIUM = "/usr/bin/chromium"
# Headless, as root (no sandbox), and talking to nothing but the pages under test.
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 30_000


@contextlib.contextmanager
def chromium() -> Iterator[Browser]:
    """Debian's chromium, headless; give each test its own ``browser.new_context(...)``.

    Playwright keeps the browser's profile in a temporary directory it removes when the browser
    closes, so a test session leaves nothing behind.
    """
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: run scripts/test as root (it installs it) or apt-get install -y chromium")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS, timeout=TIMEOUT_MS)
        try:
            yield browser
        finally:
            browser.close()


def screenshot_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """$WSBROADCAST_SCREENSHOTS, else pytest's own temporary directory (kept for the last few runs)."""
    chosen = os.environ.get("WSBROADCAST_SCREENSHOTS")
    if not chosen:
        return tmp_path_factory.mktemp("screenshots")
    path = Path(chosen)
    path.mkdir(parents=True, exist_ok=True)
    return path


def save_screenshot(page: Page, directory: Path, name: str, capsys: pytest.CaptureFixture[str]) -> Path:
    """A full-page PNG, its path printed even under pytest's capture."""
    target = directory / f"{name}.png"
    page.screenshot(path=str(target), full_page=True)
    with capsys.disabled():
        print(f"\nscreenshot: {target}")
    return target
