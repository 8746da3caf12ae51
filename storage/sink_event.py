"""A ``telemetry.session.ended`` event read as the sink's rows (contract: ``docs/events.md``).

:func:`parse_event` validates the event and returns the rows of
``pose_session_metrics``, ``pose_rep_metrics``, ``media_session_metrics`` and
``media_buffering_events`` it stands for. A malformed event raises
:class:`SinkEventError` naming the offending field; that includes text Postgres
cannot store (NUL, unpaired surrogates), anywhere in the event. Pure: no I/O, nothing
to cancel.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Mapping
from typing import Any

from psycopg.types.json import Jsonb

EVENT_TYPE = "telemetry.session.ended"
SCHEMA_VERSION = 1
END_REASONS = frozenset(
    {"client_end", "idle_timeout", "max_duration", "admin", "shutdown", "actor_error"}
)
MAX_ID = 200
MAX_REPS = 10_000
MAX_MEDIA = 500
MAX_BUFFERING = 10_000


class SinkEventError(ValueError):
    """The event is malformed; the message names the field and the fault."""


# NUL cannot be stored in text or JSONB (\u0000), and a lone surrogate has no UTF-8
# form. Found anywhere, such text would fail the whole transaction on every delivery.
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
_UNSTORABLE_MSG = "contains NUL or an unpaired surrogate, which cannot be stored"


# -- validation -------------------------------------------------------------------


def _fail(path: str, msg: str) -> SinkEventError:
    return SinkEventError(f"{path}: {msg}")


def _obj(value: Any, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise _fail(path, "expected an object")
    return value


def _text(m: Mapping[str, Any], key: str, path: str, *, required: bool = True,
          max_len: int = MAX_ID) -> str | None:
    value = m.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        raise _fail(f"{path}{key}", "expected a non-empty string")
    if len(value) > max_len:
        raise _fail(f"{path}{key}", f"longer than {max_len} characters")
    if _UNSTORABLE.search(value):
        raise _fail(f"{path}{key}", _UNSTORABLE_MSG)
    return value


INT_MAX = 2**31 - 1  # Postgres integer
BIGINT_MAX = 2**63 - 1


def _int(m: Mapping[str, Any], key: str, path: str, *, required: bool = True,
         limit: int = INT_MAX) -> int | None:
    value = m.get(key)
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _fail(f"{path}{key}", f"expected a non-negative integer, got {value!r}")
    if value > limit:
        raise _fail(f"{path}{key}", f"{value} exceeds {limit}")
    return value


def _num(m: Mapping[str, Any], key: str, path: str, *, required: bool = False) -> float | None:
    value = m.get(key)
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _fail(f"{path}{key}", f"expected a number, got {value!r}")
    try:
        number = float(value)  # a JSON integer may be too large for a float
    except OverflowError:
        raise _fail(f"{path}{key}", "number is out of range") from None
    if not math.isfinite(number):
        raise _fail(f"{path}{key}", "number is not finite")
    return number


def _bool(m: Mapping[str, Any], key: str, path: str) -> bool | None:
    value = m.get(key)
    if value is not None and not isinstance(value, bool):
        raise _fail(f"{path}{key}", f"expected true or false, got {value!r}")
    return value


def _time(m: Mapping[str, Any], key: str, path: str, *, required: bool = True
          ) -> dt.datetime | None:
    value = m.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise _fail(f"{path}{key}", "expected an ISO-8601 timestamp string")
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        raise _fail(f"{path}{key}", f"not an ISO-8601 timestamp: {value[:40]!r}") from None
    if parsed.tzinfo is None:
        raise _fail(f"{path}{key}", "timestamp lacks a UTC offset")
    return parsed


def _json(value: Any, path: str) -> Any:
    """Check that ``value`` is plain JSON that JSONB can hold: finite numbers (JSONB
    rejects NaN), no NUL or unpaired surrogate in any string or key."""
    if isinstance(value, float) and not math.isfinite(value):
        raise _fail(path, "number is not finite")
    if isinstance(value, str) and _UNSTORABLE.search(value):
        raise _fail(path, _UNSTORABLE_MSG)
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, str):
                raise _fail(path, "object keys must be strings")
            if _UNSTORABLE.search(k):
                raise _fail(path, f"a key {_UNSTORABLE_MSG}")
            _json(v, f"{path}.{k}")
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _json(v, f"{path}[{i}]")
    elif value is not None and not isinstance(value, str | int | float | bool):
        raise _fail(path, f"not a JSON value: {type(value).__name__}")
    return value


def _error_text(value: Any) -> str | None:
    # Free text from the producer's failure path: truncated, never a reason to reject
    # (and so lose) the session, so what Postgres cannot store is replaced, not refused.
    if value is None:
        return None
    text = value if isinstance(value, str) else repr(value)
    return _UNSTORABLE.sub("\ufffd", text[:2000])


def _list(m: Mapping[str, Any], key: str, path: str, limit: int) -> list[Any]:
    value = m.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise _fail(f"{path}{key}", "expected a list")
    if len(value) > limit:
        raise _fail(f"{path}{key}", f"more than {limit} entries")
    return value


def _reps(ev: Mapping[str, Any], org: str, sid: str, started: dt.datetime
          ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    raw = ev.get("reps")
    cols: dict[str, Any] = {"rep_count": None, "usable_frame_share": None, "active_ms": None,
                            "paused_ms": None, "rep_profile": None, "reps_summary": None}
    if raw is None:
        return cols, []
    reps = _obj(raw, "reps")
    _json(reps, "reps")
    profile = reps.get("profile")
    cols.update(
        rep_count=_int(reps, "rep_count", "reps.", required=False),
        usable_frame_share=_num(reps, "usable_frame_share", "reps."),
        active_ms=_int_ms(reps, "active_ms", "reps."),
        paused_ms=_int_ms(reps, "paused_ms", "reps."),
        rep_profile=profile if isinstance(profile, str) else None,
        reps_summary=Jsonb({k: v for k, v in reps.items() if k != "reps"}),
    )
    rows = []
    for i, item in enumerate(_list(reps, "reps", "reps.", MAX_REPS)):
        p = f"reps.reps[{i}]."
        rep = _obj(item, p[:-1])
        index = _int(rep, "index", p, required=False)
        rows.append({
            "org_id": org, "session_id": sid, "session_started_at": started,
            "rep_index": i if index is None else index,
            "start_ms": _num(rep, "start_ms", p), "end_ms": _num(rep, "end_ms", p),
            "duration_ms": _num(rep, "duration_ms", p), "rom_deg": _num(rep, "rom_deg", p),
            "detail": Jsonb(dict(rep)),
        })
    if len({r["rep_index"] for r in rows}) != len(rows):
        raise _fail("reps.reps", "duplicate rep index")
    return cols, rows


def _int_ms(m: Mapping[str, Any], key: str, path: str) -> int | None:
    value = _num(m, key, path)
    if value is not None and not 0 <= value <= BIGINT_MAX / 2:
        raise _fail(f"{path}{key}", f"expected a non-negative duration, got {value!r}")
    return None if value is None else round(value)


_MEDIA_NUMS = ("startup_time_ms", "watch_time_ms", "rebuffer_ms", "rebuffer_pct",
               "avg_bitrate_kbps", "completion_pct")
_MEDIA_INTS = ("rebuffer_count", "quality_changes", "seek_count", "error_count")


def _media(ev: Mapping[str, Any], org: str, sid: str, started: dt.datetime
           ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    views: list[dict[str, Any]] = []
    stalls: list[dict[str, Any]] = []
    for i, item in enumerate(_list(ev, "media", "", MAX_MEDIA)):
        p = f"media[{i}]."
        view = _obj(item, p[:-1])
        _json(view, p[:-1])
        row: dict[str, Any] = {
            "org_id": org, "session_id": sid, "session_started_at": started,
            "view_id": _text(view, "view_id", p), "media_id": _text(view, "media_id", p),
            "started_at": _time(view, "started_at", p, required=False),
            "ended_at": _time(view, "ended_at", p, required=False),
            "completed": _bool(view, "completed", p),
            "detail": Jsonb({k: v for k, v in view.items() if k != "buffering"}),
        }
        row.update({k: _num(view, k, p) for k in _MEDIA_NUMS})
        row.update({k: _int(view, k, p, required=False) for k in _MEDIA_INTS})
        views.append(row)
        for j, b in enumerate(_list(view, "buffering", p, MAX_BUFFERING)):
            q = f"{p}buffering[{j}]."
            stall = _obj(b, q[:-1])
            stalls.append({
                "org_id": org, "session_id": sid, "view_id": row["view_id"], "seq": j,
                "started_at": _time(stall, "started_at", q),
                "duration_ms": _num(stall, "duration_ms", q),
                "position_s": _num(stall, "position_s", q),
                "bitrate_kbps": _num(stall, "bitrate_kbps", q),
                "after_seek": bool(_bool(stall, "after_seek", q)),
            })
    if len({v["view_id"] for v in views}) != len(views):
        raise _fail("media", "duplicate view_id")
    return views, stalls


def parse_event(ev: Any) -> dict[str, Any]:
    """Validate an end-of-session event; return the rows to write, by table.

    Raises :class:`SinkEventError` naming the first offending field. Unknown keys are
    ignored (forward compatibility); known ones must have the documented type.
    """
    ev = _obj(ev, "event")
    if ev.get("type") != EVENT_TYPE:
        raise _fail("type", f"expected {EVENT_TYPE!r}, got {ev.get('type')!r}")
    if ev.get("schema") != SCHEMA_VERSION:
        raise _fail("schema", f"unsupported schema version {ev.get('schema')!r}")
    org = _text(ev, "org_id", "")
    sid = _text(ev, "session_id", "")
    assert org is not None and sid is not None
    started = _time(ev, "started_at", "")
    ended = _time(ev, "ended_at", "")
    assert started is not None and ended is not None
    if ended < started:
        raise _fail("ended_at", "is before started_at")
    if ev.get("end_reason") not in END_REASONS:
        raise _fail("end_reason", f"expected one of {sorted(END_REASONS)}")
    ex = _obj(ev.get("exercise") or {}, "exercise")
    blob = ev.get("blob")
    blob = None if blob is None else _obj(blob, "blob")
    pose = _obj(ev.get("pose"), "pose")
    space = pose.get("space")
    if space not in (None, "image", "world"):
        raise _fail("pose.space", "expected 'image', 'world' or null")
    session: dict[str, Any] = {
        "org_id": org, "session_id": sid, "schema_version": SCHEMA_VERSION,
        "event_id": _text(ev, "event_id", ""), "patient_id": _text(ev, "patient_id", ""),
        "exercise_kind": _text(ex, "kind", "exercise.", required=False),
        "exercise_side": _text(ex, "side", "exercise.", required=False),
        "target_reps": _int(ex, "target_reps", "exercise.", required=False),
        "started_at": started, "ended_at": ended, "end_reason": ev["end_reason"],
        "error": _error_text(ev.get("error")),
        "blob_key": None, "blob_size": None, "blob_sha256": None, "blob_encoding": None,
        "pose_space": space,
        "effective_fps": _num(pose, "effective_fps", "pose."),
        "mean_visibility": _num(pose, "mean_visibility", "pose."),
    }
    for k in ("frames", "frames_no_pose", "batches", "batches_duplicate", "batches_skipped",
              "gaps"):
        session[k] = _int(pose, k, "pose.")
    session["duration_ms"] = _int(pose, "duration_ms", "pose.", limit=BIGINT_MAX)
    if blob is not None:
        session.update(
            blob_key=_text(blob, "key", "blob.", max_len=1024),
            blob_size=_int(blob, "size", "blob.", limit=BIGINT_MAX),
            blob_sha256=_text(blob, "sha256", "blob.", required=False),
            blob_encoding=_text(blob, "encoding", "blob.", required=False),
        )
    rep_cols, reps = _reps(ev, org, sid, started)
    session.update(rep_cols)
    views, stalls = _media(ev, org, sid, started)
    session["media_views"] = len(views)
    media_pose = ev.get("media_pose")
    session["media_pose"] = None if media_pose is None else Jsonb(
        _json(_obj(media_pose, "media_pose"), "media_pose"))
    return {"session": session, "reps": reps, "views": views, "stalls": stalls}
