"""Schema migrations and monthly partition maintenance.

:func:`migrate` applies the ``storage/migrations/NNNN_*.sql`` files not yet recorded
in ``schema_migrations``, each in its own transaction, as the owner. A session-level
advisory lock serialises concurrent migrators (two processes starting at once): the
second waits, then finds nothing left to do. An applied file whose text has changed
raises :class:`MigrationError` rather than being silently skipped.

:func:`ensure_partitions` creates the monthly partitions of ``pose_rep_metrics`` and
``media_buffering_events`` for the current UTC month and ``months_ahead`` after it.
Inserts never depend on it: each partitioned table has a DEFAULT partition, and
creating a month's partition later moves that month's rows out of DEFAULT.
:func:`run_partition_maintenance` runs it at start-up and then periodically.

Errors are psycopg's, unchanged, except as noted; cancellation propagates (a
migration interrupted by cancellation finishes its transaction in its thread first).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import psycopg
import trio

from storage.pg import Database

log = logging.getLogger(__name__)

PARTITIONED_TABLES = ("pose_rep_metrics", "media_buffering_events")
DEFAULT_MONTHS_AHEAD = 3
MAINTENANCE_INTERVAL_S = 6 * 3600.0
MAINTENANCE_RETRY_S = 60.0
# Stable 64-bit advisory lock key for migrations.
LOCK_KEY = int.from_bytes(hashlib.sha256(b"restartix-telemetry:migrate").digest()[:8], "big",
                          signed=True)


class MigrationError(RuntimeError):
    """The recorded migrations do not match the files shipped with this build."""


@dataclass(frozen=True)
class Migration:
    version: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load_migrations() -> list[Migration]:
    """The shipped migrations, in version order."""
    folder = resources.files("storage") / "migrations"
    found = [
        Migration(version=entry.name.removesuffix(".sql"), sql=entry.read_text("utf-8"))
        for entry in folder.iterdir()
        if entry.name.endswith(".sql")
    ]
    return sorted(found, key=lambda m: m.version)


def _apply(conn: psycopg.Connection, migrations: list[Migration]) -> list[str]:
    conn.execute("SELECT pg_advisory_lock(%s)", [LOCK_KEY])
    try:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version text PRIMARY KEY, checksum text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        applied = dict(conn.execute("SELECT version, checksum FROM schema_migrations").fetchall())
        done: list[str] = []
        for m in migrations:
            if m.version in applied:
                if applied[m.version] != m.checksum:
                    raise MigrationError(
                        f"migration {m.version} was changed after it was applied"
                    )
                continue
            with conn.transaction():
                conn.execute(m.sql.encode())
                conn.execute(
                    "INSERT INTO schema_migrations (version, checksum) VALUES (%s, %s)",
                    [m.version, m.checksum],
                )
            log.info("migration applied", extra={"version": m.version})
            done.append(m.version)
        return done
    finally:
        if not conn.broken:
            conn.execute("SELECT pg_advisory_unlock(%s)", [LOCK_KEY])


async def migrate(db: Database, migrations: list[Migration] | None = None) -> list[str]:
    """Apply pending migrations; return the versions applied now (``[]`` if none)."""
    todo = load_migrations() if migrations is None else migrations
    return await db.run_admin(lambda conn: _apply(conn, todo))


def _month_starts(now: dt.datetime, months_ahead: int) -> list[dt.date]:
    now = now.astimezone(dt.UTC)
    out = []
    year, month = now.year, now.month
    for _ in range(months_ahead + 1):
        out.append(dt.date(year, month, 1))
        year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    return out


def _ensure(conn: psycopg.Connection, months: list[dt.date]) -> list[str]:
    created: list[str] = []
    for table in PARTITIONED_TABLES:
        for month in months:
            with conn.transaction():
                # Never queue the sink behind a long lock wait; retry next round.
                conn.execute("SET LOCAL lock_timeout = '5s'")
                row = conn.execute(
                    "SELECT telemetry_ensure_partition(%s::regclass, %s)", [table, month]
                ).fetchone()
            if row and row[0]:
                created.append(row[0])
    return created


async def ensure_partitions(
    db: Database,
    months_ahead: int = DEFAULT_MONTHS_AHEAD,
    *,
    now: dt.datetime | None = None,
) -> list[str]:
    """Create missing monthly partitions from ``now``'s UTC month to ``months_ahead``
    months later; return the names created. Idempotent and safe to run concurrently."""
    if months_ahead < 0:
        raise ValueError("months_ahead must be >= 0")
    months = _month_starts(now or dt.datetime.now(dt.UTC), months_ahead)
    created = await db.run_admin(lambda conn: _ensure(conn, months))
    if created:
        log.info("partitions created", extra={"partitions": created})
    return created


async def run_partition_maintenance(
    db: Database,
    *,
    months_ahead: int = DEFAULT_MONTHS_AHEAD,
    interval_s: float = MAINTENANCE_INTERVAL_S,
    retry_s: float = MAINTENANCE_RETRY_S,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run :func:`ensure_partitions` now, report started, then every ``interval_s``.

    The first run's errors propagate (start-up fails loudly). Later errors are logged
    and retried after ``retry_s``: the DEFAULT partitions keep inserts working in the
    meantime. Runs until cancelled.
    """
    await ensure_partitions(db, months_ahead)
    task_status.started()
    delay = interval_s
    while True:
        await trio.sleep(delay)
        try:
            await ensure_partitions(db, months_ahead)
        except (psycopg.Error, OSError) as exc:
            log.warning("partition maintenance failed; will retry",
                        extra={"error": f"{type(exc).__name__}: {exc}"})
            delay = retry_s
        else:
            delay = interval_s


async def migrate_main(data_dir: Path, *, database_url: str | None = None) -> None:
    """``telemetry migrate``: apply migrations and create partitions, then exit.

    Uses ``database_url``, else ``$DATABASE_URL``, else the embedded server in
    ``data_dir`` (started for the duration, then stopped).
    """
    url = database_url or os.environ.get("DATABASE_URL") or None
    db = await Database.open(database_url=url, data_dir=data_dir)
    try:
        applied = await migrate(db)
        created = await ensure_partitions(db)
        print(f"migrations applied: {', '.join(applied) or 'none'}; "
              f"partitions created: {len(created)}")
    finally:
        await db.aclose()
