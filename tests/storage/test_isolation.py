"""Tenant isolation in Postgres, proved against a real server.

* A pooled sink connection used for one organisation never carries that
  organisation's ``app.org_id`` into the next transaction (``SET LOCAL``
  semantics), also after a failed transaction; the pool is one connection, so
  "the next transaction" is provably on the same backend.
* Scoped to one organisation, the sink role reads zero rows of another in all
  four tables (and zero rows when scoped to none), cannot write another's rows,
  and cannot switch row security off.
* Row-level security is enabled and forced on every table and partition; the sink
  role is neither superuser nor BYPASSRLS; every unique key and foreign key
  includes ``org_id``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio

from storage.blobs import blob_key
from storage.migrate import ensure_partitions, migrate
from storage.pg import SINK_ROLE, Database
from storage.sink import INSERT_SESSION, AggregateSink, parse_event, set_org
from tests.support.pg import make_event

TABLES = ("pose_session_metrics", "pose_rep_metrics", "media_session_metrics",
          "media_buffering_events")
# (org, session) -> the event stored for it; org-a and org-b share the id "s-1".
EVENTS = [("org-a", "s-1"), ("org-a", "s-2"), ("org-b", "s-1"), ("org-b", "s-3")]


@pytest.fixture
async def one_conn_db(pg_url: str, tmp_path: Path) -> AsyncIterator[Database]:
    """A migrated database whose sink pool holds exactly one connection."""
    db = await Database.open(database_url=pg_url, data_dir=tmp_path,
                             limiter=trio.CapacityLimiter(1))
    try:
        await migrate(db)
        # a monthly partition next to DEFAULT, so partitions are covered too
        await ensure_partitions(db, 0, now=dt.datetime(2026, 11, 1, tzinfo=dt.UTC))
        yield db
    finally:
        await db.aclose()


def org_setting(conn: psycopg.Connection) -> tuple[Any, int, Any, int]:
    """(app.org_id outside a transaction, backend pid, app.org_id inside a fresh
    transaction, rows visible in pose_session_metrics in that transaction)."""
    outside, pid = conn.execute(
        "SELECT current_setting('app.org_id', true), pg_backend_pid()").fetchone()  # type: ignore[misc]
    with conn.transaction():
        inside = conn.execute("SELECT current_setting('app.org_id', true)").fetchone()[0]  # type: ignore[index]
        visible = conn.execute("SELECT count(*) FROM pose_session_metrics").fetchone()[0]  # type: ignore[index]
    return outside, pid, inside, visible


async def test_pooled_connection_never_carries_an_org(one_conn_db: Database) -> None:
    db = one_conn_db
    sink = AggregateSink(db)
    _, pid0, _, _ = await db.run(org_setting)
    pids = {pid0}
    stored: dict[str, int] = {}
    for org, sid in EVENTS:
        assert await sink.store(make_event(org, sid)) == "stored"
        stored[org] = stored.get(org, 0) + 1
        outside, pid, inside, visible = await db.run(org_setting)
        pids.add(pid)
        assert outside in (None, "") and inside in (None, ""), (org, outside, inside)
        assert visible == 0  # unscoped: fail closed, although rows exist
        assert len(await sink.session_rows(org)) == stored[org]  # a scoped read...
        assert (await db.run(org_setting))[2] in (None, "")  # ...leaves nothing behind

    def fail_after_scoping(conn: psycopg.Connection) -> None:
        with conn.transaction():
            set_org(conn, "org-a")
            assert conn.execute("SELECT count(*) FROM pose_session_metrics").fetchone()[0] == 2  # type: ignore[index]
            raise RuntimeError("handler failed mid-transaction")

    with pytest.raises(RuntimeError):
        await db.run(fail_after_scoping)
    outside, pid, inside, visible = await db.run(org_setting)
    pids.add(pid)
    assert (outside in (None, ""), inside in (None, ""), visible) == (True, True, 0)
    assert len(pids) == 1, "the pool must have reused its single connection"

    # Control: a session-level setting WOULD leak into the next use of the connection,
    # so the checks above can fail; the sink only ever sets it transaction-locally.
    await db.run(lambda conn: conn.execute("SELECT set_config('app.org_id', 'org-a', false)"))
    try:
        leaked = await db.run(org_setting)
        assert (leaked[1], leaked[2], leaked[3]) == (pid0, "org-a", 2)
    finally:
        await db.run(lambda conn: conn.execute("RESET app.org_id"))
    assert (await db.run(org_setting))[3] == 0


async def owner_counts(db: Database) -> dict[tuple[str, str], int]:
    def read(conn: psycopg.Connection) -> dict[tuple[str, str], int]:
        out: dict[tuple[str, str], int] = {}
        with conn.transaction():
            conn.execute("SELECT set_config('app.maintenance', 'on', true)")
            for t in TABLES:
                for org, n in conn.execute(f"SELECT org_id, count(*) FROM {t} GROUP BY org_id"):
                    out[(t, org)] = n
        return out

    return await db.run_admin(read)


async def test_scoped_reads_see_zero_rows_of_another_org(one_conn_db: Database) -> None:
    db = one_conn_db
    sink = AggregateSink(db)
    for org, sid in EVENTS:
        assert await sink.store(make_event(org, sid, reps=3, media=2)) == "stored"
    truth = await owner_counts(db)
    for t in TABLES:  # both orgs really have rows in every table
        assert truth[(t, "org-a")] > 0 and truth[(t, "org-b")] > 0, t

    def scoped(org: str | None) -> Any:
        def read(conn: psycopg.Connection) -> dict[str, tuple[int, int]]:
            out = {}
            with conn.transaction():
                if org is not None:
                    set_org(conn, org)
                for t in TABLES:
                    own, other = conn.execute(
                        f"SELECT count(*) FILTER (WHERE org_id = %(o)s),"
                        f" count(*) FILTER (WHERE org_id IS DISTINCT FROM %(o)s) FROM {t}",
                        {"o": org}).fetchone()  # type: ignore[misc]
                    out[t] = (own, other)
            return out
        return read

    for org in ("org-a", "org-b"):
        seen = await db.run(scoped(org))
        for t in TABLES:
            assert seen[t] == (truth[(t, org)], 0), (org, t, seen[t])
        # the same session id in the other org is not visible either
        rows = await sink.session_rows(org)
        assert {r["org_id"] for r in rows} == {org}
    assert all(v == (0, 0) for v in (await db.run(scoped(None))).values())

    # writing another organisation's row is refused by the policy's WITH CHECK
    rows_b = parse_event(make_event("org-b", "s-new"))

    def write_other(conn: psycopg.Connection) -> None:
        with conn.transaction():
            set_org(conn, "org-a")
            conn.execute(INSERT_SESSION, rows_b["session"])

    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
        await db.run(write_other)

    # and row security cannot be switched off by the sink role
    def no_rls(conn: psycopg.Connection) -> None:
        with conn.transaction():
            conn.execute("SET LOCAL row_security = off")
            conn.execute("SELECT count(*) FROM pose_session_metrics").fetchone()

    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
        await db.run(no_rls)
    # nor can it touch the rows it may see: no UPDATE or DELETE grant
    def update(conn: psycopg.Connection) -> None:
        with conn.transaction():
            set_org(conn, "org-a")
            conn.execute("UPDATE pose_session_metrics SET frames = 0")

    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        await db.run(update)
    assert await owner_counts(db) == truth


async def test_rls_forced_everywhere_and_sink_role_unprivileged(one_conn_db: Database) -> None:
    db = one_conn_db
    role = await db.run(lambda conn: conn.execute(
        "SELECT current_user, rolsuper, rolbypassrls, rolcreaterole, rolcreatedb"
        " FROM pg_roles WHERE rolname = current_user").fetchone())
    assert role == (SINK_ROLE, False, False, False, False)

    def catalog(conn: psycopg.Connection) -> list[tuple[str, bool, bool, str]]:
        return conn.execute(
            "SELECT c.relname, c.relrowsecurity, c.relforcerowsecurity, c.relkind::text"
            " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p')"
            " AND c.relname <> 'schema_migrations' ORDER BY 1").fetchall()

    tables = await db.run_admin(catalog)
    names = {t[0] for t in tables}
    assert set(TABLES) <= names
    assert {"pose_rep_metrics_default", "pose_rep_metrics_p2026_11",
            "media_buffering_events_p2026_11"} <= names
    not_forced = [t for t in tables if not (t[1] and t[2])]
    assert not not_forced, f"tables without forced row-level security: {not_forced}"
    # the one table without organisation data is out of the sink's reach entirely
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        await db.run(lambda conn: conn.execute("SELECT * FROM schema_migrations").fetchall())


async def test_unique_and_foreign_keys_include_org_id(one_conn_db: Database) -> None:
    def keys(conn: psycopg.Connection) -> list[tuple[str, str, str, list[str]]]:
        return conn.execute("""
            SELECT c.relname, i.relname, 'unique index',
                   array_agg(a.attname::text ORDER BY a.attnum)
              FROM pg_index x
              JOIN pg_class c ON c.oid = x.indrelid
              JOIN pg_class i ON i.oid = x.indexrelid
              JOIN pg_namespace n ON n.oid = c.relnamespace
              JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = ANY (x.indkey)
             WHERE n.nspname = 'public' AND x.indisunique AND c.relname <> 'schema_migrations'
             GROUP BY 1, 2
            UNION ALL
            SELECT c.relname, k.conname, k.contype::text,
                   array_agg(a.attname::text ORDER BY a.attnum)
              FROM pg_constraint k
              JOIN pg_class c ON c.oid = k.conrelid
              JOIN pg_namespace n ON n.oid = c.relnamespace
              JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = ANY (k.conkey)
             WHERE n.nspname = 'public' AND k.contype IN ('p', 'u', 'f')
               AND c.relname <> 'schema_migrations'
             GROUP BY 1, 2, 3
        """).fetchall()

    found = await one_conn_db.run_admin(keys)
    per_table = {t for t, _, kind, _ in found if kind in ("p", "u", "unique index")}
    assert set(TABLES) <= per_table  # every table has a unique key to check
    assert any(kind == "f" for _, _, kind, _ in found)
    missing = [(t, name, kind, cols) for t, name, kind, cols in found if "org_id" not in cols]
    assert not missing, f"keys without org_id: {missing}"
    # a session id may repeat across organisations, and does in EVENTS
    sink = AggregateSink(one_conn_db)
    assert await sink.store(make_event("org-a", "same")) == "stored"
    assert await sink.store(make_event("org-b", "same")) == "stored"


def test_blob_keys_start_with_the_org() -> None:
    assert blob_key("org-a", "s-1") == "org-a/s-1.bin.gz"
    for org, sid in (("../org-b", "s"), ("org-a", "../org-b/s"), ("org-a/x", "s"), ("", "s")):
        with pytest.raises(ValueError):
            blob_key(org, sid)
