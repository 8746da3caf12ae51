"""Regressions for defects a review found, each reproduced before it was fixed."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
import trio

import actors.session
from actors.durable import MEDIA, POSE, START, encode_claims, session_key
from actors.supervisor import Supervisor
from domain.pose_batch import decode_batch, encode_batch
from domain.privacy import Pseudonymiser
from storage.blobs import MemoryBlobStore
from storage.bus import InProcessBus
from storage.spool import Spool
from telemetry.auth import TokenVerifier, is_safe_id
from telemetry.config import Settings
from telemetry.wiring import actor_limits
from tests.support.harness import Harness
from tests.support.payloads import batch_body, hdr, pose_frames, session_token
from tests.support.service import running_service


class SlowExists(MemoryBlobStore):
    async def exists(self, key: str) -> bool:
        await trio.sleep(0.5)
        return await super().exists(key)


async def test_end_racing_the_first_batch_ends_the_real_session(
    settings: Settings, nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    h = Harness(settings, store=SlowExists())
    await nursery.start(h.sup.run)
    c = h.claims()
    result: list[dict[str, Any]] = []

    async def end() -> None:
        result.append(await h.sup.end(c))

    nursery.start_soon(end)
    await trio.sleep(0.1)  # end() is asking the store whether the session ended before
    assert h.sup.offer(c, decode_batch(batch_body(0), max_frames=120)).accepted
    await trio.sleep(5)
    (summary,) = result
    assert summary["pose"]["frames"] == 30
    assert [e["pose"]["frames"] for e in h.events] == [30]  # no empty summary first


async def test_concurrent_first_batches_lose_nothing(settings: Settings) -> None:
    settings = dataclasses.replace(settings, max_batches_per_s=5.0)
    async with running_service(settings) as svc:
        tok = session_token(settings)
        answers: dict[int, int] = {}

        async def send(seq: int) -> None:
            r = await svc.client.post("/v1/pose/frames", content=batch_body(seq),
                                      headers=hdr(tok))
            answers[seq] = r.status_code

        async with trio.open_nursery() as n:
            for seq in range(12):
                n.start_soon(send, seq)
        acked = [s for s, code in answers.items() if code == 202]
        assert acked and set(answers.values()) <= {202, 429, 503}
        r = await svc.client.post("/v1/sessions/sess-1/end", headers=hdr(tok))
        s = r.json()
        # every acknowledged batch is in the session (held ones are applied past gaps)
        assert s["pose"]["frames"] == 30 * len(acked), (answers, s["pose"])


def test_ids_with_spool_suffixes_are_refused() -> None:
    for bad in ("visit.json", "a.log", "x.tmp"):
        assert not is_safe_id(bad)
    assert is_safe_id("visit.json2") and is_safe_id("s-1.2")


def test_an_id_ending_in_a_newline_is_refused() -> None:
    assert not is_safe_id("sess-1\n") and not is_safe_id("org-a\n")
    assert is_safe_id("sess-1")


async def test_a_failing_finalisation_costs_only_its_session(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = actors.session.finalise

    async def finalise(actor: Any) -> dict[str, Any]:
        if actor.session_id == "bad":
            raise OSError("disk full")
        return await real(actor)

    monkeypatch.setattr(actors.session, "finalise", finalise)
    async with running_service(settings) as svc:
        bad, good = session_token(settings, session_id="bad"), session_token(settings)
        for tok in (bad, good):
            r = await svc.client.post("/v1/pose/frames", content=batch_body(0), headers=hdr(tok))
            assert r.status_code == 202
        # Nothing was stored, so no 200 (docs/durability.md): 503 + Retry-After, the
        # session stays on disk at its step for the next start, and takes nothing more.
        for _ in range(2):
            r = await svc.client.post("/v1/sessions/bad/end", headers=hdr(bad))
            assert r.status_code == 503 and r.json()["error"]["code"] == "finalising", r.text
            assert int(r.headers["Retry-After"]) >= 1
        r = await svc.client.post("/v1/pose/frames", content=batch_body(1), headers=hdr(bad))
        assert r.status_code == 409
        r = await svc.client.post("/v1/sessions/sess-1/end", headers=hdr(good))
        assert r.status_code == 200 and r.json()["pose"]["frames"] == 30


async def test_recovery_skips_a_media_record_refused_live(
    settings: Settings, nursery: trio.Nursery
) -> None:
    spool = Spool(settings.data_dir / "spool")
    await nursery.start(spool.run)
    claims = TokenVerifier(settings).verify_session(session_token(settings))
    key = session_key(claims.org_id, claims.session_id)

    def media(media_id: str) -> bytes:
        return json.dumps({"media_id": media_id, "view_id": "v1", "events": [
            {"id": f"{media_id}-1", "type": "play", "t_ms": 10, "position_seconds": 0}]}).encode()

    await spool.append(key, START, encode_claims(claims, 1.0))
    await spool.append(key, MEDIA, media("video-a"))
    await spool.append(key, MEDIA, media("video-b"))  # same view, other video: refused live
    sup = Supervisor(actor_limits(settings), store=MemoryBlobStore(), bus=InProcessBus(),
                     pseudonyms=Pseudonymiser(b"k" * 32), journal=spool)
    await nursery.start(sup.run)
    assert sup.recovered is not None and sup.recovered.resumed == 1
    (actor,) = sup.live()
    assert [v["media_id"] for v in actor.media.summaries()] == ["video-a"]
    await sup.drain(5)


class _SecondCommitsFirst(Spool):
    """A spool whose append of seq 1 returns only after seq 2's, as when both wake
    from one group-commit round and Trio runs the second's task first."""

    second_done: trio.Event

    async def append(self, key: str, kind: int, payload: bytes, *,
                     compress: bool = True) -> None:
        await super().append(key, kind, payload, compress=compress)
        if kind == POSE:
            seq = decode_batch(payload, max_frames=120).seq
            if seq == 1:
                await self.second_done.wait()
            elif seq == 2:
                self.second_done.set()


def _taken(actor: Any) -> set[int]:
    """The seqs a session's sequencer took: applied or waiting for their turn."""
    seq = actor._seq
    return (set(range(seq.next_seq)) - seq.skipped) | set(seq.pending)


async def test_batches_are_judged_in_journal_order_so_a_replay_takes_the_same_ones(
    settings: Settings, nursery: trio.Nursery
) -> None:
    """Two batches whose timestamps overlap, in flight together: the one the journal
    holds first is the one taken, live as on a replay. Judged in the order their
    appends returned, the live session took seq 2 and refused seq 1, and a replay
    (a restart, a take-over) took seq 1 and refused seq 2."""
    journal = _SecondCommitsFirst(settings.data_dir / "spool")
    journal.second_done = trio.Event()
    await nursery.start(journal.run)
    claims = TokenVerifier(settings).verify_session(session_token(settings))

    def supervisor() -> Supervisor:
        return Supervisor(actor_limits(settings), store=MemoryBlobStore(), bus=InProcessBus(),
                          pseudonyms=Pseudonymiser(b"k" * 32), journal=journal)

    t, f = pose_frames(30, t0=1500, seed=9)  # starts before seq 1's last frame (1957 ms)
    bodies = {0: batch_body(0), 1: batch_body(1),
              2: encode_batch(2, t, f, space="image", image_width=640, image_height=480)}
    answers: dict[int, str] = {}
    sup = supervisor()
    await nursery.start(sup.run)

    async def send(seq: int) -> None:
        offer = await sup.submit(claims, decode_batch(bodies[seq], max_frames=120),
                                 bodies[seq])
        answers[seq] = offer.verdict.value

    await send(0)
    async with trio.open_nursery() as both:
        both.start_soon(send, 1)
        await trio.lowlevel.checkpoint()
        both.start_soon(send, 2)
    assert answers[1] == "accept" and answers[2] != "accept", answers
    (live,) = sup.live()
    rebuilt = supervisor().rebuild(
        await journal.replay(session_key(claims.org_id, claims.session_id)))
    assert _taken(live) == _taken(rebuilt) == {0, 1}
