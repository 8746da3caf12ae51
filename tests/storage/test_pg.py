"""Database, migrations, partitions and row-level security on a real Postgres."""

from __future__ import annotations

import datetime as dt
import uuid
from functools import partial
from pathlib import Path
from typing import Any

import psutil
import psycopg
import pytest
import trio
from psycopg import sql
from psycopg.conninfo import make_conninfo

import storage.migrate as migrate_module
from storage.migrate import (
    Migration,
    MigrationError,
    ensure_partitions,
    load_migrations,
    migrate,
    run_partition_maintenance,
)
from storage.pg import SINK_ROLE, Database, DatabaseError
from storage.sink import AggregateSink
from tests.support.pg import create_database, drop_database, make_event

NOW = dt.datetime(2026, 11, 22, 10, 0, tzinfo=dt.UTC)
DATA_TABLES = ("pose_session_metrics", "pose_rep_metrics", "media_session_metrics",
               "media_buffering_events")


def rows(conn: psycopg.Connection, query: str, *params: Any) -> list[tuple[Any, ...]]:
    return conn.execute(query, params or None).fetchall()


def partitions(conn: psycopg.Connection, parent: str) -> list[str]:
    return [r[0] for r in rows(
        conn, "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
              " WHERE i.inhparent = %s::regclass ORDER BY 1", parent)]


# -- migrations ---------------------------------------------------------------------


async def test_migrations_apply_once_and_are_idempotent(pg_url: str, tmp_path: Path) -> None:
    db = await Database.open(database_url=pg_url, data_dir=tmp_path)
    try:
        shipped = [m.version for m in load_migrations()]
        assert shipped[:2] == ["0001_init", "0002_media_pose"]
        assert await migrate(db) == shipped
        assert await migrate(db) == []
        recorded = await db.run_admin(
            lambda c: rows(c, "SELECT version FROM schema_migrations ORDER BY version"))
        assert recorded == [(v,) for v in shipped]
    finally:
        await db.aclose()


async def test_concurrent_migrators_do_not_collide(pg_url: str, tmp_path: Path) -> None:
    dbs = [await Database.open(database_url=pg_url, data_dir=tmp_path) for _ in range(3)]
    results: list[list[str]] = []

    async def run(db: Database) -> None:
        results.append(await migrate(db))

    try:
        async with trio.open_nursery() as nursery:
            for db in dbs:
                nursery.start_soon(run, db)
    finally:
        for db in dbs:
            await db.aclose()
    assert sorted(results) == [[], [], [m.version for m in load_migrations()]]


async def test_changed_migration_is_refused(pg_db: Database) -> None:
    first = load_migrations()[0]
    edited = Migration(first.version, first.sql + "\n-- edited\n")
    with pytest.raises(MigrationError, match="0001_init was changed"):
        await migrate(pg_db, [edited])
    # A new migration after the applied one still applies.
    extra = Migration("0002_test", "CREATE TABLE t_extra (id int);")
    assert await migrate(pg_db, [first, extra]) == ["0002_test"]


async def test_every_data_table_has_rls_enabled_and_forced(pg_db: Database) -> None:
    await ensure_partitions(pg_db, 1, now=NOW)

    def check(conn: psycopg.Connection) -> list[tuple[Any, ...]]:
        return rows(conn, "SELECT relname, relrowsecurity, relforcerowsecurity FROM pg_class"
                          " WHERE relkind IN ('r', 'p') AND relnamespace = 'public'::regnamespace"
                          " AND relname <> 'schema_migrations' ORDER BY 1")

    tables = await pg_db.run_admin(check)
    assert len(tables) == 4 + 2 * 3  # parents, DEFAULTs, two monthly partitions each
    assert {name for name, _, _ in tables} >= set(DATA_TABLES)
    assert all(enabled and forced for _, enabled, forced in tables), tables


# -- partitions ---------------------------------------------------------------------


async def test_partitions_are_created_ahead_and_idempotently(pg_db: Database) -> None:
    created = await ensure_partitions(pg_db, 2, now=NOW)
    assert created == [
        "pose_rep_metrics_p2026_11", "pose_rep_metrics_p2026_12", "pose_rep_metrics_p2027_01",
        "media_buffering_events_p2026_11", "media_buffering_events_p2026_12",
        "media_buffering_events_p2027_01",
    ]
    assert await ensure_partitions(pg_db, 2, now=NOW) == []
    assert await pg_db.run_admin(lambda c: partitions(c, "pose_rep_metrics")) == [
        "pose_rep_metrics_default", "pose_rep_metrics_p2026_11", "pose_rep_metrics_p2026_12",
        "pose_rep_metrics_p2027_01"]


async def test_far_future_insert_lands_in_default_then_moves_to_its_partition(
    pg_db: Database,
) -> None:
    await ensure_partitions(pg_db, 1, now=NOW)
    sink = AggregateSink(pg_db)
    far = "2031-05-17T08:00:00.000Z"
    assert await sink.store(make_event(session_id="far", started_at=far)) == "stored"

    def where(conn: psycopg.Connection) -> list[tuple[Any, ...]]:
        with conn.transaction():
            conn.execute("SELECT set_config('app.maintenance', 'on', true)")
            return rows(conn, "SELECT tableoid::regclass::text, count(*) FROM pose_rep_metrics"
                              " GROUP BY 1 UNION ALL SELECT tableoid::regclass::text, count(*)"
                              " FROM media_buffering_events GROUP BY 1 ORDER BY 1")

    assert await pg_db.run_admin(where) == [("media_buffering_events_default", 2),
                                           ("pose_rep_metrics_default", 3)]
    # Maintenance later reaches that month: the rows move out of DEFAULT.
    created = await ensure_partitions(pg_db, 0, now=dt.datetime(2031, 5, 1, tzinfo=dt.UTC))
    assert created == ["pose_rep_metrics_p2031_05", "media_buffering_events_p2031_05"]
    assert await pg_db.run_admin(where) == [("media_buffering_events_p2031_05", 2),
                                           ("pose_rep_metrics_p2031_05", 3)]
    [row] = await sink.session_rows("org-a")
    assert row["session_id"] == "far"


async def test_maintenance_task_runs_at_start_then_periodically(
    pg_db: Database, autojump_clock: trio.abc.Clock, monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = migrate_module.ensure_partitions
    calls: list[float] = []

    async def observed(db: Database, months_ahead: int = 3, **kw: Any) -> list[str]:
        calls.append(trio.current_time())
        if len(calls) == 1:
            return await real(db, months_ahead, **kw)  # the real thing, at start-up
        if len(calls) == 2:
            raise psycopg.OperationalError("injected: server went away")
        return []

    monkeypatch.setattr(migrate_module, "ensure_partitions", observed)
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(run_partition_maintenance, pg_db, months_ahead=3,
                                    interval_s=100, retry_s=10))
        assert len(calls) == 1  # the start-up run finished before started()
        await trio.sleep(215)
        nursery.cancel_scope.cancel()
    # (Checked only now: a thread wait while the task sleeps lets the autojump clock race.)
    # DEFAULT + the current month + 3 ahead.
    assert len(await pg_db.run_admin(lambda c: partitions(c, "pose_rep_metrics"))) == 5
    gaps = [round(b - a, 6) for a, b in zip(calls, calls[1:], strict=False)]
    assert gaps == [100, 10, 100]  # periodic; a failure is retried sooner, then back to normal


# -- roles and row-level security ---------------------------------------------------


async def test_sink_connects_as_unprivileged_role(pg_db: Database) -> None:
    def who(conn: psycopg.Connection) -> tuple[Any, ...]:
        row = conn.execute(
            "SELECT current_user, session_user, r.rolsuper, r.rolbypassrls, r.rolcreaterole,"
            " (SELECT count(*) FROM pg_class WHERE relowner = r.oid)"
            " FROM pg_roles r WHERE r.rolname = current_user").fetchone()
        assert row is not None
        return row

    assert await pg_db.run(who) == (SINK_ROLE, SINK_ROLE, False, False, False, 0)


async def test_one_orgs_connection_cannot_read_or_write_anothers_rows(pg_db: Database) -> None:
    await ensure_partitions(pg_db, 1)
    sink = AggregateSink(pg_db)
    await sink.store(make_event("org-a", "s-a"))
    await sink.store(make_event("org-b", "s-b"))

    def as_org(org: str | None, query: str) -> Any:
        def fn(conn: psycopg.Connection) -> Any:
            with conn.transaction():
                if org is not None:
                    conn.execute("SELECT set_config('app.org_id', %s, true)", [org])
                return rows(conn, query)
        return fn

    for table in DATA_TABLES:
        seen = await pg_db.run(as_org("org-a", f"SELECT DISTINCT org_id FROM {table}"))
        assert seen == [("org-a",)], table
        assert await pg_db.run(as_org(None, f"SELECT count(*) FROM {table}")) == [(0,)], table
    # SET LOCAL really is local: the pooled connection forgets the org afterwards.
    assert await pg_db.run(lambda c: rows(c, "SELECT count(*) FROM pose_session_metrics")) \
        == [(0,)]
    # Filters do not help: org-b's rows are invisible, not merely unselected.
    assert await pg_db.run(as_org(
        "org-a", "SELECT count(*) FROM pose_session_metrics WHERE org_id = 'org-b'")) == [(0,)]

    async def refused(org: str, query: str) -> str:
        with pytest.raises(psycopg.Error) as info:
            await pg_db.run(as_org(org, query))
        return type(info.value).__name__

    # Writing another organisation's row is refused by the policy's WITH CHECK.
    assert await refused("org-a", (
        "INSERT INTO pose_rep_metrics (org_id, session_id, session_started_at, rep_index,"
        " detail) VALUES ('org-b', 's-b', now(), 99, '{}') RETURNING 1")) \
        == "InsufficientPrivilege"
    # No UPDATE/DELETE grants, no direct partition access, no way out of RLS.
    for query in ("DELETE FROM pose_session_metrics RETURNING 1",
                  "UPDATE pose_session_metrics SET frames = 0 RETURNING 1",
                  "SELECT * FROM pose_rep_metrics_default",
                  "SELECT * FROM pose_rep_metrics_p" + dt.datetime.now(dt.UTC).strftime("%Y_%m"),
                  "SET LOCAL ROLE postgres",
                  "ALTER TABLE pose_session_metrics NO FORCE ROW LEVEL SECURITY"):
        assert await refused("org-a", query) in {"InsufficientPrivilege", "UndefinedObject"}, query
    assert await refused("org-a", "SET LOCAL row_security = off; "
                                  "SELECT * FROM pose_session_metrics") == "InsufficientPrivilege"


async def test_forced_rls_binds_a_non_superuser_owner(pg_admin_url: str, tmp_path: Path) -> None:
    """Run migrations as an ordinary (non-superuser) owner, as on a managed server:
    FORCE makes RLS apply to the owner too, and maintenance still moves DEFAULT rows."""
    owner = f"owner_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN CREATEROLE NOSUPERUSER NOBYPASSRLS").format(
            sql.Identifier(owner)))
    name = create_database(pg_admin_url, owner=owner)
    db = await Database.open(database_url=make_conninfo(pg_admin_url, dbname=name, user=owner),
                             data_dir=tmp_path)
    try:
        assert await migrate(db) == [m.version for m in load_migrations()]
        await AggregateSink(db).store(make_event(started_at="2032-02-01T00:00:00Z"))
        # The owner, without opting in, sees nothing.
        assert await db.run_admin(
            lambda c: rows(c, "SELECT current_user, count(*) FROM pose_session_metrics"
                              " GROUP BY 1")) == []
        created = await ensure_partitions(db, 0, now=dt.datetime(2032, 2, 3, tzinfo=dt.UTC))
        assert "pose_rep_metrics_p2032_02" in created
        assert len(await AggregateSink(db).session_rows("org-a")) == 1
    finally:
        await db.aclose()
        drop_database(pg_admin_url, name)
        with psycopg.connect(pg_admin_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(owner)))


async def test_sink_refuses_a_privileged_role(pg_url: str, tmp_path: Path) -> None:
    db = await Database.open(database_url=pg_url, data_dir=tmp_path, sink_database_url=pg_url)
    try:
        await migrate(db)
        with pytest.raises(DatabaseError, match="superuser or bypasses RLS"):
            await db.run(lambda c: c.execute("SELECT 1"))
    finally:
        await db.aclose()


# -- the Database object ------------------------------------------------------------


async def test_calls_share_one_limiter(pg_db: Database) -> None:
    limiter = trio.CapacityLimiter(2)
    db = Database(owner_url=pg_db.owner_url, sink_url=pg_db.sink_url, limiter=limiter,
                  embedded_key=None)
    peak = 0

    def busy(conn: psycopg.Connection) -> None:
        nonlocal peak
        peak = max(peak, limiter.borrowed_tokens)
        conn.execute("SELECT pg_sleep(0.05)")

    try:
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            for _ in range(6):
                nursery.start_soon(db.run, busy)
        assert peak == 2 and trio.current_time() - start >= 0.15
    finally:
        await db.aclose()


async def test_cancelled_call_waits_for_its_thread_and_pool_survives(pg_db: Database) -> None:
    start = trio.current_time()
    with trio.move_on_after(0.05) as scope:
        result = await pg_db.run(lambda c: rows(c, "SELECT 7 FROM pg_sleep(0.3)"))
        await trio.lowlevel.checkpoint()
        pytest.fail("cancellation not delivered at the next checkpoint")
    assert scope.cancelled_caught and result == [(7,)]
    assert trio.current_time() - start >= 0.3
    assert await pg_db.run(lambda c: rows(c, "SELECT 1")) == [(1,)]


async def test_embedded_server_starts_in_data_dir_and_stops_on_close(private_tmp: Path) -> None:
    db = await Database.open(database_url=None, data_dir=private_tmp / "data")
    pid_file = private_tmp / "data" / "pg" / "postmaster.pid"
    try:
        assert db.embedded and pid_file.exists()
        assert await migrate(db) == [m.version for m in load_migrations()]
        assert await AggregateSink(db).store(make_event()) == "stored"
        pid = int(pid_file.read_text().split()[0])
        assert psutil.pid_exists(pid)
    finally:
        await db.aclose()
    assert not pid_file.exists()
    with pytest.raises(DatabaseError, match="closed"):
        await db.run(lambda c: None)
