"""Fixtures for the console: a real Herald (in-process service with its HTTP
server, real broker and database, the sandbox as the provider) and a real
headless Chromium driven through chromedriver, both from Debian's packages.

Selenium's API blocks, and the Herald under test runs on this test's event
loop, so every browser call goes through a thread (:class:`Browser`).
Chromium may resolve nothing but loopback (``--host-resolver-rules``), and
starts with a fresh profile and background networking off.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from consumer.service import Service
from consumer.settings import Settings
from tests.conftest import REPO, RunningSandbox
from tests.helpers import wait_for

OPS_TOKEN = "ops-3f9c1a7e5b2d4c60aa"
VIEW_TOKEN = "view-8d2e4f6a1c3b5d79ee"
TOKENS = f"ops:operator:{OPS_TOKEN},night:viewer:{VIEW_TOKEN}"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
SHOTS = REPO / "test-artifacts" / "console"
T = TypeVar("T")


@dataclass
class RunningHerald:
    service: Service
    base: str  # http://127.0.0.1:PORT

    @property
    def console(self) -> str:
        return f"{self.base}/console"


@pytest.fixture
async def herald(settings: Settings, sandbox: RunningSandbox) -> AsyncIterator[RunningHerald]:
    service = Service(settings.replace(admin_token=TOKENS, http_port=0), serve_http=True)
    await service.start()
    assert service.admin_listener is not None
    port = service.admin_listener.port
    yield RunningHerald(service, f"http://127.0.0.1:{port}")
    await service.stop()


class Browser:
    """A headless Chromium, each call run in a thread; screenshots numbered in
    the order the test takes them."""

    def __init__(self, driver: Any, shots: Path) -> None:
        self.driver = driver
        self.shots = shots
        self.taken = 0

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(fn, *args)

    async def get(self, url: str) -> None:
        await self.call(self.driver.get, url)

    async def url(self) -> str:
        return str(await self.call(lambda: self.driver.current_url))

    async def find(self, css: str) -> Any:
        from selenium.webdriver.common.by import By

        return await self.call(self.driver.find_element, By.CSS_SELECTOR, css)

    async def all(self, css: str) -> list[Any]:
        from selenium.webdriver.common.by import By

        return list(await self.call(self.driver.find_elements, By.CSS_SELECTOR, css))

    async def exists(self, css: str) -> bool:
        return bool(await self.all(css))

    async def text(self, css: str) -> str:
        element = await self.find(css)
        return str(await self.call(lambda: element.text))

    async def text_if_there(self, css: str) -> str | None:
        """The element's text, or None when it is not there yet or the page
        reloaded between finding and reading it (a job's page reloads itself
        once the job ends)."""
        from selenium.common.exceptions import (
            NoSuchElementException,
            StaleElementReferenceException,
        )

        try:
            return await self.text(css)
        except (NoSuchElementException, StaleElementReferenceException):
            return None

    async def click(self, css: str) -> None:
        element = await self.find(css)
        await self.call(element.click)

    async def fill(self, css: str, value: str) -> None:
        element = await self.find(css)
        await self.call(element.clear)
        await self.call(element.send_keys, value)

    async def script(self, source: str, *args: Any) -> Any:
        return await self.call(self.driver.execute_script, source, *args)

    async def fetch_post(self, path: str, fields: dict[str, str]) -> int:
        """POST a form from the page (same origin, the session's cookie): the status."""
        source = """
            const done = arguments[arguments.length - 1];
            const body = new URLSearchParams(arguments[1]);
            fetch(arguments[0], {method: "POST", body: body, credentials: "same-origin",
                                 redirect: "manual"})
              .then(r => done(r.status)).catch(e => done(String(e)));
        """
        return int(await self.call(self.driver.execute_async_script, source, path, fields))

    async def cookies(self) -> list[dict[str, Any]]:
        return list(await self.call(self.driver.get_cookies))

    async def wait_text(self, css: str, pattern: str, *, timeout: float = 20) -> str:
        """Wait until the element's text matches ``pattern``; returns the text."""
        seen = ""

        async def matches() -> bool:
            nonlocal seen
            text = await self.text_if_there(css)
            if text is None:
                return False
            seen = text
            return re.search(pattern, seen) is not None

        await wait_for(matches, timeout=timeout, interval=0.1,
                       what=f"{css} to say {pattern!r} (last: {seen!r})")
        return seen

    async def wait_url(self, pattern: str, *, timeout: float = 20) -> str:
        async def matches() -> bool:
            return re.search(pattern, await self.url()) is not None

        await wait_for(matches, timeout=timeout, interval=0.1, what=f"a URL like {pattern!r}")
        return await self.url()

    async def shot(self, name: str) -> Path:
        self.taken += 1
        path = self.shots / f"{self.taken:02d}-{name}.png"
        await self.call(self.driver.save_screenshot, str(path))
        return path

    async def resize(self, width: int, height: int) -> None:
        await self.call(self.driver.set_window_size, width, height)

    async def sign_in(self, herald: RunningHerald, token: str) -> None:
        await self.get(f"{herald.console}/")
        await self.wait_url(r"/console/login")
        await self.fill("#token", token)
        await self.click("#sign-in")
        await self.wait_text("#who", r"·")


def _chromium(profile: str) -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", "--no-default-browser-check",
                "--disable-default-apps", "--disable-extensions", "--disable-dev-shm-usage",
                "--disable-domain-reliability", "--disable-client-side-phishing-detection",
                "--metrics-recording-only", "--no-pings", "--password-store=basic",
                # Nothing but loopback resolves: the browser cannot reach anything else.
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost",
                f"--user-data-dir={profile}", "--window-size=1280,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=DriverService(CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    driver.set_script_timeout(30)
    return driver


@pytest.fixture
async def browser(request: pytest.FixtureRequest,
                  monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Browser]:
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        pytest.fail("Debian's chromium and chromium-driver are needed: deploy/local/chromium.sh"
                    " install (make services runs it)")
    # Selenium must never fetch a driver or a browser.
    monkeypatch.setenv("SE_OFFLINE", "true")
    shots = SHOTS / request.node.name
    shutil.rmtree(shots, ignore_errors=True)
    shots.mkdir(parents=True)
    profile = tempfile.mkdtemp(prefix="herald-chromium-")
    driver = await asyncio.to_thread(_chromium, profile)
    try:
        yield Browser(driver, shots)
    finally:
        await asyncio.to_thread(driver.quit)
        shutil.rmtree(profile, ignore_errors=True)
