// The v1 pose batch encoder against docs/pose-batch-format.md, byte by byte.
// (tests/test_web_client.py also decodes this encoder's output with domain/pose_batch.py.)

import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import test from 'node:test';

import {
  CHANNELS, FRAME_BYTES, FRAME_VALUES, HEADER_BYTES, LANDMARKS, V2_STEPS, encodeBatch,
  encodeBatchAs, encodeBatchV2, landmarksToValues, sanitise,
} from '../../telemetry-client.js';
import { decodeV2 } from './v2-decode.js';

const DOC = new URL('../../../../docs/pose-batch-format.md', import.meta.url);

/** 132 distinct values a tracker could produce (visibility in [0, 1]). */
function values(k) {
  const v = new Float32Array(FRAME_VALUES);
  for (let i = 0; i < FRAME_VALUES; i++) {
    v[i] = i % CHANNELS === 3 ? ((i + k) % 10) / 10 : (i - 66) * 0.013 + k;
  }
  return v;
}

/** The header table of the spec: `| offset | size | type | field |` rows. */
function specHeader() {
  const rows = [];
  for (const line of readFileSync(DOC, 'utf8').split('\n')) {
    const m = /^\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*(\w+)\s*\|\s*(.+?)\s*\|$/.exec(line);
    if (m) rows.push({ offset: Number(m[1]), size: Number(m[2]), type: m[3], field: m[4] });
  }
  return rows;
}

test('the header matches the table in docs/pose-batch-format.md', () => {
  const rows = specHeader();
  assert.equal(rows.length, 10, 'the spec lists 10 header fields');
  const frames = [{ t: 7, values: values(0) }, { t: 40, values: null }];
  const view = new DataView(encodeBatch({ seq: 0x01020304, space: 'world', width: 640,
    height: 480, frames }));
  // What the encoder must have written for each field the spec names.
  const expected = [
    [/^magic/, 'bytes', (o) => String.fromCharCode(...new Uint8Array(view.buffer, o, 4)), 'RXPB'],
    [/^version/, 'u8', (o) => view.getUint8(o), 1],
    [/^coordinate space/, 'u8', (o) => view.getUint8(o), 1],
    [/^landmark count/, 'u8', (o) => view.getUint8(o), LANDMARKS],
    [/^channels/, 'u8', (o) => view.getUint8(o), CHANNELS],
    [/^batch sequence number/, 'u32', (o) => view.getUint32(o, true), 0x01020304],
    [/^frame count/, 'u16', (o) => view.getUint16(o, true), 2],
    [/^camera image width/, 'u16', (o) => view.getUint16(o, true), 640],
    [/^camera image height/, 'u16', (o) => view.getUint16(o, true), 480],
    [/^reserved/, 'u16', (o) => view.getUint16(o, true), 0],
  ];
  let end = 0;
  for (const [name, type, read, want] of expected) {
    const row = rows.find((r) => name.test(r.field));
    assert.ok(row, `the spec has a field matching ${name}`);
    assert.equal(row.type, type, `${row.field}: type`);
    assert.equal(row.offset, end, `${row.field}: fields are contiguous`);
    assert.equal(read(row.offset), want, `${row.field} at offset ${row.offset}`);
    end = row.offset + row.size;
  }
  assert.equal(end, HEADER_BYTES);
  // and then the frames, FRAME_BYTES each
  assert.match(readFileSync(DOC, 'utf8'), new RegExp(`^\\| ${HEADER_BYTES} \\| N × ${FRAME_BYTES} \\|`, 'm'));
});

test('frames: u32 timestamp then 33 x 4 little-endian f32, landmark-major', () => {
  const a = values(1);
  const body = encodeBatch({ seq: 3, frames: [{ t: 0, values: a }, { t: 0xfffffffe, values: null }] });
  assert.equal(FRAME_BYTES, 532);
  assert.equal(body.byteLength, HEADER_BYTES + 2 * FRAME_BYTES);
  const view = new DataView(body);
  assert.equal(view.getUint32(HEADER_BYTES, true), 0);
  for (let lm = 0; lm < LANDMARKS; lm++) {
    for (let c = 0; c < CHANNELS; c++) {
      const off = HEADER_BYTES + 4 + (lm * CHANNELS + c) * 4;
      assert.equal(view.getFloat32(off, true), a[lm * CHANNELS + c], `landmark ${lm} channel ${c}`);
    }
  }
  const second = HEADER_BYTES + FRAME_BYTES;
  assert.equal(view.getUint32(second, true), 0xfffffffe);
  for (let i = 0; i < FRAME_VALUES; i++) {
    assert.ok(Number.isNaN(view.getFloat32(second + 4 + i * 4, true)), 'no pose: all NaN');
  }
});

test('the spec example: a 30-frame batch is 15,980 bytes', () => {
  const frames = Array.from({ length: 30 }, (_, i) => ({ t: i * 33, values: values(i) }));
  assert.equal(encodeBatch({ seq: 0, frames }).byteLength, 15980);
});

test('image size is both or neither; image space is 0', () => {
  const frames = [{ t: 1, values: null }];
  const view = new DataView(encodeBatch({ seq: 0, width: 640, height: 0, frames }));
  assert.equal(view.getUint8(5), 0);
  assert.deepEqual([view.getUint16(14, true), view.getUint16(16, true)], [0, 0]);
  const big = new DataView(encodeBatch({ seq: 0, width: 70000, height: 480, frames }));
  assert.deepEqual([big.getUint16(14, true), big.getUint16(16, true)], [0xffff, 480]);
});

test('what the format cannot carry is refused', () => {
  assert.throws(() => encodeBatch({ seq: 0, frames: [] }), RangeError);
  const many = Array.from({ length: 0x10000 }, (_, t) => ({ t, values: null }));
  assert.throws(() => encodeBatch({ seq: 0, frames: many }), RangeError);
  assert.throws(() => encodeBatch({ seq: 0, space: 'screen', frames: [{ t: 0, values: null }] }),
    RangeError);
});

test('landmarksToValues: values the service accepts, or a no-pose frame', () => {
  const lms = Array.from({ length: LANDMARKS }, (_, i) => ({ x: i / 33, y: 0.5, z: -0.1,
    visibility: 0.9 }));
  const v = landmarksToValues(lms);
  assert.equal(v?.length, FRAME_VALUES);
  assert.deepEqual(Array.from(v.slice(4, 8)), Array.from(new Float32Array([1 / 33, 0.5, -0.1, 0.9])));
  // visibility clamped to [0, 1]; missing visibility and z count as 1 and 0
  const odd = lms.map((p, i) => (i === 0 ? { x: 0.1, y: 0.2 } : { ...p, visibility: i === 1 ? 1.3 : -0.2 }));
  const w = landmarksToValues(odd);
  assert.deepEqual([w[2], w[3], w[7], w[11]], [0, 1, 1, 0]);
  // refused values make the whole frame a no-pose frame
  assert.equal(landmarksToValues(lms.slice(0, 32)), null);
  assert.equal(landmarksToValues(lms.map((p, i) => (i === 5 ? { ...p, x: NaN } : p))), null);
  assert.equal(landmarksToValues(lms.map((p, i) => (i === 5 ? { ...p, z: Infinity } : p))), null);
  assert.equal(landmarksToValues(lms.map((p, i) => (i === 5 ? { ...p, y: 1e4 + 1 } : p))), null);
  assert.equal(landmarksToValues(null), null);
});

test('sanitise: a frame the service would refuse becomes no pose', () => {
  const ok = values(0);
  assert.equal(sanitise(ok), ok);
  for (const [i, x] of [[0, NaN], [1, -Infinity], [2, -1e4 - 1], [3, 1.01], [7, -0.01]]) {
    const bad = values(0);
    bad[i] = x;
    assert.equal(sanitise(bad), null, `value ${x} at ${i}`);
  }
});

// -- version 2 -------------------------------------------------------------------------

/** A plausible 30 fps pose: landmarks drifting a little from frame to frame. */
function moving(k) {
  const v = new Float32Array(FRAME_VALUES);
  for (let i = 0; i < FRAME_VALUES; i++) {
    const lm = Math.floor(i / CHANNELS);
    v[i] = i % CHANNELS === 3 ? 0.9 + 0.003 * Math.sin(k + lm)
      : 0.5 + 0.3 * Math.sin(lm + i % CHANNELS) + 0.01 * k * Math.cos(lm);
  }
  return v;
}

test('v2: the v1 header with version 2; the frames come back within the bound', () => {
  const frames = Array.from({ length: 30 }, (_, i) => ({ t: 1000 + i * 33 + (i % 3),
    values: i === 4 || i === 17 ? null : moving(i) }));
  const body = encodeBatchV2({ seq: 0x01020304, space: 'world', width: 640, height: 480, frames });
  assert.ok(body);
  const d = decodeV2(body);
  assert.deepEqual([d.version, d.space, d.seq, d.n, d.width, d.height],
    [2, 1, 0x01020304, 30, 640, 480]);
  assert.equal(new DataView(body).getUint16(18, true), 0, 'reserved');
  assert.deepEqual(d.t, frames.map((f) => f.t));
  frames.forEach(({ values }, i) => {
    if (!values) { assert.equal(d.frames[i], null, `frame ${i}: no pose`); return; }
    for (let s = 0; s < FRAME_VALUES; s++) {
      const bound = s % CHANNELS === 3 ? 5e-3 : 5e-4;
      assert.ok(Math.abs(d.frames[i][s] - values[s]) <= bound, `frame ${i} value ${s}`);
      assert.equal(d.q[i][s], Math.round(values[s] / V2_STEPS[s % CHANNELS]) + 0); // no -0
    }
  });
  assert.ok(body.byteLength < 2500, `${body.byteLength} bytes, v1 takes 15,980`);
});

test('v2: one frame, no pose at all, timestamps far apart', () => {
  const one = decodeV2(encodeBatchV2({ seq: 1, frames: [{ t: 0xffffffff, values: moving(0) }] }));
  assert.deepEqual(one.t, [0xffffffff]);
  const none = encodeBatchV2({ seq: 2, frames: [{ t: 5, values: null }, { t: 0xfffffff0, values: null }] });
  assert.deepEqual(decodeV2(none).t, [5, 0xfffffff0]);
  assert.deepEqual(decodeV2(none).frames, [null, null]);
});

test('v2: the grid steps are the replay codec\'s', () => {
  assert.deepEqual(V2_STEPS, [5e-4, 5e-4, 5e-4, 5e-3].map((e) => 2 * e * (1 - 2 ** -10)));
  assert.ok(Math.abs(V2_STEPS[0] / 2 - 5e-4) < 1e-6);
});

test('v2: what it cannot carry is null; encodeBatchAs then sends version 1', () => {
  const far = moving(0);
  far[0] = 9000; // |q| >= 2**23: beyond v2, fine for v1
  const cases = [
    [{ t: 0, values: far }],
    [{ t: 5, values: moving(0) }, { t: 5, values: moving(1) }],
    [{ t: 1.5, values: moving(0) }],
    [{ t: 0, values: Float32Array.from(moving(0), (x, i) => (i === 7 ? NaN : x)) }],
    [{ t: 0, values: Float32Array.from(moving(0), (x, i) => (i === 3 ? 1.2 : x)) }],
  ];
  for (const frames of cases) {
    assert.equal(encodeBatchV2({ seq: 0, frames }), null);
    assert.equal(new DataView(encodeBatchAs({ seq: 0, frames })).getUint8(4), 1);
  }
  const frames = [{ t: 0, values: moving(0) }];
  assert.equal(new DataView(encodeBatchAs({ seq: 0, frames })).getUint8(4), 2);
  assert.equal(new DataView(encodeBatchAs({ seq: 0, frames }, 'v1')).getUint8(4), 1);
  assert.throws(() => encodeBatchV2({ seq: 0, frames: [] }), RangeError);
});
