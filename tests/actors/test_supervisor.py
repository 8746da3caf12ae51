"""Supervisor and session actor: timeouts, ordering, isolation, shutdown (no HTTP)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import trio

from actors.chunks import CHUNK_DELAY_S
from actors.reps import RepEngine
from actors.sequencer import Verdict
from domain.errors import ShuttingDown
from storage.blobs import MemoryBlobStore, blob_key
from storage.replay import read_replay
from telemetry.config import Settings
from tests.support.harness import Harness


@pytest.fixture
async def h(settings: Settings, nursery: trio.Nursery) -> Harness:
    harness = Harness(settings)
    await nursery.start(harness.sup.run)
    return harness


async def test_idle_timeout_ends_session(h: Harness, autojump_clock: trio.abc.Clock) -> None:
    c = h.claims()
    assert h.offer(c, 0).verdict is Verdict.ACCEPT
    await trio.sleep(h.settings.idle_timeout_s - 1)
    assert h.events == [] and len(h.sup.live()) == 1
    await trio.sleep(2)
    assert h.event("sess-1")["end_reason"] == "idle_timeout"
    assert h.sup.live() == []
    assert h.offer(c, 1).verdict == "ended"
    assert (await h.sup.end(c))["end_reason"] == "idle_timeout"


async def test_max_duration_ends_session(settings: Settings, nursery: trio.Nursery,
                                         autojump_clock: trio.abc.Clock) -> None:
    h = Harness(dataclasses.replace(settings, max_session_s=95.0))
    await nursery.start(h.sup.run)
    c = h.claims()
    for seq in range(15):
        h.offer(c, seq)
        await trio.sleep(10)
    e = h.event("sess-1")
    assert e["end_reason"] == "max_duration" and e["pose"]["batches"] == 10


async def test_missing_batch_is_skipped_after_gap_timeout(
    h: Harness, autojump_clock: trio.abc.Clock
) -> None:
    c = h.claims()
    h.offer(c, 0)
    h.offer(c, 2)
    await trio.sleep(0.1)
    (actor,) = h.sup.live()
    # the admin view applies the pending chunk first (actors/chunks.py)
    assert actor.snapshot()["batches"] == 1
    await trio.sleep(h.settings.gap_timeout_s + 0.1)
    assert actor.snapshot()["batches"] == 2
    assert h.offer(c, 1).verdict is Verdict.SKIPPED
    s = await h.sup.end(c)
    assert s["pose"]["batches_skipped"] == 1 and s["pose"]["frames"] == 60


async def test_crashing_actor_is_isolated(h: Harness, monkeypatch: pytest.MonkeyPatch,
                                          autojump_clock: trio.abc.Clock) -> None:
    real_feed = RepEngine.feed
    bad = h.claims("bad")
    good = h.claims("good")

    def feed(self: RepEngine, t: Any, f: Any) -> Any:
        if any(a.reps is self for a in h.sup.find("bad")):
            raise RuntimeError("injected bug")
        return real_feed(self, t, f)

    monkeypatch.setattr(RepEngine, "feed", feed)
    for seq in range(3):
        assert h.offer(good, seq).accepted
        assert h.offer(bad, seq).accepted  # acknowledged before the actor applies it
    # the engine sees the batches within the chunk delay (actors/chunks.py)
    await trio.sleep(CHUNK_DELAY_S + 1)
    crashed = h.event("bad")
    assert crashed["end_reason"] == "actor_error" and "injected bug" in crashed["error"]
    # every acknowledged frame is still in the crashed session's replay
    replay = read_replay(await h.store.get(blob_key("org-a", "bad")))
    assert replay.frames.shape[0] == 90
    assert h.offer(bad, 3).verdict == "ended"
    h.offer(good, 3)
    s = await h.sup.end(good)
    assert s["end_reason"] == "client_end" and s["pose"]["frames"] == 120 and s["error"] is None
    assert h.sup.crashed == 1


async def test_drain_finalises_every_acknowledged_batch(h: Harness) -> None:
    sessions = [h.claims(f"s{i}") for i in range(3)]
    for c in sessions:
        for seq in (0, 1, 3):  # 2 never comes: 3 is held out of order
            assert h.offer(c, seq).accepted
    # no checkpoint since the offers: batches are still in the mailboxes
    left = await h.sup.drain(5)
    assert left == 0
    for c in sessions:
        e = h.event(c.session_id)
        assert e["end_reason"] == "shutdown"
        assert e["pose"]["frames"] == 90 and e["pose"]["batches_skipped"] == 1
    with pytest.raises(ShuttingDown):
        h.offer(h.claims("late"), 0)


async def test_concurrent_end_calls_get_one_summary(h: Harness) -> None:
    c = h.claims()
    h.offer(c, 0)
    results: list[dict[str, Any]] = []

    async def end() -> None:
        results.append(await h.sup.end(c))

    async with trio.open_nursery() as n:
        for _ in range(3):
            n.start_soon(end)
    assert results[0] == results[1] == results[2]
    assert len(h.events) == 1


class FailingStore(MemoryBlobStore):
    async def put(self, key: str, data: bytes) -> Any:
        raise OSError("disk on fire")


async def test_blob_store_failure_is_reported_not_hidden(
    settings: Settings, nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    h = Harness(settings, store=FailingStore())
    await nursery.start(h.sup.run)
    c = h.claims()
    h.offer(c, 0)
    s = await h.sup.end(c)
    assert s["blob"] is None and s["error"] == "blob store unavailable"
    assert h.event("sess-1")["end_reason"] == "client_end"


class CountingStore(MemoryBlobStore):
    """Records how many blobs are being stored at once (each put takes a while)."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0
        self.most = 0

    async def put(self, key: str, data: bytes) -> Any:
        self.now += 1
        self.most = max(self.most, self.now)
        try:
            await trio.sleep(0.05)
            return await super().put(key, data)
        finally:
            self.now -= 1


async def test_a_mass_end_builds_a_few_blobs_at_a_time(settings: Settings,
                                                        nursery: trio.Nursery) -> None:
    """Twelve sessions ending at once: every blob is stored, never more than
    FINALISE_CONCURRENCY at a time (a blob is held in memory while it is built and
    stored), and no finished session keeps its blob."""
    from actors.finalise import FINALISE_CONCURRENCY

    store = CountingStore()
    h = Harness(settings, store)
    await nursery.start(h.sup.run)
    sessions = [h.claims(f"m{i}") for i in range(12)]
    for c in sessions:
        assert h.offer(c, 0).accepted
    actors = list(h.sup.live())
    left = await h.sup.drain(30)
    assert left == 0
    assert store.most == FINALISE_CONCURRENCY
    for c in sessions:
        assert await store.exists(blob_key(c.org_id, c.session_id))
        assert h.event(c.session_id)["blob"] is not None
    for a in actors:
        assert a.replay is not None and a.replay.finished
        with pytest.raises(RuntimeError):
            a.replay.finish()  # released after it was stored
