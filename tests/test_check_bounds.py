"""The layering guard (scripts/check_bounds.py): clean on this repository, loud on each rule.

Each rule is shown failing and passing on a small tree written into tmp_path, so no test
here can pass with the rule switched off.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "check_bounds.py"
_spec = importlib.util.spec_from_file_location("check_bounds", SCRIPT)
assert _spec is not None and _spec.loader is not None
check_bounds = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("check_bounds", check_bounds)  # dataclasses look their module up
_spec.loader.exec_module(check_bounds)

LINE = re.compile(r"^(?P<path>[\w/.]+\.py):(?P<line>\d+): (?P<rule>layer|driver|handler|cycle): ")


def guard(root: Path, files: dict[str, str],
          capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    """Write ``files`` (path -> source) under ``root`` with empty package inits, run the
    guard on it, return its exit code and stdout lines (every one checked for format)."""
    for rel, text in files.items():
        path = root / rel
        for parent in path.relative_to(root).parents:
            if parent != Path(".") and not (root / parent / "__init__.py").exists():
                (root / parent).mkdir(parents=True, exist_ok=True)
                (root / parent / "__init__.py").write_text("")
        path.write_text(text)
    rc = check_bounds.main(["--root", str(root)])
    out = capsys.readouterr().out.splitlines()
    if rc == 1:
        assert all(LINE.match(line) for line in out), out
    return rc, out


def found(lines: list[str], path: str, line: int, rule: str, text: str = "") -> bool:
    return any(x.startswith(f"{path}:{line}: {rule}: ") and text in x for x in lines)


# --- domain/ -------------------------------------------------------------------------


def test_domain_imports_no_other_layer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out = guard(tmp_path, {
        "storage/blobs.py": "",
        "actors/session.py": "",
        "telemetry/config.py": "",
        "domain/claims.py": "\n".join([
            "from storage.blobs import BlobStore",          # 1
            "from typing import TYPE_CHECKING",             # 2 fine
            "if TYPE_CHECKING:",                            # 3
            "    from actors.session import SessionActor",  # 4 never runs, still a dependency
            "def f():",                                     # 5
            "    from telemetry import config",             # 6 deferred, still a dependency
            "    import bench.load",                        # 7 project code outside the layers
            "",
        ]),
    }, capsys)
    assert rc == 1
    assert found(out, "domain/claims.py", 1, "layer", "imports storage.blobs")
    assert found(out, "domain/claims.py", 4, "layer", "imports actors.session")
    assert found(out, "domain/claims.py", 6, "layer", "imports telemetry.config")
    assert found(out, "domain/claims.py", 7, "layer", "imports bench.load")
    assert len(out) == 4, out


def test_domain_does_no_io(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out = guard(tmp_path, {
        "domain/pose_batch.py": "import boto3\nimport trio\nfrom psycopg import rows\n",
    }, capsys)
    assert rc == 1
    assert [int(x.split(":")[1]) for x in out] == [1, 2, 3], out
    assert all(": driver: domain/ imports " in x for x in out)


def test_clean_domain(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out = guard(tmp_path, {
        "domain/claims.py": "import re\n",
        "domain/pose_batch.py": "import struct\nimport numpy as np\nfrom .claims import x\n"
                                "from domain import claims\n",
    }, capsys)
    assert (rc, out) == (0, ["check-bounds: ok"])


# --- storage/ ------------------------------------------------------------------------


def test_storage_imports_neither_actors_nor_telemetry(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out = guard(tmp_path, {
        "domain/claims.py": "",
        "actors/durable.py": "",
        "telemetry/auth.py": "",
        "storage/spool.py": "import os\nfrom domain.claims import x\n"
                            "from actors.durable import session_key\n"
                            "def f():\n    from telemetry.auth import mint\n",
    }, capsys)
    assert rc == 1
    assert found(out, "storage/spool.py", 3, "layer", "storage/ imports actors.durable")
    assert found(out, "storage/spool.py", 5, "layer", "storage/ imports telemetry.auth")
    assert len(out) == 2, out


def test_clean_storage_may_use_drivers(tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    rc, out = guard(tmp_path, {
        "domain/claims.py": "",
        "storage/pg.py": "import psycopg\nfrom psycopg_pool import ConnectionPool\n",
        "storage/sink.py": "from domain.claims import x\nfrom storage.pg import Database\n"
                           "from .pg import Database as D\n",
    }, capsys)
    assert (rc, out) == (0, ["check-bounds: ok"])


# --- actors/ -------------------------------------------------------------------------


def test_actors_reach_storage_only_through_interfaces(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out = guard(tmp_path, {
        **{f"storage/{m}.py": "" for m in ("spool", "s3", "pg", "outbox", "fsutil")},
        "telemetry/config.py": "",
        "actors/session.py": "\n".join([
            "from storage.spool import Spool",              # 1
            "from storage import pg",                       # 2
            "import storage.s3",                            # 3
            "from telemetry.config import Settings",        # 4
            "def f():",                                     # 5
            "    from storage.outbox import Outbox",        # 6
            "    from storage.fsutil import fsync_dir",     # 7
            "    import boto3",                             # 8
            "",
        ]),
    }, capsys)
    assert rc == 1
    for line, name in ((1, "storage.spool"), (2, "storage.pg"), (3, "storage.s3"),
                       (4, "telemetry.config"), (6, "storage.outbox"), (7, "storage.fsutil")):
        assert found(out, "actors/session.py", line, "layer", f"actors/ imports {name};"), out
    assert found(out, "actors/session.py", 8, "driver", "actors/ imports boto3")
    assert len(out) == 7, out


def test_clean_actors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out = guard(tmp_path, {
        **{f"storage/{m}.py": "" for m in ("blobs", "bus", "replay", "replay_codec")},
        "domain/claims.py": "",
        "actors/summary.py": "",
        "actors/session.py": "\n".join([
            "import trio",
            "import numpy as np",
            "from domain.claims import SessionClaims",
            "from actors.summary import build_summary",
            "from .summary import iso_time",
            "from storage.blobs import BlobStore, blob_key",
            "from storage import bus, replay",
            "import storage.replay_codec",
            # the interface module may not exist yet: a missing module is judged by name
            "from storage.journal import Journal",
            "",
        ]),
    }, capsys)
    assert (rc, out) == (0, ["check-bounds: ok"])


# --- telemetry/: the HTTP handlers ---------------------------------------------------


def test_every_kind_of_direct_handler_import_is_reported(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out = guard(tmp_path, {
        "storage/blobs.py": "class BlobStore: ...\n",
        "telemetry/lean.py": "\n".join([
            "import json",                                     # 1 fine
            "from storage.blobs import BlobStore",             # 2 fine: the interface
            "import boto3",                                    # 3
            "from psycopg.rows import dict_row",               # 4
            "from storage import pg",                          # 5
            "from ..storage.s3 import S3BlobStore",            # 6 relative: storage.s3
            "from typing import TYPE_CHECKING",                # 7
            "if TYPE_CHECKING:",                               # 8
            "    import psycopg_pool",                         # 9
            "def handler():",                                  # 10
            "    import botocore.exceptions",                  # 11
            "    from storage.sink import AggregateSink",      # 12
            "    import importlib",                            # 13
            "    importlib.import_module('storage.http_bus')",  # 14
            "    return __import__('pgserver')",               # 15
            "import nats",                                     # 16
            "",
        ]),
    }, capsys)
    assert rc == 1
    handler = [int(x.split(":")[1]) for x in out if ": handler: " in x]
    assert handler == [3, 4, 5, 6, 9, 11, 12, 14, 15, 16], out
    assert found(out, "telemetry/lean.py", 3, "handler", "imports boto3;")
    assert found(out, "telemetry/lean.py", 6, "handler", "imports storage.s3;")


def test_laundering_through_a_helper_module_is_reported(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out = guard(tmp_path, {
        "storage/pg.py": "import psycopg\n",
        "actors/helper.py": "import json\nfrom storage.pg import Database\n",
        "telemetry/ingest.py": "import actors.helper\n",
    }, capsys)
    assert rc == 1
    assert ("telemetry/ingest.py:1: handler: reaches storage.pg through module-level imports "
            "actors.helper (actors/helper.py:2)") in out, out
    # the helper itself breaks the actors' layer
    assert found(out, "actors/helper.py", 2, "layer", "actors/ imports storage.pg;")


def test_a_handler_importing_the_wiring_is_judged_through_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files = {
        "storage/s3.py": "import boto3\n",
        "telemetry/stream.py": "from telemetry.wiring import open_store\n",
    }
    # the factory picks the implementation lazily, inside a function: allowed
    lazy = "def open_store():\n    from storage.s3 import S3\n    return S3\n"
    rc, out = guard(tmp_path / "lazy", {**files, "telemetry/wiring.py": lazy}, capsys)
    assert (rc, out) == (0, ["check-bounds: ok"])
    # at module level, every handler that imports the factory would load boto3
    eager = "from storage.s3 import S3\ndef open_store():\n    return S3\n"
    rc, out = guard(tmp_path / "eager", {**files, "telemetry/wiring.py": eager}, capsys)
    assert rc == 1
    assert out == ["telemetry/stream.py:1: handler: reaches storage.s3 through module-level "
                   "imports telemetry.wiring (telemetry/wiring.py:1)"], out


def test_wiring_and_entry_points_may_import_drivers(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    drivers = "import psycopg\nimport boto3\nfrom storage import pg, s3\n"
    files = {"storage/pg.py": "", "storage/s3.py": ""}
    exempt = ("telemetry/wiring.py", "telemetry/cli.py", "telemetry/sink_app.py",
              "telemetry/dev/demo.py")
    rc, out = guard(tmp_path / "exempt", {**files, **dict.fromkeys(exempt, drivers)}, capsys)
    assert (rc, out) == (0, ["check-bounds: ok"])
    # the same code anywhere else in telemetry/ is a handler module's
    rc, out = guard(tmp_path / "handler", {**files, "telemetry/server.py": drivers}, capsys)
    assert rc == 1
    assert [int(x.split(":")[1]) for x in out] == [1, 2, 3], out


# --- cycles --------------------------------------------------------------------------


def test_a_cycle_closed_by_a_deferred_import_is_reported(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out = guard(tmp_path, {
        "actors/finalise.py": "from typing import TYPE_CHECKING\n"
                              "if TYPE_CHECKING:\n    from actors.session import SessionActor\n",
        "actors/session.py": "from actors.finalise import finalise\n",
    }, capsys)
    assert rc == 1
    assert out == ["actors/finalise.py:3: cycle: actors.finalise -> actors.session "
                   "(actors/finalise.py:3) -> actors.finalise (actors/session.py:1)"], out


def test_each_cycle_is_reported_once_with_the_imports_to_cut(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out = guard(tmp_path, {
        # app -> lean -> stream -> app, and ingest <-> app: one group of four
        "telemetry/app.py": "import telemetry.lean\nfrom telemetry import ingest\n",
        "telemetry/lean.py": "from . import stream\n",
        "telemetry/stream.py": "def f():\n    from .app import AppState\n",
        "telemetry/ingest.py": "from telemetry.app import AppState\n",
        # a separate two-module cycle
        "actors/media.py": "from actors.media_correlate import MediaTracker\n",
        "actors/media_correlate.py": "def f():\n    import actors.media\n",
    }, capsys)
    assert rc == 1
    assert len(out) == 2, out
    assert found(out, "actors/media.py", 1, "cycle", "actors.media -> actors.media_correlate")
    assert found(out, "telemetry/app.py", 2, "cycle",
                 "telemetry.app -> telemetry.ingest (telemetry/app.py:2) -> telemetry.app "
                 "(telemetry/ingest.py:1); the group telemetry.app, telemetry.ingest, "
                 "telemetry.lean, telemetry.stream imports: ")
    assert "telemetry.stream -> telemetry.app (telemetry/stream.py:2)" in out[1]


def test_no_cycle_in_a_layered_tree(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out = guard(tmp_path, {
        # a package init importing its own submodules is not a cycle
        "actors/reps/__init__.py": "from .engine import RepEngine\n",
        "actors/reps/engine.py": "from .angles import JOINTS\n",
        "actors/reps/angles.py": "JOINTS = ()\n",
        "actors/session.py": "from actors.reps import RepEngine\n",
        "telemetry/app.py": "from actors import session\n",
    }, capsys)
    assert (rc, out) == (0, ["check-bounds: ok"])


# --- errors and the real tree --------------------------------------------------------


def test_unparsable_file_is_an_error_not_a_pass(tmp_path: Path) -> None:
    (tmp_path / "telemetry").mkdir()
    (tmp_path / "telemetry" / "lean.py").write_text("def broken(:\n")
    r = subprocess.run([sys.executable, str(SCRIPT), "--root", str(tmp_path)],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "lean.py" in r.stderr


def test_empty_root_is_an_error_not_a_pass(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, str(SCRIPT), "--root", str(tmp_path)],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 2 and "no module under" in r.stderr, r.stdout + r.stderr


def test_repository_is_layered() -> None:
    r = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True,
                       timeout=60, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout == "check-bounds: ok\n"
