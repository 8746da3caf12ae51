"""The real service with ``TELEMETRY_JOURNAL=jetstream`` on a real 3-node R3 cluster:
a session whose process stops is carried on by a new process that has a new, empty
data directory (nothing local survives), and its one blob holds every frame that was
acknowledged."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import trio

from domain.pose_batch import decode_batch
from storage.blobs import blob_key
from storage.jetstream import open_jetstream_journal
from storage.replay import read_replay
from telemetry.config import Settings
from tests.support.nats import NatsCluster
from tests.support.payloads import batch_body, hdr, session_token
from tests.support.service import Running, running_service

ORG, SID = "org-a", "sess-fleet-1"


async def post_until_accepted(svc: Running, token: str, seq: int) -> bytes:
    """Batch ``seq`` as the browser client sends it: a 503 (the stream just created
    and still electing its leader, a journal write not acknowledged in time) carries
    Retry-After and is sent again."""
    body = batch_body(seq)
    for _ in range(100):
        r = await svc.client.post("/v1/pose/frames", content=body, headers=hdr(token))
        if r.status_code == 202:
            return body
        assert r.status_code == 503 and r.headers.get("Retry-After"), r.text
        await trio.sleep(0.1)
    raise AssertionError(f"batch {seq} was never accepted")


async def test_a_new_process_with_a_new_disk_carries_the_session_on(
        settings: Settings, nats_cluster: NatsCluster, tmp_path: Path) -> None:
    # The production names (TELEMETRY_JOURNAL...): only this test uses them; clean
    # up whatever a crashed earlier run in this session might have left.
    async with open_jetstream_journal(nats_cluster.urls) as journal:
        await journal.delete_everything()
    base = dataclasses.replace(
        settings, journal="jetstream", nats_urls=tuple(nats_cluster.urls),
        journal_replicas=3, shutdown_mode="flush", shutdown_deadline_s=2.0,
        blob_encoding="f32")
    first = dataclasses.replace(base, data_dir=tmp_path / "instance-a")
    second = dataclasses.replace(base, data_dir=tmp_path / "instance-b")
    acked: list[bytes] = []
    try:
        with trio.fail_after(120):
            async with running_service(first) as svc:
                tok = session_token(svc.settings, org_id=ORG, session_id=SID)
                for seq in range(8):
                    acked.append(await post_until_accepted(svc, tok, seq))
            assert not (first.data_dir / "spool").exists()  # nothing journaled locally
            assert not (second.data_dir / "spool").exists()

            async with running_service(second) as svc:
                for seq in range(8, 12):
                    acked.append(await post_until_accepted(svc, tok, seq))
                r = await svc.client.post(f"/v1/sessions/{SID}/end", headers=hdr(tok))
                assert r.status_code == 200, r.text
                summary = r.json()
                events = [e for e in svc.events if e["session_id"] == SID]

        assert len(events) == 1
        blobs = list((second.data_dir / "blobs").rglob("*"))
        assert [p for p in blobs if p.is_file()] == [second.data_dir / "blobs"
                                                     / blob_key(ORG, SID)]
        replay = read_replay((second.data_dir / "blobs" / blob_key(ORG, SID)).read_bytes())
        sent = [decode_batch(b, max_frames=1000) for b in acked]
        assert summary["pose"]["frames"] == replay.frames.shape[0] == sum(
            len(b.t_ms) for b in sent)
        np.testing.assert_array_equal(replay.t_ms, np.concatenate([b.t_ms for b in sent]))
        np.testing.assert_array_equal(replay.frames,
                                      np.concatenate([b.frames for b in sent]))
        # The session's journal data is gone once its blob is stored; the ended
        # summary stays for the retention period.
        async with open_jetstream_journal(nats_cluster.urls) as journal:
            # Read from the leader: sessions() lists through a consumer, which a
            # replica still catching up (a node restarted by an earlier test) may serve.
            assert await journal.replay(f"{ORG}/{SID}") == []
            assert await journal.state(f"{ORG}/{SID}") is None
            kept = await journal.state(f"ended/{ORG}/{SID}")
            assert kept is not None and kept["summary"]["session_id"] == SID
    finally:
        async with open_jetstream_journal(nats_cluster.urls) as journal:
            await journal.delete_everything()
