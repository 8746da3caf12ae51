"""``telemetry demo``: the real service on loopback, simulated patients over real HTTP.

Each patient streams a synthetic exercise session (see :mod:`telemetry.dev.synthetic`) at
30 fps in 1-second batches, at real pace, with tracking noise, no-pose frames and
frames dropped in transit; then calls the end endpoint. One patient abandons the
session half-way, and the service ends it by idle timeout. The demo prints one row
per session from the summaries the Core API side received on the bus.
"""

from __future__ import annotations

import dataclasses
import random
import tempfile
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import trio

from domain.pose_batch import CONTENT_TYPE, encode_batch
from telemetry.auth import mint_session_token
from telemetry.config import Settings
from telemetry.dev.media_sim import batches as media_batches
from telemetry.dev.media_sim import player_events
from telemetry.dev.synthetic import generate
from telemetry.server import serve
from telemetry.wiring import open_storage

EXERCISES = ["squat", "bicep_curl", "lateral_raise", "lunge", "shoulder_press", "push_up",
             "sit_to_stand", "hip_abduction"]
DEMO_IDLE_TIMEOUT_S = 4.0
# A progress line per session every this many seconds of its stream.
PROGRESS_EVERY_S = 5


@dataclasses.dataclass
class Patient:
    name: str
    org_id: str
    session_id: str
    kind: str
    true_reps: int
    abandon: bool
    token: str
    batches: list[tuple[int, bytes]]
    media: list[tuple[int, bytes]]
    poor_connection: bool


def batches_of(t_ms: np.ndarray, frames: np.ndarray, rng: random.Random,
               drop: float = 0.02) -> Iterator[bytes]:
    """Split a session into 1-second batches, dropping ~``drop`` of frames in transit."""
    keep = np.array([rng.random() >= drop for _ in range(len(t_ms))])
    # The browser stamps whole ms since the session started.
    t = np.rint(t_ms[keep] - t_ms[0]).astype(np.int64)
    f = frames[keep]
    second = (t // 1000).astype(np.int64)
    seq = 0
    for s in np.unique(second):
        idx = second == s
        yield encode_batch(seq, t[idx].astype(np.uint32), f[idx], space="image",
                           image_width=1280, image_height=720)
        seq += 1


def make_patients(settings: Settings, n: int, seconds: int, seed: int) -> list[Patient]:
    rng = random.Random(seed)
    patients = []
    for i in range(n):
        kind = EXERCISES[i % len(EXERCISES)]
        org = f"clinic-{'ab'[i % 2]}"
        sid = f"demo-{seed}-{i}"
        reps = max(2, seconds // 4)
        session = generate(kind, reps=reps, seed=seed * 100 + i, aspect=1280 / 720)
        abandon = i == n - 1 and n > 1
        token = mint_session_token(
            settings, org_id=org, session_id=sid, patient_id=f"patient-{i}",
            exercise={"kind": kind, "target_reps": reps},
        )
        batches = list(batches_of(session.t_ms, session.frames, rng))
        true_reps = session.true_reps
        if abandon:
            batches = batches[: len(batches) // 2]
            cut_ms = session.t_ms[0] + 1000 * len(batches)
            true_reps = sum(1 for _, end in session.rep_spans_ms if end < cut_ms)
        poor = i == 1
        seconds_sent = len(batches)
        events = player_events(end_ms=seconds_sent * 1000, media_duration_s=seconds_sent + 5.0,
                               poor=poor, seed=seed * 100 + i)
        media = list(media_batches(events, media_id=f"video-{kind}", view_id=f"view-{sid}",
                                   media_duration_s=seconds_sent + 5.0))
        patients.append(Patient(f"patient-{i}", org, sid, kind, true_reps, abandon,
                                token, list(enumerate(batches)), media, poor))
    return patients


async def _send(client: httpx.AsyncClient, path: str, body: bytes, headers: dict[str, str],
                what: str) -> None:
    """POST with the retry policy a client should have: retry 429/503, same body."""
    for attempt in range(6):
        r = await client.post(path, content=body, headers=headers)
        if r.status_code == 202:
            return
        if r.status_code not in (429, 503):
            raise RuntimeError(f"{what} refused: {r.status_code} {r.text}")
        await trio.sleep(float(r.headers.get("Retry-After", 1)) * (1 + attempt))
    raise RuntimeError(f"{what}: gave up after retries")


def say(line: str) -> None:
    """One line of the demo's output, shown at once (stdout is a pipe under dev.py)."""
    print(line, flush=True)


async def stream(client: httpx.AsyncClient, p: Patient, t0: float,
                 out: Callable[[str], None] = say) -> None:
    auth = {"Authorization": f"Bearer {p.token}"}
    total = len(p.batches)

    async def pose() -> None:
        for k, body in p.batches:
            await trio.sleep_until(t0 + k)
            await _send(client, "/v1/pose/frames", body,
                        {**auth, "Content-Type": CONTENT_TYPE}, f"{p.name}: batch {k}")
            if (k + 1) % PROGRESS_EVERY_S == 0 and k + 1 < total:
                out(f"  {p.session_id}: {k + 1}/{total} s of pose acknowledged")

    async def video() -> None:
        for at_ms, body in p.media:
            await trio.sleep_until(t0 + at_ms / 1000)
            await _send(client, "/v1/media/events", body,
                        {**auth, "Content-Type": "application/json"}, f"{p.name}: media")

    await trio.sleep_until(t0)
    out(f"  {p.session_id}: {p.kind} ({p.org_id}) started, {total} s of pose"
        + ("" if p.abandon else " and a video"))
    async with trio.open_nursery() as both:
        both.start_soon(pose)
        if not p.abandon:
            both.start_soon(video)
    if p.abandon:
        out(f"  {p.session_id}: abandoned after {total} s; the service ends it when idle")
        return
    r = await client.post(f"/v1/sessions/{p.session_id}/end", headers=auth)
    r.raise_for_status()
    reps = (r.json().get("reps") or {}).get("rep_count")
    out(f"  {p.session_id}: ended, summary stored ({reps} reps)")


def _row(record: dict[str, Any]) -> dict[str, Any]:
    """A table row from a Postgres ``pose_session_metrics`` row or, without a sink,
    from the bus event itself."""
    if "pose" in record:  # a bus event
        reps = record.get("reps") or {}
        blob = record.get("blob") or {}
        return {"frames": record["pose"]["frames"], "reps": reps.get("rep_count"),
                "rom": reps.get("rom_mean_deg"), "ms": record["pose"]["duration_ms"],
                "blob": blob.get("size"), "end": record["end_reason"]}
    summary = record.get("reps_summary") or {}
    return {"frames": record["frames"], "reps": record["rep_count"],
            "rom": summary.get("rom_mean_deg"), "ms": record["duration_ms"],
            "blob": record["blob_size"], "end": record["end_reason"]}


def print_table(patients: list[Patient], records: dict[tuple[str, str], dict[str, Any]],
                media: dict[tuple[str, str], dict[str, Any]], out: Any = print) -> None:
    cols = ("session", "org", "exercise", "frames", "reps", "true", "rom_deg", "secs",
            "blob_kb", "end_reason", "startup_ms", "rebuf_%")

    def line(values: tuple[Any, ...]) -> str:
        return " ".join(f"{str(v):>11}" if i > 2 else f"{str(v):<14}"
                        for i, v in enumerate(values))

    out(line(cols))
    for p in patients:
        rec = records.get((p.org_id, p.session_id))
        if rec is None:
            out(f"{p.session_id:<14} (no summary received)")
            continue
        r = _row(rec)
        view = media.get((p.org_id, p.session_id))
        if view:
            r["startup_ms"], r["rebuffer_pct"] = view.get("startup_time_ms"), view.get(
                "rebuffer_pct")
        out(line((
            p.session_id, p.org_id, p.kind, r["frames"], r["reps"], p.true_reps,
            f"{r['rom']:.1f}" if isinstance(r["rom"], float) else "-", f"{r['ms'] / 1000:.1f}",
            f"{(r['blob'] or 0) / 1024:.1f}", r["end"],
            _fmt(r.get("startup_ms"), "{:.0f}"), _fmt(r.get("rebuffer_pct"), "{:.1f}"),
        )))


def _fmt(value: Any, spec: str) -> str:
    return spec.format(value) if isinstance(value, int | float) else "-"


async def write_plots(store: Any, events: dict[tuple[str, str], dict[str, Any]],
                      out_dir: Path) -> list[Path]:
    """One PNG per session with a blob (matplotlib in a worker thread: ~0.5 s each)."""
    from telemetry.dev.plot import plot_session

    await trio.Path(out_dir).mkdir(parents=True, exist_ok=True)
    written = []
    for (org, sid), event in sorted(events.items()):
        if not event.get("blob"):
            continue
        blob = await store.get(event["blob"]["key"])
        path = out_dir / f"{org}-{sid}.png"
        await trio.to_thread.run_sync(
            partial(plot_session, blob, path, media=event.get("media")))
        written.append(path)
    return written


async def run_demo(settings: Settings, n: int = 5, seconds: int = 20, seed: int = 7,
                   plots: Path | None = None, out: Callable[[str], None] = say) -> int:
    """Run the demo, writing its lines (progress, then the table) with ``out``."""
    started = time.monotonic()
    tmp = tempfile.TemporaryDirectory(prefix="telemetry-demo-")
    settings = dataclasses.replace(
        settings, host="127.0.0.1", port=0, data_dir=Path(tmp.name),
        idle_timeout_s=DEMO_IDLE_TIMEOUT_S,
    )
    patients = make_patients(settings, n, seconds, seed)
    events: dict[tuple[str, str], dict[str, Any]] = {}
    all_in = trio.Event()

    async def on_event(event: Any) -> None:
        events[(event["org_id"], event["session_id"])] = dict(event)
        out(f"  {event['session_id']}: summary event on the bus ({event['end_reason']})")
        if len(events) == len(patients):
            all_in.set()

    out(f"RestartiX Telemetry demo: {n} simulated patients, {seconds} s sessions at 30 fps")
    try:
        async with open_storage(settings) as storage:
            storage.transport.subscribe(on_event)  # type: ignore[union-attr]
            stop = trio.Event()
            async with trio.open_nursery() as nursery:
                port = (await nursery.start(partial(serve, settings, storage, stop=stop))).port
                out(f"service listening on http://127.0.0.1:{port}; streaming ...")
                base = f"http://127.0.0.1:{port}"
                async with httpx.AsyncClient(base_url=base, timeout=30) as client:
                    t0 = trio.current_time() + 0.5
                    async with trio.open_nursery() as clients:
                        for p in patients:
                            clients.start_soon(stream, client, p, t0 + random.random(), out)
                with trio.move_on_after(DEMO_IDLE_TIMEOUT_S * 3):
                    await all_in.wait()
                stop.set()
            records: dict[tuple[str, str], dict[str, Any]] = dict(events)
            media = {k: e["media"][0] for k, e in events.items() if e.get("media")}
            source = "bus events"
            sink: Any = storage.sink
            if sink is not None:
                source = "Postgres (pose_ and media_session_metrics, read under each org's RLS)"
                records, media = {}, {}
                for org in sorted({p.org_id for p in patients}):
                    for row in await sink.session_rows(org):
                        records[(org, row["session_id"])] = row
                    for row in await sink.media_rows(org):
                        media[(org, row["session_id"])] = row
            out(f"results from {source}:")
            print_table(patients, records, media, out)
            poor = [p.session_id for p in patients if p.poor_connection]
            out(f"{', '.join(poor)} played its video on a poor connection (stalls, lower "
                  "bitrate); the last session was abandoned and ended by idle timeout.")
            if plots is not None:
                written = await write_plots(storage.store, events, plots)
                where = await trio.Path(plots).resolve()
                out(f"plots: {len(written)} PNGs in {where} "
                      f"(e.g. {written[0].name})" if written else "plots: none")
            out(f"blobs written under {settings.data_dir / 'blobs'} (removed on exit); "
                  f"took {time.monotonic() - started:.1f} s")
    finally:
        tmp.cleanup()
    return 0 if len(events) == len(patients) else 1
