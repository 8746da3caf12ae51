"""The media event batch decoder: every event type accepted, every rejection code named."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import domain.media_batch as media_wire
from domain.media_batch import (
    ERROR_CODES,
    EVENT_TYPES,
    MESSAGE_MAX,
    SPECS,
    MediaBatch,
    MediaBatchError,
    decode_media_batch,
)

# One event of every type with every field set (required and optional).
FULL: dict[str, dict[str, Any]] = {
    "session_start": {"ttfb_ms": 180, "load_time_ms": 420.5, "connection_type": "4g",
                      "position_seconds": 0},
    "play": {"position_seconds": 0.0},
    "pause": {"position_seconds": 12.25},
    "seek": {"position_seconds": 60, "from_position_seconds": 26.0},
    "heartbeat": {"position_seconds": 45.2, "buffering_count": 1, "buffering_duration_ms": 800,
                  "current_bitrate": 2_500_000, "resolution": "720p", "dropped_frames": 2},
    "buffering_start": {"position_seconds": 23.1, "bitrate_before": 2_500_000,
                        "cdn_response_time_ms": 1200},
    "buffering_end": {"position_seconds": 23.1, "cdn_response_time_ms": 300},
    "quality_change": {"bitrate": 1_200_000, "previous_bitrate": 2_500_000,
                       "resolution": "1280x720", "position_seconds": 30},
    "milestone": {"percent": 25, "position_seconds": 78.1},
    "error": {"code": "MEDIA_ERR_NETWORK", "message": "segment 12 failed", "fatal": False,
              "position_seconds": 80},
    "session_end": {"reason": "completed", "position_seconds": 312.5, "buffering_count": 1,
                    "buffering_duration_ms": 800, "dropped_frames": 9},
}
REQUIRED = {t: {k: FULL[t][k] for k, (_, req) in spec.items() if req}
            for t, spec in SPECS.items()}


def body(events: list[dict[str, Any]] | None = None, **top: Any) -> bytes:
    doc: dict[str, Any] = {"media_id": "ex-squat-01", "view_id": "v-1", "media_duration_s": 312.5,
                           "events": events if events is not None else full_events()}
    doc.update(top)
    return json.dumps(doc).encode()


def full_events() -> list[dict[str, Any]]:
    return [{"id": f"e-{i}", "type": t, "t_ms": 1000 + i * 100, **FULL[t]}
            for i, t in enumerate(EVENT_TYPES)]


def test_fixture_covers_every_event_type_and_field() -> None:
    assert set(FULL) == set(SPECS) == set(EVENT_TYPES)
    for etype, spec in SPECS.items():
        assert set(FULL[etype]) == set(spec), etype


def test_every_event_type_is_accepted_with_all_fields_typed() -> None:
    batch = decode_media_batch(body())
    assert isinstance(batch, MediaBatch)
    assert (batch.media_id, batch.view_id, batch.media_duration_s) == ("ex-squat-01", "v-1", 312.5)
    assert [e.type for e in batch.events] == list(EVENT_TYPES)
    by_type = {e.type: e for e in batch.events}
    assert by_type["heartbeat"].fields == {
        "position_seconds": 45.2, "buffering_count": 1, "buffering_duration_ms": 800.0,
        "current_bitrate": 2_500_000.0, "resolution": "720p", "dropped_frames": 2}
    assert type(by_type["heartbeat"].fields["buffering_count"]) is int
    assert type(by_type["session_start"].fields["ttfb_ms"]) is float
    assert type(by_type["play"].fields["position_seconds"]) is float
    assert by_type["error"].fields["fatal"] is False
    assert by_type["milestone"].fields["percent"] == 25
    assert by_type["session_end"].t_ms == 1000 + 100 * EVENT_TYPES.index("session_end")
    assert isinstance(by_type["play"].fields, MappingProxyType)  # read-only


@pytest.mark.parametrize("etype", EVENT_TYPES)
def test_each_type_accepted_with_required_fields_only(etype: str) -> None:
    ev = {"id": "a", "type": etype, "t_ms": 0, **REQUIRED[etype]}
    (got,) = decode_media_batch(body([ev], media_duration_s=None)).events
    assert set(got.fields) == set(REQUIRED[etype])


def test_null_optional_fields_and_duration_are_absent() -> None:
    ev = {"id": "a", "type": "heartbeat", "t_ms": 5, "position_seconds": 1, "buffering_count": 0,
          "buffering_duration_ms": 0, "current_bitrate": None, "resolution": None}
    batch = decode_media_batch(body([ev], media_duration_s=None))
    assert batch.media_duration_s is None
    assert "current_bitrate" not in batch.events[0].fields
    raw = json.loads(body([ev]))
    del raw["media_duration_s"]
    assert decode_media_batch(json.dumps(raw).encode()).media_duration_s is None


def test_positions_within_duration_plus_tolerance() -> None:
    ok = {"id": "a", "type": "play", "t_ms": 0, "position_seconds": 101.9}
    decode_media_batch(body([ok], media_duration_s=100))
    # unknown duration: only the absolute cap (24 h) applies
    decode_media_batch(body([{**ok, "position_seconds": 5000}], media_duration_s=None))
    with pytest.raises(MediaBatchError) as info:
        decode_media_batch(body([{**ok, "position_seconds": 86_401}], media_duration_s=None))
    assert info.value.code == "out_of_range"
    with pytest.raises(MediaBatchError) as info:
        decode_media_batch(body([{**ok, "position_seconds": 102.1}], media_duration_s=100))
    assert info.value.code == "beyond_media_duration"
    assert str(info.value) == ("events[0].position_seconds: 102.1 s is beyond the media "
                               "duration (max 102)")


def test_equal_timestamps_are_allowed() -> None:
    evs = [{"id": "a", "type": "play", "t_ms": 7, "position_seconds": 0},
           {"id": "b", "type": "quality_change", "t_ms": 7, "bitrate": 1e6}]
    assert len(decode_media_batch(body(evs)).events) == 2


def test_whole_numbers_written_with_a_fraction_are_integers() -> None:
    # JSON has one number type; JSON Schema (docs/openapi.yaml) counts 116.0 as an
    # integer, so the service does too (found by schemathesis).
    evs = [{"id": "a", "type": "milestone", "t_ms": 116.0, "percent": 25.0},
           {"id": "b", "type": "heartbeat", "t_ms": 1e3, "position_seconds": 1,
            "buffering_count": 2.0, "buffering_duration_ms": 0, "dropped_frames": 0.0}]
    a, b = decode_media_batch(body(evs)).events
    assert (a.t_ms, a.fields["percent"], b.t_ms) == (116, 25, 1000)
    assert type(a.t_ms) is int and type(a.fields["percent"]) is int
    assert b.fields["buffering_count"] == 2 and type(b.fields["buffering_count"]) is int
    assert type(b.fields["dropped_frames"]) is int


def test_error_message_is_truncated_and_url_queries_removed() -> None:
    msg = "GET https://cdn.example/v/seg12.ts?token=SECRET&exp=1 failed " + "x" * 500
    ev = {"id": "a", "type": "error", "t_ms": 0, "code": "2", "message": msg}
    kept = decode_media_batch(body([ev])).events[0].fields["message"]
    assert "SECRET" not in kept and "https://cdn.example/v/seg12.ts?…" in kept
    assert len(kept) == MESSAGE_MAX


@pytest.mark.parametrize("escape", [rb"\u0000", rb"\ud800", rb"\udc00", rb"a\u0000b",
                                    rb"\ude00\ud83d"])
def test_unstorable_text_is_refused_naming_the_field(escape: bytes) -> None:
    """JSON escapes for NUL and lone surrogates are valid JSON but cannot be stored in
    Postgres: refused at ingest, so they never reach (and stall) the sink."""
    ev = b'{"id": "a", "type": "error", "t_ms": 0, "code": "E1", "message": "' + escape + b'"}'
    raw = b'{"media_id": "m", "view_id": "v", "events": [' + ev + b"]}"
    with pytest.raises(MediaBatchError) as info:
        decode_media_batch(raw)
    assert (info.value.code, info.value.path) == ("bad_text", "events[0].message")
    assert str(info.value) == ("events[0].message: must not contain NUL or unpaired "
                               "surrogate characters")


def test_paired_surrogates_and_other_unicode_are_kept() -> None:
    ev = (b'{"id": "a", "type": "error", "t_ms": 0, "code": "E1", '
          b'"message": "\\ud83d\\ude00 \xc3\xa9 \\u0001 \xe2\x80\xa8"}')
    raw = b'{"media_id": "m", "view_id": "v", "events": [' + ev + b"]}"
    (got,) = decode_media_batch(raw).events
    assert got.fields["message"] == "\U0001F600 \u00e9 \x01 \u2028"
    assert got.fields["message"].encode("utf-8")  # storable: has a UTF-8 form


def test_precise_message_names_event_index_and_field() -> None:
    evs = full_events()
    evs[3]["position_seconds"] = -1
    with pytest.raises(MediaBatchError) as info:
        decode_media_batch(body(evs))
    assert (info.value.code, info.value.path) == ("out_of_range", "events[3].position_seconds")
    assert str(info.value) == "events[3].position_seconds: must be >= 0"


def _ev(i: int, **change: Any) -> Callable[[dict[str, Any]], None]:
    """Mutation: update (or with value ``...``, delete) keys of event ``i``."""
    def mutate(doc: dict[str, Any]) -> None:
        for k, v in change.items():
            if v is ...:
                del doc["events"][i][k]
            else:
                doc["events"][i][k] = v
    return mutate


def _top(**change: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        for k, v in change.items():
            if v is ...:
                del doc[k]
            else:
                doc[k] = v
    return mutate


HB = EVENT_TYPES.index("heartbeat")
ERR = EVENT_TYPES.index("error")
SS = EVENT_TYPES.index("session_start")
MS = EVENT_TYPES.index("milestone")
END = EVENT_TYPES.index("session_end")
QC = EVENT_TYPES.index("quality_change")

REJECTIONS: list[tuple[str, Callable[[dict[str, Any]], None], str, str]] = [
    # (case, mutation of the full batch, code, path)
    ("unknown top key", _top(extra=1), "unknown_field", "extra"),
    ("unknown event key", _ev(1, volume=3), "unknown_field", "events[1].volume"),
    ("field of another type", _ev(1, percent=25), "unknown_field", "events[1].percent"),
    ("media_id missing", _top(media_id=...), "missing_field", "media_id"),
    ("events missing", _top(events=...), "missing_field", "events"),
    ("event id missing", _ev(0, id=...), "missing_field", "events[0].id"),
    ("event type missing", _ev(0, type=...), "missing_field", "events[0].type"),
    ("t_ms missing", _ev(2, t_ms=...), "missing_field", "events[2].t_ms"),
    ("required field missing", _ev(HB, buffering_count=...), "missing_field",
     f"events[{HB}].buffering_count"),
    ("required field null", _ev(HB, position_seconds=None), "wrong_type",
     f"events[{HB}].position_seconds"),
    ("media_id not a string", _top(media_id=5), "wrong_type", "media_id"),
    ("duration a string", _top(media_duration_s="312"), "wrong_type", "media_duration_s"),
    ("events not a list", _top(events={}), "wrong_type", "events"),
    ("event not an object", _top(events=[[1]]), "wrong_type", "events[0]"),
    ("type not a string", _ev(0, type=3), "wrong_type", "events[0].type"),
    ("t_ms a float", _ev(0, t_ms=1000.5), "wrong_type", "events[0].t_ms"),
    ("t_ms a bool", _ev(0, t_ms=True), "wrong_type", "events[0].t_ms"),
    ("count a fraction", _ev(HB, buffering_count=1.5), "wrong_type",
     f"events[{HB}].buffering_count"),
    ("position a string", _ev(1, position_seconds="3"), "wrong_type",
     "events[1].position_seconds"),
    ("bitrate a bool", _ev(HB, current_bitrate=True), "wrong_type",
     f"events[{HB}].current_bitrate"),
    ("fatal not a bool", _ev(ERR, fatal=1), "wrong_type", f"events[{ERR}].fatal"),
    ("message not a string", _ev(ERR, message=["x"]), "wrong_type", f"events[{ERR}].message"),
    ("percent a string", _ev(MS, percent="25"), "wrong_type", f"events[{MS}].percent"),
    ("event id charset", _ev(0, id="a b"), "bad_id", "events[0].id"),
    ("event id too long", _ev(0, id="a" * 65), "bad_id", "events[0].id"),
    ("event id empty", _ev(0, id=""), "bad_id", "events[0].id"),
    ("view_id too long", _top(view_id="v" * 129), "bad_id", "view_id"),
    ("media_id charset", _top(media_id="ex/1"), "bad_id", "media_id"),
    ("negative position", _ev(1, position_seconds=-0.5), "out_of_range",
     "events[1].position_seconds"),
    ("negative t_ms", _ev(0, t_ms=-1), "out_of_range", "events[0].t_ms"),
    ("t_ms beyond 24 h", _ev(0, t_ms=86_400_001), "out_of_range", "events[0].t_ms"),
    ("negative duration ms", _ev(HB, buffering_duration_ms=-5), "out_of_range",
     f"events[{HB}].buffering_duration_ms"),
    ("absurd ttfb", _ev(SS, ttfb_ms=600_001), "out_of_range", f"events[{SS}].ttfb_ms"),
    ("bitrate over 1e9", _ev(QC, bitrate=1e9 + 1), "out_of_range", f"events[{QC}].bitrate"),
    ("negative count", _ev(HB, dropped_frames=-1), "out_of_range",
     f"events[{HB}].dropped_frames"),
    ("zero duration", _top(media_duration_s=0), "out_of_range", "media_duration_s"),
    ("negative duration", _top(media_duration_s=-3), "out_of_range", "media_duration_s"),
    ("duration beyond 24 h", _top(media_duration_s=86_401), "out_of_range",
     "media_duration_s"),
    ("position beyond media", _ev(1, position_seconds=400), "beyond_media_duration",
     "events[1].position_seconds"),
    ("seek source beyond media", _ev(3, from_position_seconds=315), "beyond_media_duration",
     "events[3].from_position_seconds"),
    ("resolution", _ev(HB, resolution="HD"), "bad_format", f"events[{HB}].resolution"),
    ("resolution zero", _ev(HB, resolution="0x720"), "bad_format", f"events[{HB}].resolution"),
    ("error code charset", _ev(ERR, code="bad code"), "bad_format", f"events[{ERR}].code"),
    ("connection type", _ev(SS, connection_type="dialup"), "bad_enum",
     f"events[{SS}].connection_type"),
    ("milestone 30", _ev(MS, percent=30), "bad_enum", f"events[{MS}].percent"),
    ("end reason", _ev(END, reason="bored"), "bad_enum", f"events[{END}].reason"),
    ("unknown type", _ev(2, type="playing"), "unknown_event_type", "events[2].type"),
    ("empty batch", _top(events=[]), "empty_batch", "events"),
    ("duplicate id", _ev(4, id="e-1"), "duplicate_event_id", "events[4].id"),
    ("time goes back", _ev(5, t_ms=1000), "non_monotonic_time", "events[5].t_ms"),
    # Text Postgres cannot store (red-team finding 2): json.dumps writes these as the
    # escapes "\u0000" and "\ud800", which decode back to NUL and a lone surrogate.
    ("message with NUL", _ev(ERR, message="\x00"), "bad_text", f"events[{ERR}].message"),
    ("message lone surrogate", _ev(ERR, message="seg \ud800 failed"), "bad_text",
     f"events[{ERR}].message"),
    ("message low surrogate", _ev(ERR, message="\udfff"), "bad_text",
     f"events[{ERR}].message"),
    ("NUL past the cut", _ev(ERR, message="x" * 300 + "\x00"), "bad_text",
     f"events[{ERR}].message"),
    ("error code with NUL", _ev(ERR, code="E\x00"), "bad_text", f"events[{ERR}].code"),
    ("enum with NUL", _ev(END, reason="completed\x00"), "bad_text", f"events[{END}].reason"),
]


@pytest.mark.parametrize(("case", "mutate", "code", "path"), REJECTIONS,
                         ids=[r[0] for r in REJECTIONS])
def test_each_rejection_is_named(case: str, mutate: Callable[[dict[str, Any]], None],
                                 code: str, path: str) -> None:
    doc = json.loads(body())
    mutate(doc)
    with pytest.raises(MediaBatchError) as info:
        decode_media_batch(json.dumps(doc).encode())
    assert (info.value.code, info.value.path) == (code, path), str(info.value)
    assert str(info.value).startswith(f"{path}: "), str(info.value)


BODY_FAULTS = [
    (b"{", "bad_json"),
    (b"\xff\xfe{}", "bad_json"),  # not UTF-8
    (b'{"media_id": "a", "media_id": "b"}', "bad_json"),  # duplicate key
    (b'{"media_duration_s": NaN}', "bad_json"),
    (b'{"media_duration_s": Infinity}', "bad_json"),
    (b"[" * 100_000 + b"]" * 100_000, "bad_json"),  # nesting bomb (under the byte cap)
    (b'{"media_duration_s": 1' + b"0" * 5000 + b"}", "bad_json"),  # 5000-digit integer
    (b"[]", "wrong_type"),
    (b'"text"', "wrong_type"),
]


@pytest.mark.parametrize(("raw", "code"), BODY_FAULTS)
def test_body_level_faults(raw: bytes, code: str) -> None:
    with pytest.raises(MediaBatchError) as info:
        decode_media_batch(raw)
    assert info.value.code == code and info.value.path == ""


def test_huge_float_is_out_of_range_not_infinity() -> None:
    with pytest.raises(MediaBatchError) as info:
        decode_media_batch(body(media_duration_s=None).replace(b"null", b"1e400"))
    assert (info.value.code, info.value.path) == ("out_of_range", "media_duration_s")


def test_caps() -> None:
    evs = [{"id": f"e{i}", "type": "play", "t_ms": i, "position_seconds": 0} for i in range(11)]
    assert len(decode_media_batch(body(evs[:10]), max_events=10).events) == 10
    with pytest.raises(MediaBatchError) as info:
        decode_media_batch(body(evs), max_events=10)
    assert info.value.code == "too_many_events"
    assert str(info.value) == "events: 11 events exceed the cap of 10"
    big = body(evs)
    with pytest.raises(MediaBatchError) as info:
        decode_media_batch(big, max_bytes=len(big) - 1)
    assert info.value.code == "body_too_large"
    assert len(decode_media_batch(big, max_bytes=len(big)).events) == 11


def test_messages_do_not_echo_free_text_from_the_body() -> None:
    secret = "https://x/?token=SECRET"
    for doc in (
        {"media_id": "m", "view_id": "v", "events": [{"id": "a", "type": secret, "t_ms": 0}]},
        {"media_id": "m", "view_id": "v", secret: 1, "events": []},
        {"media_id": "m", "view_id": "v", "events": [{"id": secret, "type": "play", "t_ms": 0}]},
    ):
        with pytest.raises(MediaBatchError) as info:
            decode_media_batch(json.dumps(doc).encode())
        assert "SECRET" not in str(info.value) and "SECRET" not in info.value.path


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_only_ever_raise_batch_errors(raw: bytes) -> None:
    try:
        decode_media_batch(raw)
    except MediaBatchError:
        pass


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                max_size=3),
    max_leaves=10,
)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(EVENT_TYPES), st.sampled_from(["id", "type", "t_ms", "position_seconds",
                                                     "bitrate", "percent", "reason", "code"]),
       _json)
def test_any_value_in_any_field_is_accepted_or_named(etype: str, key: str, value: Any) -> None:
    ev = {"id": "a", "type": etype, "t_ms": 0, **REQUIRED[etype], key: value}
    try:
        decode_media_batch(body([ev]))
    except MediaBatchError as exc:
        assert exc.code and str(exc).startswith("events[0]")


def test_every_error_code_is_tested_and_documented() -> None:
    tested = {r[2] for r in REJECTIONS} | {c for _, c in BODY_FAULTS}
    tested |= {"too_many_events", "body_too_large"}  # test_caps
    assert tested == set(ERROR_CODES)
    # every code the decoder can raise is a declared one
    source = Path(media_wire.__file__).read_text()
    assert set(re.findall(r'MediaBatchError\(\s*"([a-z_]+)"', source)) == set(ERROR_CODES)
    docs = Path(__file__).parents[2] / "docs" / "media-metrics.md"
    text = docs.read_text()
    assert all(f"`{code}`" in text for code in ERROR_CODES)
