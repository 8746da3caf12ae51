"""The browser client's version 2 encoder (``clients/web/telemetry-client.js``) against the
service's (``domain/pose_batch_v2.py``): the same bytes for the same frames, real clips and
edge cases, and the fallback to version 1 for a batch v2 cannot carry.

Runs ``node`` as ``tests/test_web_client.py`` does (a missing tool fails, never skips).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import numpy as np

from domain import pose_batch_v2 as v2
from domain.pose_batch import decode_batch, encode_batch, encode_batch_v2
from tests.data import LOWER_BODY, PUSHUP
from tests.support.node import WEB
from tests.support.node import run_tool as _run
from tests.support.node import tool as _tool

ENCODE = """
import { encodeBatchAs } from %s;
let input = '';
for await (const chunk of process.stdin) input += chunk;
const out = JSON.parse(input).map(({ seq, space, width, height, t, frames }) => {
  const body = encodeBatchAs({ seq, space, width, height,
    frames: t.map((ms, i) => ({ t: ms, values: frames[i] && Float32Array.from(frames[i]) })) });
  return Buffer.from(body).toString('base64');
});
process.stdout.write(JSON.stringify(out));
"""


def _case(seq: int, t: np.ndarray, frames: np.ndarray, space: str) -> dict[str, Any]:
    nopose = np.isnan(frames).all(axis=(1, 2))
    # float(np.float32) is exact in a double, so node gets the very float32 values
    rows = [None if nopose[i] else [float(x) for x in f.ravel()] for i, f in enumerate(frames)]
    return {"seq": seq, "space": space, "width": 640, "height": 480,
            "t": [int(x) for x in t], "frames": rows}


def _cases() -> list[tuple[dict[str, Any], np.ndarray, np.ndarray]]:
    out = []
    for path, key in [(PUSHUP / "correct108.npz", "landmarks"), (PUSHUP / "wrong20.npz", "world"),
                      (LOWER_BODY / "squat_side_rohitk.npz", "landmarks")]:
        d = np.load(path)
        t = np.rint(d["t_ms"]).astype(np.int64)
        space = "world" if key == "world" else "image"
        for s in range(0, min(len(t), 300), 30):
            out.append((t[s:s + 30], d[key][s:s + 30], space))
    rng = np.random.default_rng(15)
    for n, scale, nopose in [(1, 1.0, ()), (120, 2.0, (0, 5, 119)), (7, 8000.0, (2,)),
                             (3, 1.0, (0, 1, 2)), (40, 1e-3, ())]:
        t = 2**32 - 4000 + np.cumsum(rng.integers(1, 60, size=n))
        f = rng.uniform(-scale, scale, size=(n, 33, 4)).astype(np.float32)
        f[:, :, 3] = rng.uniform(0, 1, size=(n, 33))
        f[list(nopose)] = np.nan
        out.append((t, f, "image"))
    # a coordinate beyond v2's range: the client sends that batch as v1
    t, f = np.arange(4) * 33, rng.uniform(0, 1, size=(4, 33, 4)).astype(np.float32)
    f[2, 5, 1] = 9000.0
    out.append((t, f, "world"))
    return [(_case(i, t, f, space), t, f) for i, (t, f, space) in enumerate(out)]


def _node_encode(tmp_path: Path, cases: list[dict[str, Any]]) -> list[bytes]:
    script = tmp_path / "encode_v2.mjs"
    script.write_text(ENCODE % json.dumps((WEB / "telemetry-client.js").as_uri()))
    out = _run([_tool("node"), str(script)], tmp_path, stdin=json.dumps(cases))
    return [base64.b64decode(b) for b in json.loads(out)]


def test_node_v2_encoder_writes_the_python_encoders_bytes(tmp_path: Path) -> None:
    built = _cases()
    bodies = _node_encode(tmp_path, [c for c, _, _ in built])
    assert len(bodies) == len(built)
    versions = []
    for body, (case, t, frames) in zip(bodies, built, strict=True):
        kw = dict(space=case["space"], image_width=640, image_height=480)
        try:
            want = encode_batch_v2(case["seq"], t, frames, **kw)
        except ValueError:
            want = encode_batch(case["seq"], t, frames, **kw)  # v1, as the client falls back
        assert body == want, case["seq"]
        batch = decode_batch(body, max_frames=120)
        versions.append(body[4])
        np.testing.assert_array_equal(batch.t_ms, t)
        if body[4] == 2:
            np.testing.assert_array_equal(
                batch.frames, v2.dequantise(v2.quantise(frames)).reshape(frames.shape))
    assert versions.count(1) == 1 and versions[-1] == 1
