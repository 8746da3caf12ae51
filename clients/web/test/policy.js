// Delivery-policy scenarios for the pose client, run in the browser by
// tests/browser/test_chromium.py::test_delivery_policy_in_chromium.
//
// Each scenario drives a TelemetryClient through its transport seam with a fake
// transport whose answers are scripted, and reports what happened; the Python test
// holds the expectations.

import {
  TelemetryClient, WebSocketTransport, landmarksToValues, poseOf,
} from '../telemetry-client.js';

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
    // v1: the checks compare bytes with domain.pose_batch.encode_batch and count 16 KB batches
    wire: 'v1', onError: (e) => errors.push(e), ...opts,
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

// -- the WebSocket transport against a scripted stream ------------------------------------

/**
 * A fake `/v1/pose/stream`: `onConnect(ws)` opens (`ws.open()`) or fails (`ws.drop(1006)`)
 * each socket; `onBatch(ws, seq)` answers (`ws.ack(seq)`, `ws.answer({...})`) or not.
 * `durable` is what the fake service holds; a batch acked again is a duplicate.
 */
function streamServer({ onConnect = (ws) => ws.open(), onBatch = (ws, seq) => ws.ack(seq) } = {}) {
  const srv = { sockets: [], received: [], durable: new Set(), maxUnanswered: 0 };
  class FakeWebSocket {
    constructor(url, protocols) {
      Object.assign(this, { url, protocols, readyState: 0, protocol: '', unanswered: 0,
        id: srv.sockets.length, closedBy: null });
      srv.sockets.push(this);
      setTimeout(() => onConnect(this), 0);
    }

    send(data) {
      if (this.readyState === 0) throw new DOMException('still connecting', 'InvalidStateError');
      if (this.readyState !== 1) return; // what browsers do on a closing socket
      const seq = new DataView(data).getUint32(8, true);
      srv.received.push([this.id, seq, performance.now()]);
      this.unanswered++;
      srv.maxUnanswered = Math.max(srv.maxUnanswered, this.unanswered);
      setTimeout(() => { if (this.readyState === 1) onBatch(this, seq); }, 0);
    }

    close(code = 1005, reason = '') {
      if (this.readyState >= 2) return;
      this.readyState = 2;
      this.closedBy = { code, reason };
      setTimeout(() => { this.readyState = 3; this.onclose?.({ code, reason }); }, 0);
    }

    open() {
      if (this.readyState !== 0) return;
      this.readyState = 1;
      this.protocol = 'restartix.pose.v1';
      this.onopen?.({});
    }

    answer(msg) {
      this.unanswered--;
      this.onmessage?.({ data: JSON.stringify(msg) });
    }

    ack(seq) {
      const duplicate = srv.durable.has(seq);
      srv.durable.add(seq);
      this.answer({ seq, status: 202, duplicate });
    }

    /** The service closes the socket (or it fails: 1006). */
    drop(code, reason = '') {
      if (this.readyState >= 2) return;
      this.readyState = 3;
      this.onclose?.({ code, reason });
    }
  }
  srv.WebSocket = FakeWebSocket;
  srv.onSocket = (id) => srv.received.filter(([s]) => s === id).map(([, seq]) => seq);
  return srv;
}

/** A fake `fetch` for the transport's POST side; `answer(path, call)` gives
 * `{status, body?}`, status 0 for a network error. */
function fakeFetch(answer = () => ({ status: 202, body: { duplicate: false } })) {
  const calls = [];
  const f = async (url, init) => {
    const path = new URL(url).pathname;
    const seq = init.body instanceof ArrayBuffer ? new DataView(init.body).getUint32(8, true) : null;
    const call = { path, seq, keepalive: !!init.keepalive, auth: init.headers.Authorization,
      at: performance.now() };
    calls.push(call);
    const a = await answer(path, call);
    if (!a.status) throw new TypeError('Failed to fetch');
    return {
      status: a.status,
      headers: { get: (h) => (a.headers ?? {})[h.toLowerCase()] ?? null },
      json: async () => { if (a.body === undefined) throw new SyntaxError('empty'); return a.body; },
    };
  };
  f.calls = calls;
  f.posts = () => calls.filter((c) => c.path === '/v1/pose/frames');
  return f;
}

const ENDED = (path) => (path.endsWith('/end') ? { status: 200, body: { session_id: 's-1' } }
  : { status: 202, body: { duplicate: false } });

function streamClient(srv, fetchFn, opts = {}) {
  const reports = [];
  const t = new WebSocketTransport({
    baseUrl: 'http://svc.test', token: 'tok-1', WebSocket: srv.WebSocket, fetch: fetchFn,
    retry: { baseMs: 50, capMs: 100 }, onError: (e) => reports.push(e), ...opts,
  });
  const [c, errors] = client(t);
  return [c, t, errors, reports];
}

/** The service restarts (1012) with four batches unanswered, one of them already durable:
 * all four are resent in order on a new socket; never more than the window in flight. */
async function streamResend() {
  const srv = streamServer({
    onBatch: (ws, seq) => {
      if (ws.id > 0 || seq < 2) ws.ack(seq);
      else if (seq === 2) srv.durable.add(seq); // durable, but its ack is lost
      else if (seq === 5) ws.drop(1012, 'service restarting; reconnect');
    },
  });
  const f = fakeFetch(ENDED);
  const [c, t, errors, reports] = streamClient(srv, f);
  feed(c, 300);
  c.flush();
  const drained = await c.drain(5000);
  return {
    drained, errors, reports, stats: c.stats(), transport: t.stats(),
    first: srv.onSocket(0), second: srv.onSocket(1), maxUnanswered: srv.maxUnanswered,
    url: srv.sockets[0].url, protocols: srv.sockets[0].protocols, posts: f.posts().length,
  };
}

/** 4401: `getToken` gives a fresh token; the next socket and the POSTs use it. */
async function streamToken() {
  const srv = streamServer({
    onBatch: (ws, seq) => {
      if (ws.id === 0 && seq === 2) ws.drop(4401, 'token expired; reconnect with a fresh token');
      else ws.ack(seq);
    },
  });
  const f = fakeFetch(ENDED);
  let asks = 0;
  const [c, t, errors, reports] = streamClient(srv, f, {
    getToken: async () => { asks++; return 'tok-2'; },
  });
  feed(c, 150);
  c.flush();
  const drained = await c.drain(5000);
  const summary = await c.end();
  return {
    drained, errors, reports, asks, stats: c.stats(), transport: t.stats(), summary,
    protocols: srv.sockets.map((s) => s.protocols[1]), second: srv.onSocket(1),
    endAuth: f.calls.filter((x) => x.path.endsWith('/end')).map((x) => x.auth),
  };
}

/** Refusals over the stream are classified like POST answers: 400 rejected, 503 with
 * retry_after resent after it, 409 sequence_skipped dropped; then 409 session_ended and
 * close 4409 end everything. */
async function streamRefusals() {
  let retried = false;
  const srv = streamServer({
    onBatch: (ws, seq) => {
      if (seq === 0) ws.answer({ seq, status: 400, error: { code: 'nan_values', message: 'no' } });
      else if (seq === 1 && !retried) {
        retried = true;
        ws.answer({ seq, status: 503, retry_after: 1,
          error: { code: 'storage_unavailable', message: 'later' } });
      } else if (seq === 2) {
        ws.answer({ seq, status: 409, error: { code: 'sequence_skipped', message: 'late' } });
      } else if (seq === 5) {
        ws.answer({ seq, status: 409, error: { code: 'session_ended', message: 'over' } });
        ws.drop(4409, 'session_ended');
      } else ws.ack(seq);
    },
  });
  const f = fakeFetch(ENDED);
  const [c, t, errors] = streamClient(srv, f);
  feed(c, 150); // batches 0-4
  c.flush();
  const drained = await c.drain(5000);
  for (let k = 0; k < 30; k++) c.addFrame(new Float32Array(132).fill(0.5)); // batch 5
  c.flush();
  await c.drain(2000);
  for (let k = 0; k < 3; k++) c.addFrame(new Float32Array(132).fill(0.5)); // after the end
  c.flush();
  await sleep(50);
  const ones = srv.received.filter(([, seq]) => seq === 1).map(([, , at]) => at);
  return {
    drained, errors: errors.map((e) => [e.type, e.seq ?? null, e.code ?? null]),
    stats: c.stats(), transport: t.stats(), received: srv.received.map(([, seq]) => seq),
    retryGap: ones[1] - ones[0], posts: f.posts().length,
  };
}

/** The socket never opens but POST works: after `maxOpenFailures` sockets one batch goes
 * by POST, one more socket fails, and from then on everything goes by POST, in order. */
async function streamFallback() {
  const srv = streamServer({ onConnect: (ws) => ws.drop(1006) });
  const f = fakeFetch(ENDED);
  const [c, t, errors, reports] = streamClient(srv, f);
  feed(c, 300);
  c.flush();
  const drained = await c.drain(5000);
  return {
    drained, errors, reports, stats: c.stats(), transport: t.stats(),
    sockets: srv.sockets.length, posts: f.posts().map((x) => x.seq),
  };
}

/** The service is down (neither the socket nor POST gets through) for 600 ms: no
 * fallback; once it is back, the socket carries everything. */
async function streamDown() {
  const t0 = performance.now();
  const up = () => performance.now() - t0 > 600;
  const srv = streamServer({ onConnect: (ws) => (up() ? ws.open() : ws.drop(1006)) });
  const f = fakeFetch((path) => (up() ? ENDED(path) : { status: 0 }));
  const [c, t, errors, reports] = streamClient(srv, f);
  feed(c, 300);
  c.flush();
  const drained = await c.drain(5000);
  return {
    drained, errors, reports, stats: c.stats(), transport: t.stats(),
    postedOk: f.posts().filter((x) => x.at - t0 > 600).length,
  };
}

/** A socket that stops answering is replaced after `ackTimeoutMs`; nothing is lost. */
async function streamSilent() {
  const srv = streamServer({ onBatch: (ws, seq) => { if (ws.id > 0) ws.ack(seq); } });
  const f = fakeFetch(ENDED);
  const [c, t, errors] = streamClient(srv, f, { ackTimeoutMs: 300 });
  const t0 = performance.now();
  feed(c, 150);
  c.flush();
  const drained = await c.drain(5000);
  return {
    drained, errors, stats: c.stats(), transport: t.stats(), ms: performance.now() - t0,
    closedBy: srv.sockets[0].closedBy, second: srv.onSocket(1),
  };
}

/** Page hide with batches unanswered on the socket: they go by keepalive POST, the
 * socket is closed normally, the end call goes by keepalive POST. */
async function streamHide() {
  const srv = streamServer({ onBatch: () => {} }); // never answers
  const f = fakeFetch(ENDED);
  const [c, t, errors] = streamClient(srv, f);
  feed(c, 150);
  await sleep(50);
  const before = t.stats();
  c.pageHide();
  const summary = await c.end();
  return {
    errors: errors.map((e) => [e.type, e.seq]), before, transport: t.stats(),
    onSocket: srv.onSocket(0), closedBy: srv.sockets[0].closedBy, summary,
    keepalive: f.calls.filter((x) => x.keepalive).map((x) => [x.path, x.seq]),
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
    stream: {
      resend: await streamResend(), token: await streamToken(), refusals: await streamRefusals(),
      fallback: await streamFallback(), down: await streamDown(), silent: await streamSilent(),
      hide: await streamHide(),
    },
  };
}
