"""The media event batch (``POST /v1/media/events``, JSON): strict decoder.

Shape and rules are specified in ``docs/media-metrics.md``::

    {"media_id": "ex-squat-01", "view_id": "v-7f3a", "media_duration_s": 312.5,
     "events": [{"id": "e-1", "type": "session_start", "t_ms": 1000, "ttfb_ms": 180}, ...]}

:func:`decode_media_batch` raises :class:`MediaBatchError` for the first fault it finds;
``code`` is machine-readable and ``str(exc)`` names the place, e.g.
``events[3].position_seconds: must be >= 0``. The message never echoes free text from
the body (only numbers and strings that already passed a strict charset check), so it
is safe to log and to return to the client. The ``error`` event's ``message`` is
truncated and has URL query strings removed, but may still contain URLs: never log it.
Any string holding NUL or an unpaired surrogate (valid JSON: ``"\\u0000"``,
``"\\ud800"``) is refused with ``bad_text``: Postgres cannot store it, and it would
make the sink refuse the whole session's summary.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from domain.errors import MediaBatchError

MAX_BYTES = 256 * 1024
T_MS_MAX = 86_400_000  # 24 h of client clock: anything later is a broken clock
DURATION_MAX_S = 86_400.0
POSITION_TOLERANCE_S = 2.0  # players report currentTime slightly past the duration
MS_MAX = 600_000  # ttfb / load time / CDN response time: 10 min is already absurd
COUNT_MAX = 100_000_000
BITRATE_MAX = 1_000_000_000  # bits/s
MESSAGE_MAX = 200
MILESTONES = (25, 50, 75, 95)
CONNECTION_TYPES = frozenset({
    "slow-2g", "2g", "3g", "4g", "5g", "wifi", "ethernet", "cellular", "other", "unknown",
})
END_REASONS = frozenset({"completed", "user_exit", "error", "session_ended", "unknown"})
ERROR_CODES = (
    "body_too_large", "bad_json", "wrong_type", "unknown_field", "missing_field", "bad_id",
    "out_of_range", "beyond_media_duration", "bad_format", "bad_enum", "unknown_event_type",
    "empty_batch", "too_many_events", "duplicate_event_id", "non_monotonic_time", "bad_text",
)

_ID = re.compile(r"[A-Za-z0-9_.:\-]{1,64}")
_LONG_ID = re.compile(r"[A-Za-z0-9_.:\-]{1,128}")
_RESOLUTION = re.compile(r"[1-9][0-9]{1,3}p|[1-9][0-9]{1,4}x[1-9][0-9]{1,4}")
# Characters Postgres cannot store (text refuses NUL, JSONB refuses \u0000, and a lone
# surrogate has no UTF-8 form). Accepting one would poison the session's summary at
# the sink, so every string of the body is checked here, before anything is applied.
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
_URL_TAIL = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s?#]*)[?#]\S*")
_TOP_KEYS = frozenset({"media_id", "view_id", "media_duration_s", "events"})
_COMMON = frozenset({"id", "type", "t_ms"})


@dataclass(frozen=True)
class MediaEvent:
    """One validated player event. ``t_ms``: client ms since the exercise session
    started (the pose frames' clock). ``fields``: the type-specific fields that were
    present (absent or null optional fields are left out), already typed."""

    event_id: str
    type: str
    t_ms: int
    fields: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class MediaBatch:
    media_id: str
    view_id: str
    media_duration_s: float | None
    events: tuple[MediaEvent, ...]


# -- field kinds: each takes (value, path, position cap) and returns the typed value --

def _integer(v: Any, path: str) -> int:
    """A JSON integer. JSON has one number type, and JSON Schema (the OpenAPI
    document's) counts any number without a fractional part as an integer, so
    ``116.0`` is 116 -- some encoders write whole numbers so."""
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise MediaBatchError("wrong_type", path, "must be an integer")
    return v


def _int_in(lo: int, hi: int) -> Callable[[Any, str, float], int]:
    def check(v: Any, path: str, _cap: float) -> int:
        v = _integer(v, path)
        if not lo <= v <= hi:
            raise MediaBatchError("out_of_range", path, f"must be within [{lo}, {hi}]")
        return v
    return check


def _number(v: Any, path: str) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise MediaBatchError("wrong_type", path, "must be a number")
    # A JSON integer may be arbitrarily large; float() of it raises OverflowError.
    if isinstance(v, int) and abs(v) > 1e300 or not math.isfinite(v):
        raise MediaBatchError("out_of_range", path, "must be finite")
    return float(v)


def _num_in(lo: float, hi: float) -> Callable[[Any, str, float], float]:
    def check(v: Any, path: str, _cap: float) -> float:
        x = _number(v, path)
        if x < lo:
            raise MediaBatchError("out_of_range", path, f"must be >= {lo:g}")
        if x > hi:
            raise MediaBatchError("out_of_range", path, f"must be <= {hi:g}")
        return x
    return check


def _position(v: Any, path: str, cap: float) -> float:
    x = _number(v, path)
    if x < 0:
        raise MediaBatchError("out_of_range", path, "must be >= 0")
    if x > cap >= DURATION_MAX_S:
        raise MediaBatchError("out_of_range", path, f"must be <= {cap:g}")
    if x > cap:
        raise MediaBatchError("beyond_media_duration", path,
                              f"{x:g} s is beyond the media duration (max {cap:g})")
    return x


def _text(v: Any, path: str) -> str:
    """Every string value of the body passes here: the type, then storability."""
    if not isinstance(v, str):
        raise MediaBatchError("wrong_type", path, "must be a string")
    if _UNSTORABLE.search(v):
        raise MediaBatchError("bad_text", path,
                              "must not contain NUL or unpaired surrogate characters")
    return v


def _pattern(rx: re.Pattern[str], what: str) -> Callable[[Any, str, float], str]:
    def check(v: Any, path: str, _cap: float) -> str:
        if not rx.fullmatch(_text(v, path)):
            raise MediaBatchError("bad_format", path, f"must be {what}")
        return v
    return check


def _enum(allowed: frozenset[str] | tuple[int, ...], kind: str) -> Callable[..., Any]:
    shown = ", ".join(str(a) for a in sorted(allowed))

    def check(v: Any, path: str, _cap: float) -> Any:
        if kind == "str":
            _text(v, path)
        else:
            v = _integer(v, path)
        if v not in allowed:
            raise MediaBatchError("bad_enum", path, f"must be one of: {shown}")
        return v
    return check


def _message(v: Any, path: str, _cap: float) -> str:
    """Free text: kept, cut to MESSAGE_MAX characters, URL query/fragment removed."""
    return _URL_TAIL.sub(r"\1?…", _text(v, path))[:MESSAGE_MAX]


def _boolean(v: Any, path: str, _cap: float) -> bool:
    if not isinstance(v, bool):
        raise MediaBatchError("wrong_type", path, "must be true or false")
    return v


_MS = _num_in(0, MS_MAX)
_CUM_MS = _num_in(0, T_MS_MAX)
_COUNT = _int_in(0, COUNT_MAX)
_BITRATE = _num_in(0, BITRATE_MAX)
_RES = _pattern(_RESOLUTION, 'a resolution like "720p" or "1280x720"')
_CODE = _pattern(_ID, "1-64 characters of [A-Za-z0-9_.:-]")
_POS = _position

# type -> field -> (kind, required)
SPECS: dict[str, dict[str, tuple[Callable[..., Any], bool]]] = {
    "session_start": {"ttfb_ms": (_MS, False), "load_time_ms": (_MS, False),
                      "connection_type": (_enum(CONNECTION_TYPES, "str"), False),
                      "position_seconds": (_POS, False)},
    "play": {"position_seconds": (_POS, True)},
    "pause": {"position_seconds": (_POS, True)},
    "seek": {"position_seconds": (_POS, True), "from_position_seconds": (_POS, False)},
    "heartbeat": {"position_seconds": (_POS, True), "buffering_count": (_COUNT, True),
                  "buffering_duration_ms": (_CUM_MS, True), "current_bitrate": (_BITRATE, False),
                  "resolution": (_RES, False), "dropped_frames": (_COUNT, False)},
    "buffering_start": {"position_seconds": (_POS, True), "bitrate_before": (_BITRATE, False),
                        "cdn_response_time_ms": (_MS, False)},
    "buffering_end": {"position_seconds": (_POS, True), "cdn_response_time_ms": (_MS, False)},
    "quality_change": {"bitrate": (_BITRATE, True), "previous_bitrate": (_BITRATE, False),
                       "resolution": (_RES, False), "position_seconds": (_POS, False)},
    "milestone": {"percent": (_enum(MILESTONES, "int"), True), "position_seconds": (_POS, False)},
    "error": {"code": (_CODE, True), "message": (_message, True), "fatal": (_boolean, False),
              "position_seconds": (_POS, False)},
    "session_end": {"reason": (_enum(END_REASONS, "str"), True),
                    "position_seconds": (_POS, False), "buffering_count": (_COUNT, False),
                    "buffering_duration_ms": (_CUM_MS, False), "dropped_frames": (_COUNT, False)},
}
EVENT_TYPES = tuple(SPECS)
_T_MS = _int_in(0, T_MS_MAX)


def _shown(key: str) -> str:
    """A key from the body, quoted only if it is harmless to echo."""
    return repr(key) if _ID.fullmatch(key) else "(unprintable name)"


def _parse(body: bytes) -> Any:
    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in items:
            if k in out:
                raise MediaBatchError("bad_json", "", f"duplicate key {_shown(k)}")
            out[k] = v
        return out

    def constant(name: str) -> Any:
        raise MediaBatchError("bad_json", "", f"{name} is not valid JSON")

    try:
        text = body.decode("utf-8")
        return json.loads(text, object_pairs_hook=pairs, parse_constant=constant)
    except UnicodeDecodeError:
        raise MediaBatchError("bad_json", "", "body is not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise MediaBatchError("bad_json", "", f"invalid JSON: {exc.msg} at char {exc.pos}"
                              ) from None
    except (RecursionError, ValueError) as exc:  # absurd nesting or a 5000-digit number
        if isinstance(exc, MediaBatchError):
            raise
        raise MediaBatchError("bad_json", "", "invalid JSON: unparseable value") from None


def _id(obj: Mapping[str, Any], key: str, path: str, rx: re.Pattern[str], n: int) -> str:
    if key not in obj:
        raise MediaBatchError("missing_field", path + key, "is required")
    if not rx.fullmatch(_text(obj[key], path + key)):
        raise MediaBatchError("bad_id", path + key, f"must be 1-{n} characters of [A-Za-z0-9_.:-]")
    return obj[key]


def decode_media_batch(body: bytes, *, max_events: int = 500,
                       max_bytes: int = MAX_BYTES) -> MediaBatch:
    """Parse and validate one batch body; raise :class:`MediaBatchError` on any fault.

    Nothing in a rejected batch is usable: the whole batch is refused, so the client
    must fix and resend it (all codes map to HTTP 400; ``body_too_large`` may be 413).
    """
    if len(body) > max_bytes:
        raise MediaBatchError("body_too_large", "", f"body of {len(body)} bytes exceeds the "
                              f"cap of {max_bytes}")
    doc = _parse(body)
    if not isinstance(doc, dict):
        raise MediaBatchError("wrong_type", "", "body must be a JSON object")
    for key in doc:
        if key not in _TOP_KEYS:
            raise MediaBatchError("unknown_field", _shown(key).strip("'"), "unknown field")
    media_id = _id(doc, "media_id", "", _LONG_ID, 128)
    view_id = _id(doc, "view_id", "", _LONG_ID, 128)
    duration = doc.get("media_duration_s")
    if duration is not None:
        duration = _num_in(0, DURATION_MAX_S)(duration, "media_duration_s", 0.0)
        if duration == 0:
            raise MediaBatchError("out_of_range", "media_duration_s", "must be > 0")
    cap = DURATION_MAX_S if duration is None else duration + POSITION_TOLERANCE_S
    if "events" not in doc:
        raise MediaBatchError("missing_field", "events", "is required")
    raw = doc["events"]
    if not isinstance(raw, list):
        raise MediaBatchError("wrong_type", "events", "must be a list")
    if not raw:
        raise MediaBatchError("empty_batch", "events", "must hold at least one event")
    if len(raw) > max_events:
        raise MediaBatchError("too_many_events", "events", f"{len(raw)} events exceed the cap "
                              f"of {max_events}")
    events: list[MediaEvent] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(raw):
        ev = _event(item, f"events[{i}]", cap)
        if ev.event_id in seen:
            raise MediaBatchError("duplicate_event_id", f"events[{i}].id",
                                  f"duplicates events[{seen[ev.event_id]}].id")
        seen[ev.event_id] = i
        if events and ev.t_ms < events[-1].t_ms:
            raise MediaBatchError("non_monotonic_time", f"events[{i}].t_ms",
                                  f"{ev.t_ms} is before events[{i - 1}].t_ms "
                                  f"({events[-1].t_ms})")
        events.append(ev)
    return MediaBatch(media_id, view_id, duration, tuple(events))


def _event(item: Any, path: str, cap: float) -> MediaEvent:
    if not isinstance(item, dict):
        raise MediaBatchError("wrong_type", path, "must be an object")
    p = path + "."
    if "type" not in item:
        raise MediaBatchError("missing_field", p + "type", "is required")
    etype = _text(item["type"], p + "type")
    spec = SPECS.get(etype)
    if spec is None:
        shown = f" {etype!r}" if _ID.fullmatch(etype) else ""
        raise MediaBatchError("unknown_event_type", p + "type", f"unknown event type{shown}")
    event_id = _id(item, "id", p, _ID, 64)
    if "t_ms" not in item:
        raise MediaBatchError("missing_field", p + "t_ms", "is required")
    t_ms = _T_MS(item["t_ms"], p + "t_ms", cap)
    for key in item:
        if key not in _COMMON and key not in spec:
            raise MediaBatchError("unknown_field", p + _shown(key).strip("'"),
                                  f"unknown field for {etype}")
    fields: dict[str, Any] = {}
    for key, (check, required) in spec.items():
        value = item.get(key)
        if value is None:
            if required and key in item:
                raise MediaBatchError("wrong_type", p + key, "must not be null")
            if required:
                raise MediaBatchError("missing_field", p + key, "is required")
            continue
        fields[key] = check(value, p + key, cap)
    return MediaEvent(event_id, etype, t_ms, MappingProxyType(fields))
