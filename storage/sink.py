"""The aggregate sink: the Core API side of the bus, writing one finished session's rows.

:meth:`AggregateSink.store` validates a ``telemetry.session.ended`` event (contract:
``docs/events.md``), then writes ``pose_session_metrics``, ``pose_rep_metrics``,
``media_session_metrics`` and ``media_buffering_events`` in ONE transaction on a
sink-role connection with ``app.org_id`` set locally to the event's organisation, so
row-level security checks every row. The session row is inserted first with
``ON CONFLICT DO NOTHING``; if it already exists the event is a redelivery and
nothing else is written (concurrent duplicates serialise on its primary key).

Errors: a malformed event raises :class:`SinkEventError` naming the offending field,
before any I/O; that includes text Postgres cannot store (NUL, unpaired surrogates),
anywhere in the event. Database errors propagate: :func:`is_permanent` tells the ones
no retry can fix (the event, or a value in it, is refused: ``SinkEventError``,
psycopg's ``DataError``) from the rest (``OperationalError`` means "retry later").
As a bus subscriber (:meth:`AggregateSink.handle`) the permanent ones are raised as
:class:`storage.bus.EventRejected`, so the outbox sets the event aside instead of
retrying it. Cancellation propagates once the in-flight transaction has finished in
its thread; the transaction either committed or rolled back as a whole.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import psycopg
from psycopg.rows import dict_row

from storage.bus import EventRejected
from storage.pg import Database
from storage.sink_event import (
    _MEDIA_INTS,
    _MEDIA_NUMS,
    EVENT_TYPE,
    SCHEMA_VERSION,
    SinkEventError,
    parse_event,
)

# The event's reading stays importable from here, where it always was.
__all__ = [
    "EVENT_TYPE",
    "INSERT_REP",
    "INSERT_SESSION",
    "INSERT_STALL",
    "INSERT_VIEW",
    "SCHEMA_VERSION",
    "AggregateSink",
    "SinkEventError",
    "describe_refusal",
    "is_permanent",
    "parse_event",
    "set_org",
]


def is_permanent(exc: BaseException) -> bool:
    """True if storing the event failed for a reason a retry cannot fix: the event is
    malformed, or Postgres refused a value in it (``DataError``: a NUL, an untranslatable
    character, a number out of range). Connection and server faults are transient."""
    return isinstance(exc, SinkEventError | psycopg.DataError)


# -- writing ----------------------------------------------------------------------


def describe_refusal(exc: Exception) -> str:
    """What a refusal says: the field and the fault, or Postgres's primary message
    (psycopg's own message when it refused the value before sending it)."""
    if isinstance(exc, psycopg.Error):
        return f"rejected by the database: {exc.diag.message_primary or str(exc)[:200]}"
    return str(exc)


def _insert(table: str, cols: list[str], conflict: str = "") -> str:
    names = ", ".join(cols)
    values = ", ".join(f"%({c})s" for c in cols)
    return f"INSERT INTO {table} ({names}) VALUES ({values}) {conflict}"


_SESSION_COLS = [
    "org_id", "session_id", "event_id", "schema_version", "patient_id", "exercise_kind",
    "exercise_side", "target_reps", "started_at", "ended_at", "end_reason", "error",
    "blob_key", "blob_size", "blob_sha256", "blob_encoding", "pose_space", "frames",
    "frames_no_pose", "batches", "batches_duplicate", "batches_skipped", "gaps",
    "duration_ms", "effective_fps", "mean_visibility", "rep_count", "usable_frame_share",
    "active_ms", "paused_ms", "rep_profile", "reps_summary", "media_views", "media_pose",
]
_REP_COLS = ["org_id", "session_id", "session_started_at", "rep_index", "start_ms", "end_ms",
             "duration_ms", "rom_deg", "detail"]
_VIEW_COLS = ["org_id", "session_id", "view_id", "media_id", "session_started_at",
              "started_at", "ended_at", *_MEDIA_NUMS, *_MEDIA_INTS, "completed", "detail"]
_STALL_COLS = ["org_id", "session_id", "view_id", "seq", "started_at", "duration_ms",
               "position_s", "bitrate_kbps", "after_seek"]

INSERT_SESSION = _insert("pose_session_metrics", _SESSION_COLS,
                         "ON CONFLICT (org_id, session_id) DO NOTHING RETURNING 1")
INSERT_REP = _insert("pose_rep_metrics", _REP_COLS)
INSERT_VIEW = _insert("media_session_metrics", _VIEW_COLS)
INSERT_STALL = _insert("media_buffering_events", _STALL_COLS)


def set_org(conn: psycopg.Connection, org_id: str) -> None:
    """``SET LOCAL app.org_id``: scope the current transaction to one organisation."""
    conn.execute("SELECT set_config('app.org_id', %s, true)", [org_id])


def _write(conn: psycopg.Connection, rows: dict[str, Any]) -> bool:
    session = rows["session"]
    with conn.transaction():
        set_org(conn, session["org_id"])
        if conn.execute(INSERT_SESSION, session).fetchone() is None:
            return False  # redelivery: the first delivery's rows stand
        with conn.cursor() as cur:
            for sql, key in ((INSERT_REP, "reps"), (INSERT_VIEW, "views"),
                             (INSERT_STALL, "stalls")):
                if rows[key]:
                    cur.executemany(sql, rows[key])
    return True


class AggregateSink:
    """Writes end-of-session events to Postgres; a :class:`storage.bus.Bus` subscriber."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def store(self, event: Mapping[str, Any]) -> Literal["stored", "duplicate"]:
        """Validate and write ``event``; ``"duplicate"`` if the session was already stored.
        Errors as in the module docstring."""
        rows = parse_event(event)
        try:
            stored = await self.db.run(lambda conn: _write(conn, rows))
        except UnicodeEncodeError:
            # Text with no UTF-8 form that validation missed: psycopg cannot even send
            # it, so it is the event's fault, as permanent as a malformed field.
            raise SinkEventError("event: text that cannot be encoded as UTF-8") from None
        return "stored" if stored else "duplicate"

    async def handle(self, event: Mapping[str, Any]) -> None:
        """Bus subscriber entry point: :meth:`store`, discarding the outcome. A refusal
        no retry can fix (:func:`is_permanent`) is raised as
        :class:`~storage.bus.EventRejected`; anything else propagates unchanged."""
        try:
            await self.store(event)
        except Exception as exc:  # trio.Cancelled is not an Exception: it propagates
            if is_permanent(exc):
                raise EventRejected(f"sink refused the event: {describe_refusal(exc)}") from exc
            raise

    async def session_rows(self, org_id: str) -> list[dict[str, Any]]:
        """``pose_session_metrics`` rows of one organisation, oldest first, read under
        that organisation's RLS scope."""
        return await self._rows(org_id, "pose_session_metrics", "started_at, session_id")

    async def media_rows(self, org_id: str) -> list[dict[str, Any]]:
        """``media_session_metrics`` rows (one per media view) of one organisation,
        read under its RLS scope."""
        return await self._rows(org_id, "media_session_metrics", "session_id, started_at")

    async def _rows(self, org_id: str, table: str, order: str) -> list[dict[str, Any]]:
        if not isinstance(org_id, str) or not org_id:
            raise ValueError("org_id must be a non-empty string")
        assert table in ("pose_session_metrics", "media_session_metrics")

        def read(conn: psycopg.Connection) -> list[dict[str, Any]]:
            with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
                set_org(conn, org_id)
                cur.execute(f"SELECT * FROM {table} ORDER BY {order}")
                return cur.fetchall()

        return await self.db.run(read)
