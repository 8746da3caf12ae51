"""Postgres fixtures: one real server per test run, one fresh database per test.

Registered by ``pytest_plugins`` in ``tests/conftest.py``; test modules never import
the fixtures, only the helpers (:func:`make_event`, :func:`create_database`...).

* ``pg_admin_url`` (session, sync): ``$DATABASE_URL`` if set (a role that may create
  databases and roles), else an embedded server from the ``pgserver`` wheel in a
  temporary directory, started once and stopped (and deleted) at the end.
* ``pg_url`` (function, sync): a brand-new empty database on that server, dropped
  after the test, so tests never see each other's rows.
* ``pg_db`` (function, async): a migrated :class:`storage.pg.Database` on ``pg_url``.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio
from psycopg import sql
from psycopg.conninfo import make_conninfo

from storage.migrate import migrate
from storage.pg import Database

# One embedded server per process even if this module's fixtures are ever collected
# under several names (a plugin, and a module that imports them).
_shared: dict[str, object] = {}


@pytest.fixture(scope="session")
def pg_admin_url() -> Iterator[str]:
    external = os.environ.get("DATABASE_URL")
    if external:
        yield external
        return
    if "server" not in _shared:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs' XDG_RUNTIME_DIR notice
            import pgserver
        # Not under pytest's basetemp: concurrent pytest runs rotate (delete) those
        # directories, which would pull the data directory from under the server.
        root = Path(tempfile.mkdtemp(prefix="telemetry-test-pg-"))
        _shared["root"] = root
        _shared["server"] = pgserver.get_server(root / "pg", cleanup_mode="delete")
        _shared["users"] = 0
    server: Any = _shared["server"]
    _shared["users"] = int(_shared["users"]) + 1  # type: ignore[call-overload]
    try:
        yield server.get_uri()
    finally:
        _shared["users"] = int(_shared["users"]) - 1  # type: ignore[call-overload]
        if _shared["users"] == 0:
            root = _shared["root"]
            _shared.clear()
            server.cleanup()
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def private_tmp() -> Iterator[Path]:
    """A temporary directory outside pytest's rotated basetemp (see above)."""
    path = Path(tempfile.mkdtemp(prefix="telemetry-test-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def create_database(admin_url: str, owner: str | None = None) -> str:
    name = f"t_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        stmt = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if owner:
            stmt = sql.SQL("{} OWNER {}").format(stmt, sql.Identifier(owner))
        conn.execute(stmt)
    return name


def drop_database(admin_url: str, name: str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(name)))


@pytest.fixture
def pg_url(pg_admin_url: str) -> Iterator[str]:
    name = create_database(pg_admin_url)
    try:
        yield make_conninfo(pg_admin_url, dbname=name)
    finally:
        drop_database(pg_admin_url, name)


@pytest.fixture
async def pg_db(pg_url: str, tmp_path: Path) -> AsyncIterator[Database]:
    db = await Database.open(database_url=pg_url, data_dir=tmp_path)
    try:
        await migrate(db)
        yield db
    finally:
        await db.aclose()


def make_event(org_id: str = "org-a", session_id: str = "s-1", *,
               started_at: str = "2026-11-22T10:00:00.000Z",
               reps: int = 3, media: int = 1) -> dict[str, Any]:
    """An end-of-session event shaped like ``docs/events.md``; all its times follow
    ``started_at`` (stalls at +1 and +2 min, end at +5 min)."""
    t0 = dt.datetime.fromisoformat(started_at)

    def at(seconds: int) -> str:
        return (t0 + dt.timedelta(seconds=seconds)).isoformat().replace("+00:00", "Z")

    rep_list = [
        {"index": i, "start_ms": 1000.0 * i, "end_ms": 1000.0 * i + 900,
         "duration_ms": 900.0, "rom_deg": 80.0 + i, "tempo_up_ms": 400}
        for i in range(reps)
    ]
    views = [
        {"view_id": f"v{j}", "media_id": f"m{j}", "started_at": started_at,
         "ended_at": at(240), "startup_time_ms": 350, "watch_time_ms": 230000,
         "rebuffer_count": 2, "rebuffer_ms": 1200, "rebuffer_pct": 0.52,
         "avg_bitrate_kbps": 2400.5, "completed": True, "player": "hls.js",
         "buffering": [
             {"started_at": at(60), "duration_ms": 700, "position_s": 42.5,
              "bitrate_kbps": 1800, "after_seek": False},
             {"started_at": at(120), "duration_ms": 500, "position_s": 90.0,
              "bitrate_kbps": 1200, "after_seek": True},
         ]}
        for j in range(media)
    ]
    return {
        "type": "telemetry.session.ended",
        "schema": 1,
        "event_id": f"pose-session:{org_id}:{session_id}",
        "org_id": org_id,
        "session_id": session_id,
        "patient_id": "p-42",
        "exercise": {"kind": "squat", "side": None, "target_reps": 10},
        "started_at": started_at,
        "ended_at": at(300),
        "end_reason": "client_end",
        "error": None,
        "blob": {"key": f"{org_id}/{session_id}.bin.gz", "size": 123456, "sha256": "ab" * 32,
                 "encoding": "q16delta"},
        "pose": {"space": "image", "frames": 9000, "frames_no_pose": 120, "batches": 300,
                 "batches_duplicate": 2, "batches_skipped": 0, "gaps": 3,
                 "duration_ms": 300000, "effective_fps": 29.6, "mean_visibility": 0.91},
        "reps": {"rep_count": reps, "target_reps": 10, "rom_mean_deg": 81.0, "symmetry": None,
                 "usable_frame_share": 0.97, "active_ms": 250000, "paused_ms": 50000,
                 "profile": "squat", "fallback": False, "reps": rep_list},
        "media": views,
    }


async def deliver_behind_a_poisoned_event(outbox: Any) -> None:
    """The red team's scenario (finding 2) through ``outbox``: a summary with NUL in a
    media error message (``org-x``/``s-bad``), then ``s-1`` of three other
    organisations; the outbox runs until it holds nothing (10 s at most), then is
    closed."""
    poisoned = make_event("org-x", "s-bad")
    poisoned["media"][0]["error_message"] = "\x00"
    await outbox.publish(poisoned)
    for org in ("org-a", "org-b", "org-c"):
        await outbox.publish(make_event(org, "s-1"))
    async with trio.open_nursery() as nursery:
        await nursery.start(outbox.run)
        with trio.fail_after(10):
            while outbox.depth:  # noqa: ASYNC110 - polling a test's condition
                await trio.sleep(0.01)
        await outbox.aclose()
