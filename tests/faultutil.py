"""Helpers for fault-injection tests: the real service and sink as child processes.

:class:`Child` runs ``python -m telemetry.cli serve`` (or ``sink``) with an
environment built from scratch (:func:`service_env`: nothing ``TELEMETRY_*`` or
``DATABASE_URL`` leaks in from the parent), on a port chosen beforehand so a
restarted child comes back at the same address. Its stdout and stderr go to a log
file in the data directory (a pipe nobody reads could fill and stall the child).

Always use :func:`child` (an async context manager): the process is SIGKILLed and
reaped on the way out, whatever happened, so no test leaves a child behind.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, BinaryIO

import httpx
import trio

from domain.pose_batch import CONTENT_TYPE

ROOT = Path(__file__).resolve().parents[1]

AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": "/nonexistent/aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
    "AWS_EC2_METADATA_DISABLED": "true",
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
}


def free_port() -> int:
    """A TCP port nothing listens on right now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def service_env(data_dir: Path, port: int, **extra: str) -> dict[str, str]:
    """Environment of a ``telemetry serve`` child: loopback, ``port``, ``data_dir``,
    no embedded sink, quiet logs, rate limit out of the way; ``extra`` on top
    (``TELEMETRY_*`` names without the prefix are accepted: ``SPOOL="off"``)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TELEMETRY_", "AWS_")) and k != "DATABASE_URL"}
    env.update(AWS_ENV)
    env.update({
        "TELEMETRY_HOST": "127.0.0.1",
        "TELEMETRY_PORT": str(port),
        "TELEMETRY_DATA_DIR": str(data_dir),
        "TELEMETRY_SINK": "none",
        "TELEMETRY_LOG_LEVEL": "WARNING",
        "TELEMETRY_MAX_BATCHES_PER_S": "1000",
        "TELEMETRY_PSEUDONYM_KEY": "k" * 32,
        "PYTHONUNBUFFERED": "1",
    })
    for k, v in extra.items():
        env[k if k.startswith(("TELEMETRY_", "DATABASE_", "AWS_")) else f"TELEMETRY_{k}"] = v
    return env


class Child:
    """One child process of the ``telemetry`` command; see the module docstring."""

    def __init__(self, command: str, env: Mapping[str, str], port: int, log_path: Path,
                 ready_path: str) -> None:
        self.command = command
        self.env = dict(env)
        self.port = port
        self.log_path = log_path
        self.ready_path = ready_path
        self.proc: trio.Process | None = None
        self.started_at = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.returncode

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    async def start(self, timeout_s: float = 60.0) -> float:
        """Spawn and wait until ``ready_path`` answers 200; return seconds taken."""
        assert self.proc is None or self.proc.returncode is not None, "already running"
        with self._open_log() as log:
            self.proc = await trio.lowlevel.open_process(
                [sys.executable, "-m", "telemetry.cli", self.command], env=self.env,
                cwd=str(ROOT), stdin=None, stdout=log, stderr=log)
        self.started_at = time.monotonic()
        async with httpx.AsyncClient(timeout=2) as client:
            with trio.fail_after(timeout_s):
                while True:
                    if self.proc.returncode is not None or self.proc.poll() is not None:
                        raise RuntimeError(f"{self.command} exited with {self.proc.returncode} "
                                           f"before ready:\n{self.log_text()[-3000:]}")
                    try:
                        r = await client.get(self.url + self.ready_path)
                        if r.status_code == 200:
                            return time.monotonic() - self.started_at
                    except httpx.TransportError:
                        pass
                    await trio.sleep(0.05)

    def _open_log(self) -> BinaryIO:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed by the caller's with
        log.write(f"--- start {self.command} {time.strftime('%X')}\n".encode())
        log.flush()
        return log

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(sig)

    async def wait(self, timeout_s: float) -> int:
        assert self.proc is not None
        with trio.fail_after(timeout_s):
            return await self.proc.wait()

    async def kill(self) -> int:
        """SIGKILL (if still running) and reap; return the exit status."""
        assert self.proc is not None
        self.signal(signal.SIGKILL)
        with trio.move_on_after(10) as scope:
            scope.shield = True
            await self.proc.wait()
        return self.proc.returncode if self.proc.returncode is not None else -9

    def rss_kb(self) -> dict[str, int]:
        """``VmRSS`` (now) and ``VmHWM`` (peak) of the child, in kB, from /proc."""
        out: dict[str, int] = {}
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name in ("VmRSS", "VmHWM"):
                    out[name] = int(value.split()[0])
        return out


def service(data_dir: Path, port: int | None = None, **extra: str) -> Child:
    """A ``telemetry serve`` child (not started); see :func:`service_env`."""
    port = port or free_port()
    return Child("serve", service_env(data_dir, port, **extra), port,
                 data_dir / "service.log", "/v1/readyz")


def sink(data_dir: Path, database_url: str, port: int | None = None) -> Child:
    """A ``telemetry sink`` child (not started) writing to ``database_url``."""
    port = port or free_port()
    env = service_env(data_dir, 0, SINK_PORT=str(port), DATABASE_URL=database_url)
    return Child("sink", env, port, data_dir / "sink.log", "/healthz")


@asynccontextmanager
async def child(proc: Child, *, start: bool = True) -> AsyncIterator[Child]:
    """Start ``proc`` (unless ``start=False``) and SIGKILL + reap it on the way out."""
    try:
        if start:
            await proc.start()
        yield proc
    finally:
        if proc.proc is not None:
            await proc.kill()


def auth(token: str, content_type: str | None = CONTENT_TYPE) -> dict[str, str]:
    h = {"Authorization": f"Bearer {token}"}
    if content_type:
        h["Content-Type"] = content_type
    return h


def outbox_pending(data_dir: Path) -> list[str]:
    pending = data_dir / "outbox" / "pending"
    return sorted(p.name for p in pending.glob("*.json")) if pending.is_dir() else []


def spool_keys(data_dir: Path) -> list[str]:
    """Session logs left in the spool, as ``org/session`` (excludes kept summaries)."""
    root = data_dir / "spool"
    if not root.is_dir():
        return []
    return sorted(str(p.relative_to(root))[: -len(".log")] for p in root.rglob("*.log")
                  if not str(p.relative_to(root)).startswith("ended/"))


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) \
        if root.is_dir() else []


async def poll(fn: Any, timeout_s: float, interval_s: float = 0.1) -> Any:
    """Call (and await, if async) ``fn`` until it returns something truthy."""
    with trio.fail_after(timeout_s):
        while True:
            got = fn()
            if hasattr(got, "__await__"):
                got = await got
            if got:
                return got
            await trio.sleep(interval_s)


class RawHttp:
    """A minimal HTTP/1.1 keep-alive client on one connection, for floods: httpx
    spends several times the server's CPU per request, and on a small machine the
    client would otherwise throttle the flood it is meant to produce. Responses
    must carry Content-Length (every answer of this service does)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._stream: trio.SocketStream | None = None
        self._buf = bytearray()

    async def request(self, method: str, path: str, headers: Mapping[str, str],
                      body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
        """Send one request; return (status, lower-cased headers, body). Raises
        ``ConnectionError`` (and drops the connection) if the server closes it."""
        try:
            if self._stream is None:
                self._stream = await trio.open_tcp_stream("127.0.0.1", self.port)
                self._buf.clear()
            head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
            await self._stream.send_all(
                f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
                f"Content-Length: {len(body)}\r\n{head}\r\n".encode() + body)
            while (end := self._buf.find(b"\r\n\r\n")) < 0:
                await self._fill()
            lines = bytes(self._buf[:end]).decode("latin-1").split("\r\n")
            del self._buf[: end + 4]
            status = int(lines[0].split(" ", 2)[1])
            fields = {k.strip().lower(): v.strip()
                      for k, _, v in (line.partition(":") for line in lines[1:])}
            length = int(fields.get("content-length", "0"))
            while len(self._buf) < length:
                await self._fill()
            data = bytes(self._buf[:length])
            del self._buf[:length]
            if fields.get("connection", "").lower() == "close":
                await self.aclose()
            return status, fields, data
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            await self.aclose()
            raise ConnectionError(str(exc)) from exc
        except ConnectionError:
            await self.aclose()
            raise

    async def _fill(self) -> None:
        assert self._stream is not None
        chunk = await self._stream.receive_some(65536)
        if not chunk:
            raise ConnectionError("server closed the connection")
        self._buf += chunk

    async def aclose(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            await stream.aclose()


class DiskFull:
    """Failure injection: a real :class:`~storage.spool.Spool` whose commits fail
    with ENOSPC while :attr:`full` is set, as on a full data disk (the spool's own
    error handling runs: the log is rolled back, the state file is not replaced,
    waiters get ``SpoolError``). Everything else is the real spool."""

    def __init__(self, spool: Any, *, full: bool = True) -> None:
        self.full = full
        self.failed = 0
        real = spool._commit_key

        def commit_key(*args: Any) -> None:
            if self.full:
                self.failed += 1
                raise OSError(errno.ENOSPC, "No space left on device")
            real(*args)

        spool._commit_key = commit_key  # an instance attribute: this spool only


class BlobStoreDown:
    """Failure injection: a real blob store whose ``put`` raises ``BlobStoreError``
    while :attr:`down` is set (``attempts`` counts them); reads are untouched."""

    def __init__(self, store: Any, *, down: bool = True) -> None:
        from storage.blobs import BlobStoreError

        self.down = down
        self.attempts = 0
        real = store.put

        async def put(key: str, data: bytes) -> Any:
            if self.down:
                self.attempts += 1
                await trio.lowlevel.checkpoint()
                raise BlobStoreError("injected: blob store down")
            return await real(key, data)

        store.put = put
