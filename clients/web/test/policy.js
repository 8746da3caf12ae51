// Delivery-policy scenarios for the pose client, run in the browser by
// tests/browser/test_chromium.py::test_delivery_policy_in_chromium.
//
// Each scenario drives a TelemetryClient through its transport seam with a fake
// transport whose answers are scripted, and reports what happened; the Python test
// holds the expectations.

import { TelemetryClient, landmarksToValues, poseOf } from '../telemetry-client.js';

/** A transport answer. */
const R = (status, extra = {}) => ({
  status, code: null, message: null, retryAfterMs: null,
  body: status === 202 ? { duplicate: false } : null, ...extra,
});

/**
 * The transport seam with scripted answers: `answer(seq, attempt, opts)` gives the answer
 * (or a promise of it) to a normal send; keepalive sends are acknowledged at once.
 */
function fake(answer) {
  const t = {
    kind: 'fake', sent: [], ends: [],
    sendPoseBatch(body, opts = {}) {
      const seq = new DataView(body).getUint32(8, true);
      const attempt = t.sent.filter((s) => s.seq === seq && !s.keepalive).length;
      t.sent.push({ seq, at: performance.now(), body, keepalive: !!opts.keepalive });
      return Promise.resolve(opts.keepalive ? R(202) : answer(seq, attempt, opts));
    },
    sendMediaBatch() { return Promise.resolve(R(202, { body: { applied: 1, duplicates: 0 } })); },
    endSession(id, opts = {}) {
      t.ends.push({ id, keepalive: !!opts.keepalive });
      return Promise.resolve(R(200, { body: { session_id: id } }));
    },
  };
  return t;
}

const same = (a, b) => a.byteLength === b.byteLength
  && new Uint8Array(a).every((x, i) => x === new Uint8Array(b)[i]);
const hex = (b) => Array.from(new Uint8Array(b), (x) => x.toString(16).padStart(2, '0')).join('');
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** 33 landmarks as MediaPipe gives them; `k` moves y a little. */
const lm = (k) => Array.from({ length: 33 },
  (_, i) => ({ x: 0.3 + i / 100, y: 0.4 + k / 1000, z: -0.1, visibility: 0.9 }));

/** `n` results 33 ms apart: a new batch every 1000 ms of timestamps. */
function feed(c, n, image) {
  for (let k = 0; k < n; k++) c.addResult({ poseLandmarks: lm(k), image }, { timestampMs: k * 33 });
}

function client(transport, opts = {}) {
  const errors = [];
  const c = new TelemetryClient({
    sessionId: 's-1', transport, endOnPageHide: false, retry: { baseMs: 50, capMs: 100 },
    onError: (e) => errors.push(e), ...opts,
  });
  return [c, errors];
}

/** Retries: same bytes and seq, in order; Retry-After honoured; backoff capped. */
async function retries() {
  const t = fake((seq, attempt) => {
    if (seq === 0 && attempt === 0) return R(503, { code: 'mailbox_full', retryAfterMs: 1000 });
    if (seq === 0 && attempt === 1) return R(0);
    if (seq === 1 && attempt === 0) return R(429, { code: 'rate_limited', retryAfterMs: 1000 });
    if (seq === 1 && attempt === 1) return R(500);
    return R(202);
  });
  const [c, errors] = client(t);
  feed(c, 60, { width: 640, height: 480 });
  const drained = await c.drain(10000);
  return {
    drained, errors, stats: c.stats(), order: t.sent.map((s) => s.seq),
    gaps: t.sent.slice(1).map((s, i) => s.at - t.sent[i].at),
    same: same(t.sent[0].body, t.sent[1].body) && same(t.sent[0].body, t.sent[2].body)
      && same(t.sent[3].body, t.sent[4].body) && same(t.sent[3].body, t.sent[5].body),
    first: hex(t.sent[0].body),
  };
}

/** 400 reported and dropped, 409 sequence_skipped dropped, 409 session_ended stops all. */
async function finalAnswers() {
  const answers = [R(400, { code: 'nan_values', message: 'no' }),
    R(409, { code: 'sequence_skipped' }), R(202), R(409, { code: 'session_ended' })];
  const t = fake((seq) => answers[seq] ?? R(202));
  const [c, errors] = client(t);
  feed(c, 150);
  c.flush();
  await c.drain(5000);
  feed(c, 3); // after the end: ignored
  return {
    errors: errors.map((e) => [e.type, e.seq ?? null, e.code ?? null]),
    sent: t.sent.map((s) => s.seq), stats: c.stats(),
  };
}

/** A full buffer drops the oldest unacknowledged batch; adding never blocks. */
async function overflow() {
  let release;
  const gate = new Promise((resolve) => { release = resolve; });
  const t = fake((seq, attempt, opts) => new Promise((resolve) => {
    opts.signal?.addEventListener('abort', () => resolve(R(0)));
    gate.then(() => resolve(R(202)));
  }));
  const [c, errors] = client(t, { maxBufferedBatches: 3 });
  const t0 = performance.now();
  feed(c, 150);
  c.flush();
  const addMs = performance.now() - t0;
  await sleep(50);
  const mid = c.stats();
  release();
  await c.drain(5000);
  return {
    addMs, mid, stats: c.stats(), sent: t.sent.map((s) => s.seq),
    errors: errors.map((e) => [e.type, e.seq]),
  };
}

/** Page hide: unacknowledged batches go out with keepalive within 64 KiB, then the end. */
async function pageHide() {
  const t = fake(() => new Promise(() => {})); // the service never answers
  const [c, errors] = client(t, { maxBufferedBatches: 60 });
  feed(c, 300); // 9 sealed batches and an open one, none acknowledged
  c.pageHide();
  const kept = t.sent.filter((s) => s.keepalive);
  return {
    kept: kept.map((s) => s.seq), bytes: kept.reduce((n, s) => n + s.body.byteLength, 0),
    ends: t.ends, stats: c.stats(), errors: errors.map((e) => [e.type, e.seq]),
    summary: await c.end(),
  };
}

/** What MediaPipe gives -> frames the service accepts. */
function values() {
  const partial = lm(0);
  partial[5] = { ...partial[5], z: NaN };
  const over = lm(0);
  over[0] = { ...over[0], visibility: 1.2 };
  const first4 = (v) => Array.from(v.slice(0, 4));
  return {
    none: landmarksToValues(poseOf({ poseLandmarks: undefined }, 'image')),
    partial: landmarksToValues(partial),
    clamped: first4(landmarksToValues(over)),
    tasks: first4(landmarksToValues(poseOf({ landmarks: [lm(1)] }, 'image'))),
    world: first4(landmarksToValues(poseOf({ poseWorldLandmarks: lm(2) }, 'world'))),
  };
}

/** Every scenario, one after the other. */
export async function run() {
  return {
    retry: await retries(), final: await finalAnswers(), overflow: await overflow(),
    hide: await pageHide(), values: values(),
  };
}
