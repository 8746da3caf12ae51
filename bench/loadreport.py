"""Reports for ``bench/load.py``: one-line summaries, comparison tables, profiles.

A comparison table has one column group per transport (``http``, ``ws``): the
targets' figures side by side, then the service as a ratio of each yardstick *for
the same transport* (``svc/bare``, ``svc/raw``).
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bench.loadproc import TARGET_LABEL

if TYPE_CHECKING:
    from bench.loadrun import Result

SHORT = {"service": "service", "bare": "bare", "raw": "raw"}
LEGEND = ("  (bare = bare quart-trio, raw = raw ASGI; svc/x = service / x for the same "
          "transport; js = the service on the JetStream journal)")


def label(r: Result) -> str:
    journal = " js" if r.spec.journal == "jetstream" else ""
    procs = f" x{r.spec.processes}" if r.spec.processes > 1 else ""
    return f"{TARGET_LABEL[r.target]}{procs}{journal} {r.transport}"


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
            f"others {fmt(r.others_cpu, '.0f')}%  psi {fmt(r.cpu_pressure, '.0f')}%"
            + ("" if np.isnan(r.nats_cpu) else f"  nats {r.nats_cpu:.0f}%"))


def table(rows: Sequence[tuple[str, Sequence[str]]], heads: Sequence[str],
          groups: Sequence[tuple[str, int]] = ()) -> str:
    """Right-aligned columns; ``groups`` (title, number of columns) adds a line of
    titles above the heads, each spanning its columns."""
    w0 = max(len(r[0]) for r in rows)
    widths = [max(len(h), *(len(r[1][i]) for r in rows)) for i, h in enumerate(heads)]
    out = []
    if groups:
        at, parts = 0, []
        for title, span in groups:
            w = sum(widths[at:at + span]) + 2 * (span - 1)
            parts.append(f" {title} ".center(w, "-"))
            at += span
        out.append("  " + " " * w0 + "  " + "  ".join(parts))
    out.append("  " + " " * w0 + "  " + "  ".join(h.rjust(w) for h, w in zip(heads, widths,
                                                                               strict=True)))
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


def by_transport(results: Sequence[Result]) -> dict[str, list[Result]]:
    """Results grouped by transport (in order of appearance), service first in each."""
    out: dict[str, list[Result]] = {}
    for r in results:
        out.setdefault(r.transport, []).append(r)
    for rs in out.values():
        rs.sort(key=lambda r: r.target != "service")
    return out


def compare(results: Sequence[Result], *, paced: bool) -> str:
    groups = by_transport(results)
    heads: list[str] = []
    spans: list[tuple[str, int]] = []
    for transport, rs in groups.items():
        heads += [SHORT[r.target] for r in rs]
        svc = rs[0] if rs[0].target == "service" else None
        if svc is not None:
            heads += [f"svc/{SHORT[r.target]}" for r in rs[1:]]
        spans.append((transport, len(rs) + (len(rs) - 1 if svc is not None else 0)))

    def row(name: str, f: Callable[[Result], Any], spec: str = ".1f",
            show_ratio: bool = True) -> tuple[str, list[str]]:
        cells: list[str] = []
        for rs in groups.values():
            vals = [f(r) for r in rs]
            cells += [fmt(v, spec) if isinstance(v, float) else str(v) for v in vals]
            if rs[0].target == "service":
                cells += [ratio(vals[0], v) if show_ratio else "" for v in vals[1:]]
        return name, cells

    def per_ack(x: float, r: Result) -> float:
        return x * 10 / r.acked_per_s if r.acked_per_s else float("nan")

    rows = [
        row("acknowledged batches/s", lambda r: r.acked_per_s),
        row("ack latency p50 ms", lambda r: r.lat_ms(50), ".2f"),
        row("ack latency p99 ms", lambda r: r.lat_ms(99), ".2f"),
        row("ack latency max ms", lambda r: r.lat_ms("max"), ".2f"),
        row("send lag p99 ms (generator)", lambda r: r.lag_ms(99), ".2f", False),
        row("errors (batches)", lambda r: r.batch_errors, "d", False),
        row("server CPU % of a core", lambda r: r.server_cpu, ".0f"),
        row("server CPU ms per ack", lambda r: per_ack(r.server_cpu, r), ".3f"),
        row("server RSS idle MB", lambda r: r.idle_rss_kb / 1024),
        row("server RSS at window end MB", lambda r: r.rss_live_kb / 1024),
        row("server RSS peak MB", lambda r: r.rss_peak_kb / 1024),
        row("load generator CPU % of a core", lambda r: r.gen_cpu, ".0f", False),
        row("load generator CPU ms per request", lambda r: per_ack(r.gen_cpu, r), ".3f",
            False),
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
    if any(r.spec.journal == "jetstream" for r in results):
        rows[8:8] = [
            row("NATS servers CPU % of a core (3 nodes)", lambda r: r.nats_cpu, ".0f", False),
            row("NATS servers CPU ms per ack", lambda r: per_ack(r.nats_cpu, r), ".3f", False),
        ]
    if "ws" in groups:
        rows += [
            row("ws handshakes (connections opened)", lambda r: r.handshakes
                if r.transport == "ws" else float("nan"), "d", False),
            row("ws handshake p99 ms", lambda r: r.handshake_ms(99), ".1f"),
        ]
    if any(r.spec.end for r in results) or paced:
        rows += [
            row("finalisation p50 ms", lambda r: r.end_ms(50), ".1f"),
            row("finalisation p99 ms", lambda r: r.end_ms(99), ".1f"),
            row("finalisation max ms", lambda r: r.end_ms("max"), ".1f"),
            row("sessions ended (durable)", lambda r: len(r.end_lat) - r.end_errors, "d",
                False),
        ]
    out = [table(rows, heads, spans), LEGEND]
    for r in results:
        out.append(f"  errors, {label(r)}: {errors_text(r)}; "
                   f"server log lines (WARNING+): {r.log_lines}")
    return "\n".join(out)


def print_profile(r: Result, top: int, brief: bool = False) -> None:
    if r.profile:
        p = r.profile
        print(f"\n  -- py-spy profile of {label(r)} over the window ({p['path']}) --")
        text = summarise_profile(Path(p["path"]), p["seconds"], p["rate"], top)
        if brief:
            text = text.split("\n  inclusive")[0]
        print(text, flush=True)



HANDLER = "handler: lean ASGI path / stream (own code)"
SERVER_IO = "hypercorn + h11/wsproto: the handler's sends and reads"
# Frames of the server's protocol code: a handler sample with one of these deeper in
# its stack is the server's work (framing, masking, flow control), not the handler's.
_SERVER_MARKERS = ("(hypercorn/", "(h11/", "(wsproto/")

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
    ("handler: JWT verification", ("verify_session", "(jwt/", "(telemetry/auth/")),
    ("handler: decode + validate batch", ("(domain/pose_batch.py)",)),
    # The journal's own code only: the admission around it (Supervisor.submit,
    # Admission.admit_checked) is bookkeeping below.
    ("handler: spool append (await)", ("Spool.append", "SessionActor.persist",
                                        "(storage/journal.py)")),
    ("handler: metrics, request id, access log", (
        "begin_request", "finish_request", "end_request", "observe (telemetry/app.py)",
        "observe (telemetry/http/pipeline.py)", "(domain/privacy.py)",
        "(prometheus_client/", "(telemetry/logs.py)", "(telemetry/metrics.py)", "(logging/")),
    ("handler: jsonify (response body)", ("jsonify",)),
    # Admission runs on the handler's task (py-spy names its methods Admission.*),
    # the rest on the actor's.
    ("admission + actor bookkeeping (check/accept, mailbox, sequencer)", (
        "SessionActor.", "Supervisor.", "Admission.", "(actors/admission.py)",
        "(actors/sequencer.py)")),
    ("finalisation", ("(actors/finalise.py)", "(actors/summary.py)")),
    ("handler: rest of the endpoint code", ("(telemetry/app.py)", "pose_frames",
                                             "(telemetry/errors.py)")),
    # The lean POST path and the stream, their own code. The hypercorn sends and
    # receives they make count under SERVER_IO (see categorise).
    (HANDLER, ("(telemetry/lean.py)", "(telemetry/stream.py)", "(telemetry/ingest.py)",
               "(telemetry/http/pipeline.py)")),
    ("quart-trio request/response machinery", ("(quart/", "(quart_trio/", "(werkzeug/")),
    ("ASGI wrappers (CORS, connection close)", ("(telemetry/cors.py)",
                                                "(telemetry/connection_close.py)")),
    # Before hypercorn + h11: a WebSocket's frames also pass through hypercorn's h11
    # protocol, which hands them to its WSStream (wsproto).
    ("hypercorn + wsproto (WebSocket)", ("(hypercorn/protocol/ws_stream.py)", "(wsproto/")),
    ("hypercorn + h11 (HTTP/1.1)", ("(hypercorn/", "(h11/")),
    ("spool committer (loop side)", ("Spool.", "GroupCommit.", "(storage/spool.py)",
                                    "(storage/spool_commit.py)")),
    ("trio scheduler, sockets, epoll", ("(trio/", "(outcome/")),
)


def categorise(frames: Sequence[str]) -> str:
    """The component of one stack (outermost frame first). A stack in the handler's
    code that went on into hypercorn, h11 or wsproto (an ASGI send or receive) is
    :data:`SERVER_IO`: the handler merely called it."""
    for name, markers in CATEGORIES:
        hits = [i for i, f in enumerate(frames) if any(m in f for m in markers)]
        if not hits:
            continue
        if name == HANDLER and any(m in f for f in frames[hits[-1] + 1:]
                                   for m in _SERVER_MARKERS):
            return SERVER_IO
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
               "bench.loadreport.CATEGORIES on its stack):")
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

