"""Node.js for the tests of the browser client (``clients/web``): the tools, and one
way to run them that fails the test with everything they printed. A missing tool
fails the test with what to install; it never skips."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WEB = ROOT / "clients" / "web"
TIMEOUT_S = 180


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"`{name}` is missing: install Node.js 18+ and npm (Debian: apt-get install "
                    "nodejs npm), or run `python3 dev.py test`", pytrace=False)
    return path


def run_tool(cmd: list[str], cwd: Path, *, stdin: str | None = None) -> str:
    """Run ``cmd``; on failure, fail with everything it printed."""
    env = {**os.environ, "NO_COLOR": "1", "npm_config_update_notifier": "false",
           "npm_config_fund": "false", "npm_config_audit": "false"}
    done = subprocess.run(cmd, cwd=cwd, input=stdin, capture_output=True, text=True,
                          timeout=TIMEOUT_S, env=env, check=False)
    if done.returncode != 0:
        pytest.fail(f"`{' '.join(cmd)}` in {cwd} exited {done.returncode}\n"
                    f"--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}", pytrace=False)
    return done.stdout
