"""Chromium for the browser tests, driven by Selenium, and the check for the tools.

Nothing here installs or downloads anything. The browser is Debian's ``chromium`` driven
by Debian's ``chromium-driver`` (paths given explicitly, so Selenium Manager never runs);
the video is made by Debian's ``ffmpeg`` (:mod:`tests.support.media`). A missing tool
fails the test with the line to install it. The rest of what the browser tests use:
:mod:`tests.support.static_files` (the page's server), :mod:`tests.support.service`
(the service with CORS in this process), :class:`tests.support.processes.ServiceProcess`
(the same as a child process).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.support.media import RECORDINGS

ROOT = Path(__file__).resolve().parents[2]
WEB_CLIENT = ROOT / "clients" / "web"
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
APT_LINE = ("apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y "
            "chromium chromium-driver ffmpeg")
CHROMIUM_ARGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--mute-audio", "--autoplay-policy=no-user-gesture-required",
    "--window-size=1024,768",
)


# -- tools ------------------------------------------------------------------------------


def require_browser_tools() -> None:
    """Fail (never skip) with what to install when a tool the browser tests need is missing."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER)
               if not (p.is_file() and os.access(p, os.X_OK))]
    if shutil.which("ffmpeg") is None:
        missing.append("ffmpeg")
    if missing:
        pytest.fail(f"the browser tests need {', '.join(missing)} (Debian packages chromium, "
                    f"chromium-driver, ffmpeg): run `{APT_LINE}` (.ci/run does)", pytrace=False)
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.fail("the browser tests need the `selenium` package (the project's `test` extra): "
                    "run `.venv/bin/pip install -e '.[test]'`", pytrace=False)
    if not RECORDINGS.is_dir():
        pytest.fail(f"the pose recordings are missing: expected {RECORDINGS}", pytrace=False)




# -- the browser ------------------------------------------------------------------------


class Browser:
    """A Selenium-driven headless Chromium. Every call runs in a worker thread, so a
    service in this test's Trio loop keeps answering the page meanwhile."""

    def __init__(self, profile_dir: Path) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM)
        for arg in CHROMIUM_ARGS:
            options.add_argument(arg)
        profile_dir.mkdir(parents=True, exist_ok=True)
        options.add_argument(f"--user-data-dir={profile_dir}")
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        # An explicit driver path: Selenium Manager (which would download) never runs.
        service = Service(executable_path=str(CHROMEDRIVER),
                          log_output=str(profile_dir.parent / "chromedriver.log"))
        self.driver = webdriver.Chrome(options=options, service=service)
        self.driver.set_script_timeout(30)
        self.driver.set_page_load_timeout(30)

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=True)

    async def get(self, url: str) -> None:
        await self._call(self.driver.get, url)

    async def js(self, script: str, *args: Any) -> Any:
        return await self._call(self.driver.execute_script, script, *args)

    async def js_async(self, script: str, *args: Any) -> Any:
        """Run ``script`` with a callback ``arguments[arguments.length - 1]``."""
        return await self._call(self.driver.execute_async_script, script, *args)

    async def page(self) -> dict[str, Any]:
        """``window.__page`` of the test page, without its objects."""
        return await self.js("""
            const p = window.__page;
            if (!p) return null;
            return {state: p.state, fed: p.fed, errors: p.errors, failure: p.failure,
                    result: p.result, client: p.client && p.client.stats(),
                    tracker: p.tracker && p.tracker.stats(),
                    transport: p.client && p.client.transport.stats
                        ? p.client.transport.stats() : null};""")

    async def wait_page(
        self, ok: Callable[[dict[str, Any]], bool], what: str,
        timeout: float,  # noqa: ASYNC109 - on timeout it fails with the page's state
    ) -> dict[str, Any]:
        """Poll the page until ``ok(state)``; fail with the page's state and console."""
        deadline = trio.current_time() + timeout
        state: dict[str, Any] | None = None
        while True:
            state = await self.page()
            if state and state["state"] == "failed":
                raise AssertionError(f"the test page failed: {state['failure']}\n{self.console()}")
            if state and state["state"] != "loading" and ok(state):
                return state
            if trio.current_time() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}; page: "
                                     f"{json.dumps(state)[:3000]}\nconsole:\n{self.console()}")
            await trio.sleep(0.1)

    def console(self) -> str:
        try:
            entries = self.driver.get_log("browser")
        except Exception as exc:  # noqa: BLE001 - diagnostics only
            return f"(no console: {exc})"
        return "\n".join(f"{e.get('level')} {e.get('message')}" for e in entries[-50:])

    def close(self) -> None:
        self.driver.quit()
