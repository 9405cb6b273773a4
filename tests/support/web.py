"""The dashboard's browser tests: Debian's Chromium through playwright, a page that fails the test on any script
error, CSP refusal or request to another origin, signing in, keyboard presses and checked screenshots."""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image
from playwright.sync_api import Browser, ConsoleMessage, Locator, Page, Request, expect, sync_playwright

from tests.conftest import REPO

TIMEOUT_MS = 15_000
ARTIFACTS = Path(os.environ.get("PORTICO_TEST_ARTIFACTS", REPO / "var" / "test-artifacts"))


@contextmanager
def chromium() -> Iterator[Browser]:
    """Headless Debian ``chromium`` (no browser download)."""
    executable = shutil.which("chromium")
    if executable is None:
        raise AssertionError("Chromium is not installed: run `make setup` (Debian package chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True)
        try:
            yield browser
        finally:
            browser.close()


@contextmanager
def watched_page(browser: Browser, origin: str, *, downloads: bool = False) -> Iterator[Page]:
    """A 1366x768 page that records script errors, what the CSP blocked and requests beyond ``origin``;
    the block fails when there were any. Refused API calls (403, 409) are the tests' point, not problems."""
    context = browser.new_context(viewport={"width": 1366, "height": 768}, accept_downloads=downloads)
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error" and not message.text.startswith("Failed to load resource"):
            problems.append(f"console {message.type}: {message.text}")

    def on_request(request: Request) -> None:
        if not request.url.startswith(origin + "/"):
            problems.append(f"request to another origin: {request.url}")

    page.on("console", on_console)
    page.on("request", on_request)
    try:
        yield page
    finally:
        context.close()
    assert problems == []  # no script errors, nothing the CSP blocked, nothing fetched from elsewhere


def sign_in(page: Page, url: str, user: str, password: str) -> None:
    page.goto(url + "/ui/")
    page.get_by_label("User name").fill(user)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#who")).to_contain_text(f"Signed in as {user}")


def press(scope: Page | Locator, name: str) -> None:
    """Reach a button by keyboard focus and press Enter on it."""
    button = scope.get_by_role("button", name=name, exact=True)
    button.focus()
    expect(button).to_be_focused()
    button.press("Enter")


def shot(page: Page, name: str) -> Path:
    """Save the page as a test artifact; it must not be blank and must fit a 1366-pixel-wide screen."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    pixels = np.asarray(Image.open(io.BytesIO(path.read_bytes())).convert("L"), dtype=float)
    assert pixels.std() > 10 and len(np.unique(pixels)) > 20, name  # text, tables, the blue bar
    assert page.evaluate("document.documentElement.scrollWidth") <= 1366, name
    return path
