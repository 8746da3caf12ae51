"""The durable admission path (check → persist → accept) when the session changes
while a batch is being made durable: the sequencer judges it again then, and only
then."""

from __future__ import annotations

from typing import Any

import trio
import trio.testing

from actors.durable import POSE
from actors.sequencer import Sequencer, Verdict
from actors.supervisor import Supervisor
from domain.pose_batch import PoseBatch, decode_batch, encode_batch
from domain.privacy import Pseudonymiser
from storage.blobs import MemoryBlobStore
from storage.bus import InProcessBus
from telemetry.auth import TokenVerifier
from telemetry.config import Settings
from telemetry.wiring import actor_limits
from tests.support.payloads import batch_body, pose_frames, session_token


class GatedJournal:
    """A journal whose appends wait for :meth:`release` (the pose records only)."""

    def __init__(self) -> None:
        self.gate = trio.Event()
        self.appended: list[bytes] = []

    def release(self) -> None:
        self.gate.set()

    async def append(self, key: str, kind: int, payload: bytes, *,
                     compress: bool = True) -> None:
        if kind == POSE:
            await self.gate.wait()
        self.appended.append(bytes(payload))

    async def sessions(self) -> list[str]:  # recovery at start: nothing on disk
        return []


def batch(seq: int, t0: int | None = None) -> PoseBatch:
    """Batch ``seq`` (its frames from ``t0`` ms if given)."""
    if t0 is None:
        return decode_batch(batch_body(seq), max_frames=120)
    t, f = pose_frames(30, t0=t0, seed=seq)
    return decode_batch(encode_batch(seq, t, f, space="image", image_width=640,
                                     image_height=480), max_frames=120)


async def supervisor(settings: Settings, nursery: trio.Nursery,
                     journal: GatedJournal) -> tuple[Supervisor, Any]:
    sup = Supervisor(actor_limits(settings), store=MemoryBlobStore(), bus=InProcessBus(),
                     pseudonyms=Pseudonymiser(b"k" * 32), journal=journal)  # type: ignore[arg-type]
    await nursery.start(sup.run)
    claims = TokenVerifier(settings).verify_session(session_token(settings))
    return sup, claims


def body_of(b: PoseBatch) -> bytes:
    return b"batch %d" % b.seq  # what the journal stores is not read here


async def test_a_retry_racing_its_first_copy_is_a_duplicate(
        settings: Settings, nursery: trio.Nursery) -> None:
    journal = GatedJournal()
    sup, claims = await supervisor(settings, nursery, journal)
    answers: list[Verdict] = []

    async def send(b: PoseBatch) -> None:
        answers.append((await sup.submit(claims, b, body_of(b))).verdict)

    nursery.start_soon(send, batch(0))
    nursery.start_soon(send, batch(0))
    await trio.testing.wait_all_tasks_blocked()
    journal.release()
    await trio.testing.wait_all_tasks_blocked()
    assert sorted(answers) == [Verdict.ACCEPT, Verdict.DUPLICATE]
    actor = sup._live[(claims.org_id, claims.session_id)]
    assert actor.duplicates == 1


async def test_a_batch_overlapping_one_taken_meanwhile_is_refused(
        settings: Settings, nursery: trio.Nursery) -> None:
    journal = GatedJournal()
    sup, claims = await supervisor(settings, nursery, journal)
    answers: dict[int, Verdict] = {}

    async def send(b: PoseBatch) -> None:
        answers[b.seq] = (await sup.submit(claims, b, body_of(b))).verdict

    # Batch 1 starts inside batch 0's frames: each alone is acceptable at check time.
    b0, b1 = batch(0), batch(1, t0=batch(0).last_t - 100)
    nursery.start_soon(send, b0)
    await trio.testing.wait_all_tasks_blocked()
    nursery.start_soon(send, b1)
    await trio.testing.wait_all_tasks_blocked()
    journal.release()
    await trio.testing.wait_all_tasks_blocked()
    # whichever is queued first is taken; the other is judged again, and refused
    assert sorted(answers.values()) == [Verdict.ACCEPT, Verdict.OVERLAP]


async def test_an_unchanged_session_judges_a_batch_once(
        settings: Settings, nursery: trio.Nursery, monkeypatch: Any) -> None:
    journal = GatedJournal()
    journal.release()
    sup, claims = await supervisor(settings, nursery, journal)
    calls: list[int] = []
    real = Sequencer.check

    def counted(self: Sequencer, seq: int, first_t: int, last_t: int) -> Any:
        calls.append(seq)
        return real(self, seq, first_t, last_t)

    monkeypatch.setattr(Sequencer, "check", counted)
    for seq in range(3):
        b = batch(seq)
        assert (await sup.submit(claims, b, body_of(b))).verdict is Verdict.ACCEPT
    assert calls == [0, 1, 2]


async def test_a_gap_skipped_meanwhile_refuses_the_late_batch(
        settings: Settings, nursery: trio.Nursery) -> None:
    journal = GatedJournal()
    sup, claims = await supervisor(settings, nursery, journal)
    journal.release()
    b = batch(0)
    assert (await sup.submit(claims, b, body_of(b))).accepted
    journal.gate = trio.Event()
    answers: list[Verdict] = []

    async def send(b: PoseBatch) -> None:
        answers.append((await sup.submit(claims, b, body_of(b))).verdict)

    nursery.start_soon(send, batch(1))
    await trio.testing.wait_all_tasks_blocked()
    actor = sup._live[(claims.org_id, claims.session_id)]
    actor._seq.skip()  # the gap timeout gave up on batch 1 while it was being spooled
    journal.release()
    await trio.testing.wait_all_tasks_blocked()
    assert answers == [Verdict.SKIPPED]
