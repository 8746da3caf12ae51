"""Programs the tests run as child processes: the service, the sink, the service with
CORS (the browser tests' restart), and any other server (HAProxy).

:class:`Child` runs ``python -m telemetry.cli serve`` (or ``sink``) with an
environment built from scratch (:func:`service_env`: nothing ``TELEMETRY_*`` or
``DATABASE_URL`` leaks in from the parent), on a port chosen beforehand so a
restarted child comes back at the same address. Its stdout and stderr go to a log
file in the data directory (a pipe nobody reads could fill and stall the child).

Always use :func:`child` (an async context manager): the process is SIGKILLed and
reaped on the way out, whatever happened, so no test leaves a child behind.

Every one of them is waited for with :func:`tests.support.ready.wait_ready`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import trio

from telemetry.config import Settings
from tests.support.ports import free_port
from tests.support.ready import NotReady, wait_ready
from tests.support.s3 import AWS_ENV

ROOT = Path(__file__).resolve().parents[2]


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


def _read_log(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


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
        return _read_log(self.log_path)

    async def start(self, timeout_s: float = 60.0) -> float:
        """Spawn and wait until ``ready_path`` answers 200; return seconds taken.
        :class:`~tests.support.ready.NotReady` if the child exits first or is late
        (the child is left for :func:`child` to kill)."""
        assert self.proc is None or self.proc.returncode is not None, "already running"
        with self._open_log() as log:
            self.proc = await trio.lowlevel.open_process(
                [sys.executable, "-m", "telemetry.cli", self.command], env=self.env,
                cwd=str(ROOT), stdin=None, stdout=log, stderr=log)
        self.started_at = time.monotonic()
        await wait_ready(self.url + self.ready_path, timeout_s=timeout_s,
                         exited=self.proc.poll, log=self.log_text)
        return time.monotonic() - self.started_at

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


@dataclass
class ServiceProcess:
    """``telemetry serve`` with CORS as a child process, restartable on one port and data
    directory (the browser restart test's subject). It runs
    ``python -m tests.support.service serve``."""

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
        """Spawn and wait for ``/v1/readyz``; :class:`~tests.support.ready.NotReady`
        with the log if it exits first (then :attr:`proc` is None) or is late."""
        assert self.proc is None, "already running"
        env = self.environ()
        self.starts += 1
        with self.log_path.open("ab") as log:
            log.write(f"--- start {self.starts} ---\n".encode())
            log.flush()
            self.proc = await trio.lowlevel.open_process(
                [sys.executable, "-m", "tests.support.service", "serve"], cwd=ROOT, env=env,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        try:
            await wait_ready(self.url + "/v1/readyz", timeout_s=timeout,
                             exited=self.proc.poll, log=self.log_tail)
        except NotReady:
            if self.proc.poll() is not None:
                self.proc = None
            raise

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
        return _read_log(self.log_path)[-n:] or "(no log)"


@asynccontextmanager
async def running_process(argv: Sequence[str], *, ready_url: str, timeout_s: float = 10,
                          any_answer: bool = False) -> AsyncIterator[list[str]]:
    """Run ``argv`` in the foreground, its stdout and stderr read line by line; wait
    until ``ready_url`` answers (see :func:`~tests.support.ready.wait_ready`), then
    yield the list of lines read so far (it grows while the block runs). On the way
    out: SIGTERM and wait, SIGKILL if anything went wrong before."""
    lines: list[str] = []
    proc = await trio.lowlevel.open_process(list(argv), stdout=subprocess.PIPE,
                                            stderr=subprocess.STDOUT)
    assert proc.stdout is not None

    async def read() -> None:
        buf = b""
        async for chunk in proc.stdout:  # type: ignore[union-attr]
            buf += chunk
            *done, buf = buf.split(b"\n")
            lines.extend(x.decode("utf-8", "replace") for x in done)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            await wait_ready(ready_url, timeout_s=timeout_s, exited=proc.poll,
                             log=lambda: "\n".join(lines), any_answer=any_answer)
            try:
                yield lines
            finally:
                proc.terminate()
                await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
