#!/usr/bin/env python3
"""Set up what is missing, then run the demo or the tests. Needs only Python 3.11+.

    python3 dev.py demo     # virtualenv + install if needed, then `telemetry demo`
    python3 dev.py test     # virtualenv + install (with test extras) and, as root on Debian,
                            # the system tools some tests drive, if needed; then ruff, the
                            # layering guard (scripts/check_bounds.py) and pytest

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
# Exact versions of every dependency (scripts/freeze_constraints.py writes it); the
# Dockerfile installs with the same file, so tests run what production runs.
CONSTRAINTS = ROOT / "constraints.txt"
# What `telemetry demo` needs beyond the service: embedded Postgres and the PNG plots.
DEMO_EXTRAS = "embedded,plot"


def _has_pip() -> bool:
    return PY.exists() and subprocess.call(
        [str(PY), "-m", "pip", "--version"], stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL) == 0


def _ensure_ensurepip() -> None:
    """Debian splits ensurepip out of python3 (package python3-venv): install it as
    root, else say what to install."""
    try:
        import ensurepip  # noqa: F401
    except ImportError:
        if os.name == "posix" and os.geteuid() == 0 and shutil.which("apt-get"):
            env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
            subprocess.check_call(["apt-get", "update", "-qq"], env=env)
            subprocess.check_call(["apt-get", "install", "-y", "-qq", "python3-venv"], env=env)
        else:
            sys.exit("this Python cannot create a virtualenv with pip; on Debian/Ubuntu: "
                     "sudo apt-get install python3-venv")


def ensure_env(extras: str) -> None:
    if sys.version_info < (3, 11):  # noqa: UP036 - dev.py runs before any install
        sys.exit(f"Python 3.11+ is required; this is {sys.version.split()[0]}")
    if not _has_pip():
        # Also when a first attempt left a .venv without pip (Debian's python3 without
        # python3-venv creates the interpreter, then fails at ensurepip).
        _ensure_ensurepip()
        print(f"creating virtualenv in {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True, clear=True).create(VENV)
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + CONSTRAINTS.read_bytes()
                            + extras.encode()).hexdigest()
    stamp = VENV / f".installed-{extras.replace(',', '+') or 'base'}"
    if stamp.exists() and stamp.read_text() == digest:
        return
    print("installing the project and its dependencies (first run only)", flush=True)
    subprocess.check_call([str(PY), "-m", "pip", "install", "-q", "--upgrade", "pip"])
    target = f".[{extras}]" if extras else "."
    subprocess.check_call([str(PY), "-m", "pip", "install", "-q", "-c", str(CONSTRAINTS),
                           "-e", target], cwd=ROOT)
    stamp.write_text(digest)


# Programs some tests drive for real: HAProxy checks the routing config, Chromium with
# ChromeDriver runs the browser client, ffmpeg makes the test video, Node and npm test and
# type-check the browser client's package. Debian packages.
SYSTEM_TOOLS = {"haproxy": "haproxy", "chromium": "chromium",
                "chromedriver": "chromium-driver", "ffmpeg": "ffmpeg",
                "node": "nodejs", "npm": "npm"}


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


WEB_CLIENT = ROOT / "clients" / "web"


def ensure_web_client() -> None:
    """`npm ci` in clients/web (TypeScript for its type check) when node_modules is missing
    or package-lock.json changed since the last install."""
    digest = hashlib.sha256((WEB_CLIENT / "package-lock.json").read_bytes()).hexdigest()
    # Inside node_modules: `npm ci` deletes it first, so an interrupted install re-runs.
    stamp = WEB_CLIENT / "node_modules" / ".installed-lock"
    if stamp.exists() and stamp.read_text() == digest:
        return
    npm = shutil.which("npm")
    if npm is None:  # ensure_system_tools has said what to install
        return
    print("installing the browser client's dev dependencies (npm ci)", flush=True)
    subprocess.check_call([npm, "ci", "--no-audit", "--no-fund"], cwd=WEB_CLIENT)
    stamp.write_text(digest)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in {"demo", "test"}:
        print(__doc__)
        return 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "demo":
        ensure_env(DEMO_EXTRAS)
        return subprocess.call([str(BIN / "telemetry"), "demo", *rest], cwd=ROOT)
    ensure_env("test")
    ensure_system_tools()
    ensure_web_client()
    rc = subprocess.call([str(BIN / "ruff"), "check", "."], cwd=ROOT)
    if rc:
        return rc
    # The layering guard (docs/architecture.md), before the long run it would fail anyway.
    rc = subprocess.call([str(PY), str(ROOT / "scripts" / "check_bounds.py")], cwd=ROOT)
    if rc:
        return rc
    return subprocess.call([str(PY), "-m", "pytest", *rest], cwd=ROOT)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
