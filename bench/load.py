"""Load benchmark: the real service against the bare framework, over loopback.

Run from the repository root (a default run takes five to ten minutes)::

    .venv/bin/python -m bench.load --nice -10            # max + paced + long + sweep
    .venv/bin/python -m bench.load --only max,paced      # a subset
    .venv/bin/python -m bench.load --only paced --sessions 1500 --seconds 1800  # soak
    .venv/bin/python -m bench.load --only long --s3      # finalisation to moto S3
    .venv/bin/python -m bench.load --only paced --profile /tmp/prof   # py-spy too

Every target runs as its own subprocess on 127.0.0.1 with a fresh temporary data
directory, and is driven by load-generator subprocesses (``bench/loadgen.py``:
Trio and raw HTTP/1.1 keep-alive sockets, one connection per session):

* ``service``: ``telemetry serve`` with ``TELEMETRY_SINK=none`` (no Postgres; the
  in-process bus behind the durable outbox), the durable spool on, session limits
  out of the way, a throw-away HMAC key, logs at WARNING;
* ``bare``: ``bench/bare_app.py``, a quart-trio app on hypercorn that reads the
  same POST and answers 202, and nothing else: the yardstick;
* ``raw`` (max section only): the same answer from a raw ASGI callable on
  hypercorn's trio worker: the floor of the server itself.

Sections (``--only``):

* ``max``: closed loop, ``--connections`` sessions each sending its next batch as
  soon as the last is answered; acknowledged batches per second after a warm-up.
  The service's rate limit is lifted for this section only (it would refuse a
  session sending faster than 5 batches a second).
* ``paced``: ``--sessions`` patients at real pace, one batch a second each; starts
  spread over ``--ramp`` s, all live for ``--seconds`` s (the measurement window,
  less its first second), ends spread over ``--end-spread`` s. Finalisation
  latency is the end call's latency: the service answers it only once the replay
  blob is stored and verified and the summary event is in the durable outbox
  (the load generator checks ``published`` and ``blob.key`` in every answer).
* ``long``: ``--long-sessions`` sessions stream ``--long-batches`` batches each
  (1,800 = a 30-minute session) as fast as they are acknowledged, then end: memory
  held per long session and finalisation of long sessions without waiting 30 min.
* ``sweep``: paced runs over ``--sweep`` values of N (shorter windows), for each
  target, stopping at the first N that fails; a pass is p99 ack latency under
  ``--p99-ms`` and no error at all (every batch 202, every end 200 and durable).

Measured, per target: acknowledged batches/s; ack latency p50/p99/max (request
sent to full answer read, at the generator); send lag (how late the generator
sent against schedule: if it grows, the generator or the server's accept loop is
behind, and latency from the schedule would be that much worse); errors by status
and error code; the server's CPU (utime+stime from ``/proc/PID/stat``, all
threads, % of one core over the window) and RSS (``VmRSS``, ``/proc/PID/status``);
RSS per live session = (RSS at the end of the window - RSS idle, after a priming
session) / N; the RSS slope over the window (per session per minute: it should be
0 for memory flat over a session); each generator's CPU the same way.

The machine is measured too, because other people's work may share it: the CPU
that every other process used over the window (``/proc/stat`` busy time less the
server's and the generators') and the CPU pressure (``/proc/pressure/cpu``, the
share of the window in which some runnable task waited for a CPU). Before each run
the benchmark waits up to ``--wait-quiet`` s for the machine to settle. ``--nice
-10`` (root) gives the targets and generators a higher priority, together with
their scheduler autogroup (each child runs in its own session); without it, on a
busy shared machine, the figures measure the other work as much as the service.
"""

from __future__ import annotations

import argparse
import collections
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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CLK_TCK = os.sysconf("SC_CLK_TCK")
SAMPLE_S = 0.25
PAUSE_BEFORE_END_S = 2.0
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


def snapshot(target: Target, keys: str) -> dict[str, Any]:
    """RSS, and the replay bytes the live sessions hold by the service's own count."""
    rss = sample(target.pid)
    live = admin_sessions(target.port, keys)
    held = [int(x.get("bytes_held") or 0) for x in live]
    return {"rss_kb": rss.rss_kb if rss else 0, "live": len(live),
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


# -- one run ------------------------------------------------------------------------------


@dataclass
class RunSpec:
    mode: str  # "paced" | "closed"
    sessions: int
    ramp: float = 0.0
    seconds: float = 0.0
    end_spread: float = 0.0
    duration: float = 0.0
    warmup: float = 0.0
    batches: int = 10**9
    end: bool = False
    pause_before_end: float = 0.0

    @property
    def window(self) -> tuple[float, float]:
        """Seconds after the start over which rates and latencies are taken."""
        if self.mode == "paced":
            return self.ramp + 1.0, self.ramp + self.seconds
        return self.warmup, self.duration


@dataclass
class Result:
    target: str
    spec: RunSpec
    t: np.ndarray
    lat: np.ndarray
    lag: np.ndarray
    status: np.ndarray
    kind: np.ndarray
    codes: dict[str, int]
    end_checks: dict[str, int]
    server: list[Sample]
    gens: list[list[Sample]]
    go: float
    idle_rss_kb: int
    gen_self_cpu_s: float
    log_lines: int
    machine: list[Sample]
    psi: list[Sample]
    quiet_before_pct: float
    profile: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    # window helpers
    def _win(self) -> tuple[float, float]:
        return self.spec.window

    def batches_in_window(self) -> np.ndarray:
        """Batch requests sent in the window (paced: *due* in it, so a late generator
        does not move batches into it)."""
        a, b = self._win()
        t = self.t - self.lag if self.spec.mode == "paced" else self.t
        return (self.kind == 0) & (t >= a) & (t < b)

    @property
    def acked_per_s(self) -> float:
        a, b = self._win()
        m = self.batches_in_window() & (self.status == 202)
        if self.spec.mode == "closed":
            # Requests answered inside the window, whatever it took.
            done = self.t + self.lat
            m = (self.kind == 0) & (self.status == 202) & (done >= a) & (done < b)
        return float(m.sum()) / (b - a)

    def lat_ms(self, q: float | str) -> float:
        m = self.batches_in_window() & (self.status == 202)
        x = self.lat[m]
        if not len(x):
            return float("nan")
        return float(x.max() if q == "max" else np.percentile(x, float(q))) * 1000

    def lag_ms(self, q: float) -> float:
        m = self.batches_in_window()
        x = self.lag[m]
        return float(np.percentile(x, q)) * 1000 if len(x) else float("nan")

    @property
    def batch_errors(self) -> int:
        """Batch requests not answered 202, and batches the generator never got to send
        because the session was a whole session behind (see ``bench/loadgen.py``)."""
        unsent = sum(v for k, v in self.codes.items() if k.startswith(("not sent",
                                                                       "transport: run")))
        return int(((self.kind == 0) & (self.status != 202)).sum()) + unsent

    @property
    def end_lat(self) -> np.ndarray:
        return self.lat[(self.kind == 1) & (self.status == 200)]

    def end_ms(self, q: float | str) -> float:
        x = self.end_lat
        if not len(x):
            return float("nan")
        return float(x.max() if q == "max" else np.percentile(x, float(q))) * 1000

    @property
    def end_errors(self) -> int:
        bad = self.end_checks.get("end_failed", 0) + self.end_checks.get("not_durable", 0)
        return bad + self.end_checks.get("bad_summary", 0)

    def _at(self, samples: list[Sample], rel: float) -> Sample | None:
        when = self.go + rel
        best = None
        for s in samples:
            if best is None or abs(s.t - when) < abs(best.t - when):
                best = s
        return best

    def cpu_pct(self, samples: list[Sample]) -> float:
        a, b = self._win()
        s0, s1 = self._at(samples, a), self._at(samples, b)
        if s0 is None or s1 is None or s1.t <= s0.t:
            return float("nan")
        return 100 * (s1.cpu_s - s0.cpu_s) / (s1.t - s0.t)

    @property
    def server_cpu(self) -> float:
        return self.cpu_pct(self.server)

    @property
    def gen_cpu(self) -> float:
        return sum(self.cpu_pct(g) for g in self.gens)

    @property
    def others_cpu(self) -> float:
        """What everything else on the machine used over the window (% of one core)."""
        return self.cpu_pct(self.machine) - self.server_cpu - self.gen_cpu

    @property
    def cpu_pressure(self) -> float:
        """% of the window during which some task on the machine waited for a CPU."""
        return self.cpu_pct(self.psi)

    @property
    def rss_live_kb(self) -> int:
        s = self._at(self.server, self._win()[1])
        return s.rss_kb if s else 0

    @property
    def rss_peak_kb(self) -> int:
        return max((s.rss_kb for s in self.server), default=0)

    @property
    def rss_per_session_kb(self) -> float:
        return (self.rss_live_kb - self.idle_rss_kb) / self.spec.sessions

    @property
    def rss_slope_kb_per_session_min(self) -> float:
        """RSS growth over the window's second half, per session per minute."""
        a, b = self._win()
        mid = (a + b) / 2
        s0, s1 = self._at(self.server, mid), self._at(self.server, b)
        if s0 is None or s1 is None or s1.t <= s0.t:
            return float("nan")
        return (s1.rss_kb - s0.rss_kb) / self.spec.sessions / ((s1.t - s0.t) / 60)

    def passes(self, p99_ms: float) -> bool:
        return (self.lat_ms(99) < p99_ms and self.batch_errors == 0 and self.end_errors == 0
                and not np.isnan(self.lat_ms(99)))


def run(target_name: str, spec: RunSpec, a: argparse.Namespace, *, log_dir: Path,
        extra_env: dict[str, str], quiet: bool = False,
        profile_dir: Path | None = None) -> Result:
    keys = json.dumps({"bench": secrets.token_hex(32)})
    env = dict(extra_env)
    if target_name == "service" and spec.mode == "closed":
        env["TELEMETRY_MAX_BATCHES_PER_S"] = "100000"
    env.update(dict(kv.split("=", 1) for kv in a.env))
    target = Target(target_name, keys=keys, extra_env=env, log_dir=log_dir,
                    pin=0 if a.pin else None, nice=a.nice)
    gens: list[subprocess.Popen[str]] = []
    outs: list[Path] = []
    prof: subprocess.Popen[bytes] | None = None
    prof_path: Path | None = None
    run_id = secrets.token_hex(4)
    settled = wait_quiet(a.wait_quiet, a.quiet_pct) if a.wait_quiet > 0 else float("nan")
    try:
        target.start()
        n_gen = max(1, min(a.generators, spec.sessions))
        bounds = np.linspace(0, spec.sessions, n_gen + 1).astype(int)
        gen_env = {k: v for k, v in os.environ.items() if not k.startswith("TELEMETRY_")}
        gen_env["TELEMETRY_JWT_KEYS"] = keys
        for j in range(n_gen):
            out = target.dir.parent / f"bench-gen-{run_id}-{j}.npz"
            outs.append(out)
            cmd = [sys.executable, "-m", "bench.loadgen", "--port", str(target.port),
                   "--mode", spec.mode, "--run-id", run_id,
                   "--index-from", str(bounds[j]), "--index-to", str(bounds[j + 1]),
                   "--total", str(spec.sessions), "--ramp", str(spec.ramp),
                   "--seconds", str(spec.seconds), "--end-spread", str(spec.end_spread),
                   "--duration", str(spec.duration), "--batches", str(spec.batches),
                   "--timeout", str(a.timeout), "--out", str(out)]
            if spec.end:
                cmd.append("--end")
            if spec.pause_before_end:
                cmd += ["--pause-before-end", str(spec.pause_before_end)]
            if target_name == "service":
                cmd.append("--check-summary")
            if j == 0:
                cmd.append("--prime")
            gens.append(subprocess.Popen(cmd, cwd=ROOT, env=gen_env, text=True,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         start_new_session=True,
                                         preexec_fn=niced(a.nice)))
            if a.pin:
                os.sched_setaffinity(gens[-1].pid, {1})
        for g in gens:
            line = read_line(g, READY_TIMEOUT_S)
            if line.strip() != "ready":
                raise RuntimeError(f"load generator said {line!r}")
        time.sleep(0.5)  # let the priming session's finalisation settle
        idle = sample(target.pid)
        assert idle is not None
        go = time.time() + 1.0
        for g in gens:
            assert g.stdin is not None
            g.stdin.write(f"go {go}\n")
            g.stdin.flush()
        server: list[Sample] = [idle]
        machine: list[Sample] = []
        psi: list[Sample] = []
        gen_samples: list[list[Sample]] = [[] for _ in gens]
        if spec.mode == "paced":
            expected = spec.ramp + spec.seconds + spec.end_spread
        else:
            expected = spec.duration
        deadline = go + expected + spec.pause_before_end + a.timeout * 5 + 60
        win_a, win_b = spec.window
        held: dict[str, Any] | None = None
        streamed = 0
        while any(g.poll() is None for g in gens):
            now = time.time()
            if target_name == "service" and held is None and (
                    (spec.mode == "paced" and now >= go + win_b)
                    or (spec.pause_before_end and streamed == len(gens))):
                held = snapshot(target, keys)
            if spec.pause_before_end:
                streamed += sum(1 for g in gens if line_ready(g) == "streamed")
            if now > deadline:
                raise RuntimeError("load generators overran their time limit")
            if profile_dir is not None and prof is None and now >= go + win_a:
                prof_path = profile_dir / f"{target_name}-{spec.mode}-{spec.sessions}.txt"
                prof = subprocess.Popen(
                    [str(Path(sys.executable).parent / "py-spy"), "record", "--pid",
                     str(target.pid), "--duration", str(max(1, int(win_b - win_a))),
                     "--rate", "200", "--format", "raw", "--nolineno", "--threads",
                     "--nonblocking", "-o", str(prof_path)],
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE)
            s = sample(target.pid)
            if s is not None:
                server.append(s)
            machine.append(Sample(time.time(), machine_busy_s()))
            psi.append(Sample(time.time(), cpu_pressure_s()))
            for lst, g in zip(gen_samples, gens, strict=True):
                gs = sample(g.pid)
                if gs is not None:
                    lst.append(gs)
            time.sleep(SAMPLE_S)
        for g in gens:
            if g.returncode != 0:
                raise RuntimeError(f"load generator exited with {g.returncode}")
        profile = None
        if prof is not None:
            prof.wait(60)
            if prof_path is not None and prof_path.exists():
                profile = {"path": str(prof_path), "seconds": max(1, int(win_b - win_a)),
                           "rate": 200}
            elif prof.stderr is not None:
                print(f"py-spy failed: {prof.stderr.read().decode(errors='replace')[-500:]}")
        parts = [np.load(o) for o in outs]
        metas = [json.loads(str(p["meta"])) for p in parts]
        codes: collections.Counter[str] = collections.Counter()
        checks: collections.Counter[str] = collections.Counter()
        for m in metas:
            codes.update(m["codes"])
            checks.update(m["end_checks"])
        res = Result(
            target=target_name, spec=spec,
            t=np.concatenate([p["t"] for p in parts]),
            lat=np.concatenate([p["lat"] for p in parts]),
            lag=np.concatenate([p["lag"] for p in parts]),
            status=np.concatenate([p["status"] for p in parts]),
            kind=np.concatenate([p["kind"] for p in parts]),
            codes=dict(codes), end_checks=dict(checks), server=server, gens=gen_samples,
            go=go, idle_rss_kb=idle.rss_kb,
            gen_self_cpu_s=sum(m["cpu_s"] for m in metas),
            log_lines=target.log_lines(), machine=machine, psi=psi, quiet_before_pct=settled,
            profile=profile,
            extra={"blob_bytes": sum(sum(m.get("blob_sizes", [])) for m in metas),
                   "held": held},
        )
        if not quiet:
            print(f"  {TARGET_LABEL[target_name]:<16} {one_line(res)}", flush=True)
        return res
    finally:
        if prof is not None and prof.poll() is None:
            prof.kill()
            prof.wait(10)
        for g in gens:
            kill(g, 2.0)
        target.stop()
        for o in outs:
            o.unlink(missing_ok=True)


# -- report -------------------------------------------------------------------------------


def fmt(x: float, spec: str = ".1f") -> str:
    return "-" if x is None or (isinstance(x, float) and np.isnan(x)) else format(x, spec)


def errors_text(r: Result) -> str:
    parts = [f"{k}: {v}" for k, v in sorted(r.codes.items())]
    if r.end_errors:
        parts.append(f"end: {r.end_errors} not durable/failed")
    return ", ".join(parts) or "none"


def one_line(r: Result) -> str:
    return (f"acked/s {r.acked_per_s:8.1f}  p50 {fmt(r.lat_ms(50))}  p99 {fmt(r.lat_ms(99))}  "
            f"max {fmt(r.lat_ms('max'))} ms  errors {r.batch_errors + r.end_errors}  "
            f"cpu {fmt(r.server_cpu, '.0f')}%  gen {fmt(r.gen_cpu, '.0f')}%  "
            f"others {fmt(r.others_cpu, '.0f')}%  psi {fmt(r.cpu_pressure, '.0f')}%")


def table(rows: Sequence[tuple[str, Sequence[str]]], heads: Sequence[str]) -> str:
    w0 = max(len(r[0]) for r in rows)
    widths = [max(len(h), *(len(r[1][i]) for r in rows)) for i, h in enumerate(heads)]
    out = ["  " + " " * w0 + "  " + "  ".join(h.rjust(w) for h, w in zip(heads, widths,
                                                                          strict=True))]
    for name, vals in rows:
        out.append("  " + name.ljust(w0) + "  " + "  ".join(
            v.rjust(w) for v, w in zip(vals, widths, strict=True)))
    return "\n".join(out)


def _held(r: Result, key: str) -> float:
    held = r.extra.get("held")
    return float(held[key]) if held else float("nan")


def ratio(a: float, b: float) -> str:
    if b == 0 or np.isnan(a) or np.isnan(b):
        return "-"
    return f"{a / b:.2f}"


def compare(results: list[Result], *, paced: bool) -> str:
    heads = [TARGET_LABEL[r.target] for r in results]
    svc = results[0]
    heads_r = [*heads, *(f"{svc.target}/{r.target}" for r in results[1:])]

    def row(name: str, f: Any, spec: str = ".1f", show_ratio: bool = True
            ) -> tuple[str, list[str]]:
        vals = [f(r) for r in results]
        rs = [ratio(f(svc), f(r)) if show_ratio else "" for r in results[1:]]
        return name, [fmt(v, spec) if isinstance(v, float) else str(v) for v in vals] + rs

    rows = [
        row("acknowledged batches/s", lambda r: r.acked_per_s),
        row("ack latency p50 ms", lambda r: r.lat_ms(50), ".2f"),
        row("ack latency p99 ms", lambda r: r.lat_ms(99), ".2f"),
        row("ack latency max ms", lambda r: r.lat_ms("max"), ".2f"),
        row("send lag p99 ms (generator)", lambda r: r.lag_ms(99), ".2f", False),
        row("errors (batches)", lambda r: r.batch_errors, "d", False),
        row("server CPU % of a core", lambda r: r.server_cpu, ".0f"),
        row("server CPU ms per ack", lambda r: r.server_cpu * 10 / r.acked_per_s
            if r.acked_per_s else float("nan"), ".3f"),
        row("server RSS idle MB", lambda r: r.idle_rss_kb / 1024),
        row("server RSS at window end MB", lambda r: r.rss_live_kb / 1024),
        row("server RSS peak MB", lambda r: r.rss_peak_kb / 1024),
        row("load generator CPU % of a core", lambda r: r.gen_cpu, ".0f", False),
        row("load generator CPU ms per request", lambda r: r.gen_cpu * 10 / r.acked_per_s
            if r.acked_per_s else float("nan"), ".3f", False),
        row("other processes CPU % of a core", lambda r: r.others_cpu, ".0f", False),
        row("CPU pressure % (PSI some)", lambda r: r.cpu_pressure, ".0f", False),
    ]
    if paced:
        rows[9:9] = [
            row("RSS per live session KB", lambda r: r.rss_per_session_kb),
            row("RSS slope KB/session/min", lambda r: r.rss_slope_kb_per_session_min),
            row("live sessions at window end (admin)", lambda r: _held(r, "live"), ".0f",
                False),
            row("replay KB held per session (admin)",
                lambda r: _held(r, "bytes_held_mean") / 1024, ".1f", False),
        ]
    if any(r.spec.end for r in results) or paced:
        rows += [
            row("finalisation p50 ms", lambda r: r.end_ms(50), ".1f"),
            row("finalisation p99 ms", lambda r: r.end_ms(99), ".1f"),
            row("finalisation max ms", lambda r: r.end_ms("max"), ".1f"),
            row("sessions ended (durable)", lambda r: len(r.end_lat) - r.end_errors, "d",
                False),
        ]
    out = [table(rows, heads_r)]
    for r in results:
        out.append(f"  errors, {TARGET_LABEL[r.target]}: {errors_text(r)}; "
                   f"server log lines (WARNING+): {r.log_lines}")
    return "\n".join(out)


# Each event-loop sample counts for the first component of this list that has a
# frame anywhere on its stack (markers are substrings of py-spy's "function (file)"
# frames). So a component's share includes the numpy, trio and socket work it
# causes: the rep engine's numpy calls count as rep engine, the trio checkpoints of
# quart's body reading as quart, hypercorn's own task spawning as hypercorn.
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("actor: replay encode (q16delta + zlib)", ("ReplayWriter.", "ChunkCodec.",
                                                "(storage/replay_codec.py)")),
    ("actor: rep engine", ("RepEngine.", "(actors/reps/")),
    ("actor: pose stats", ("PoseStats.", "(actors/pose_stats.py)")),
    ("handler: JWT verification", ("verify_session", "(jwt/", "(telemetry/auth.py)")),
    ("handler: decode + validate batch", ("(telemetry/wire.py)",)),
    ("handler: spool append (await)", ("Supervisor.submit", "Spool.append",
                                        "SessionActor.persist")),
    ("handler: metrics, request id, access log", (
        "begin_request", "finish_request", "end_request", "observe (telemetry/app.py)",
        "(prometheus_client/", "(telemetry/logs.py)", "(telemetry/metrics.py)", "(logging/")),
    ("handler: jsonify (response body)", ("jsonify",)),
    ("actor: bookkeeping (check/accept, mailbox, sequencer)", (
        "SessionActor.", "Supervisor.", "(actors/sequencer.py)")),
    ("finalisation", ("(actors/finalise.py)", "(actors/summary.py)")),
    ("handler: rest of the endpoint code", ("(telemetry/app.py)", "pose_frames",
                                             "(telemetry/errors.py)")),
    ("quart-trio request/response machinery", ("(quart/", "(quart_trio/", "(werkzeug/")),
    ("ASGI wrappers (CORS, connection close)", ("(telemetry/cors.py)",
                                                "(telemetry/connection_close.py)")),
    ("hypercorn + h11 (HTTP/1.1)", ("(hypercorn/", "(h11/")),
    ("spool committer (loop side)", ("Spool.", "(storage/spool.py)")),
    ("trio scheduler, sockets, epoll", ("(trio/", "(outcome/")),
)


def categorise(frames: Sequence[str]) -> str:
    for name, markers in CATEGORIES:
        if any(m in f for f in frames for m in markers):
            return name
    return "other"


ROOT_FRAMES = frozenset({"_run_module_as_main", "_run_code", "<module>", "main", "run",
                         "unrolled_run"})


def summarise_profile(path: Path, seconds: int, rate: int, top: int) -> str:
    """The event-loop thread's samples by category and by function (py-spy raw)."""
    main = 0
    others: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    self_: collections.Counter[str] = collections.Counter()
    cats: collections.Counter[str] = collections.Counter()
    for line in path.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        count = int(n)
        frames = stack.split(";")
        thread = frames[0]
        frames = frames[1:]
        if not thread.endswith("MainThread"):
            # Worker threads: the spool's writes and fsyncs (GIL released, mostly
            # waiting on the disk: py-spy counts a thread in a syscall as active).
            leaf = frames[-1] if frames else "?"
            owner = next((f for f in frames if "Spool." in f), leaf)
            others[owner.split(" (")[0]] += count
            continue
        main += count
        for f in set(frames):
            incl[f] += count
        if frames:
            self_[frames[-1]] += count
        cats[categorise(frames)] += count
    possible = seconds * rate
    if not main:
        return "  (no samples)"
    out = [f"  event-loop thread busy in {main} of {possible} samples "
           f"({100 * main / possible:.0f}% of the window); shares below are of its busy "
           "samples"]
    out.append("  by component (each sample counts once, for the first component of "
               "bench.load.CATEGORIES on its stack):")
    for name, v in cats.most_common():
        out.append(f"    {100 * v / main:5.1f}%  {name}")
    out.append("  inclusive (function in the stack; the entry-point frames omitted):")
    shown = 0
    for f, v in incl.most_common():
        if f.split(" (")[0] in ROOT_FRAMES:
            continue
        out.append(f"    {100 * v / main:5.1f}%  {f}")
        shown += 1
        if shown >= top:
            break
    out.append("  self (function on top of the stack):")
    for f, v in self_.most_common(top):
        out.append(f"    {100 * v / main:5.1f}%  {f}")
    if others:
        out.append("  worker threads (samples as % of the window; mostly blocked in write/fsync):")
        for f, v in others.most_common(5):
            out.append(f"    {100 * v / possible:5.1f}%  {f}")
    return "\n".join(out)


# -- sections -----------------------------------------------------------------------------


def section_max(a: argparse.Namespace, log_dir: Path, env: dict[str, str]) -> None:
    print(f"\n== max: closed loop, {a.connections} connections (one session each), "
          f"{a.max_seconds:g} s after {a.warmup:g} s warm-up ==", flush=True)
    spec = RunSpec("closed", a.connections, duration=a.warmup + a.max_seconds,
                   warmup=a.warmup)
    results = [run(t, spec, a, log_dir=log_dir, extra_env=env, profile_dir=a.profile)
               for t in targets(a, "service", "bare", "raw")]
    print(compare(results, paced=False))
    for r in results:
        print_profile(r, a.profile_top, brief=r.target != "service")
    by = {r.target: r.acked_per_s for r in results}
    if by.get("service") and by.get("bare"):
        print(f"  => service throughput is {100 * by['service'] / by['bare']:.0f}% of bare "
              "quart-trio (target >= 85%)", flush=True)
    if by.get("bare") and by.get("raw"):
        print(f"  => bare quart-trio throughput is {100 * by['bare'] / by['raw']:.0f}% of raw "
              "ASGI", flush=True)


def targets(a: argparse.Namespace, *allowed: str) -> list[str]:
    """The targets asked for (``--targets``) that this section runs, service first."""
    asked = {t.strip() for t in a.targets.split(",")}
    return [t for t in allowed if t in asked]


def section_paced(a: argparse.Namespace, log_dir: Path, env: dict[str, str],
                  profile_dir: Path | None) -> None:
    print(f"\n== paced: {a.sessions} sessions x 1 batch/s at real pace; starts over "
          f"{a.ramp:g} s, all live {a.seconds:g} s (window: its last {a.seconds - 1:g} s), "
          f"ends over {a.end_spread:g} s ==", flush=True)
    spec = RunSpec("paced", a.sessions, ramp=a.ramp, seconds=a.seconds,
                   end_spread=a.end_spread)
    results = [run(t, spec, a, log_dir=log_dir, extra_env=env,
                   profile_dir=profile_dir if t == "service" else None)
               for t in targets(a, "service", "bare")]
    print(compare(results, paced=True), flush=True)
    print_profile(results[0], a.profile_top)


def print_profile(r: Result, top: int, brief: bool = False) -> None:
    if r.profile:
        p = r.profile
        print(f"\n  -- py-spy profile of {TARGET_LABEL[r.target]} over the window "
              f"({p['path']}) --")
        text = summarise_profile(Path(p["path"]), p["seconds"], p["rate"], top)
        if brief:
            text = text.split("\n  inclusive")[0]
        print(text, flush=True)


def section_long(a: argparse.Namespace, log_dir: Path, env: dict[str, str]) -> None:
    where = "moto S3 on loopback" if a.s3 else "filesystem blob store"
    print(f"\n== long: {a.long_sessions} sessions x {a.long_batches} batches "
          f"({a.long_batches / 60:g} min of frames each) streamed closed-loop, then ended; "
          f"blobs to the {where} ==", flush=True)
    # A time bound only: streaming stops at the batch count, long before it.
    bound = max(60.0, a.long_sessions * a.long_batches / 100)
    spec = RunSpec("closed", a.long_sessions, duration=bound, warmup=0.0,
                   batches=a.long_batches, end=True, pause_before_end=PAUSE_BEFORE_END_S)
    with contextlib.ExitStack() as stack:
        extra = dict(env)
        if a.s3:
            extra.update(stack.enter_context(moto_s3(log_dir, a.nice)))
        r = run("service", spec, a, log_dir=log_dir, extra_env=extra, quiet=True)
    acked = int(((r.kind == 0) & (r.status == 202)).sum())
    stream_s = float((r.t + r.lat)[r.kind == 0].max()) if acked else float("nan")
    # Taken once every session had streamed, before any end call (see loadgen's
    # --pause-before-end): what a long session holds.
    held = r.extra.get("held") or {}
    rss_per = (held.get("rss_kb", 0) - r.idle_rss_kb) / a.long_sessions if held else np.nan
    print(table([
        ("batches acknowledged", [f"{acked}"]),
        ("streaming took s", [fmt(stream_s)]),
        ("errors", [f"{r.batch_errors + r.end_errors} ({errors_text(r)})"]),
        ("RSS idle MB", [fmt(r.idle_rss_kb / 1024)]),
        ("RSS per session, all streamed KB", [fmt(rss_per)]),
        ("replay KB held per session (admin)",
         [fmt(held.get("bytes_held_mean", np.nan) / 1024)]),
        ("RSS peak MB (finalisation included)", [fmt(r.rss_peak_kb / 1024)]),
        ("replay blob per session KB", [fmt(r.extra["blob_bytes"] / 1024 / a.long_sessions)]),
        ("finalisation p50 ms", [fmt(r.end_ms(50))]),
        ("finalisation p99 ms", [fmt(r.end_ms(99))]),
        ("finalisation max ms", [fmt(r.end_ms("max"))]),
        ("sessions ended (durable)", [f"{len(r.end_lat) - r.end_errors}"]),
    ], ["service"]), flush=True)


def section_sweep(a: argparse.Namespace, log_dir: Path, env: dict[str, str]) -> None:
    ns = sorted(int(x) for x in a.sweep.split(","))
    print(f"\n== sweep: paced, N in {ns}; {a.sweep_seconds:g} s all live; pass = p99 ack "
          f"< {a.p99_ms:g} ms and no error; each target stops at its first failure ==",
          flush=True)
    spec0 = RunSpec("paced", 0, ramp=a.sweep_ramp, seconds=a.sweep_seconds,
                    end_spread=a.sweep_ramp)
    best: dict[str, int] = {}
    rows = []
    for target in targets(a, "service", "bare"):
        for n in ns:
            spec = RunSpec("paced", n, ramp=spec0.ramp, seconds=spec0.seconds,
                           end_spread=spec0.end_spread)
            r = run(target, spec, a, log_dir=log_dir, extra_env=env, quiet=True)
            ok = r.passes(a.p99_ms)
            rows.append((f"{TARGET_LABEL[target]} N={n}", [
                fmt(r.acked_per_s), fmt(r.lat_ms(50), ".2f"), fmt(r.lat_ms(99), ".2f"),
                fmt(r.lat_ms("max"), ".1f"), f"{r.batch_errors + r.end_errors}",
                fmt(r.server_cpu, ".0f"), fmt(r.rss_per_session_kb), fmt(r.end_ms(99), ".0f"),
                fmt(r.gen_cpu, ".0f"), "pass" if ok else "FAIL"]))
            print(f"  {TARGET_LABEL[target]:<16} N={n:<5} {one_line(r)}  "
                  f"{'pass' if ok else 'FAIL'}", flush=True)
            if ok:
                best[target] = n
            else:
                break
    print(table(rows, ["acked/s", "p50 ms", "p99 ms", "max ms", "errors", "cpu %",
                       "KB/sess", "final p99", "gen cpu %", ""]))
    s, b = best.get("service", 0), best.get("bare", 0)
    print(f"  => largest N passing (of those tried): service {s}, bare quart-trio {b}"
          f"{f' (service/bare {s / b:.2f})' if b else ''}; target >= 1500 for the service",
          flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="max,paced,long,sweep",
                   help="comma-separated sections: max, paced, long, sweep")
    p.add_argument("--targets", default="service,bare,raw",
                   help="which of service, bare, raw to run (raw: max section only)")
    p.add_argument("--generators", type=int, default=1, help="load generator processes")
    p.add_argument("--timeout", type=float, default=30.0, help="per request, seconds")
    p.add_argument("--pin", action="store_true",
                   help="pin the server to CPU 0 and the generators to CPU 1")
    p.add_argument("--wait-quiet", type=float, default=30.0, metavar="S",
                   help="before each run, wait up to S s for other load to drop (0: don't)")
    p.add_argument("--quiet-pct", type=float, default=15.0,
                   help="'quiet' = the whole machine busy below this %% of one core")
    p.add_argument("--nice", type=int, default=0,
                   help="niceness of the targets and generators (negative needs root): "
                        "keeps other work on a shared machine from skewing the figures")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="extra environment for the targets (e.g. TELEMETRY_SPOOL=off)")
    g = p.add_argument_group("max")
    g.add_argument("--connections", type=int, default=64)
    g.add_argument("--warmup", type=float, default=3.0)
    g.add_argument("--max-seconds", type=float, default=10.0)
    g = p.add_argument_group("paced")
    g.add_argument("--sessions", type=int, default=1500)
    g.add_argument("--ramp", type=float, default=5.0)
    g.add_argument("--seconds", type=float, default=15.0)
    g.add_argument("--end-spread", type=float, default=5.0)
    g.add_argument("--profile", type=Path, default=None, metavar="DIR",
                   help="py-spy record the service over the max and paced windows into DIR")
    g.add_argument("--profile-top", type=int, default=15)
    g = p.add_argument_group("long")
    g.add_argument("--long-sessions", type=int, default=4)
    g.add_argument("--long-batches", type=int, default=1800)
    g.add_argument("--s3", action="store_true", help="blobs to a local moto S3 server")
    g = p.add_argument_group("sweep")
    g.add_argument("--sweep", default="100,200,300,500,750,1000,1500,2000")
    g.add_argument("--sweep-seconds", type=float, default=8.0)
    g.add_argument("--sweep-ramp", type=float, default=2.0)
    g.add_argument("--p99-ms", type=float, default=50.0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.nice < 0 and os.geteuid() != 0:
        print(f"--nice {a.nice} needs root; running at nice 0")
        a.nice = 0
    sections = [s.strip() for s in a.only.split(",") if s.strip()]
    unknown = set(sections) - {"max", "paced", "long", "sweep"}
    if unknown:
        raise SystemExit(f"unknown sections: {sorted(unknown)}")
    log_dir = Path(tempfile.mkdtemp(prefix="bench-logs-"))
    if a.profile is not None:
        a.profile.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    print(f"bench.load: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, "
          f"sections {','.join(sections)}; nice {a.nice}; "
          f"{'server on CPU 0, generators on CPU 1; ' if a.pin else ''}"
          f"server logs in {log_dir}", flush=True)
    env: dict[str, str] = {}
    if "max" in sections:
        section_max(a, log_dir, env)
    if "paced" in sections:
        section_paced(a, log_dir, env, a.profile)
    if "long" in sections:
        section_long(a, log_dir, env)
    if "sweep" in sections:
        section_sweep(a, log_dir, env)
    print(f"\nbench.load took {time.monotonic() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
