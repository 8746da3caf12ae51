"""A static file server in a thread, with byte ranges and injected stalls (for media):
it serves the browser tests' page, scripts and video."""

from __future__ import annotations

import mimetypes
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit


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
