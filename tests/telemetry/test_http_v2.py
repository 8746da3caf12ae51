"""Wire format version 2 through the running service: a session sent as v2 batches gets
the summary and the replay a session sent as v1 gets, and a malformed v2 batch is
refused with its precise code."""

from __future__ import annotations

from typing import Any

import numpy as np

from domain.pose_batch import encode_batch, encode_batch_v2
from storage.blobs import blob_key
from storage.replay import read_replay
from telemetry.config import Settings
from tests.data import PUSHUP
from tests.support.payloads import hdr, session_token
from tests.support.service import running_service

_VOLATILE = {"session_id", "event_id", "blob", "started_at", "ended_at", "duration_s",
             "received_at", "finalised_at"}


def _clip() -> list[tuple[np.ndarray, np.ndarray]]:
    d = np.load(PUSHUP / "correct108.npz")
    t = np.rint(d["t_ms"]).astype(np.int64)
    return [(t[s:s + 30], d["landmarks"][s:s + 30]) for s in range(0, len(t), 30)]


def _strip(summary: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in summary.items() if k not in _VOLATILE}


async def test_a_v2_session_gets_the_v1_summary_and_replay(settings: Settings) -> None:
    out = {}
    async with running_service(settings) as svc:
        for sid, enc in (("sess-v1", encode_batch), ("sess-v2", encode_batch_v2)):
            tok = session_token(settings, session_id=sid, exercise={"kind": "push_up"})
            for seq, (t, f) in enumerate(_clip()):
                body = enc(seq, t, f, image_width=640, image_height=480)
                r = await svc.client.post("/v1/pose/frames", content=body, headers=hdr(tok))
                assert r.status_code == 202, r.text
            r = await svc.client.post(f"/v1/sessions/{sid}/end", headers=hdr(tok))
            assert r.status_code == 200, r.text
            out[sid] = (r.json(), await svc.storage.store.get(blob_key("org-a", sid)))
        tok = session_token(settings, session_id="sess-bad")
        t, f = _clip()[0]
        bad = encode_batch_v2(0, t, f, image_width=640, image_height=480) + b"\0"
        r = await svc.client.post("/v1/pose/frames", content=bad, headers=hdr(tok))
        assert r.status_code == 400 and r.json()["error"]["code"] == "trailing_bytes"
    (s1, blob1), (s2, blob2) = out["sess-v1"], out["sess-v2"]
    assert s1["reps"]["rep_count"] > 0 and s1["pose"]["frames"] > 0
    assert _strip(s1) == _strip(s2)  # pose statistics and reps included
    r1, r2 = read_replay(blob1), read_replay(blob2)
    np.testing.assert_array_equal(r1.t_ms, r2.t_ms)
    assert r1.frames.tobytes() == r2.frames.tobytes()  # bit for bit
