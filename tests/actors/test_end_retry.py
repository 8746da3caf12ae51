"""Durable finalisation retries storage failures instead of giving up (no HTTP).

With a spool, every ending (end call, idle timeout, max duration) records the end
durably, stores the blob and publishes the event, retrying each storage step with
capped backoff until it succeeds; an end call waits a bounded time and otherwise
gets :class:`NotFinalised`; a repeated end call cuts the current pause short.
Real spool and stores, with failures injected (``tests/faultutil.py``); the
backoff runs on the autojump clock.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import trio
import trio.testing

import actors.supervisor as supervisor_mod
from actors.durable import POSE, START, encode_claims, session_key
from actors.sequencer import Verdict
from actors.supervisor import Supervisor
from domain.pose_batch import decode_batch
from domain.privacy import Pseudonymiser
from storage.blobs import MemoryBlobStore, blob_key
from storage.bus import InProcessBus
from storage.replay import read_replay
from storage.spool import Spool
from telemetry.auth import SessionClaims, TokenVerifier
from telemetry.config import Settings
from telemetry.wiring import actor_limits
from tests.support import faults as fu
from tests.support.payloads import batch_body, session_token


class Durable:
    """A supervisor on a real spool, an in-memory blob store and an in-process bus."""

    def __init__(self, settings: Settings, spool: Spool) -> None:
        self.settings = settings
        self.spool = spool
        self.store = MemoryBlobStore()
        self.bus = InProcessBus()
        self.events: list[dict[str, Any]] = []
        self.bus.subscribe(self._collect)
        self.sup = Supervisor(actor_limits(settings), store=self.store, bus=self.bus,
                              pseudonyms=Pseudonymiser(b"k" * 32), journal=spool)
        self.sup.end_wait_s = 1.0

    async def _collect(self, event: Any) -> None:
        self.events.append(dict(event))

    def claims(self, sid: str = "sess-1") -> SessionClaims:
        return TokenVerifier(self.settings).verify_session(
            session_token(self.settings, session_id=sid))

    async def submit(self, claims: SessionClaims, seq: int) -> Any:
        body = batch_body(seq)
        return await self.sup.submit(claims, decode_batch(body, max_frames=120), body)


@pytest.fixture(autouse=True)
def inline_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """The spool's file I/O on the Trio thread. Under autojump_clock, virtual time
    jumps whenever every task waits, a worker thread included: an fsync slower
    than the jump threshold would carry the clock past an idle timeout or an end
    call's wait while the session is still being fed. Inline, the clock moves only
    at the code's own deadlines, whatever the machine's load."""

    async def run_inline(fn: Any, *args: Any, **_: Any) -> Any:
        await trio.lowlevel.checkpoint()
        return fn(*args)

    monkeypatch.setattr(trio.to_thread, "run_sync", run_inline)


async def _durable(settings: Settings, nursery: trio.Nursery) -> Durable:
    spool = Spool(settings.data_dir / "spool")
    await nursery.start(spool.run)
    d = Durable(settings, spool)
    await nursery.start(d.sup.run)
    return d


async def test_idle_timeout_with_the_disk_full_retries_until_recorded(
    settings: Settings, nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    """An idle timeout while the disk is full: the end cannot be recorded, so the
    session answers "retry" (not "ended"), end calls get NotFinalised (not a
    summary with no blob), and once the disk takes writes again the session is
    recorded, stored and published without anyone asking."""
    d = await _durable(settings, nursery)
    c = d.claims()
    for seq in range(3):
        assert (await d.submit(c, seq)).verdict is Verdict.ACCEPT
    disk = fu.DiskFull(d.spool)
    await trio.sleep(settings.idle_timeout_s + 5)
    assert (await d.submit(c, 3)).verdict == "session_ending"
    assert d.events == [] and disk.failed >= 3
    with pytest.raises(supervisor_mod.NotFinalised) as e:
        await d.sup.end(c)
    assert not e.value.recorded and e.value.retry_after >= 1

    disk.full = False
    await trio.sleep(60)  # no end call: the background retry gets there (backoff <= 30 s)
    (event,) = d.events
    assert event["end_reason"] == "idle_timeout" and event["pose"]["frames"] == 90
    assert event["blob"] is not None
    summary = await d.sup.end(c)
    assert summary["published"] is True and summary["event_id"] == event["event_id"]
    assert (await d.submit(c, 3)).verdict == "ended"
    replay = read_replay(await d.store.get(blob_key(c.org_id, c.session_id)))
    assert replay.frames.shape[0] == 90
    assert await trio.to_thread.run_sync(d.spool.keys) == [
        f"ended/{session_key(c.org_id, c.session_id)}"]


async def test_blob_store_outage_at_max_duration_backs_off_and_a_repeated_end_cuts_it(
    settings: Settings, nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    """Max duration while the blob store is down: the end is recorded (batches get
    "ended"), the blob is retried with capped backoff (not a busy loop, not given
    up), an end call answers NotFinalised within its bound, and once the store is
    back a repeated end call cuts the 30 s pause short and gets the summary."""
    d = await _durable(dataclasses.replace(settings, max_session_s=20.0), nursery)
    d.store.fail_puts = 10**6
    c = d.claims()
    for seq in range(3):
        assert (await d.submit(c, seq)).verdict is Verdict.ACCEPT
    await trio.sleep(25)
    assert (await d.submit(c, 3)).verdict == "ended"
    t0 = trio.current_time()
    with pytest.raises(supervisor_mod.NotFinalised) as e:
        await d.sup.end(c)
    assert e.value.recorded and trio.current_time() - t0 <= d.sup.end_wait_s + 0.1

    await trio.sleep(120)
    # 0.25 s doubling to the 30 s cap: about a dozen attempts in ~2 minutes
    assert 6 <= d.store.put_calls <= 14, d.store.put_calls
    (actor,) = d.sup.live()
    assert actor.backoff.delay >= 0.8 * 30
    d.store.fail_puts = 0
    t0 = trio.current_time()
    summary = await d.sup.end(c)
    assert trio.current_time() - t0 < 1.0
    assert summary["end_reason"] == "max_duration" and summary["pose"]["frames"] == 90
    assert summary["published"] is True and summary["blob"] is not None
    assert [e["event_id"] for e in d.events] == [summary["event_id"]]


async def _recovered_at_publish(settings: Settings, nursery: trio.Nursery) -> tuple[
        Spool, SessionClaims, str, dict[str, Any], fu.DiskFull, Durable]:
    """A session left at the ``publish`` step by an earlier process, on a full disk,
    and a supervisor that has recovered it."""
    spool = Spool(settings.data_dir / "spool")
    await nursery.start(spool.run)
    c = TokenVerifier(settings).verify_session(session_token(settings))
    key = session_key(c.org_id, c.session_id)
    summary = {"event_id": "pose-session:org-a:sess-1", "session_id": c.session_id,
               "org_id": c.org_id, "end_reason": "client_end", "published": False}
    await spool.append(key, START, encode_claims(c, 1.0))
    await spool.set_state(key, {"step": "publish", "summary": summary})
    disk = fu.DiskFull(spool)
    d = Durable(settings, spool)
    await nursery.start(d.sup.run)
    return spool, c, key, summary, disk, d


async def test_recovery_at_publish_retries_a_full_disk(
    settings: Settings, nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    """A session found at ``publish`` after a restart while the disk is full: its
    batches get "ended", end calls get NotFinalised until the event is out and the
    summary kept, and the supervisor lives through it (a spool error there used to
    escape into the supervisor's nursery)."""
    spool, c, key, summary, disk, d = await _recovered_at_publish(settings, nursery)
    assert d.sup.recovered is not None and d.sup.recovered.finalising == 1
    body = batch_body(0)
    offer = await d.sup.submit(c, decode_batch(body, max_frames=120), body)
    assert offer.verdict == "ended"
    await trio.sleep(30)
    assert disk.failed >= 3
    with pytest.raises(supervisor_mod.NotFinalised) as e:
        await d.sup.end(c)
    assert e.value.recorded
    disk.full = False
    await trio.sleep(40)
    got = await d.sup.end(c)
    assert got["event_id"] == summary["event_id"] and got["published"] is True
    assert len(d.events) >= 1
    assert await trio.to_thread.run_sync(spool.keys) == [f"ended/{key}"]


@pytest.mark.parametrize("disk_back", [True, False])
async def test_drain_waits_for_a_recovered_publish(
    settings: Settings, nursery: trio.Nursery, autojump_clock: trio.abc.Clock,
    disk_back: bool,
) -> None:
    """A session recovered at ``publish`` is finished by a task of the supervisor's
    own, not an actor: drain() waits for it as for the actors, and counts it as
    unfinished if the deadline passes first (it used to be left untracked)."""
    spool, c, key, summary, disk, d = await _recovered_at_publish(settings, nursery)

    async def disk_comes_back() -> None:
        await trio.sleep(10)
        disk.full = False

    if disk_back:
        nursery.start_soon(disk_comes_back)
    left = await d.sup.drain(60.0)
    if disk_back:
        assert left == 0 and [e["event_id"] for e in d.events] == [summary["event_id"]]
        assert await trio.to_thread.run_sync(spool.keys) == [f"ended/{key}"]
    else:
        # published, but not kept and closed: the next start does it again (idempotent)
        assert left == 1
        assert spool.get_state(key) == {"step": "publish", "summary": summary}


class _ReplayFailsOnce(Spool):
    """A spool whose first replay of a session's log fails, as an I/O error (EIO)
    while reading a segment at start-up would."""

    failed = False

    async def replay(self, key: str) -> Any:
        if not self.failed:
            self.failed = True
            raise OSError(5, "Input/output error")
        return await super().replay(key)


async def test_a_log_that_cannot_be_replayed_is_neither_restarted_nor_ended_empty(
    settings: Settings, nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    """A session whose log fails to replay at start-up keeps its acknowledged batches:
    its batches and end calls are answered "retry" until a later start replays it. It
    used to start afresh, and its end call published an empty summary and removed
    the log (the review of December)."""
    spool = _ReplayFailsOnce(settings.data_dir / "spool")
    await nursery.start(spool.run)
    c = TokenVerifier(settings).verify_session(session_token(settings))
    key = session_key(c.org_id, c.session_id)
    await spool.append(key, START, encode_claims(c, 1.0))
    for seq in range(3):  # what the previous process acknowledged
        await spool.append(key, POSE, batch_body(seq), compress=False)
    d = Durable(settings, spool)
    await nursery.start(d.sup.run)
    assert d.sup.recovered is not None and d.sup.recovered.unrecoverable == 1

    offer = await d.submit(c, 3)
    assert offer.verdict == "session_ending"  # 503, retry: not accepted into a new session
    with pytest.raises(supervisor_mod.NotFinalised) as e:
        await d.sup.end(c)
    assert not e.value.recorded
    await trio.sleep(60)
    assert d.events == []
    assert len(await spool.replay(key)) == 4  # every acknowledged batch is still there
