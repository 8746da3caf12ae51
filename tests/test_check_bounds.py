"""The bounds guard (scripts/check_bounds.py): clean on this repository, loud on violations."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "check_bounds.py"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=60, check=False)


def write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_repository_http_layer_is_clean() -> None:
    r = run()
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ok (9 modules)" in r.stdout


def test_sink_receiver_would_fail_so_the_guard_can_fail() -> None:
    # The Core API side receiver writes Postgres by design and is excluded; pointing
    # the guard at it shows that it does detect real driver imports in this repo.
    r = run("telemetry/sink_app.py")
    assert r.returncode == 1
    assert re.search(r"^telemetry/sink_app\.py:\d+: imports psycopg directly", r.stdout, re.M)


def test_every_kind_of_direct_import_is_reported(tmp_path: Path) -> None:
    for pkg in ("telemetry", "storage", "actors"):
        write(tmp_path, f"{pkg}/__init__.py", "")
    write(tmp_path, "storage/blobs.py", "class BlobStore: ...\n")
    write(tmp_path, "telemetry/app.py", "\n".join([
        "import json",                                     # 1 fine
        "from storage.blobs import BlobStore",             # 2 fine: the interface
        "import boto3",                                    # 3
        "from psycopg.rows import dict_row",               # 4
        "from storage import pg",                          # 5
        "from ..storage.s3 import S3BlobStore",            # 6 (relative, resolves to storage.s3)
        "from typing import TYPE_CHECKING",                # 7
        "if TYPE_CHECKING:",                               # 8
        "    import psycopg_pool",                         # 9
        "def handler():",                                  # 10
        "    import botocore.exceptions",                  # 11
        "    from storage.sink import AggregateSink",      # 12
        "    import importlib",                            # 13
        "    importlib.import_module('storage.http_bus')",  # 14
        "    return __import__('pgserver')",               # 15
        "",
    ]))
    r = run("--root", str(tmp_path), "telemetry/app.py")
    assert r.returncode == 1, r.stdout + r.stderr
    lines = {int(line.split(":")[1]) for line in r.stdout.splitlines()}
    assert lines == {3, 4, 5, 6, 9, 11, 12, 14, 15}, r.stdout
    assert "telemetry/app.py:3: imports boto3 directly" in r.stdout
    assert "telemetry/app.py:6: imports storage.s3" in r.stdout
    assert "9 violation(s)" in r.stderr


def test_laundering_through_a_helper_module_is_reported(tmp_path: Path) -> None:
    for pkg in ("telemetry", "storage", "actors"):
        write(tmp_path, f"{pkg}/__init__.py", "")
    write(tmp_path, "actors/helper.py", "import json\nfrom storage.pg import Database\n")
    write(tmp_path, "storage/pg.py", "import psycopg\n")
    write(tmp_path, "telemetry/app.py", "import actors.helper\n")
    r = run("--root", str(tmp_path), "telemetry/app.py")
    assert r.returncode == 1
    assert ("telemetry/app.py:1: reaches storage.pg through module-level imports "
            "actors.helper (actors/helper.py:2)") in r.stdout


def test_deferred_factory_imports_are_allowed(tmp_path: Path) -> None:
    # telemetry.wiring picks the implementation lazily, inside a function: allowed.
    for pkg in ("telemetry", "storage"):
        write(tmp_path, f"{pkg}/__init__.py", "")
    write(tmp_path, "storage/s3.py", "import boto3\n")
    write(tmp_path, "telemetry/wiring.py",
          "def open_store():\n    from storage.s3 import S3\n    return S3\n")
    write(tmp_path, "telemetry/app.py", "from telemetry.wiring import open_store\n")
    r = run("--root", str(tmp_path), "telemetry/app.py")
    assert r.returncode == 0, r.stdout + r.stderr


def test_missing_module_is_an_error_not_a_pass(tmp_path: Path) -> None:
    r = run("--root", str(tmp_path), "telemetry/app.py")
    assert r.returncode == 2 and "does not exist" in r.stderr
