#!/usr/bin/env python3
"""Set up what is missing, then run the demo or the tests. Needs only Python 3.11+.

    python3 dev.py demo     # virtualenv + install if needed, then `telemetry demo`
    python3 dev.py test     # virtualenv + install (with test extras) and, as root on Debian,
                            # the system tools some tests drive, if needed; then ruff + pytest

Extra arguments go to the command run (e.g. `python3 dev.py test -k wire`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / "python"


def ensure_env(extras: str) -> None:
    if sys.version_info < (3, 11):  # noqa: UP036 - dev.py runs before any install
        sys.exit(f"Python 3.11+ is required; this is {sys.version.split()[0]}")
    if not PY.exists():
        print(f"creating virtualenv in {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + extras.encode()).hexdigest()
    stamp = VENV / f".installed-{extras or 'base'}"
    if stamp.exists() and stamp.read_text() == digest:
        return
    print("installing the project and its dependencies (first run only)", flush=True)
    subprocess.check_call([str(PY), "-m", "pip", "install", "-q", "--upgrade", "pip"])
    target = f".[{extras}]" if extras else "."
    subprocess.check_call([str(PY), "-m", "pip", "install", "-q", "-e", target], cwd=ROOT)
    stamp.write_text(digest)


# Programs some tests drive for real: HAProxy checks the routing config, Chromium with
# ChromeDriver runs the browser client, ffmpeg makes the test video. Debian packages.
SYSTEM_TOOLS = {"haproxy": "haproxy", "chromium": "chromium",
                "chromedriver": "chromium-driver", "ffmpeg": "ffmpeg"}


def ensure_system_tools() -> None:
    missing = [pkg for tool, pkg in SYSTEM_TOOLS.items() if shutil.which(tool) is None]
    if not missing:
        return
    if os.name == "posix" and os.geteuid() == 0 and shutil.which("apt-get"):
        print(f"installing system packages: {' '.join(missing)}", flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.check_call(["apt-get", "update", "-qq"], env=env)
        subprocess.check_call(["apt-get", "install", "-y", "-qq", "--no-install-recommends",
                               *missing], env=env)
    else:
        print(f"note: the tests that need {', '.join(missing)} will fail until they are "
              f"installed (Debian: sudo apt-get install {' '.join(missing)})", flush=True)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in {"demo", "test"}:
        print(__doc__)
        return 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "demo":
        ensure_env("")
        return subprocess.call([str(BIN / "telemetry"), "demo", *rest], cwd=ROOT)
    ensure_env("test")
    ensure_system_tools()
    rc = subprocess.call([str(BIN / "ruff"), "check", "."], cwd=ROOT)
    if rc:
        return rc
    return subprocess.call([str(PY), "-m", "pytest", *rest], cwd=ROOT)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
