"""Which of the project's files one pose batch crosses, measured, not read off a diagram.

Starts ``telemetry serve`` in a child process under a profile hook that records every
first-party source file a Python function is called in, per phase:

1. *idle*: nothing is sent for two seconds (background loops: key watcher, outbox...);
2. *batch*: one pose batch is POSTed and the actor is given time to apply it;
3. *end*: the session's end call, until the blob is written and the event published.

A file counts for a phase if it ran in that phase and not while idle, so background
loops do not inflate the figure. Run from the repository root::

    python -m bench.trace_path

It prints the files of each phase and their counts. Used for issue 13's before/after
figure; it only uses the CLI and HTTP, so it runs unchanged on older commits.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("domain", "storage", "actors", "telemetry")

# The child: a profile hook recording first-party files per phase; SIGUSR1 starts the
# next phase; the record is written at exit.
CHILD = r"""
import atexit, json, signal, sys, threading
root, out = sys.argv[1], sys.argv[2]
pkgs = tuple(root + "/" + p + "/" for p in ("domain", "storage", "actors", "telemetry"))
phases = [set()]
def hook(frame, event, arg):
    if event == "call":
        f = frame.f_code.co_filename
        if f.startswith(pkgs):
            phases[-1].add(f[len(root) + 1:])
sys.setprofile(hook)
threading.setprofile(hook)
signal.signal(signal.SIGUSR1, lambda *a: phases.append(set()))
atexit.register(lambda: open(out, "w").write(json.dumps([sorted(p) for p in phases])))
sys.argv = ["telemetry", "serve"]
from telemetry.cli import main
main()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batch() -> bytes:
    sys.path.insert(0, str(ROOT))
    try:
        from domain.pose_batch import encode_batch
    except ImportError:  # commits before issue 13
        from telemetry.wire import encode_batch
    t = np.arange(30, dtype=np.int64) * 33
    frames = np.random.default_rng(1).random((30, 33, 4), dtype=np.float32)
    return encode_batch(0, t, frames)


def main() -> None:
    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "phases.json"
        env = dict(os.environ, TELEMETRY_PORT=str(port), TELEMETRY_DATA_DIR=tmp,
                   TELEMETRY_LOG_LEVEL="warning", PYTHONPATH=str(ROOT))
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(ROOT), str(out)],
                                 env=env, cwd=ROOT)
        base = f"http://127.0.0.1:{port}"
        try:
            for _ in range(300):
                try:
                    if httpx.get(base + "/v1/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
            token = subprocess.run(
                [sys.executable, "-m", "telemetry.cli", "token", "--session", "trace-1"],
                env=env, cwd=ROOT, capture_output=True, text=True, check=True,
            ).stdout.strip().splitlines()[-1]
            auth = {"Authorization": f"Bearer {token}"}
            body = _batch()
            child.send_signal(signal.SIGUSR1)  # phase 1: idle
            time.sleep(2.0)
            child.send_signal(signal.SIGUSR1)  # phase 2: one batch
            r = httpx.post(base + "/v1/pose/frames", content=body, headers={
                **auth, "Content-Type": "application/x-restartix-pose"})
            assert r.status_code == 202, r.text
            time.sleep(2.0)
            child.send_signal(signal.SIGUSR1)  # phase 3: the end call
            r = httpx.post(base + "/v1/sessions/trace-1/end", headers=auth, json={})
            assert r.status_code == 200, r.text
            time.sleep(2.0)
            child.send_signal(signal.SIGUSR1)  # phase 4: shutdown, not counted
        finally:
            child.send_signal(signal.SIGTERM)
            child.wait(60)
        phases = [set(p) for p in json.loads(out.read_text())]
    idle, batch, end = phases[1], phases[2], phases[3]
    for name, files in (("batch (socket to applied frames)", batch - idle),
                        ("end call (blob and bus event)", end - idle),
                        ("one pose batch, socket to blob and event", (batch | end) - idle)):
        print(f"{name}: {len(files)} files")
        for f in sorted(files):
            print(f"  {f}")


if __name__ == "__main__":
    main()
