"""The aggregate sink against a real Postgres: event -> rows, idempotency, rejection."""

from __future__ import annotations

import copy
import json
from typing import Any

import psycopg
import pytest
import trio

import storage.sink as sink_module
import storage.sink_event as sink_event_module
from actors.reps import RepEngine
from storage.bus import BusError, EventRejected, InProcessBus
from storage.outbox import Outbox
from storage.pg import Database
from storage.sink import AggregateSink, SinkEventError, parse_event
from telemetry.dev.synthetic import generate
from tests.support.pg import deliver_behind_a_poisoned_event, make_event

TABLES = ("pose_session_metrics", "pose_rep_metrics", "media_session_metrics",
          "media_buffering_events")


async def counts(db: Database) -> dict[str, int]:
    """Rows per table, all organisations (owner connection, maintenance opt-in)."""

    def read(conn: psycopg.Connection) -> dict[str, int]:
        with conn.transaction():
            conn.execute("SELECT set_config('app.maintenance', 'on', true)")
            return {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]  # type: ignore[index]
                    for t in TABLES}

    return await db.run_admin(read)


async def test_event_becomes_rows(pg_db: Database) -> None:
    sink = AggregateSink(pg_db)
    assert await sink.store(make_event(reps=3, media=2)) == "stored"
    assert await counts(pg_db) == {"pose_session_metrics": 1, "pose_rep_metrics": 3,
                                   "media_session_metrics": 2, "media_buffering_events": 4}
    [row] = await sink.session_rows("org-a")
    assert row["session_id"] == "s-1" and row["patient_id"] == "p-42"
    assert row["event_id"] == "pose-session:org-a:s-1"
    assert row["frames"] == 9000 and row["gaps"] == 3 and row["effective_fps"] == 29.6
    assert row["exercise_kind"] == "squat" and row["target_reps"] == 10
    assert row["rep_count"] == 3 and row["rep_profile"] == "squat"
    assert row["reps_summary"]["rom_mean_deg"] == 81.0 and "reps" not in row["reps_summary"]
    assert row["blob_key"] == "org-a/s-1.bin.gz" and row["media_views"] == 2
    assert (row["ended_at"] - row["started_at"]).total_seconds() == 300

    def detail(conn: psycopg.Connection) -> tuple[list[Any], list[Any]]:
        with conn.transaction():
            conn.execute("SELECT set_config('app.org_id', 'org-a', true)")
            reps = conn.execute("SELECT rep_index, rom_deg, detail->>'tempo_up_ms'"
                                " FROM pose_rep_metrics ORDER BY rep_index").fetchall()
            stalls = conn.execute("SELECT view_id, seq, duration_ms, after_seek"
                                  " FROM media_buffering_events ORDER BY view_id, seq"
                                  ).fetchall()
            return reps, stalls

    reps, stalls = await pg_db.run(detail)
    assert reps == [(0, 80.0, "400"), (1, 81.0, "400"), (2, 82.0, "400")]
    assert stalls[:2] == [("v0", 0, 700.0, False), ("v0", 1, 500.0, True)]


async def test_engine_summary_rows_carry_clinical_angles(pg_db: Database) -> None:
    """A real rep engine summary: the rows keep its angle fields as the engine wrote
    them (the `angle` named, min/max in the clinical convention), and the `rom_deg`
    column is the rep's range of motion, a difference that no convention changes."""
    s = generate("squat", reps=4, seed=3, space="world")
    engine = RepEngine("squat", space="world")
    engine.feed(s.t_ms, s.frames)
    engine.finish()
    event = make_event()
    event["reps"] = json.loads(json.dumps(engine.summary()))
    assert await AggregateSink(pg_db).store(event) == "stored"

    def read(conn: psycopg.Connection) -> tuple[Any, list[Any]]:
        with conn.transaction():
            conn.execute("SELECT set_config('app.org_id', 'org-a', true)")
            summary = conn.execute("SELECT reps_summary FROM pose_session_metrics").fetchone()
            reps = conn.execute(
                "SELECT rom_deg, detail->>'angle', (detail->>'angle_min_deg')::float8,"
                " (detail->>'angle_max_deg')::float8, detail ? 'peak_deg'"
                " FROM pose_rep_metrics ORDER BY rep_index").fetchall()
            return summary[0], reps  # type: ignore[index]

    summary, rows = await pg_db.run(read)
    assert summary["angle"] == "knee_flexion" and summary["angle_convention"] == "clinical"
    assert len(rows) == len(event["reps"]["reps"]) >= 3
    for (rom, angle, lo, hi, old_field), rep in zip(rows, event["reps"]["reps"], strict=True):
        assert angle == "knee_flexion" and old_field is False
        assert (rom, lo, hi) == (rep["rom_deg"], rep["angle_min_deg"], rep["angle_max_deg"])
        assert lo < 20.0 < 60.0 < hi     # standing near 0°, the bottom well flexed
        assert hi - lo == pytest.approx(rom, abs=0.02)


async def test_redelivery_changes_nothing(pg_db: Database) -> None:
    sink = AggregateSink(pg_db)
    event = make_event()
    assert await sink.store(event) == "stored"
    before_rows, before_counts = await sink.session_rows("org-a"), await counts(pg_db)
    assert await sink.store(event) == "duplicate"
    # A re-published event with different content still maps to the same session:
    # the first delivery's rows stand.
    changed = copy.deepcopy(event)
    changed["pose"]["frames"] = 1
    changed["reps"]["reps"].append({"index": 99, "rom_deg": 1.0})
    assert await sink.store(changed) == "duplicate"
    assert await sink.session_rows("org-a") == before_rows
    assert await counts(pg_db) == before_counts


async def test_concurrent_duplicates_store_once(pg_db: Database) -> None:
    sink = AggregateSink(pg_db)
    results: list[str] = []

    async def deliver() -> None:
        results.append(await sink.store(make_event()))

    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(deliver)
    assert sorted(results) == ["duplicate", "duplicate", "duplicate", "stored"]
    assert (await counts(pg_db))["pose_rep_metrics"] == 3


async def test_same_session_id_in_two_orgs_are_distinct(pg_db: Database) -> None:
    sink = AggregateSink(pg_db)
    assert await sink.store(make_event("org-a", "s-1")) == "stored"
    assert await sink.store(make_event("org-b", "s-1")) == "stored"
    assert [r["org_id"] for r in await sink.session_rows("org-a")] == ["org-a"]
    assert [r["org_id"] for r in await sink.session_rows("org-b")] == ["org-b"]
    assert await sink.session_rows("org-c") == []


async def test_minimal_event_without_reps_media_or_blob(pg_db: Database) -> None:
    sink = AggregateSink(pg_db)
    event = make_event(reps=0, media=0)
    event.update(reps=None, blob=None, exercise={"kind": None})
    event["pose"].update(frames=0, frames_no_pose=0, batches=0, duration_ms=0,
                         effective_fps=None, mean_visibility=None, space=None)
    del event["media"]
    assert await sink.store(event) == "stored"
    [row] = await sink.session_rows("org-a")
    assert row["rep_count"] is None and row["blob_key"] is None and row["media_views"] == 0
    assert await counts(pg_db) == {"pose_session_metrics": 1, "pose_rep_metrics": 0,
                                   "media_session_metrics": 0, "media_buffering_events": 0}


async def test_in_process_bus_delivers_to_sink(pg_db: Database) -> None:
    sink = AggregateSink(pg_db)
    bus = InProcessBus()
    bus.subscribe(sink.handle)
    await bus.publish(make_event())
    await bus.publish(make_event())  # redelivery is harmless
    bad = make_event(session_id="s-2")
    del bad["org_id"]
    with pytest.raises(BusError, match="org_id"):
        await bus.publish(bad)
    assert len(await sink.session_rows("org-a")) == 1
    await bus.aclose()


def _mutate(path: str, value: Any) -> dict[str, Any]:
    event = make_event(media=1)
    target: Any = event
    *parents, leaf = path.split(".")
    for p in parents:
        target = target[int(p)] if p.isdigit() else target[p]
    key: Any = int(leaf) if leaf.isdigit() else leaf
    if value is KeyError:
        del target[key]
    else:
        target[key] = value
    return event


MALFORMED = [
    ("type", "telemetry.other", "type: expected"),
    ("schema", 2, "schema: unsupported schema version 2"),
    ("org_id", KeyError, "org_id: expected a non-empty string"),
    ("org_id", "", "org_id: expected a non-empty string"),
    ("session_id", 7, "session_id: expected a non-empty string"),
    ("org_id", "o" * 201, "org_id: longer than 200"),
    ("event_id", None, "event_id: expected a non-empty string"),
    ("patient_id", KeyError, "patient_id: expected a non-empty string"),
    ("started_at", "yesterday", "started_at: not an ISO-8601 timestamp"),
    ("started_at", "2026-11-22T10:00:00", "started_at: timestamp lacks a UTC offset"),
    ("ended_at", "2026-11-22T09:00:00Z", "ended_at: is before started_at"),
    ("end_reason", "bored", "end_reason: expected one of"),
    ("exercise", "squat", "exercise: expected an object"),
    ("exercise.target_reps", -1, "exercise.target_reps: expected a non-negative integer"),
    ("pose", None, "pose: expected an object"),
    ("pose.frames", "9000", "pose.frames: expected a non-negative integer"),
    ("pose.gaps", True, "pose.gaps: expected a non-negative integer"),
    ("pose.batches_skipped", KeyError, "pose.batches_skipped: expected a non-negative"),
    ("pose.effective_fps", float("nan"), "pose.effective_fps: number is not finite"),
    ("pose.space", "3d", "pose.space: expected 'image', 'world' or null"),
    ("blob", [], "blob: expected an object"),
    ("blob.size", -5, "blob.size: expected a non-negative integer"),
    ("reps", [1, 2], "reps: expected an object"),
    ("reps.rep_count", 2.5, "reps.rep_count: expected a non-negative integer"),
    ("reps.symmetry", float("inf"), "reps.symmetry: number is not finite"),
    ("reps.reps", {"a": 1}, "reps.reps: expected a list"),
    ("reps.reps.1", "rep", "reps.reps[1]: expected an object"),
    ("reps.reps.1.rom_deg", "big", "reps.reps[1].rom_deg: expected a number"),
    ("reps.reps.2.index", 0, "reps.reps: duplicate rep index"),
    ("media", {}, "media: expected a list"),
    ("media.0", 3, "media[0]: expected an object"),
    ("media.0.view_id", KeyError, "media[0].view_id: expected a non-empty string"),
    ("media.0.rebuffer_count", -1, "media[0].rebuffer_count: expected a non-negative"),
    ("media.0.completed", "yes", "media[0].completed: expected true or false"),
    ("media.0.buffering", "none", "media[0].buffering: expected a list"),
    ("media.0.buffering.1.started_at", KeyError,
     "media[0].buffering[1].started_at: expected an ISO-8601"),
    ("media.0.buffering.0.position_s", "x", "media[0].buffering[0].position_s: expected a"),
]


@pytest.mark.parametrize(("path", "value", "message"), MALFORMED,
                         ids=[f"{p}={v!r}"[:40] for p, v, _ in MALFORMED])
def test_malformed_event_is_rejected_naming_the_fault(path: str, value: Any,
                                                      message: str) -> None:
    with pytest.raises(SinkEventError) as info:
        parse_event(_mutate(path, value))
    assert str(info.value).startswith(message), str(info.value)


def test_not_an_object_is_rejected() -> None:
    with pytest.raises(SinkEventError, match="^event: expected an object"):
        parse_event(["not", "an", "event"])


def test_duplicate_media_view_is_rejected() -> None:
    event = make_event(media=2)
    event["media"][1]["view_id"] = "v0"
    with pytest.raises(SinkEventError, match="^media: duplicate view_id"):
        parse_event(event)


async def test_rejected_event_writes_nothing(pg_db: Database,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    sink = AggregateSink(pg_db)
    with pytest.raises(SinkEventError):
        await sink.store(_mutate("media.0.buffering.1.started_at", "soon"))
    with pytest.raises(SinkEventError, match=r"^media\[0\]\.rebuffer_count: \d+ exceeds"):
        await sink.store(_mutate("media.0.rebuffer_count", 2**40))
    assert set((await counts(pg_db)).values()) == {0}
    # A database failure at the last insert (injected) rolls the whole session back:
    # the session, rep and view rows written before it in the transaction vanish.
    monkeypatch.setattr(sink_module, "INSERT_STALL",
                        "INSERT INTO media_buffering_events (org_id) VALUES (%(org_id)s)")
    with pytest.raises(psycopg.errors.NotNullViolation):
        await sink.store(make_event())
    assert set((await counts(pg_db)).values()) == {0}
    monkeypatch.undo()
    assert await sink.store(make_event()) == "stored"  # and the session is not poisoned


# -- red-team finding 2: text Postgres cannot store ---------------------------------

UNSTORABLE_MSG = "contains NUL or an unpaired surrogate, which cannot be stored"
UNSTORABLE = [
    # (path, value, the field the message names): every string the sink writes
    ("media.0.error_message", "\x00", "media[0].error_message"),  # the red team's case
    ("media.0.error_message", "seg \ud800 failed", "media[0].error_message"),
    ("media.0.media_id", "m\x00", "media[0].media_id"),
    ("media.0.player", "\udfff", "media[0].player"),
    ("media.0.bad\x00key", 1, "media[0]"),
    ("patient_id", "p\x00", "patient_id"),
    ("session_id", "s\ud800", "session_id"),
    ("exercise.kind", "squat\x00", "exercise.kind"),
    ("blob.sha256", "\udc00", "blob.sha256"),
    ("reps.profile", "\x00", "reps.profile"),
    ("reps.reps.1.note", "\ud83d", "reps.reps[1].note"),
    ("media_pose", {"note": "\x00"}, "media_pose.note"),
]


@pytest.mark.parametrize(("path", "value", "field"), UNSTORABLE,
                         ids=[f"{p}={v!r}"[:40] for p, v, _ in UNSTORABLE])
def test_unstorable_text_is_a_malformed_event_naming_the_field(path: str, value: Any,
                                                               field: str) -> None:
    """Before the fix these reached Postgres and failed there (DataError, or a
    UnicodeEncodeError: a 500 the sender retried)."""
    with pytest.raises(SinkEventError) as info:
        parse_event(_mutate(path, value))
    assert str(info.value).startswith(field + ": ") and UNSTORABLE_MSG in str(info.value)
    assert sink_module.is_permanent(info.value)


async def test_unstorable_error_text_is_replaced_not_refused(pg_db: Database) -> None:
    """The producer's own failure text never costs the session: what cannot be stored
    is replaced by U+FFFD; a valid pair (an emoji) is kept."""
    sink = AggregateSink(pg_db)
    event = make_event()
    event["error"] = "boom \x00 \ud800 \U0001F600"
    assert await sink.store(event) == "stored"
    [row] = await sink.session_rows("org-a")
    assert row["error"] == "boom \ufffd \ufffd \U0001F600"


@pytest.mark.parametrize("text", ["\x00", "\ud800"])
async def test_database_refusal_is_permanent_for_the_bus(
        pg_db: Database, monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    """If such text slips past validation, Postgres (NUL: DataError) or psycopg (a lone
    surrogate: UnicodeEncodeError) refuses it, and the subscriber says so for good
    (EventRejected), not as a transient failure; a connection failure stays transient."""
    monkeypatch.setattr(sink_event_module, "_UNSTORABLE", sink_event_module.re.compile("(?!)"))
    sink = AggregateSink(pg_db)
    bad = make_event()
    bad["patient_id"] = f"p{text}"
    with pytest.raises(EventRejected, match="sink refused the event") as info:
        await sink.handle(bad)
    assert sink_module.is_permanent(info.value.__cause__)  # type: ignore[arg-type]
    assert not sink_module.is_permanent(psycopg.OperationalError("connection refused"))
    assert set((await counts(pg_db)).values()) == {0}


async def test_poisoned_session_is_set_aside_at_once_others_stored(
        pg_db: Database, tmp_path: Any) -> None:
    """The red team's scenario in embedded mode (outbox -> in-process bus -> sink ->
    Postgres): one session's summary with "\\u0000" in a media error message is moved
    to dead/ on its first attempt, and the other organisations' sessions, published
    after it, are stored at once instead of waiting 22-44 minutes behind it."""
    sink = AggregateSink(pg_db)
    bus = InProcessBus()
    bus.subscribe(sink.handle)
    outbox = Outbox(tmp_path / "outbox", bus)
    await deliver_behind_a_poisoned_event(outbox)
    assert outbox.stats()["rejected"] == outbox.stats()["dead"] == 1
    assert outbox.stats()["delivered"] == 3 and outbox.stats()["failures"] == 1
    (dead,) = (tmp_path / "outbox" / "dead").iterdir()
    assert "media[0].error_message" in json.loads(dead.read_bytes())["last_error"]
    for org in ("org-a", "org-b", "org-c"):
        assert [r["session_id"] for r in await sink.session_rows(org)] == ["s-1"]
    assert await sink.session_rows("org-x") == []
