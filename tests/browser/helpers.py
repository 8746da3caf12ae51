"""What the browser tests need: Chromium via Selenium, a static file server for the test
page, the service with CORS (in-process or as a child process), and the test media.

Nothing here installs or downloads anything. The browser is Debian's ``chromium`` driven
by Debian's ``chromium-driver`` (paths given explicitly, so Selenium Manager never runs);
the video is made by Debian's ``ffmpeg``; the landmarks are the real recordings kept in
``tests/data/pose/pushup``. A missing tool fails the test with the line to install it.

``python -m tests.browser.helpers serve`` runs ``telemetry serve`` with the CORS wrapper
around the app (origins from ``TELEMETRY_CORS_ORIGINS``), as the service will once the
wrapper is wired into ``telemetry/server.py``; the restart test runs it as a child.
"""

from __future__ import annotations

import json
import mimetypes
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx
import numpy as np
import pytest
import trio

from telemetry.config import Settings
from telemetry.cors import ASGIApp, cors, parse_origins
from tests.data import PUSHUP
from tests.service import Running, running_service

ROOT = Path(__file__).resolve().parents[2]
WEB_CLIENT = ROOT / "clients" / "web"
RECORDINGS = PUSHUP
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- test media -------------------------------------------------------------------------


def make_video(path: Path, *, seconds: float, width: int = 320, height: int = 240) -> Path:
    """A real VP8/WebM video made by ffmpeg: a moving test pattern, no audio."""
    cmd = [
        "ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi",
        "-i", f"testsrc2=size={width}x{height}:rate=30:duration={seconds}",
        "-c:v", "libvpx", "-b:v", "300k", "-g", "30", "-deadline", "realtime", "-cpu-used", "8",
        "-an", "-f", "webm", str(path),
    ]
    done = subprocess.run(cmd, capture_output=True, timeout=60, check=False)
    if done.returncode != 0 or not path.is_file():
        raise AssertionError(f"ffmpeg could not make the test video: {done.stderr.decode()[-800:]}")
    return path


@dataclass(frozen=True)
class Recording:
    """Real MediaPipe Pose recordings played back to back: ``frames`` float32 (N, 33, 4)
    in normalised image space, all-NaN rows where no pose was found."""

    names: tuple[str, ...]
    frames: np.ndarray
    reps: int

    @property
    def no_pose(self) -> int:
        return int(np.isnan(self.frames).all(axis=(1, 2)).sum())

    def json(self) -> str:
        """The page's frames file. ``float(np.float32)`` is exact in a double and JSON
        round-trips doubles, so the page gets the very float32 values back."""
        rows: list[list[float] | None] = []
        for f in self.frames:
            rows.append(None if np.isnan(f).all() else [float(v) for v in f.reshape(-1)])
        return json.dumps({"fps": 30, "names": list(self.names), "frames": rows})

    def cycled(self, n: int) -> np.ndarray:
        """The first ``n`` frames of the recording played in a loop."""
        return self.frames[np.arange(n) % len(self.frames)]


def load_recording(names: Sequence[str]) -> Recording:
    labels = json.loads((RECORDINGS / "labels.json").read_text())
    parts = [np.load(RECORDINGS / f"{n}.npz")["landmarks"].astype(np.float32) for n in names]
    return Recording(tuple(names), np.concatenate(parts), sum(labels[n]["reps"] for n in names))


# -- static files -----------------------------------------------------------------------


class _Files(ThreadingHTTPServer):
    daemon_threads = True
    mounts: dict[str, Path]
    # URL path -> (byte offset, seconds): once a response reaches the offset, no byte
    # from it onwards is sent, by any response, for that many seconds: the player runs
    # out of data (a real stall) however it re-requests.
    stalls: dict[str, tuple[int, float]]
    released_at: dict[str, float]
    lock: threading.Lock

    def hold(self, path: str, start: int, end: int) -> tuple[int, float] | None:
        """(offset, seconds to wait there) if this response must pause, else None."""
        stall = self.stalls.get(path)
        if stall is None or end < stall[0]:
            return None
        with self.lock:
            now = time.monotonic()
            release = self.released_at.setdefault(path, now + stall[1])
        return (max(stall[0], start), release - now) if release > now else None

    def resolve(self, url_path: str) -> Path | None:
        path = unquote(url_path)
        for prefix, root in sorted(self.mounts.items(), key=lambda m: -len(m[0])):
            if path.startswith(prefix):
                base = root.resolve()
                target = (base / path[len(prefix):].lstrip("/")).resolve()
                if target.is_file() and target.is_relative_to(base):
                    return target
                return None
        return None


class _Handler(BaseHTTPRequestHandler):
    server: _Files
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        target = self.server.resolve(urlsplit(self.path).path)
        if target is None:
            self.send_error(404)
            return
        data = target.read_bytes()
        ctype = {".js": "text/javascript", ".webm": "video/webm", ".json": "application/json",
                 ".html": "text/html; charset=utf-8"}.get(
            target.suffix, mimetypes.guess_type(target.name)[0] or "application/octet-stream")
        start, end, status = 0, len(data) - 1, 200
        m = re.fullmatch(r"bytes=(\d*)-(\d*)", (self.headers.get("Range") or "").strip())
        if m and (m[1] or m[2]):
            if m[1]:
                start, end = int(m[1]), min(int(m[2]) if m[2] else end, end)
            else:
                start = max(0, len(data) - int(m[2]))
            if start > end:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        body = data[start:end + 1]
        try:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Cache-Control", "no-store")
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
            self.end_headers()
            hold = self.server.hold(urlsplit(self.path).path, start, end)
            if hold is not None:
                offset, wait = hold
                self.wfile.write(body[:offset - start])
                self.wfile.flush()
                time.sleep(wait)
                body = body[offset - start:]
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the browser abandoned a media request: normal


@contextmanager
def static_server(mounts: dict[str, Path],
                  stalls: dict[str, tuple[int, float]] | None = None) -> Iterator[str]:
    """Serve ``mounts`` (URL prefix -> directory) on a loopback port, in a thread, with
    byte ranges (for media). ``stalls``: URL path -> (byte offset, seconds) to pause the
    first response that reaches that offset. Yields the origin (``http://127.0.0.1:PORT``)."""
    server = _Files(("127.0.0.1", 0), _Handler)
    server.mounts = mounts
    server.stalls = dict(stalls or {})
    server.released_at = {}
    server.lock = threading.Lock()
    thread = threading.Thread(target=server.serve_forever, name="static-files", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


# -- the service with CORS --------------------------------------------------------------


@dataclass
class Request:
    """One request as the service saw it (``t`` on the Trio clock)."""

    method: str
    path: str
    started: float
    body: bytes = b""
    status: int | None = None
    answered: float | None = None

    @property
    def seq(self) -> int | None:
        """The sequence number of a pose batch."""
        if self.path == "/v1/pose/frames" and len(self.body) >= 12:
            return int.from_bytes(self.body[8:12], "little")
        return None


@dataclass
class RequestLog:
    """An ASGI wrapper that records every request and its answer's status."""

    requests: list[Request] = field(default_factory=list)

    def posts(self, path: str) -> list[Request]:
        return [r for r in self.requests if r.method == "POST" and r.path == path]

    def wrap(self, app: ASGIApp) -> ASGIApp:
        async def wrapped(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            req = Request(scope["method"], scope["path"], trio.current_time())
            self.requests.append(req)

            async def recv() -> Any:
                message = await receive()
                if message["type"] == "http.request":
                    req.body += message.get("body", b"")
                return message

            async def snd(message: Any) -> None:
                if message["type"] == "http.response.start":
                    req.status, req.answered = message["status"], trio.current_time()
                await send(message)

            await app(scope, recv, snd)

        return wrapped


@contextmanager
def cors_wired(origins: Sequence[str], log: RequestLog | None = None) -> Iterator[None]:
    """While open, :func:`telemetry.server.serve` wraps its app in :func:`cors`: the one
    line the lead adds to ``server.py`` (``cors(create_app(state), settings.cors_origins)``),
    applied here from outside because tests may not edit ``server.py``. ``log``, if
    given, records the requests (outside CORS, so preflights too)."""
    import telemetry.server as server

    original = server.create_app

    def create_app(state: Any) -> ASGIApp:
        app = cors(original(state), origins)
        return log.wrap(app) if log is not None else app

    server.create_app = create_app  # type: ignore[assignment]
    try:
        yield
    finally:
        server.create_app = original


@asynccontextmanager
async def running_cors_service(settings: Settings, origins: Sequence[str],
                               log: RequestLog | None = None) -> AsyncIterator[Running]:
    """:func:`tests.service.running_service` with the CORS wrapper around the app."""
    with cors_wired(origins, log):
        async with running_service(settings) as svc:
            yield svc


@dataclass
class ServiceProcess:
    """``telemetry serve`` with CORS as a child process, restartable on one port and data
    directory (the restart test's subject)."""

    data_dir: Path
    port: int
    origins: Sequence[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: trio.Process | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def environ(self) -> dict[str, str]:
        """The child's environment: this process's, plus the service's configuration."""
        return {**os.environ, "TELEMETRY_HOST": "127.0.0.1", "TELEMETRY_PORT": str(self.port),
                "TELEMETRY_DATA_DIR": str(self.data_dir), "TELEMETRY_SINK": "none",
                "TELEMETRY_LOG_LEVEL": "INFO", "TELEMETRY_CORS_ORIGINS": ",".join(self.origins),
                **self.env}

    def settings(self) -> Settings:
        """The settings the child loads (to mint its tokens, open its blob store)."""
        return Settings.from_env(self.environ())

    async def start(self, timeout: float = 30.0) -> None:  # noqa: ASYNC109 - fails with the log
        assert self.proc is None, "already running"
        env = self.environ()
        self.starts += 1
        with self.log_path.open("ab") as log:
            log.write(f"--- start {self.starts} ---\n".encode())
            log.flush()
            self.proc = await trio.lowlevel.open_process(
                [sys.executable, "-m", "tests.browser.helpers", "serve"], cwd=ROOT, env=env,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        deadline = trio.current_time() + timeout
        async with httpx.AsyncClient(timeout=2) as client:
            while True:
                if self.proc.poll() is not None:
                    code = self.proc.returncode
                    self.proc = None
                    raise AssertionError(f"the service exited with {code} while starting:\n"
                                         f"{self.log_tail()}")
                try:
                    if (await client.get(self.url + "/v1/readyz")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                if trio.current_time() > deadline:
                    raise AssertionError(f"the service did not get ready in {timeout} s:\n"
                                         f"{self.log_tail()}")
                await trio.sleep(0.1)

    async def stop(self, sig: int = signal.SIGTERM, grace_s: float = 30.0) -> int:
        """Send ``sig`` and wait for the exit (its code); SIGKILL if it outlives ``grace_s``."""
        proc, self.proc = self.proc, None
        if proc is None:
            return 0
        proc.send_signal(sig)
        with trio.move_on_after(grace_s):
            return await proc.wait()
        with trio.CancelScope(shield=True):
            proc.kill()
            await proc.wait()
        raise AssertionError(f"the service outlived {grace_s} s after {sig}:\n{self.log_tail()}")

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return "(no log)"


def _serve_main() -> None:
    origins = parse_origins(os.environ.get("TELEMETRY_CORS_ORIGINS", ""))
    from telemetry.cli import main

    with cors_wired(origins):
        code = main(["serve"])
    sys.exit(code)


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


if __name__ == "__main__":
    if sys.argv[1:] != ["serve"]:
        sys.exit("usage: python -m tests.browser.helpers serve")
    _serve_main()
