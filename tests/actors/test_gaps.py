"""A session's gaps across a take-over or restart, and the retry a batch refused as
ahead of the window is given. Found by tests/system/test_fleet.py: the resend came
as the gap timer skipped it (Retry-After was the gap timeout), and a rebuilt session
dropped every acknowledged batch past a gap the live actor had skipped."""

from __future__ import annotations

import time

import trio

from actors.sequencer import Verdict
from domain.pose_batch import decode_batch
from telemetry.config import Settings
from tests.support.harness import Harness
from tests.support.payloads import batch_body


async def test_a_batch_retried_after_its_retry_after_is_not_skipped(
        settings: Settings, nursery: trio.Nursery, autojump_clock: trio.abc.Clock) -> None:
    # What a browser stream does when one batch is refused (here 1, e.g. 503
    # storage_unavailable while a NATS node is elected) and its window moves on:
    # the batches after it are held, until one is more than the reorder window ahead.
    h = Harness(settings)
    await nursery.start(h.sup.run)
    c = h.claims()
    assert h.offer(c, 0).verdict is Verdict.ACCEPT
    await trio.sleep(0.2)  # applied: batch 1 is the next expected
    for seq in range(2, 2 + settings.reorder_window):
        assert h.offer(c, seq).verdict is Verdict.ACCEPT  # held
    ahead = 2 + settings.reorder_window
    refused = h.offer(c, ahead)
    assert refused.verdict is Verdict.AHEAD_OF_WINDOW
    assert refused.refusal is not None
    retry_after = refused.refusal.retry_after
    assert retry_after is not None
    assert h.offer(c, 1).verdict is Verdict.ACCEPT  # the refused batch, resent: 1..9 apply
    await trio.sleep(0.2)
    # The window has room again: the client sends its next new batch at once, and
    # resends the refused one when Retry-After says (the browser adds 0-10 % jitter).
    assert h.offer(c, ahead + 1).verdict is Verdict.ACCEPT  # held: `ahead` is missing
    await trio.sleep(retry_after * 1.05)
    # (SKIPPED, 409, when Retry-After was the gap timeout itself)
    assert h.offer(c, ahead).verdict is Verdict.ACCEPT


async def test_a_take_over_keeps_every_batch_acknowledged_after_a_skipped_one(
        settings: Settings, nursery: trio.Nursery, autojump_clock: trio.abc.Clock) -> None:
    # The journal of a session whose live actor skipped batch 1 and then acknowledged
    # 2..11 (ten batches); rebuilt as actors.fleet / actors.hosting do it.
    h = Harness(settings)
    await nursery.start(h.sup.run)
    c = h.claims()
    journaled = [0, *range(2, 12)]
    actor = h.sup.adopt(c, time.time())
    for seq in journaled:
        actor.restore_pose(decode_batch(batch_body(seq), max_frames=120))
    h.sup.launch(actor)
    summary = await h.sup.end(c)
    assert summary["pose"]["batches_skipped"] == 1
    assert summary["pose"]["batches"] == len(journaled)  # was 9: batches 10 and 11 lost
