"""The browser client package (``clients/web/``) under Node: its unit tests, its types,
its encoder against the service's decoder, and the package as an integrator installs it.

Needs ``node`` and ``npm`` (Debian: ``apt-get install nodejs npm``) and the package's dev
dependencies (``npm ci`` in ``clients/web``); ``python3 dev.py test`` sees to both. A
missing tool fails the test with what to run; it never skips.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from domain.pose_batch import decode_batch, encode_batch
from tests.support.node import TIMEOUT_S, WEB
from tests.support.node import run_tool as _run
from tests.support.node import tool as _tool

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = json.loads((WEB / "package.json").read_text())


def _tsc() -> Path:
    tsc = WEB / "node_modules" / ".bin" / "tsc"
    if not tsc.exists():
        pytest.fail("TypeScript is not installed: run `npm ci` in clients/web "
                    "(`python3 dev.py test` does)", pytrace=False)
    return tsc


def test_node_unit_tests_pass() -> None:
    """``npm test``'s files under node --test: batching, backoff, the buffer bound, the
    v1 encoder and the token refresh of the stream transport's POST side. The TAP
    reporter is asked for by name: the default one differs by Node version and by
    whether stdout is a terminal."""
    assert PACKAGE["scripts"]["test"] == "node --test test/unit/*.test.js"
    files = sorted(str(p.relative_to(WEB)) for p in (WEB / "test" / "unit").glob("*.test.js"))
    assert files == ["test/unit/backoff.test.js", "test/unit/batching.test.js",
                     "test/unit/encoder.test.js", "test/unit/token-refresh.test.js"]
    out = _run([_tool("node"), "--test", "--test-reporter=tap", *files], WEB)
    counts = dict(line[2:].split() for line in out.splitlines()
                  if line.startswith(("# pass ", "# fail ", "# cancelled ")))
    assert counts["fail"] == counts["cancelled"] == "0", out
    assert int(counts["pass"]) >= 20, out


def test_typescript_check_is_clean() -> None:
    """``tsc -p . --noEmit`` with checkJs over the JSDoc: no errors."""
    _tool("node")
    _run([str(_tsc()), "-p", ".", "--noEmit"], WEB)


# -- the encoder against domain/pose_batch.py ----------------------------------------------

ENCODE = """
import { encodeBatch } from %s;
let input = '';
for await (const chunk of process.stdin) input += chunk;
const out = JSON.parse(input).map(({ seq, space, width, height, t, frames }) => {
  const body = encodeBatch({ seq, space, width, height,
    frames: t.map((ms, i) => ({ t: ms, values: frames[i] && Float32Array.from(frames[i]) })) });
  return Buffer.from(body).toString('base64');
});
process.stdout.write(JSON.stringify(out));
"""


def _node_encode(tmp_path: Path, cases: list[dict[str, Any]]) -> list[bytes]:
    script = tmp_path / "encode.mjs"
    script.write_text(ENCODE % json.dumps((WEB / "telemetry-client.js").as_uri()))
    out = _run([_tool("node"), str(script)], tmp_path, stdin=json.dumps(cases))
    return [base64.b64decode(b) for b in json.loads(out)]


def _case(seq: int, n: int, *, space: str, size: tuple[int, int], t0: int,
          no_pose: tuple[int, ...], seed: int) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    t = (t0 + np.cumsum(rng.integers(1, 70, size=n))).astype(np.uint32)
    lo, hi = (-1.5, 1.5) if space == "world" else (-0.2, 1.2)
    frames = rng.uniform(lo, hi, size=(n, 33, 4)).astype(np.float32)
    frames[:, :, 3] = rng.uniform(0.0, 1.0, size=(n, 33)).astype(np.float32)
    frames[:, 0, :] = np.float32([1e4, -1e4, 0.0, 1.0])  # the range's edges
    frames[list(no_pose)] = np.nan
    # float(np.float32) is exact in a double, so node gets the very float32 values
    rows = [None if i in no_pose else [float(x) for x in f.ravel()] for i, f in enumerate(frames)]
    case = {"seq": seq, "space": space, "width": size[0], "height": size[1],
            "t": [int(x) for x in t], "frames": rows}
    return case, t, frames


CASES = [
    dict(seq=0, n=30, space="image", size=(640, 480), t0=0, no_pose=(3, 29), seed=1),
    dict(seq=2**32 - 1, n=1, space="world", size=(0, 0), t0=2**32 - 100, no_pose=(), seed=2),
    dict(seq=77, n=120, space="image", size=(1920, 1080), t0=86_400_000, no_pose=(0,), seed=3),
]


def test_node_encoder_matches_the_python_decoder(tmp_path: Path) -> None:
    """What the browser encodes, domain/pose_batch.py decodes strictly to the same batch, and
    the bytes are those of the service's own encoder."""
    built = [_case(**c) for c in CASES]
    bodies = _node_encode(tmp_path, [b[0] for b in built])
    assert len(bodies) == len(built)
    for body, (case, t, frames) in zip(bodies, built, strict=True):
        batch = decode_batch(body, max_frames=120)
        assert batch.seq == case["seq"]
        assert batch.space == case["space"]
        assert (batch.image_width, batch.image_height) == (case["width"], case["height"])
        np.testing.assert_array_equal(batch.t_ms, t)
        np.testing.assert_array_equal(batch.frames, frames)  # NaN rows compare equal
        assert body == encode_batch(case["seq"], t, frames, space=case["space"],
                                    image_width=case["width"], image_height=case["height"])


# -- the package as an integrator gets it -----------------------------------------------

CONSUMER_TS = """
import { TelemetryClient, encodeBatch, type TransportResult } from '@restartix/telemetry-client';
import { MediaTracker } from '@restartix/telemetry-client/media-tracker';

const client = new TelemetryClient({ baseUrl: 'https://t.example', token: 't', sessionId: 's' });
const tracker = new MediaTracker(document.createElement('video'),
  { mediaId: 'm-1', clock: client.clock, transport: client.transport });
client.attach(tracker);
const body: ArrayBuffer = encodeBatch({ seq: 0, frames: [{ t: 0, values: null }] });
const answer: Promise<TransportResult> = client.transport.sendPoseBatch(body);
const summary: Promise<unknown> = client.end({ drainMs: 1000 });
void answer; void summary;
"""

CONSUMER_BAD_TS = """
import { encodeBatch } from '@restartix/telemetry-client';
encodeBatch({ seq: 0, space: 'screen', frames: [] });
"""

CONSUMER_TSCONFIG = {
    # strict and skipLibCheck off: the declarations must hold up in the strictest app
    "compilerOptions": {"module": "nodenext", "moduleResolution": "nodenext", "strict": True,
                        "noEmit": True, "lib": ["es2022", "dom"], "types": [],
                        "skipLibCheck": False},
    "files": ["consumer.ts"],
}

CONSUMER_MJS = """
import { encodeBatch, TelemetryClient, CONTENT_TYPE } from '@restartix/telemetry-client';
import { MediaTracker } from '@restartix/telemetry-client/media-tracker';
const body = encodeBatch({ seq: 5, frames: [{ t: 1, values: null }] });
console.log(JSON.stringify({ bytes: body.byteLength, type: CONTENT_TYPE,
  classes: [typeof TelemetryClient, typeof MediaTracker] }));
"""


def test_package_installs_and_its_types_resolve(tmp_path: Path) -> None:
    """``npm pack`` (which builds the declarations), install the tarball into an app, then
    import both entry points under Node and type-check a TypeScript consumer against it."""
    npm, node, tsc = _tool("npm"), _tool("node"), _tsc()
    src = tmp_path / "pkg"
    shutil.copytree(WEB, src, ignore=shutil.ignore_patterns("node_modules", "types", "test"))
    (src / "node_modules").symlink_to(WEB / "node_modules", target_is_directory=True)
    tarball = src / _run([npm, "pack", "--silent"], src).strip().splitlines()[-1]
    with tarfile.open(tarball) as tar:
        names = sorted(n.removeprefix("package/") for n in tar.getnames())
    assert names == ["README.md", "media-tracker.js", "package.json", "telemetry-client.js",
                     "types/media-tracker.d.ts", "types/telemetry-client.d.ts"], names

    app = tmp_path / "app"
    app.mkdir()
    (app / "package.json").write_text(json.dumps({"name": "app", "private": True,
                                                  "type": "module"}))
    _run([npm, "install", "--offline", "--no-save", str(tarball)], app)
    installed = app / "node_modules" / "@restartix" / "telemetry-client"
    assert json.loads((installed / "package.json").read_text())["version"] == PACKAGE["version"]

    (app / "main.mjs").write_text(CONSUMER_MJS)
    got = json.loads(_run([node, "main.mjs"], app))
    assert got == {"bytes": 20 + 532, "type": "application/x-restartix-pose",
                   "classes": ["function", "function"]}

    (app / "tsconfig.json").write_text(json.dumps(CONSUMER_TSCONFIG))
    (app / "consumer.ts").write_text(CONSUMER_TS)
    _run([str(tsc), "-p", "."], app)
    # The declarations are precise enough to refuse a wrong call.
    (app / "consumer.ts").write_text(CONSUMER_BAD_TS)
    done = subprocess.run([str(tsc), "-p", "."], cwd=app, capture_output=True, text=True,
                          timeout=TIMEOUT_S, check=False)
    assert done.returncode != 0 and '"screen"' in done.stdout, done.stdout + done.stderr
