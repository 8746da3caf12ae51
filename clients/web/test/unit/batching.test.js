// TelemetryClient's batching, sequence numbers, delivery order and bounded buffer, driven
// through its transport seam with scripted answers and a hand-moved session clock.

import assert from 'node:assert/strict';
import test from 'node:test';

import {
  FRAME_BYTES, HEADER_BYTES, SessionClock, TelemetryClient,
} from '../../telemetry-client.js';
import { decodeV2 } from './v2-decode.js';

/** A TransportResult. */
const R = (status, extra = {}) => ({ status, code: null, message: null, retryAfterMs: null,
  body: status === 202 ? { duplicate: false } : null, ...extra });

/** The header and timestamps of an encoded batch. */
function decode(body) {
  const v = new DataView(body);
  if (v.getUint8(4) === 2) {
    const { seq, n, width, height, t } = decodeV2(body);
    return { seq, n, width, height, t };
  }
  const n = v.getUint16(12, true);
  assert.equal(body.byteLength, HEADER_BYTES + n * FRAME_BYTES);
  const t = Array.from({ length: n }, (_, i) => v.getUint32(HEADER_BYTES + i * FRAME_BYTES, true));
  return { seq: v.getUint32(8, true), n, width: v.getUint16(14, true),
    height: v.getUint16(16, true), t };
}

/**
 * A transport whose answers the test gives: each non-keepalive send waits until
 * `answer(seq, result)` is called for it.
 */
function scripted() {
  const waiting = new Map(); // seq -> resolve
  const tr = {
    kind: 'scripted', sent: [], keepalive: [], ends: 0, aborted: [],
    sendPoseBatch(body, opts = {}) {
      const b = decode(body);
      if (opts.keepalive) {
        tr.keepalive.push(b);
        return Promise.resolve(R(202));
      }
      tr.sent.push({ ...b, bytes: new Uint8Array(body.slice(0)) });
      opts.signal?.addEventListener('abort', () => tr.aborted.push(b.seq));
      return new Promise((resolve) => waiting.set(b.seq, resolve));
    },
    sendMediaBatch: () => Promise.resolve(R(202)),
    endSession: () => { tr.ends++; return Promise.resolve(R(200, { body: { ok: true } })); },
    inFlight: () => [...waiting.keys()],
    answer(seq, result) {
      const resolve = waiting.get(seq);
      assert.ok(resolve, `batch ${seq} is in flight`);
      waiting.delete(seq);
      resolve(result);
    },
  };
  return tr;
}

/** Let the client's promise chains run. */
const settle = async () => { for (let i = 0; i < 20; i++) await Promise.resolve(); };

/** Wait (up to 5 s) until `cond()` holds: for the client's own timers. */
async function until(cond, what) {
  const deadline = Date.now() + 5000;
  while (!cond()) {
    if (Date.now() > deadline) assert.fail(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

/** A client on a scripted transport (sending v1, whose bytes these tests read) and a clock the test moves; closed after the test. */
function client(t, opts = {}) {
  const clock = { now: 0 };
  const transport = scripted();
  const errors = [];
  const c = new TelemetryClient({
    sessionId: 's-1', transport, clock: new SessionClock({ now: () => clock.now, startedAt: 0 }),
    onError: (e) => errors.push(e), random: () => 0.5, wire: 'v1', ...opts,
  });
  t.after(() => c.pageHide()); // stops its timers
  return { c, clock, transport, errors };
}

const frame = (k = 0) => Array.from({ length: 132 }, (_, i) => (i % 4 === 3 ? 1 : k + i / 1000));

test('a batch closes when its first frame is batchMs old', async (t) => {
  const { c, transport } = client(t);
  for (const ms of [0, 33, 500, 999]) c.addFrame(frame(), ms);
  assert.equal(transport.sent.length, 0, 'still open');
  c.addFrame(frame(), 1000); // opens the next batch
  await settle();
  assert.deepEqual(transport.sent.map(({ seq, t: ts }) => ({ seq, t: ts })),
    [{ seq: 0, t: [0, 33, 500, 999] }]);
  assert.equal(c.stats().framesOpen, 1);
  assert.equal(c.stats().batchesSealed, 1);
});

test('a batch closes at maxFramesPerBatch', async (t) => {
  const { c, transport } = client(t, { maxFramesPerBatch: 5 });
  for (let ms = 0; ms < 12; ms++) c.addFrame(frame(), ms);
  await settle();
  assert.equal(transport.sent.length, 1, 'one request at a time');
  assert.deepEqual(transport.sent[0].t, [0, 1, 2, 3, 4]);
  transport.answer(0, R(202));
  await settle();
  assert.deepEqual(transport.sent[1].t, [5, 6, 7, 8, 9]);
  assert.equal(c.stats().framesOpen, 2);
});

test('an image size change closes the batch; the size travels with it', async (t) => {
  const { c, transport } = client(t, { imageSource: { width: 640, height: 480 } });
  c.addFrame(frame(), 0);
  c.addFrame(frame(), 10);
  c.addFrame(frame(), 20, { videoWidth: 1280, videoHeight: 720 });
  c.flush();
  await settle();
  transport.answer(0, R(202));
  await settle();
  assert.deepEqual(transport.sent.map(({ seq, n, width, height }) => [seq, n, width, height]),
    [[0, 2, 640, 480], [1, 1, 1280, 720]]);
});

test('timestamps strictly increase; a result without a pose is an all-NaN frame', async (t) => {
  const { c, transport } = client(t);
  c.addFrame(frame(), 10);
  c.addFrame(frame(), 10);
  c.addFrame(frame(), 5);
  c.addResult({ poseLandmarks: undefined }, { timestampMs: 30 });
  c.flush();
  await settle();
  assert.deepEqual(transport.sent[0].t, [10, 11, 12, 30]);
  assert.equal(c.stats().framesNoPose, 1);
  const nanAt = HEADER_BYTES + 3 * FRAME_BYTES + 4;
  const last = new DataView(transport.sent[0].bytes.buffer, nanAt, 132 * 4);
  assert.ok(Number.isNaN(last.getFloat32(0, true)) && Number.isNaN(last.getFloat32(131 * 4, true)));
  assert.throws(() => c.addFrame([1, 2, 3], 40), RangeError);
});

test('a stalled camera: the timer closes the started batch', async (t) => {
  const { c, clock, transport } = client(t, { batchMs: 100 });
  c.addFrame(frame(), 0);
  c.addFrame(frame(), 40);
  clock.now = 100; // no more frames arrive; the timer (every 50 ms) sees the batch is due
  await until(() => transport.sent.length === 1, 'the timer to close the batch');
  assert.deepEqual(transport.sent[0].t, [0, 40]);
});

test('batches go out in sequence order; a retry resends the same bytes', async (t) => {
  const { c, transport } = client(t, { retry: { baseMs: 1, capMs: 2 } });
  for (let b = 0; b < 3; b++) { c.addFrame(frame(b), b * 10); c.flush(); }
  await settle();
  assert.deepEqual(transport.inFlight(), [0], 'one at a time over a window-1 transport');
  transport.answer(0, R(503, { code: 'storage_unavailable', retryAfterMs: 1 }));
  await until(() => transport.sent.length === 2, 'the retry');
  assert.equal(transport.sent[1].seq, 0);
  assert.deepEqual(transport.sent[1].bytes, transport.sent[0].bytes);
  transport.answer(0, R(202));
  await settle();
  transport.answer(1, R(202, { body: { duplicate: true } }));
  await settle();
  transport.answer(2, R(202));
  await settle();
  assert.deepEqual(transport.sent.map((s) => s.seq), [0, 0, 1, 2]);
  const s = c.stats();
  assert.deepEqual([s.batchesAcked, s.batchesDuplicate, s.retries, s.buffered, s.framesAcked],
    [3, 1, 1, 0, 3]);
});

test('a transport window lets that many batches be in flight', async (t) => {
  const { c, transport } = client(t);
  transport.window = 3;
  for (let b = 0; b < 5; b++) { c.addFrame(frame(b), b * 10); c.flush(); }
  await settle();
  assert.deepEqual(transport.inFlight(), [0, 1, 2]);
  transport.answer(1, R(202));
  await settle();
  assert.deepEqual(transport.inFlight(), [0, 2, 3], 'the lowest waiting batch fills the slot');
});

test('the buffer is bounded: the oldest batch is dropped, even in flight', async (t) => {
  const { c, transport, errors } = client(t, { maxBufferedBatches: 3 });
  for (let b = 0; b < 5; b++) {
    c.addFrame(frame(b), b * 10);
    c.addFrame(frame(b), b * 10 + 1);
    c.flush();
  }
  await settle();
  const s = c.stats();
  assert.deepEqual([s.buffered, s.batchesSealed, s.batchesOverflowed, s.framesLost], [3, 5, 2, 4]);
  assert.deepEqual(errors, [{ type: 'buffer_overflow', seq: 0, frames: 2 },
    { type: 'buffer_overflow', seq: 1, frames: 2 }]);
  assert.deepEqual(transport.aborted, [0], 'the batch in flight was abandoned');
  // its late answer changes nothing; delivery goes on with the oldest kept batch
  transport.answer(0, R(202));
  await settle();
  assert.equal(c.stats().batchesAcked, 0);
  assert.deepEqual(transport.inFlight(), [2]);
});

test('answers that end a batch or the session', async (t) => {
  const { c, transport, errors } = client(t);
  for (let b = 0; b < 4; b++) { c.addFrame(frame(b), b * 10); c.flush(); }
  await settle();
  transport.answer(0, R(409, { code: 'sequence_skipped', message: 'skipped' }));
  await settle();
  transport.answer(1, R(400, { code: 'nan_values', message: 'partly NaN' }));
  await settle();
  transport.answer(2, R(409, { code: 'session_ended', message: 'over' }));
  await settle();
  assert.deepEqual(errors, [
    { type: 'dropped', seq: 0, frames: 1, status: 409, code: 'sequence_skipped', message: 'skipped' },
    { type: 'rejected', seq: 1, frames: 1, status: 400, code: 'nan_values', message: 'partly NaN' },
    { type: 'session_ended', status: 409, code: 'session_ended', message: 'over', frames: 2 },
  ]);
  c.addFrame(frame(), 100);
  c.flush();
  await settle();
  const s = c.stats();
  assert.deepEqual([s.batchesDropped, s.batchesRejected, s.buffered, s.framesAdded, s.ended],
    [1, 1, 0, 4, true], 'frames after the end are ignored');
  assert.deepEqual(transport.inFlight(), [], 'batch 3 was never sent');
});

test('page hide hands what is left to keepalive sends, then ends the session', async (t) => {
  const { c, transport } = client(t);
  c.addFrame(frame(), 0);
  c.flush();
  c.addFrame(frame(), 10);
  await settle();
  c.pageHide();
  assert.deepEqual(transport.keepalive.map((b) => b.seq), [0, 1], 'oldest first, the open one too');
  assert.equal(transport.ends, 1);
  c.addFrame(frame(), 20);
  assert.equal(c.stats().framesAdded, 2);
});

test('the wire format is v2 unless asked for v1', async (t) => {
  const lm = Array.from({ length: 33 }, (_, i) => ({ x: i / 40, y: 0.5, z: 0, visibility: 1 }));
  for (const [opts, version] of [[{ wire: undefined }, 2], [{ wire: 'v2' }, 2], [{ wire: 'v1' }, 1]]) {
    const { c, transport } = client(t, opts);
    c.addResult({ poseLandmarks: lm }, { timestampMs: 0 });
    c.addResult(null, { timestampMs: 40 });
    c.flush();
    await settle();
    assert.equal(transport.sent[0].bytes[4], version, JSON.stringify(opts));
    assert.deepEqual(transport.sent[0].t, [0, 40]);
  }
  assert.throws(() => client(t, { wire: 'v3' }), RangeError);
});
