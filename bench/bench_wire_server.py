"""Server instructions per acknowledged batch, wire format v1 against v2: a figure the
shared machine's noise does not move.

Starts ``telemetry serve`` (the local spool, as ``bench.load`` runs it) under
``valgrind --tool=callgrind``; warms it up with a few sessions of each wire format and
transport; then, for each (transport, wire) in turn, zeroes the counters
(``callgrind_control -z``), runs ``bench/loadgen.py`` in closed mode (``--sessions``
sessions, ``--batches`` batches each, one in flight per session) and dumps them
(``callgrind_control -d``). Prints the server's instructions (Ir) per acknowledged
batch. Instruction counts include everything the server process ran in that window
(the event loop, h11/wsproto, the journal, the actor and its metrics), not the
kernel's work.

    PYTHONPATH=$PWD .venv/bin/python -m bench.bench_wire_server [--batches 40]

Slow (valgrind runs the server about 50 times slower): a few minutes.
"""

from __future__ import annotations

import argparse
import json
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.loadproc import Target  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class CallgrindTarget(Target):
    """The service as ``bench.load`` starts it, under callgrind."""

    out: Path

    def command(self) -> list[str]:
        return ["valgrind", "--tool=callgrind", f"--callgrind-out-file={self.out}",
                *super().command()]


def run_gen(port: int, keys: str, transport: str, wire: str, sessions: int, batches: int,
            run_id: str) -> int:
    """Closed-loop batches from one generator; the number acknowledged (202)."""
    out = Path(tempfile.mkdtemp()) / "gen.npz"
    cmd = [sys.executable, "-m", "bench.loadgen", "--port", str(port), "--mode", "closed",
           "--run-id", run_id, "--index-from", "0", "--index-to", str(sessions),
           "--total", str(sessions), "--duration", "3600", "--batches", str(batches),
           "--timeout", "300", "--transport", transport, "--wire", wire, "--out", str(out)]
    env = {"TELEMETRY_JWT_KEYS": keys, "PATH": "/usr/bin:/bin",
           "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, text=True, stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE)
    assert p.stdin is not None and p.stdout is not None
    if p.stdout.readline().strip() != "ready":
        raise RuntimeError("load generator did not start")
    p.stdin.write(f"go {time.time()}\n")
    p.stdin.flush()
    if p.stdout.readline().strip() != "done":
        raise RuntimeError("load generator failed")
    p.wait(60)
    rec = np.load(out)
    shutil.rmtree(out.parent, ignore_errors=True)
    return int(((rec["status"] == 202) & (rec["kind"] == 0)).sum())


def ir_of(path: Path) -> int:
    text = path.read_text(errors="replace")
    m = re.search(r"^summary:\s+(\d+)", text, re.M)
    if not m:
        raise RuntimeError(f"no totals in {path}")
    return int(m.group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=4)
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--transports", default="ws,http")
    args = ap.parse_args()
    keys = json.dumps({"bench": secrets.token_hex(32)})
    log_dir = Path(tempfile.mkdtemp(prefix="bench-wire-server-"))
    t = CallgrindTarget("service", keys=keys, extra_env={"TELEMETRY_MAX_BATCHES_PER_S":
                                                         "100000"},
                        log_dir=log_dir, pin=None, nice=0)
    t.out = log_dir / "callgrind.out"
    import bench.loadproc as lp
    lp.READY_TIMEOUT_S = 600.0
    t.start()
    try:
        for tr in args.transports.split(","):  # warm-up: imports, first-use allocations
            for w in ("v1", "v2"):
                run_gen(t.port, keys, tr, w, 2, 5, f"warm{tr}{w}")
        rows = []
        for tr in args.transports.split(","):
            for w in ("v1", "v2", "v1", "v2"):
                subprocess.run(["callgrind_control", "-z", str(t.pid)], check=True,
                               capture_output=True)
                acks = run_gen(t.port, keys, tr, w, args.sessions, args.batches,
                               f"m{tr}{w}{secrets.token_hex(2)}")
                subprocess.run(["callgrind_control", "-d", str(t.pid)], check=True,
                               capture_output=True)
                dumps = sorted(log_dir.glob("callgrind.out.*"), key=lambda p: p.stat().st_mtime)
                ir = ir_of(dumps[-1])
                rows.append((tr, w, acks, ir / max(acks, 1)))
                print(f"{tr:5} {w}  acks {acks:4d}  server Ir per ack {ir / max(acks, 1):,.0f}",
                      flush=True)
        for tr in args.transports.split(","):
            per = {w: [r[3] for r in rows if r[0] == tr and r[1] == w] for w in ("v1", "v2")}
            a, b = np.mean(per["v1"]), np.mean(per["v2"])
            print(f"{tr:5} mean Ir per ack: v1 {a:,.0f}  v2 {b:,.0f}  v2/v1 {b / a:.3f}")
    finally:
        t.stop()


if __name__ == "__main__":
    main()
