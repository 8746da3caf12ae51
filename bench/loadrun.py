"""One run of ``bench/load.py``: a target, its load generators, and the records.

:func:`run` starts the target (``bench/loadproc.py``), primes it, starts the load
generators (``bench/loadgen.py``) with a common start time, samples the server,
the generators and the machine every ``SAMPLE_S`` while they run, and returns a
:class:`Result`: every request's record plus the samples, with the figures
computed over the run's measurement window.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.loadproc import (
    READY_TIMEOUT_S,
    ROOT,
    Sample,
    Target,
    cpu_pressure_s,
    journal_cluster,
    kill,
    line_ready,
    machine_busy_s,
    niced,
    read_line,
    sample,
    sample_sum,
    snapshot,
    wait_quiet,
)
from bench.loadreport import label, one_line

SAMPLE_S = 0.25
NATS_IDLE_S = 3.0  # how long the NATS servers' idle CPU is measured before the load
KIND_BATCH, KIND_END, KIND_CONNECT = 0, 1, 2  # as in bench/loadgen.py


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
    transport: str = "http"  # "http" | "ws"
    window_k: int = 1  # ws: batches in flight per session
    journal: str = "spool"  # the service's: "spool" | "jetstream" (see journal_cluster)
    # Processes of the target, each on its own port with its own sessions, as behind a
    # router with session affinity (docs/affinity.md); the figures sum them.
    processes: int = 1

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

    @property
    def transport(self) -> str:
        return self.spec.transport

    def handshake_ms(self, q: float | str) -> float:
        """WebSocket handshakes (request sent to ``101`` read), all of the run's."""
        x = self.lat[(self.kind == KIND_CONNECT)]
        if not len(x):
            return float("nan")
        return float(x.max() if q == "max" else np.percentile(x, float(q))) * 1000

    @property
    def handshakes(self) -> int:
        return int((self.kind == KIND_CONNECT).sum())

    def batches_in_window(self) -> np.ndarray:
        """Batch requests sent in the window (paced: *due* in it, so a late generator
        does not move batches into it)."""
        a, b = self._win()
        t = self.t - self.lag if self.spec.mode == "paced" else self.t
        return (self.kind == KIND_BATCH) & (t >= a) & (t < b)

    @property
    def acked_per_s(self) -> float:
        a, b = self._win()
        m = self.batches_in_window() & (self.status == 202)
        if self.spec.mode == "closed":
            # Requests answered inside the window, whatever it took.
            done = self.t + self.lat
            m = (self.kind == KIND_BATCH) & (self.status == 202) & (done >= a) & (done < b)
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
        return int(((self.kind == KIND_BATCH) & (self.status != 202)).sum()) + unsent

    @property
    def end_lat(self) -> np.ndarray:
        return self.lat[(self.kind == KIND_END) & (self.status == 200)]

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
    def nats_cpu(self) -> float:
        """The NATS servers' CPU over the window, all nodes summed (% of one core);
        NaN without a JetStream journal."""
        samples = self.extra.get("nats") or []
        return self.cpu_pct(samples) if samples else float("nan")

    @property
    def nats_idle_cpu(self) -> float:
        """The NATS servers' CPU with the service connected and no load (% of one
        core, measured for ``NATS_IDLE_S`` before the load starts)."""
        return float(self.extra.get("nats_idle_pct", float("nan")))

    @property
    def gen_cpu(self) -> float:
        return sum(self.cpu_pct(g) for g in self.gens)

    @property
    def others_cpu(self) -> float:
        """What everything else on the machine used over the window (% of one core)."""
        nats = self.nats_cpu
        return (self.cpu_pct(self.machine) - self.server_cpu - self.gen_cpu
                - (0.0 if np.isnan(nats) else nats))

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
    procs = [Target(target_name, keys=keys, extra_env=env, log_dir=log_dir,
                     pin=0 if a.pin else None, nice=a.nice) for _ in range(spec.processes)]
    target = procs[0]
    gens: list[subprocess.Popen[str]] = []
    outs: list[Path] = []
    prof: subprocess.Popen[bytes] | None = None
    prof_path: Path | None = None
    run_id = secrets.token_hex(4)
    settled = wait_quiet(a.wait_quiet, a.quiet_pct) if a.wait_quiet > 0 else float("nan")
    cluster_exit = contextlib.ExitStack()
    nats_pids: list[int] = []
    try:
        if target_name == "service" and spec.journal == "jetstream":
            cluster = cluster_exit.enter_context(journal_cluster(a.nice))
            nats_pids = cluster.pids
            for t in procs:
                t.extra_env = {**env, **cluster.env}
        for t in procs:
            t.start()
        pids = [t.pid for t in procs]
        # At least one generator per process, and as many for each: generator j drives
        # process j % P, so a session's requests all reach one process.
        n_gen = max(1, min(-(-a.generators // len(procs)) * len(procs), spec.sessions))
        bounds = np.linspace(0, spec.sessions, n_gen + 1).astype(int)
        gen_env = {k: v for k, v in os.environ.items() if not k.startswith("TELEMETRY_")}
        gen_env["TELEMETRY_JWT_KEYS"] = keys
        for j in range(n_gen):
            out = target.dir.parent / f"bench-gen-{run_id}-{j}.npz"
            outs.append(out)
            port = procs[j % len(procs)].port
            cmd = [sys.executable, "-m", "bench.loadgen", "--port", str(port),
                   "--mode", spec.mode, "--run-id", run_id,
                   "--index-from", str(bounds[j]), "--index-to", str(bounds[j + 1]),
                   "--total", str(spec.sessions), "--ramp", str(spec.ramp),
                   "--seconds", str(spec.seconds), "--end-spread", str(spec.end_spread),
                   "--duration", str(spec.duration), "--batches", str(spec.batches),
                   "--timeout", str(a.timeout), "--out", str(out),
                   "--transport", spec.transport, "--window", str(spec.window_k)]
            if spec.end:
                cmd.append("--end")
            if spec.pause_before_end:
                cmd += ["--pause-before-end", str(spec.pause_before_end)]
            if target_name == "service":
                cmd.append("--check-summary")
            if j < len(procs):  # one priming session per process
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
        idle = sample_sum(pids)
        idle_each = [sample(pid) for pid in pids]
        nats_idle = float("nan")
        if nats_pids:  # what the cluster costs with nothing to do (raft heartbeats)
            n0 = sample_sum(nats_pids)
            time.sleep(NATS_IDLE_S)
            n1 = sample_sum(nats_pids)
            nats_idle = 100 * (n1.cpu_s - n0.cpu_s) / (n1.t - n0.t)
        go = time.time() + 1.0
        for g in gens:
            assert g.stdin is not None
            g.stdin.write(f"go {go}\n")
            g.stdin.flush()
        server: list[Sample] = [idle]
        nats: list[Sample] = []
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
                held = snapshot(procs, keys)
            if spec.pause_before_end:
                streamed += sum(1 for g in gens if line_ready(g) == "streamed")
            if now > deadline:
                raise RuntimeError("load generators overran their time limit")
            if profile_dir is not None and prof is None and now >= go + win_a:
                prof_path = profile_dir / (f"{target_name}-{spec.transport}-{spec.mode}-"
                                           f"{spec.sessions}.txt")
                prof = subprocess.Popen(
                    [str(Path(sys.executable).parent / "py-spy"), "record", "--pid",
                     str(target.pid), "--duration", str(max(1, int(win_b - win_a))),
                     "--rate", "200", "--format", "raw", "--nolineno", "--threads",
                     "--nonblocking", "-o", str(prof_path)],
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE)
            s = sample_sum(pids)
            if s.cpu_s:
                server.append(s)
            if nats_pids:
                nats.append(sample_sum(nats_pids))
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
        # CPU each process used since it went idle: how the load was shared.
        process_cpu_s = [e.cpu_s - i.cpu_s if e is not None and i is not None else float("nan")
                         for i, e in zip(idle_each, (sample(pid) for pid in pids), strict=True)]
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
            log_lines=sum(t.log_lines() for t in procs), machine=machine, psi=psi,
            quiet_before_pct=settled,
            profile=profile,
            extra={"blob_bytes": sum(sum(m.get("blob_sizes", [])) for m in metas),
                   "held": held, "nats": nats, "nats_idle_pct": nats_idle,
                   "process_cpu_s": process_cpu_s},
        )
        if not quiet:
            print(f"  {label(res):<20} {one_line(res)}", flush=True)
        return res
    finally:
        if prof is not None and prof.poll() is None:
            prof.kill()
            prof.wait(10)
        for g in gens:
            kill(g, 2.0)
            for pipe in (g.stdin, g.stdout):
                if pipe is not None:
                    pipe.close()
        try:
            for t in procs:
                t.stop()
        finally:
            cluster_exit.close()
        for o in outs:
            o.unlink(missing_ok=True)

