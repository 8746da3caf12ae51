"""Load benchmark: the real service against the bare framework, over loopback.

Run from the repository root (a default run takes about ten minutes)::

    .venv/bin/python -m bench.load --nice -10            # max + paced + long + sweep
    .venv/bin/python -m bench.load --only max,paced      # a subset
    .venv/bin/python -m bench.load --transports ws       # the WebSocket transport only
    .venv/bin/python -m bench.load --only paced --sessions 1500 --seconds 1800  # soak
    .venv/bin/python -m bench.load --only long --s3      # finalisation to moto S3
    .venv/bin/python -m bench.load --only paced --profile DIR   # py-spy too
    .venv/bin/python -m bench.load --only max --processes 2     # two processes per target

Every target runs as its own subprocess on 127.0.0.1 with a fresh temporary data
directory (``bench/loadproc.py``), and is driven by load-generator subprocesses
(``bench/loadgen.py``: Trio sockets, one connection per session):

* ``service``: ``telemetry serve`` with ``TELEMETRY_SINK=none`` (no Postgres; the
  in-process bus behind the durable outbox), the durable spool on, session limits
  out of the way, a throw-away HMAC key, logs at WARNING;
* ``bare``: ``bench/bare_app.py``, a quart-trio app on hypercorn that reads the
  same POST (or WebSocket message) and answers 202, and nothing else: the
  yardstick;
* ``raw`` (max section only): the same answers from a raw ASGI callable on
  hypercorn's trio worker: the floor of the server itself.

``--processes P`` runs P processes of each target (max, paced, sweep and journal
sections), each on its own port and driven by its own load generators, as a router
with session affinity would drive them (``docs/affinity.md``); CPU and RSS are their
sums. It measures what a host with several cores gains from one process per core.

Transports (``--transports``, default both; every section runs each, and the
tables put them side by side, the service as a ratio of the yardsticks *for the
same transport*):

* ``http``: a hand-written HTTP/1.1 client, one keep-alive connection per session,
  one ``POST /v1/pose/frames`` per batch;
* ``ws``: one WebSocket per session (``/v1/pose/stream``, ``wsproto`` on the
  client, no compression), one binary message per batch (the same bytes as the
  POST body), one text ack per batch. Ack latency is from the message's send to
  its ack: a server that applies back-pressure by delaying acks (and not reading)
  shows here. At most ``--window`` batches in flight per session (default 1, as
  over HTTP). The session still ends with ``POST /v1/sessions/{id}/end`` (after a
  normal close), so finalisation is measured the same way.

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
  Over ``--long-transports`` (default http only).
* ``sweep``: paced runs over N (shorter windows; ``--sweep`` over HTTP,
  ``--sweep-ws`` over WebSocket, which goes higher), for each target, stopping at
  the first N that fails; a pass is p99 ack latency under ``--p99-ms`` and no
  error at all (every batch 202, every end 200 and durable). Starts are spread
  over ``--sweep-ramp`` s, or longer so that at most ``--sweep-starts-per-s``
  sessions start (connect) per second.

Measured, per target and transport (``bench/loadrun.py``; tables in
``bench/loadreport.py``): acknowledged batches/s; ack latency p50/p99/max (request
or message sent to its full answer read, at the generator); send lag (how late
the generator sent against schedule: if it grows, the generator or the server is
behind, and latency from the schedule would be that much worse); errors by status
and error code; the server's CPU (utime+stime from ``/proc/PID/stat``, all
threads, % of one core over the window) and RSS (``VmRSS``, ``/proc/PID/status``);
RSS per live session = (RSS at the end of the window - RSS idle, after a priming
session) / N; the RSS slope over the window (per session per minute: it should be
0 for memory flat over a session); each generator's CPU the same way; over ws,
the handshakes (connections opened; more than N means reconnects) and their p99.

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
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.loadproc import TARGET_LABEL, moto_s3
from bench.loadreport import (
    by_transport,
    compare,
    errors_text,
    fmt,
    label,
    one_line,
    print_profile,
    ratio,
    table,
)
from bench.loadrun import KIND_BATCH, Result, RunSpec, run

PAUSE_BEFORE_END_S = 2.0
TRANSPORTS = ("http", "ws")
JOURNALS = ("spool", "jetstream")
GOAL = {"http": 1500, "ws": 4000}  # live sessions per process, p99 < 50 ms (issue 8)
# max throughput as a share of bare quart-trio's on the same transport (issue 15)
THROUGHPUT_GOAL = {"http": 0.85, "ws": 0.6}


def targets(a: argparse.Namespace, *allowed: str) -> list[str]:
    """The targets asked for (``--targets``) that this section runs, service first.
    With several journals (``--journal both``) the yardsticks, which have none, run
    in the first journal's pass only."""
    asked = {t.strip() for t in a.targets.split(",")}
    if a.journal != a.journal_list[0]:
        asked &= {"service"}
    return [t for t in allowed if t in asked]


def journals(value: str) -> list[str]:
    if value == "both":
        return list(JOURNALS)
    asked = [j.strip() for j in value.split(",") if j.strip()]
    unknown = set(asked) - set(JOURNALS)
    if unknown or not asked:
        raise SystemExit(f"unknown journals: {sorted(unknown)} (spool, jetstream or both)")
    return [j for j in JOURNALS if j in asked]


def transports(value: str) -> list[str]:
    asked = [t.strip() for t in value.split(",") if t.strip()]
    unknown = set(asked) - set(TRANSPORTS)
    if unknown:
        raise SystemExit(f"unknown transports: {sorted(unknown)}")
    return [t for t in TRANSPORTS if t in asked]


def section_max(a: argparse.Namespace, log_dir: Path, env: dict[str, str]) -> None:
    print(f"\n== max: closed loop, {a.connections} connections (one session each), "
          f"{a.max_seconds:g} s after {a.warmup:g} s warm-up; "
          f"{' and '.join(a.transport_list)} ==", flush=True)
    results = []
    for tr in a.transport_list:
        spec = RunSpec("closed", a.connections, duration=a.warmup + a.max_seconds,
                       warmup=a.warmup, transport=tr, window_k=a.window,
                       journal=a.journal, processes=a.processes)
        results += [run(t, spec, a, log_dir=log_dir, extra_env=env, profile_dir=a.profile)
                    for t in targets(a, "service", "bare", "raw")]
    print(compare(results, paced=False))
    for r in results:
        print_profile(r, a.profile_top, brief=r.target != "service")
    acked: dict[str, dict[str, float]] = {}
    for tr, rs in by_transport(results).items():
        by = acked[tr] = {r.target: r.acked_per_s for r in rs}
        if by.get("service") and by.get("bare"):
            print(f"  => {tr}: service throughput is {100 * by['service'] / by['bare']:.0f}% "
                  f"of bare quart-trio (target >= {100 * THROUGHPUT_GOAL[tr]:.0f}%)", flush=True)
        if by.get("bare") and by.get("raw"):
            print(f"  => {tr}: bare quart-trio throughput is "
                  f"{100 * by['bare'] / by['raw']:.0f}% of raw ASGI", flush=True)
    for t in ("service", "bare", "raw"):
        h, w = acked.get("http", {}).get(t), acked.get("ws", {}).get(t)
        if h and w:
            print(f"  => {TARGET_LABEL[t]}: ws/http throughput {w / h:.2f} "
                  f"({w:.0f} vs {h:.0f} batches/s)", flush=True)


def section_paced(a: argparse.Namespace, log_dir: Path, env: dict[str, str],
                  profile_dir: Path | None) -> None:
    print(f"\n== paced: {a.sessions} sessions x 1 batch/s at real pace; starts over "
          f"{a.ramp:g} s, all live {a.seconds:g} s (window: its last {a.seconds - 1:g} s), "
          f"ends over {a.end_spread:g} s; {' and '.join(a.transport_list)} ==", flush=True)
    results = []
    for tr in a.transport_list:
        spec = RunSpec("paced", a.sessions, ramp=a.ramp, seconds=a.seconds,
                       end_spread=a.end_spread, transport=tr, window_k=a.window,
                       journal=a.journal, processes=a.processes)
        results += [run(t, spec, a, log_dir=log_dir, extra_env=env,
                        profile_dir=profile_dir if t == "service" else None)
                    for t in targets(a, "service", "bare")]
    print(compare(results, paced=True), flush=True)
    for r in results:
        if r.target == "service":
            print_profile(r, a.profile_top)


def section_long(a: argparse.Namespace, log_dir: Path, env: dict[str, str]) -> None:
    where = "moto S3 on loopback" if a.s3 else "filesystem blob store"
    trs = transports(a.long_transports)
    print(f"\n== long: {a.long_sessions} sessions x {a.long_batches} batches "
          f"({a.long_batches / 60:g} min of frames each) streamed closed-loop, then ended; "
          f"blobs to the {where}; {' and '.join(trs)} ==", flush=True)
    # A time bound only: streaming stops at the batch count, long before it.
    bound = max(60.0, a.long_sessions * a.long_batches / 100)
    results: list[Result] = []
    for tr in trs:
        spec = RunSpec("closed", a.long_sessions, duration=bound, warmup=0.0,
                       batches=a.long_batches, end=True, pause_before_end=PAUSE_BEFORE_END_S,
                       transport=tr, window_k=a.window,
                       journal=a.journal)
        with contextlib.ExitStack() as stack:
            extra = dict(env)
            if a.s3:
                extra.update(stack.enter_context(moto_s3(log_dir, a.nice)))
            results.append(run("service", spec, a, log_dir=log_dir, extra_env=extra,
                               quiet=True))

    def col(r: Result) -> list[str]:
        ok = (r.kind == KIND_BATCH) & (r.status == 202)
        acked = int(ok.sum())
        stream_s = float((r.t + r.lat)[ok].max()) if acked else float("nan")
        # Taken once every session had streamed, before any end call (see loadgen's
        # --pause-before-end): what a long session holds.
        held = r.extra.get("held") or {}
        rss_per = ((held.get("rss_kb", 0) - r.idle_rss_kb) / a.long_sessions if held
                   else np.nan)
        return [f"{acked}", fmt(stream_s), f"{r.batch_errors + r.end_errors} "
                f"({errors_text(r)})", fmt(r.idle_rss_kb / 1024), fmt(rss_per),
                fmt(held.get("bytes_held_mean", np.nan) / 1024), fmt(r.rss_peak_kb / 1024),
                fmt(r.extra["blob_bytes"] / 1024 / a.long_sessions), fmt(r.end_ms(50)),
                fmt(r.end_ms(99)), fmt(r.end_ms("max")), f"{len(r.end_lat) - r.end_errors}"]

    names = ["batches acknowledged", "streaming took s", "errors", "RSS idle MB",
             "RSS per session, all streamed KB", "replay KB held per session (admin)",
             "RSS peak MB (finalisation included)", "replay blob per session KB",
             "finalisation p50 ms", "finalisation p99 ms", "finalisation max ms",
             "sessions ended (durable)"]
    cols = [col(r) for r in results]
    print(table([(n, [c[i] for c in cols]) for i, n in enumerate(names)],
                [label(r) for r in results]), flush=True)


def sweep_ns(value: str) -> list[int]:
    return sorted(int(x) for x in value.split(",") if x.strip())


def section_sweep(a: argparse.Namespace, log_dir: Path, env: dict[str, str]) -> None:
    ladders = {"http": sweep_ns(a.sweep), "ws": sweep_ns(a.sweep_ws)}
    print("\n== sweep: paced, "
          + "; ".join(f"{tr}: N in {ladders[tr]}" for tr in a.transport_list)
          + f"; {a.sweep_seconds:g} s all live; pass = p99 ack < {a.p99_ms:g} ms and no "
          "error; each target stops at its first failure ==", flush=True)
    best: dict[tuple[str, str], int] = {}
    rows = []
    for tr in a.transport_list:
        for target in targets(a, "service", "bare"):
            for n in ladders[tr]:
                ramp = max(a.sweep_ramp, n / a.sweep_starts_per_s)
                spec = RunSpec("paced", n, ramp=ramp, seconds=a.sweep_seconds,
                               end_spread=ramp, transport=tr, window_k=a.window,
                               journal=a.journal, processes=a.processes)
                r = run(target, spec, a, log_dir=log_dir, extra_env=env, quiet=True)
                ok = r.passes(a.p99_ms)
                rows.append((f"{label(r)} N={n}", [
                    fmt(r.acked_per_s), fmt(r.lat_ms(50), ".2f"), fmt(r.lat_ms(99), ".2f"),
                    fmt(r.lat_ms("max"), ".1f"), f"{r.batch_errors + r.end_errors}",
                    fmt(r.server_cpu, ".0f"), fmt(r.rss_per_session_kb),
                    fmt(r.end_ms(99), ".0f"), fmt(r.gen_cpu, ".0f"), "pass" if ok else "FAIL"]))
                print(f"  {label(r):<20} N={n:<5} {one_line(r)}  {'pass' if ok else 'FAIL'}",
                      flush=True)
                if not ok and r.batch_errors + r.end_errors:
                    print(f"    errors: {errors_text(r)}", flush=True)
                if ok:
                    best[tr, target] = n
                else:
                    break
    print(table(rows, ["acked/s", "p50 ms", "p99 ms", "max ms", "errors", "cpu %",
                       "KB/sess", "final p99", "gen cpu %", ""]))
    for tr in a.transport_list:
        s, b = best.get((tr, "service"), 0), best.get((tr, "bare"), 0)
        hosts = f" (N over {a.processes} processes)" if a.processes > 1 else ""
        print(f"  => {tr}: largest N passing (of those tried){hosts}: service {s}, bare "
              f"quart-trio {b}{f' (service/bare {s / b:.2f})' if b else ''}; target >= "
              f"{GOAL[tr]} per process for the service", flush=True)


def section_journal(a: argparse.Namespace, log_dir: Path, env: dict[str, str]) -> None:
    """The service on each journal at the same paced loads, side by side."""
    ns = sweep_ns(a.journal_sessions)
    print(f"\n== journal: the service on {' and '.join(a.journal_list)}, paced, N in {ns} "
          f"x 1 batch/s; starts over {a.ramp:g} s, all live {a.seconds:g} s (window: its "
          f"last {a.seconds - 1:g} s), ends over {a.end_spread:g} s; "
          f"{' and '.join(a.transport_list)}; jetstream = a fresh 3-node NATS cluster on "
          "loopback per run, R3 ==", flush=True)
    rows = []
    by: dict[tuple[str, int, str], Result] = {}
    for tr in a.transport_list:
        for n in ns:
            for journal in a.journal_list:
                spec = RunSpec("paced", n, ramp=a.ramp, seconds=a.seconds,
                               end_spread=a.end_spread, transport=tr, window_k=a.window,
                               journal=journal, processes=a.processes)
                r = by[tr, n, journal] = run("service", spec, a, log_dir=log_dir,
                                             extra_env=env)

                def per_ack(pct: float, r: Result = r) -> float:
                    return pct * 10 / r.acked_per_s if r.acked_per_s else float("nan")

                rows.append((f"{tr} N={n} {journal}", [
                    fmt(r.acked_per_s), fmt(r.lat_ms(50), ".2f"), fmt(r.lat_ms(99), ".2f"),
                    fmt(r.lat_ms("max"), ".1f"), f"{r.batch_errors + r.end_errors}",
                    fmt(r.server_cpu, ".0f"), fmt(per_ack(r.server_cpu), ".3f"),
                    fmt(r.nats_cpu, ".0f"), fmt(r.nats_idle_cpu, ".0f"),
                    fmt(per_ack(r.nats_cpu), ".3f"),
                    fmt(per_ack(r.nats_cpu - r.nats_idle_cpu), ".3f"),
                    fmt(r.end_ms(99), ".0f"), fmt(r.others_cpu, ".0f"),
                    fmt(r.cpu_pressure, ".0f")]))
                if r.batch_errors + r.end_errors:
                    print(f"    errors: {errors_text(r)}", flush=True)
    print(table(rows, ["acked/s", "p50 ms", "p99 ms", "max ms", "errors", "svc cpu %",
                       "svc ms/ack", "nats cpu %", "nats idle %", "nats ms/ack",
                       "nats-idle ms/ack", "final p99 ms",
                       "others %", "psi %"]), flush=True)
    print("  (svc = the service process, all threads; nats = the 3 NATS servers summed; "
          "nats idle = their CPU with the service connected, before the load; ms/ack = "
          "CPU ms per acknowledged batch over the window; nats-idle ms/ack = the same "
          "less the idle CPU; others = the rest of the machine, % of a core)", flush=True)
    if len(a.journal_list) == 2:
        for tr in a.transport_list:
            for n in ns:
                s, j = by[tr, n, "spool"], by[tr, n, "jetstream"]
                print(f"  => {tr} N={n}: jetstream/spool p50 {ratio(j.lat_ms(50), s.lat_ms(50))}"
                      f", p99 {ratio(j.lat_ms(99), s.lat_ms(99))}, service CPU per ack "
                      f"{ratio(j.server_cpu / j.acked_per_s, s.server_cpu / s.acked_per_s)}"
                      f"; service + NATS CPU per ack "
                      f"{(j.server_cpu + j.nats_cpu) * 10 / j.acked_per_s:.3f} ms vs "
                      f"{s.server_cpu * 10 / s.acked_per_s:.3f} ms", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="max,paced,long,sweep",
                   help="comma-separated sections: max, paced, long, sweep, journal (the "
                        "journals of --journal side by side at paced loads; not in the "
                        "default)")
    p.add_argument("--targets", default="service,bare,raw",
                   help="which of service, bare, raw to run (raw: max section only)")
    p.add_argument("--transports", default="http,ws",
                   help="comma-separated: http (a POST per batch), ws (a WebSocket per "
                        "session, a message per batch)")
    p.add_argument("--journal", dest="journal_arg", default="spool",
                   help="the service's journal: spool (local disk), jetstream (a fresh "
                        "3-node NATS JetStream cluster on loopback per run, R3), or both "
                        "(every section runs once per journal; the yardsticks in the "
                        "first pass only)")
    p.add_argument("--wire", choices=("v1", "v2"), default="v1",
                   help="pose batch wire format the generators send (passed as $BENCH_WIRE)")
    p.add_argument("--window", type=int, default=1, metavar="K",
                   help="ws: batches in flight per session (acks pending)")
    p.add_argument("--generators", type=int, default=1, help="load generator processes")
    p.add_argument("--processes", type=int, default=1, metavar="P",
                   help="processes per target (max, paced, sweep, journal), each on its own "
                        "port with its own sessions, as behind a router with session "
                        "affinity; figures are their sums")
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
    g = p.add_argument_group("journal")
    g.add_argument("--journal-sessions", default="100,200",
                   help="values of N for the journal section (paced, the service only, "
                        "each journal of --journal side by side; --ramp, --seconds, "
                        "--end-spread as for paced)")
    g = p.add_argument_group("long")
    g.add_argument("--long-sessions", type=int, default=4)
    g.add_argument("--long-batches", type=int, default=1800)
    g.add_argument("--long-transports", default="http",
                   help="transports for the long section (http, ws or both)")
    g.add_argument("--s3", action="store_true", help="blobs to a local moto S3 server")
    g = p.add_argument_group("sweep")
    g.add_argument("--sweep", default="100,200,300,500,750,1000,1500,2000",
                   help="values of N over http")
    g.add_argument("--sweep-ws", default="250,500,1000,1500,2000,3000,4000",
                   help="values of N over ws")
    g.add_argument("--sweep-seconds", type=float, default=8.0)
    g.add_argument("--sweep-ramp", type=float, default=2.0)
    g.add_argument("--sweep-starts-per-s", type=float, default=1000.0)
    g.add_argument("--p99-ms", type=float, default=50.0)
    a = p.parse_args(argv)
    a.transport_list = transports(a.transports)
    a.journal_list = journals(a.journal_arg)
    a.journal = a.journal_list[0]
    if a.window < 1:
        p.error("--window must be at least 1")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.nice < 0 and os.geteuid() != 0:
        print(f"--nice {a.nice} needs root; running at nice 0")
        a.nice = 0
    sections = [s.strip() for s in a.only.split(",") if s.strip()]
    unknown = set(sections) - {"max", "paced", "long", "sweep", "journal"}
    if unknown:
        raise SystemExit(f"unknown sections: {sorted(unknown)}")
    log_dir = Path(tempfile.mkdtemp(prefix="bench-logs-"))
    if a.profile is not None:
        a.profile.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    print(f"bench.load: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, "
          f"sections {','.join(sections)}; transports {','.join(a.transport_list)}"
          f"{f' (ws window {a.window})' if 'ws' in a.transport_list else ''}; wire {a.wire}; "
          f"nice {a.nice}; "
          f"{'server on CPU 0, generators on CPU 1; ' if a.pin else ''}"
          f"journal {','.join(a.journal_list)}; server logs in {log_dir}", flush=True)
    os.environ["BENCH_WIRE"] = a.wire  # the generators inherit it (bench/loadgen.py --wire)
    env: dict[str, str] = {}
    if "journal" in sections:
        section_journal(a, log_dir, env)
    for journal in a.journal_list:
        a.journal = journal
        if len(a.journal_list) > 1 and set(sections) - {"journal"}:
            print(f"\n==== the service on the {journal} journal ====", flush=True)
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
