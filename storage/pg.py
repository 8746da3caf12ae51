"""Postgres access for the aggregate sink: one server, two kinds of connection.

:class:`Database` either starts the embedded server from the ``pgserver`` wheel in
``data_dir / "pg"`` (when no ``database_url`` is given) or uses the server at
``database_url``. It hands out two kinds of connection, both blocking psycopg
connections driven from worker threads under ONE :class:`trio.CapacityLimiter`:

* the **sink pool** (:meth:`Database.run`): a :class:`psycopg_pool.ConnectionPool`
  whose connections log in as :data:`SINK_ROLE`, a role that is neither superuser
  nor ``BYPASSRLS`` and owns nothing, so row-level security always applies to it.
  Connecting *as* the role (rather than ``SET ROLE`` per transaction from a
  privileged login) means no code path, bug or injected ``RESET ROLE`` can lift
  it out of RLS. The pool is opened lazily on first use, because the role is
  created by the first migration.
* **owner connections** (:meth:`Database.run_admin`): short-lived connections as the
  ``database_url`` user (the embedded superuser), for migrations and partition
  maintenance only. The sink never uses them.

The sink pool's URL is ``sink_database_url`` when given, else ``database_url`` with
the user replaced by :data:`SINK_ROLE` and the password dropped; that works on the
embedded server (trust auth on a private Unix socket) and wherever the server
trusts or certificate-authenticates the role. Elsewhere give the role a password
and pass ``sink_database_url``. See ``docs/postgres.md``.

Cancellation: a blocking call cannot be interrupted half-way, so a cancelled
:meth:`run` waits for its thread to finish (bounded by ``statement_timeout``) and
returns its outcome; :class:`trio.Cancelled` is then raised at the caller's next
checkpoint. A result is thus never lost: what committed is reported as committed.
Errors from psycopg propagate unchanged.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import trio
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import ConnectionPool

log = logging.getLogger(__name__)

T = TypeVar("T")

SINK_ROLE = "telemetry_sink"
DEFAULT_CONCURRENCY = 8
STATEMENT_TIMEOUT_MS = 30_000
CONNECT_TIMEOUT_S = 10
POOL_TIMEOUT_S = 10.0
APP_NAME = "restartix-telemetry"


class DatabaseError(RuntimeError):
    """The database could not be opened, or is configured unsafely."""


# Embedded servers shared by Database objects in this process: pgdata -> [server, users].
_embedded: dict[Path, list[Any]] = {}
_embedded_lock = threading.Lock()


def _import_pgserver() -> Any:
    # pgserver resolves a runtime dir at import time and platformdirs warns when
    # XDG_RUNTIME_DIR is unset; that warning is noise, not a fault. Imported on the
    # calling (Trio) thread because warnings.catch_warnings is not thread-safe.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            import pgserver
        except ModuleNotFoundError:
            # An extra: the service image does not carry it and sets DATABASE_URL.
            raise DatabaseError(
                "DATABASE_URL is unset and embedded Postgres needs the `embedded` extra: "
                "pip install 'restartix-telemetry[embedded]', or set DATABASE_URL") from None
    return pgserver


def _acquire_embedded(pgserver: Any, data_dir: Path) -> tuple[Path, str]:
    """Start (or join) the embedded server in ``data_dir/pg``; return it and its URI."""
    data_dir.mkdir(parents=True, exist_ok=True)
    pgdata = data_dir.resolve() / "pg"
    with _embedded_lock:
        entry = _embedded.get(pgdata)
        if entry is None:
            server = pgserver.get_server(pgdata, cleanup_mode="stop")
            entry = _embedded[pgdata] = [server, 0]
        entry[1] += 1
        return pgdata, str(entry[0].get_uri())


def _release_embedded(key: Path) -> None:
    """Drop one user of the embedded server; the last one stops it (pgserver keeps a
    cross-process list, so a server another process still uses keeps running)."""
    with _embedded_lock:
        entry = _embedded.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] > 0:
            return
        del _embedded[key]
        server = entry[0]
    server.cleanup()


def sink_conninfo(owner_url: str, role: str = SINK_ROLE) -> str:
    """``owner_url`` with the user swapped for ``role`` and any password dropped."""
    params = conninfo_to_dict(owner_url)
    params.pop("password", None)
    params["user"] = role
    return make_conninfo("", **params)


def _configure(conn: psycopg.Connection) -> None:
    conn.execute(f"SET statement_timeout = {STATEMENT_TIMEOUT_MS}")


class Database:
    """An open database: the sink pool, owner connections and the backend's limiter.

    Build with :meth:`open`; close with :meth:`aclose` (which also stops an embedded
    server this object started, unless another user in this process still holds it).
    """

    def __init__(
        self,
        *,
        owner_url: str,
        sink_url: str,
        limiter: trio.CapacityLimiter,
        embedded_key: Path | None,
    ) -> None:
        self.owner_url = owner_url
        self.sink_url = sink_url
        self.limiter = limiter
        self.embedded = embedded_key is not None
        self._embedded_key = embedded_key
        self._pool: ConnectionPool[psycopg.Connection] | None = None
        self._pool_lock = trio.Lock()
        self._closed = False

    @classmethod
    async def open(
        cls,
        *,
        database_url: str | None,
        data_dir: Path,
        limiter: trio.CapacityLimiter | None = None,
        sink_database_url: str | None = None,
    ) -> Database:
        """Use ``database_url``, or start the embedded server under ``data_dir``.

        Starting the embedded server takes a second or two (``initdb`` on first use).
        Raises :class:`DatabaseError` if it cannot be started; nothing is connected
        yet, so a bad ``database_url`` surfaces on first use.
        """
        limiter = limiter or trio.CapacityLimiter(DEFAULT_CONCURRENCY)
        key: Path | None = None
        if database_url:
            owner_url = database_url
        else:
            pgserver = _import_pgserver()
            try:
                key, owner_url = await trio.to_thread.run_sync(
                    _acquire_embedded, pgserver, Path(data_dir), limiter=limiter
                )
            except Exception as exc:
                raise DatabaseError(f"embedded Postgres failed to start: {exc}") from exc
            log.info("embedded postgres running", extra={"pgdata": str(key)})
        sink_url = sink_database_url or sink_conninfo(owner_url)
        return cls(owner_url=owner_url, sink_url=sink_url, limiter=limiter, embedded_key=key)

    async def _ensure_pool(self) -> ConnectionPool[psycopg.Connection]:
        if self._closed:
            raise DatabaseError("database is closed")
        if self._pool is not None:
            return self._pool
        async with self._pool_lock:
            if self._pool is None:
                pool = await trio.to_thread.run_sync(self._open_pool, limiter=self.limiter)
                if self._closed:  # closed while we were opening: do not leak it
                    await trio.to_thread.run_sync(pool.close, 5.0)
                    raise DatabaseError("database is closed")
                self._pool = pool
            return self._pool

    def _open_pool(self) -> ConnectionPool[psycopg.Connection]:
        # Probe first: a missing role or refused login fails here with the server's
        # own message, instead of as a pool timeout.
        with psycopg.connect(self.sink_url, connect_timeout=CONNECT_TIMEOUT_S) as probe:
            row = probe.execute(
                "SELECT current_user, rolsuper, rolbypassrls FROM pg_roles"
                " WHERE rolname = current_user"
            ).fetchone()
        if row is None or row[1] or row[2]:
            raise DatabaseError(
                f"sink role {row[0] if row else '?'} is superuser or bypasses RLS; refusing"
            )
        size = max(1, int(min(self.limiter.total_tokens, 64)))
        pool: ConnectionPool[psycopg.Connection] = ConnectionPool(
            self.sink_url,
            min_size=1,
            max_size=size,
            open=False,
            kwargs={"autocommit": True, "application_name": f"{APP_NAME}-sink"},
            configure=_configure,
            check=ConnectionPool.check_connection,
            timeout=POOL_TIMEOUT_S,  # then PoolTimeout, an OperationalError: "retry later"
            name="telemetry-sink",
        )
        pool.open(wait=True, timeout=CONNECT_TIMEOUT_S)
        return pool

    async def run(self, fn: Callable[[psycopg.Connection], T]) -> T:
        """Run ``fn(conn)`` in a worker thread with a pooled sink-role connection.

        The connection is in autocommit mode: ``fn`` opens its own
        ``conn.transaction()``. Whatever ``fn`` raises propagates; the connection
        goes back to the pool (or is discarded if broken) either way.
        """
        pool = await self._ensure_pool()

        def call() -> T:
            with pool.connection() as conn:
                return fn(conn)

        return await trio.to_thread.run_sync(call, limiter=self.limiter)

    async def run_admin(self, fn: Callable[[psycopg.Connection], T]) -> T:
        """Run ``fn(conn)`` on a fresh autocommit connection as the owner (DDL, maintenance)."""
        if self._closed:
            raise DatabaseError("database is closed")

        def call() -> T:
            with psycopg.connect(
                self.owner_url,
                autocommit=True,
                connect_timeout=CONNECT_TIMEOUT_S,
                application_name=f"{APP_NAME}-admin",
            ) as conn:
                return fn(conn)

        return await trio.to_thread.run_sync(call, limiter=self.limiter)

    async def aclose(self) -> None:
        """Close the pool and release the embedded server. Idempotent.

        Runs shielded under a time bound so a cancelled caller still releases
        connections; psycopg's own close timeout bounds the wait for busy ones.
        """
        if self._closed:
            return
        self._closed = True
        pool, self._pool = self._pool, None
        with trio.move_on_after(15) as cs:
            cs.shield = True
            if pool is not None:
                await trio.to_thread.run_sync(pool.close, 5.0)
            if self._embedded_key is not None:
                await trio.to_thread.run_sync(_release_embedded, self._embedded_key)
        if cs.cancelled_caught:
            log.warning("database close timed out")
