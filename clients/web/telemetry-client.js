// RestartiX Telemetry browser client: MediaPipe Pose results -> 1-second binary batches.
//
// Dependency-free ES module (no build step). See ./README.md for usage and the
// retry/buffer policy; the wire format is docs/pose-batch-format.md.
//
//   import { TelemetryClient } from './telemetry-client.js';
//   const telemetry = new TelemetryClient({ baseUrl, token, sessionId, imageSource: videoEl });
//   pose.onResults((results) => telemetry.addResult(results));   // never blocks
//   ...
//   const summary = await telemetry.end();                       // or page hide ends it

/** MIME type of a pose batch body. */
export const CONTENT_TYPE = 'application/x-restartix-pose';
/** Landmarks per frame (MediaPipe Pose). */
export const LANDMARKS = 33;
/** Values per landmark: x, y, z, visibility. */
export const CHANNELS = 4;
/** Bytes of the batch header. */
export const HEADER_BYTES = 20;
/** Bytes of one frame: u32 timestamp + 33 x 4 f32. */
export const FRAME_BYTES = 4 + LANDMARKS * CHANNELS * 4;
/** Values of one frame. */
export const FRAME_VALUES = LANDMARKS * CHANNELS;
/** What browsers allow in flight across all `keepalive` requests of a page. */
export const KEEPALIVE_BUDGET_BYTES = 64 * 1024;

const MAGIC = [0x52, 0x58, 0x50, 0x42]; // "RXPB"
const SPACES = { image: 0, world: 1 };
const MAX_U32 = 0xffffffff;

/**
 * Milliseconds since the exercise session started, on the page's monotonic clock
 * (`performance.now()`), as whole ms. Pose frames and media events share one clock.
 */
export class SessionClock {
  /** @param {{ now?: () => number, startedAt?: number }} [opts] */
  constructor({ now = () => performance.now(), startedAt } = {}) {
    /** @private */ this._now = now;
    /** `now()` value at `t_ms == 0`. */
    this.t0 = startedAt ?? now();
  }

  /** @returns {number} whole ms since the session started (never negative). */
  ms() {
    return Math.min(MAX_U32, Math.max(0, Math.floor(this._now() - this.t0)));
  }
}

/**
 * @typedef {object} Frame
 * @property {number} t whole ms on the session clock
 * @property {Float32Array | null} values 132 values (x, y, z, visibility per landmark) or
 *   null when no pose was found (sent as an all-NaN frame)
 */

/** The 20-byte header both versions share (docs/pose-batch-format.md). */
function writeHeader(view, version, { seq, space, n, width, height }) {
  MAGIC.forEach((b, i) => view.setUint8(i, b));
  view.setUint8(4, version);
  view.setUint8(5, SPACES[space]);
  view.setUint8(6, LANDMARKS);
  view.setUint8(7, CHANNELS);
  view.setUint32(8, seq >>> 0, true);
  view.setUint16(12, n, true);
  view.setUint16(14, Math.min(0xffff, width), true);
  view.setUint16(16, Math.min(0xffff, height), true);
  view.setUint16(18, 0, true);
}

/**
 * Encode one batch (docs/pose-batch-format.md, version 1).
 * @param {{ seq: number, space?: 'image' | 'world', width?: number, height?: number,
 *           frames: Frame[] }} batch
 * @returns {ArrayBuffer}
 */
export function encodeBatch({ seq, space = 'image', width = 0, height = 0, frames }) {
  if (!(space in SPACES)) throw new RangeError(`unknown coordinate space ${space}`);
  if (!frames.length || frames.length > 0xffff) throw new RangeError('1..65535 frames per batch');
  if (!width || !height) { width = 0; height = 0; } // both or neither
  const buf = new ArrayBuffer(HEADER_BYTES + frames.length * FRAME_BYTES);
  const view = new DataView(buf);
  writeHeader(view, 1, { seq, space, n: frames.length, width, height });
  let off = HEADER_BYTES;
  for (const { t, values } of frames) {
    view.setUint32(off, t >>> 0, true);
    off += 4;
    for (let i = 0; i < FRAME_VALUES; i++, off += 4) {
      view.setFloat32(off, values ? values[i] : NaN, true);
    }
  }
  return buf;
}

// -- wire format version 2: quantised deltas, Rice codes (docs/pose-batch-format.md) ---

/** The grid of version 2, per channel (x, y, z, visibility): the replay codec's steps. */
export const V2_STEPS = Object.freeze([5e-4, 5e-4, 5e-4, 5e-3].map((e) => 2.0 * e * (1 - 2 ** -10)));
const V2_COORD_LIMIT = 2 ** 23; // |q| below this
const V2_VIS_MAX = 100;
const V2_K_MAX = 15;
const V2_GROUPS = 1 + CHANNELS + FRAME_VALUES; // 137
const V2_K_BYTES = (V2_GROUPS + 1) >> 1; // 69

/** numpy's rint: to the nearest integer, ties to even. @param {number} v */
function rint(v) {
  const r = Math.round(v); // ties toward +inf
  return r - v === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

/** @param {number} v an integer, |v| < 2**52 */
function zigzag(v) {
  return v >= 0 ? 2 * v : -2 * v - 1;
}

/** Little-endian bit writer (least significant bit of each byte first). */
class BitWriter {
  constructor(bytes = 256) {
    this.buf = new Uint8Array(bytes);
    this.bit = 0;
  }

  /** @private @param {number} bits */
  _room(bits) {
    const need = (this.bit + bits + 7) >> 3;
    if (need <= this.buf.length) return;
    const next = new Uint8Array(Math.max(need, this.buf.length * 2));
    next.set(this.buf);
    this.buf = next;
  }

  /** The low `k` bits of `v` (k <= 15), least significant first. @param {number} v @param {number} k */
  bits(v, k) {
    this._room(k);
    for (let i = 0; i < k; i++, this.bit++) {
      if ((v >> i) & 1) this.buf[this.bit >> 3] |= 1 << (this.bit & 7);
    }
  }

  /** `h` zero bits, then a one. @param {number} h */
  unary(h) {
    this._room(h + 1);
    this.bit += h;
    this.buf[this.bit >> 3] |= 1 << (this.bit & 7);
    this.bit++;
  }

  bytes() {
    return this.buf.subarray(0, (this.bit + 7) >> 3);
  }
}

/** The Rice parameter in 0..15 with the fewest bits, the smallest on a tie. @param {number[]} vals */
function bestK(vals) {
  if (!vals.length) return 0;
  let best = 0;
  let bestCost = Infinity;
  for (let k = 0; k <= V2_K_MAX; k++) {
    const p = 2 ** k;
    let cost = vals.length * (1 + k);
    for (const v of vals) cost += Math.floor(v / p);
    if (cost < bestCost) { best = k; bestCost = cost; }
  }
  return best;
}

/**
 * Encode one batch as version 2 (docs/pose-batch-format.md): every value on the grid of
 * `V2_STEPS` (at most 5e-4 off for a coordinate, 5e-3 for a visibility), the first frame
 * with a pose absolute, then differences along time; about 2 KB for a 30-frame batch
 * instead of 16 KB. Returns null if the batch does not fit version 2 (send `encodeBatch`'s
 * version 1 instead): timestamps not strictly increasing whole ms, a value that is not
 * finite, a coordinate beyond about +/-8,380 or a visibility outside [0, 1].
 * @param {{ seq: number, space?: 'image' | 'world', width?: number, height?: number,
 *           frames: Frame[] }} batch
 * @returns {ArrayBuffer | null}
 */
export function encodeBatchV2({ seq, space = 'image', width = 0, height = 0, frames }) {
  if (!(space in SPACES)) throw new RangeError(`unknown coordinate space ${space}`);
  const n = frames.length;
  if (!n || n > 0xffff) throw new RangeError('1..65535 frames per batch');
  if (!width || !height) { width = 0; height = 0; }
  /** @type {number[]} */ const tDeltas = [];
  for (let i = 0; i < n; i++) {
    const t = frames[i].t;
    if (!Number.isInteger(t) || t < 0 || t > MAX_U32) return null;
    if (i) {
      if (!(t > frames[i - 1].t)) return null;
      tDeltas.push(t - frames[i - 1].t - 1);
    }
  }
  /** @type {Int32Array[]} */ const q = []; // grid values of the frames with a pose
  const bitmap = new Uint8Array((n + 7) >> 3);
  for (let i = 0; i < n; i++) {
    const values = frames[i].values;
    if (!values) { bitmap[i >> 3] |= 1 << (i & 7); continue; }
    const row = new Int32Array(FRAME_VALUES);
    for (let s = 0; s < FRAME_VALUES; s++) {
      const c = s % CHANNELS;
      const v = rint(values[s] / V2_STEPS[c]);
      if (!Number.isFinite(v)) return null;
      if (c === 3 ? v < 0 || v > V2_VIS_MAX : Math.abs(v) >= V2_COORD_LIMIT) return null;
      row[s] = v;
    }
    q.push(row);
  }
  // groups (one Rice parameter each): 0 timestamp deltas, 1..4 the first frame's values by
  // channel, 5..136 the differences by series; values go out in frame order
  const m = q.length;
  /** @type {number[][]} */ const groups = Array.from({ length: V2_GROUPS }, () => []);
  groups[0] = tDeltas;
  for (let j = 0; j < m; j++) {
    for (let s = 0; s < FRAME_VALUES; s++) {
      if (j) groups[1 + CHANNELS + s].push(zigzag(q[j][s] - q[j - 1][s]));
      else groups[1 + (s % CHANNELS)].push(zigzag(q[0][s]));
    }
  }
  const ks = groups.map(bestK);
  const kTable = new Uint8Array(V2_K_BYTES);
  ks.forEach((k, g) => { kTable[g >> 1] |= k << ((g & 1) * 4); });
  const rem = new BitWriter(1024);
  const una = new BitWriter(2048);
  /** @param {number} v @param {number} k */
  const put = (v, k) => {
    const p = 2 ** k;
    const h = Math.floor(v / p);
    rem.bits(v - h * p, k);
    una.unary(h);
  };
  for (const v of tDeltas) put(v, ks[0]);
  for (let j = 0; j < m; j++) {
    for (let s = 0; s < FRAME_VALUES; s++) {
      if (j) put(zigzag(q[j][s] - q[j - 1][s]), ks[1 + CHANNELS + s]);
      else put(zigzag(q[0][s]), ks[1 + (s % CHANNELS)]);
    }
  }
  const r = rem.bytes();
  const u = una.bytes();
  const buf = new ArrayBuffer(HEADER_BYTES + 4 + bitmap.length + V2_K_BYTES + r.length + u.length);
  const view = new DataView(buf);
  writeHeader(view, 2, { seq, space, n, width, height });
  view.setUint32(HEADER_BYTES, frames[0].t, true);
  const bytes = new Uint8Array(buf);
  let off = HEADER_BYTES + 4;
  for (const part of [bitmap, kTable, r, u]) {
    bytes.set(part, off);
    off += part.length;
  }
  return buf;
}

/**
 * Encode one batch in the wire format asked for: `v2` (falling back to version 1 for a
 * batch that version 2 cannot carry) or `v1`.
 * @param {{ seq: number, space?: 'image' | 'world', width?: number, height?: number,
 *           frames: Frame[] }} batch
 * @param {'v1' | 'v2'} [wire='v2']
 * @returns {ArrayBuffer}
 */
export function encodeBatchAs(batch, wire = 'v2') {
  return (wire === 'v2' && encodeBatchV2(batch)) || encodeBatch(batch);
}

/**
 * Landmarks as MediaPipe gives them (`[{x, y, z, visibility}, ...]`, 33 of them) to the
 * 132 values of a frame, or null for "no pose". A frame with any value the service
 * would refuse (missing, not finite, |coordinate| > 1e4) becomes a no-pose frame: the
 * service accepts frames that are fully finite or all NaN only. A missing visibility
 * counts as 1 for world and image landmarks alike; visibility is clamped to [0, 1].
 * @param {ArrayLike<{x: number, y: number, z?: number, visibility?: number}> | null | undefined} landmarks
 * @returns {Float32Array | null}
 */
export function landmarksToValues(landmarks) {
  if (!landmarks || landmarks.length < LANDMARKS) return null;
  const out = new Float32Array(FRAME_VALUES);
  for (let i = 0; i < LANDMARKS; i++) {
    const p = landmarks[i];
    if (!p) return null;
    const vis = p.visibility ?? 1;
    const v = [p.x, p.y, p.z ?? 0, Math.min(1, Math.max(0, vis))];
    for (let c = 0; c < CHANNELS; c++) {
      const x = v[c];
      if (typeof x !== 'number' || !Number.isFinite(x) || (c < 3 && Math.abs(x) > 1e4)) return null;
      out[i * CHANNELS + c] = x;
    }
  }
  // float32 rounding of visibility cannot leave [0, 1]; of a coordinate cannot reach inf.
  return out;
}

/**
 * `values` if the service would accept them as a frame (all finite, |coordinate| <= 1e4,
 * visibility in [0, 1]), else null: a no-pose frame rather than a refused batch.
 * @param {Float32Array} values
 * @returns {Float32Array | null}
 */
export function sanitise(values) {
  for (let i = 0; i < values.length; i++) {
    const x = values[i];
    if (!Number.isFinite(x)) return null;
    if (i % CHANNELS === 3 ? x < 0 || x > 1 : Math.abs(x) > 1e4) return null;
  }
  return values;
}

/**
 * The landmarks of a MediaPipe Pose result in the wanted space, or null (no pose).
 * Accepts the legacy `@mediapipe/pose` results (`poseLandmarks`, `poseWorldLandmarks`),
 * Tasks `PoseLandmarkerResult` (`landmarks[0]`, `worldLandmarks[0]`), or a bare array.
 * @param {any} result
 * @param {'image' | 'world'} space
 */
export function poseOf(result, space) {
  if (result == null) return null;
  if (Array.isArray(result) || ArrayBuffer.isView(result)) return result;
  if (space === 'world') return result.poseWorldLandmarks ?? result.worldLandmarks?.[0] ?? null;
  return result.poseLandmarks ?? result.landmarks?.[0] ?? null;
}

/** Width and height of a video, canvas, image or `{width, height}`; zeros if unknown. */
export function imageSizeOf(source) {
  if (!source) return { width: 0, height: 0 };
  const w = source.videoWidth ?? source.naturalWidth ?? source.displayWidth ?? source.width ?? 0;
  const h = source.videoHeight ?? source.naturalHeight ?? source.displayHeight ?? source.height ?? 0;
  const ok = Number.isInteger(w) && Number.isInteger(h) && w > 0 && h > 0;
  return ok ? { width: Math.min(w, 0xffff), height: Math.min(h, 0xffff) } : { width: 0, height: 0 };
}

// -- retry policy --------------------------------------------------------------------

/**
 * @typedef {object} RetryOptions
 * @property {number} [baseMs=500] first backoff ceiling
 * @property {number} [capMs=15000] backoff ceiling never exceeds this
 * @property {number} [maxRetryAfterMs=60000] a longer Retry-After is shortened to this
 */

/** @type {Required<RetryOptions>} */
export const DEFAULT_RETRY = Object.freeze({ baseMs: 500, capMs: 15000, maxRetryAfterMs: 60000 });

/**
 * Exponential backoff with full jitter: uniform in [0, min(cap, base * 2^attempt)).
 * @param {number} attempt 0 for the first retry
 * @param {RetryOptions} [opts]
 * @param {() => number} [random]
 */
export function backoffDelay(attempt, opts = {}, random = Math.random) {
  const { baseMs, capMs } = { ...DEFAULT_RETRY, ...opts };
  return random() * Math.min(capMs, baseMs * 2 ** Math.min(attempt, 30));
}

/**
 * Retry-After (delta seconds or an HTTP date) in ms, or null.
 * @param {string | null | undefined} value
 * @param {number} [nowMs] wall clock, for the date form
 */
export function parseRetryAfter(value, nowMs = Date.now()) {
  if (value == null) return null;
  const s = String(value).trim();
  if (/^\d+$/.test(s)) return Number(s) * 1000;
  const at = Date.parse(s);
  return Number.isNaN(at) ? null : Math.max(0, at - nowMs);
}

/**
 * @typedef {object} TransportResult
 * @property {number} status HTTP status; 0 when the request failed without an answer
 *   (network error, refused connection, timeout, CORS refusal)
 * @property {string | null} code the `error.code` of an error body, if any
 * @property {string | null} message the `error.message` of an error body, if any
 * @property {number | null} retryAfterMs the Retry-After header in ms, if any
 * @property {any} body the parsed JSON body, or null
 * @property {unknown} [error] what went wrong without an answer
 */

/**
 * What to do with an answer to a pose batch or media batch.
 *  - `ack`: done (202, a duplicate included);
 *  - `retry`: send the same bytes again later (network error, 408, 5xx, 429, 503);
 *  - `drop`: give up on this batch, the session goes on (409 `sequence_skipped`, other 409s);
 *  - `ended`: the session is over, drop everything (409 `session_ended`, media `finished`);
 *  - `final`: refused for good, report it (other 4xx).
 * @param {TransportResult} r
 * @returns {'ack' | 'retry' | 'drop' | 'ended' | 'final'}
 */
export function classify(r) {
  if (r.status >= 200 && r.status < 300) return 'ack';
  if (r.status === 0 || r.status === 408 || r.status === 429 || r.status >= 500) return 'retry';
  if (r.status === 409) return r.code === 'session_ended' || r.code === 'finished' ? 'ended' : 'drop';
  return 'final';
}

/**
 * How long to wait before retry number `attempt` (0-based) after answer `r`:
 * Retry-After when the service gave one (429/503), plus up to 10% jitter so that
 * clients told the same thing do not return in lockstep; else backoff with full jitter.
 * @param {TransportResult} r
 * @param {number} attempt
 * @param {RetryOptions} [opts]
 * @param {() => number} [random]
 */
export function retryDelay(r, attempt, opts = {}, random = Math.random) {
  const o = { ...DEFAULT_RETRY, ...opts };
  if (r.retryAfterMs != null && (r.status === 429 || r.status === 503)) {
    const ms = Math.min(o.maxRetryAfterMs, r.retryAfterMs);
    return ms + random() * ms * 0.1;
  }
  return backoffDelay(attempt, o, random);
}

// -- transport -----------------------------------------------------------------------

/**
 * The seam between the client and the network: {@link FetchTransport} (one POST per
 * batch) or {@link WebSocketTransport} (one socket per session). Each `sendPoseBatch`
 * resolves with the service's answer for that batch, once it has one: for a stream
 * that is when the batch is durable (or refused), however many reconnects it took. The
 * retry, buffer and sequence logic above it is the same for both.
 *
 * @typedef {object} Transport
 * @property {string} kind e.g. `post`, `websocket`
 * @property {number} [window] how many pose batches the client may have in flight at
 *   once (read before each send; default 1: one request at a time)
 * @property {(body: ArrayBuffer, opts?: SendOptions) => Promise<TransportResult>} sendPoseBatch
 * @property {(json: string, opts?: SendOptions) => Promise<TransportResult>} sendMediaBatch
 * @property {(sessionId: string, opts?: SendOptions) => Promise<TransportResult>} endSession
 * @property {() => void} [close] let go of connections (called on page hide)
 */

/**
 * @typedef {object} SendOptions
 * @property {boolean} [keepalive] the request must outlive the page (page hide)
 * @property {AbortSignal} [signal] abandon the request
 */

/** {@link Transport} over `fetch`: POST /v1/pose/frames, /v1/media/events, /v1/sessions/{id}/end. */
export class FetchTransport {
  /**
   * @param {{ baseUrl: string, token: string, fetch?: typeof fetch, timeoutMs?: number }} opts
   *   `timeoutMs` bounds each request (default 15 s); the answer is then `status: 0`.
   */
  constructor({ baseUrl, token, fetch: fetchFn, timeoutMs = 15000 }) {
    this.kind = 'post';
    /** @private */ this._base = String(baseUrl).replace(/\/+$/, '');
    /** @private */ this._token = token;
    /** @private */ this._fetch = fetchFn ?? ((...a) => globalThis.fetch(...a));
    /** @private */ this._timeoutMs = timeoutMs;
  }

  /** Replace the session token (a refreshed one for the same session). */
  setToken(token) { this._token = token; }

  /** @param {ArrayBuffer} body @param {SendOptions} [opts] */
  sendPoseBatch(body, opts) {
    return this._post('/v1/pose/frames', body, CONTENT_TYPE, opts);
  }

  /** @param {string} json @param {SendOptions} [opts] */
  sendMediaBatch(json, opts) {
    return this._post('/v1/media/events', json, 'application/json', opts);
  }

  /** @param {string} sessionId @param {SendOptions} [opts] */
  endSession(sessionId, opts) {
    return this._post(`/v1/sessions/${encodeURIComponent(sessionId)}/end`, null, null, opts);
  }

  /**
   * @private
   * @param {string} path
   * @param {BodyInit | null} body
   * @param {string | null} contentType
   * @param {SendOptions} [opts]
   * @returns {Promise<TransportResult>}
   */
  async _post(path, body, contentType, { keepalive = false, signal } = {}) {
    const ctrl = new AbortController();
    const abort = () => ctrl.abort();
    if (signal) {
      if (signal.aborted) abort();
      else signal.addEventListener('abort', abort, { once: true });
    }
    // A keepalive request outlives the page; a timer could not abort it anyway.
    const timer = keepalive ? null : setTimeout(abort, this._timeoutMs);
    /** @type {Record<string, string>} */
    const headers = { Authorization: `Bearer ${this._token}` };
    if (contentType) headers['Content-Type'] = contentType;
    try {
      const res = await this._fetch(this._base + path, {
        method: 'POST', headers, body, keepalive, signal: ctrl.signal,
        mode: 'cors', credentials: 'omit',
      });
      let parsed = null;
      try { parsed = await res.json(); } catch { /* empty or not JSON */ }
      return {
        status: res.status,
        code: parsed?.error?.code ?? null,
        message: parsed?.error?.message ?? null,
        retryAfterMs: parseRetryAfter(res.headers.get('Retry-After')),
        body: parsed,
      };
    } catch (error) {
      return { status: 0, code: null, message: null, retryAfterMs: null, body: null, error };
    } finally {
      if (timer !== null) clearTimeout(timer);
      signal?.removeEventListener('abort', abort);
    }
  }
}

// -- the streaming transport -----------------------------------------------------------

/** The subprotocol of `/v1/pose/stream`. */
export const STREAM_SUBPROTOCOL = 'restartix.pose.v1';

/** Close codes of `/v1/pose/stream` (telemetry/stream.py) and the browser's own. */
export const STREAM_CLOSE = Object.freeze({
  NORMAL: 1000, UNSUPPORTED: 1003, ABNORMAL: 1006, POLICY: 1008, TOO_BIG: 1009,
  INTERNAL: 1011, RESTART: 1012, TRY_LATER: 1013, TOKEN: 4401, IDLE: 4408, ENDED: 4409,
  /** sent by this client when the service stops answering (see `ackTimeoutMs`) */
  NO_ANSWER: 4000,
});

/**
 * @typedef {object} WebSocketTransportOptions
 * @property {string} baseUrl the service (`https://...`; the stream is `wss://.../v1/pose/stream`)
 * @property {string} token the session token
 * @property {() => string | Promise<string>} [getToken] a fresh token for the same session,
 *   asked for when the stream closes with 4401 (token expired) or a POST (pose batch,
 *   media events, the end call) answers 401; once per refused token;
 *   without it, an expired token moves delivery to POST (which answers 401 once the
 *   service's leeway is over: the batches are then reported `rejected`)
 * @property {number} [window=4] unacknowledged batches on the socket at once
 * @property {number} [maxOpenFailures=3] after this many sockets in a row that did not
 *   open, one batch is sent by POST; if the POST is answered and the socket still will not
 *   open, the transport falls back to POST for the rest of the session
 * @property {number} [connectTimeoutMs=10000] a socket not open by then has failed
 * @property {number} [ackTimeoutMs=45000] with batches outstanding and no answer for this
 *   long, the socket is taken for dead: closed and replaced, the batches resent (the
 *   service answers within 30 s even when it holds a batch back for flow control)
 * @property {RetryOptions} [retry] reconnect backoff (the client's retry options)
 * @property {(info: TelemetryErrorInfo) => void} [onError] `stream_fallback`,
 *   `stream_failed`, `token_refresh_failed`
 * @property {typeof WebSocket} [WebSocket] for tests
 * @property {typeof fetch} [fetch] for the POST paths
 * @property {() => number} [random] for tests
 */

/**
 * {@link Transport} over a WebSocket per session (`/v1/pose/stream`), for pose batches;
 * media events and the session end stay on POST (an inner {@link FetchTransport}), and so
 * do `keepalive` sends (a socket does not outlive the page).
 *
 * Each `sendPoseBatch` resolves once the service has answered that batch: 202 when it is
 * durable, or the status and error code a POST would have got. A batch is never dropped
 * here: when the socket closes or fails, the transport reconnects (backoff with jitter)
 * and resends every unanswered batch in sequence order; the service answers a resend of
 * a durable batch `duplicate: true`. Only the client gives up on a batch (its signal).
 */
export class WebSocketTransport {
  /** @param {WebSocketTransportOptions} opts */
  constructor({
    baseUrl, token, getToken, window = 4, maxOpenFailures = 3, connectTimeoutMs = 10000,
    ackTimeoutMs = 45000, retry = {}, onError = () => {}, WebSocket: WS, fetch: fetchFn,
    random = Math.random,
  }) {
    this.kind = 'websocket';
    /** The POST side: media events, the session end, keepalive sends, the fallback. */
    this.fetchTransport = new FetchTransport({ baseUrl, token, fetch: fetchFn });
    /** @private */ this._base = String(baseUrl).replace(/\/+$/, '');
    /** @private */ this._token = token;
    /** @private */ this._getToken = getToken ?? null;
    /** @private @type {Promise<boolean> | null} the `getToken` call under way */
    this._refreshing = null;
    /** @private */ this._window = Math.max(1, Math.floor(window));
    /** @private */ this._maxOpenFailures = Math.max(1, maxOpenFailures);
    /** @private */ this._connectTimeoutMs = connectTimeoutMs;
    /** @private */ this._ackTimeoutMs = ackTimeoutMs;
    /** @private */ this._retry = { ...DEFAULT_RETRY, ...retry };
    /** @private */ this._onError = onError;
    /** @private */ this._WS = WS ?? globalThis.WebSocket;
    /** @private */ this._random = random;

    /** @private @type {'socket' | 'fetch' | 'ended' | 'closed'} */ this._mode = 'socket';
    /** @private @type {Map<number, PendingBatch>} unanswered batches by seq */
    this._pending = new Map();
    /** @private @type {StreamSocket | null} */ this._sock = null;
    /** @private */ this._timer = null; // a reconnect waiting out its backoff
    /** @private */ this._busy = false; // a token refresh or a POST probe is under way
    /** @private */ this._attempt = 0; // reconnects since the last answer
    /** @private */ this._failedOpens = 0; // sockets in a row that did not open
    /** @private */ this._confirming = false; // a POST worked: one more socket decides
    /** @private @type {Promise<unknown>} */ this._chain = Promise.resolve(); // POST, in order
    this.counters = {
      opens: 0, failedOpens: 0, batchesSent: 0, batchesResent: 0, acks: 0, duplicates: 0,
      refusals: 0, probes: 0, postBatches: 0, tokenRefreshes: 0, fallback: null,
      /** @type {Record<string, number>} */ closes: {},
    };
    /** @private */ this._onOnline = () => {
      if (this._timer !== null) { clearTimeout(this._timer); this._timer = null; this._pump(); }
    };
    if (typeof addEventListener === 'function') addEventListener('online', this._onOnline);
  }

  /** How many batches the client may have in flight: the window, or 1 once on POST. */
  get window() { return this._mode === 'socket' ? this._window : 1; }

  /** `socket`, `fetch` (fell back), `ended` (the service ended the session), `closed`. */
  get mode() { return this._mode; }

  /** The counters, the mode and how many batches are unanswered. */
  stats() {
    return { ...this.counters, closes: { ...this.counters.closes }, mode: this._mode,
      pending: this._pending.size, open: this._sock?.opened ?? false };
  }

  /** Replace the session token (a refreshed one for the same session): the next socket
   * and every POST use it. An open socket keeps going until the service closes it. */
  setToken(token) {
    this._token = token;
    this.fetchTransport.setToken(token);
  }

  /** A 401 (token expired) is answered as for pose batches: one fresh token, one resend.
   * @param {string} json @param {SendOptions} [opts] */
  sendMediaBatch(json, opts) {
    return this._withFreshToken((o) => this.fetchTransport.sendMediaBatch(json, o), opts);
  }

  /** Close the socket (normal closure), then `POST /v1/sessions/{id}/end`.
   * @param {string} sessionId @param {SendOptions} [opts] */
  endSession(sessionId, opts) {
    this.close();
    return this._withFreshToken((o) => this.fetchTransport.endSession(sessionId, o), opts);
  }

  /** Let go of the socket: unanswered batches are answered `status: 0`. */
  close() {
    if (this._mode !== 'ended') this._mode = 'closed';
    if (this._timer !== null) clearTimeout(this._timer);
    this._timer = null;
    this._dropSocket(STREAM_CLOSE.NORMAL, 'client done');
    for (const rec of [...this._pending.values()]) {
      this._settle(rec, noAnswer(new Error('transport closed')));
    }
    if (typeof removeEventListener === 'function') removeEventListener('online', this._onOnline);
  }

  /**
   * Send one pose batch. `keepalive` sends go by POST at once (page hide); otherwise the
   * answer comes when the service has made the batch durable or refused it.
   * @param {ArrayBuffer} body @param {SendOptions} [opts]
   * @returns {Promise<TransportResult>}
   */
  sendPoseBatch(body, opts = {}) {
    const { keepalive = false, signal } = opts;
    if (keepalive || this._mode === 'closed') {
      this.counters.postBatches++;
      return this.fetchTransport.sendPoseBatch(body, opts);
    }
    if (this._mode === 'fetch') return this._post(body, signal);
    if (this._mode === 'ended') return Promise.resolve(ended('the stream closed: session ended'));
    if (signal?.aborted) return Promise.resolve(noAnswer(new Error('aborted')));
    const seq = new DataView(body).getUint32(8, true);
    const old = this._pending.get(seq);
    if (old) this._settle(old, noAnswer(new Error('sent again')));
    return new Promise((resolve) => {
      /** @type {PendingBatch} */
      const rec = { seq, body, resolve, signal, onAbort: null, sock: null, sent: 0 };
      if (signal) {
        rec.onAbort = () => this._settle(rec, noAnswer(new Error('aborted')));
        signal.addEventListener('abort', rec.onAbort, { once: true });
      }
      this._pending.set(seq, rec);
      this._pump();
    });
  }

  // -- internals -----------------------------------------------------------------------

  /** @private */
  _report(info) {
    try { this._onError(info); } catch { /* a callback's bug must not stop delivery */ }
  }

  /** @private Answer `rec` (once) and forget it. */
  _settle(rec, result) {
    if (this._pending.get(rec.seq) !== rec) return;
    this._pending.delete(rec.seq);
    rec.signal?.removeEventListener('abort', rec.onAbort);
    rec.resolve(result);
  }

  /** @private One POST at a time, in the order asked. */
  _post(body, signal) {
    const run = () => {
      this.counters.postBatches++;
      return this._withFreshToken((o) => this.fetchTransport.sendPoseBatch(body, o), { signal });
    };
    const p = this._chain.then(run, run);
    this._chain = p.catch(() => {});
    return p;
  }

  /**
   * @private A POST with the current token; a 401 with a `getToken` gets one fresh token
   * and one resend. Not for `keepalive` sends: the page is going away.
   * @param {(opts: SendOptions) => Promise<TransportResult>} send
   * @param {SendOptions} [opts]
   */
  async _withFreshToken(send, opts = {}) {
    const used = this._token;
    const r = await send(opts);
    if (r.status !== 401 || !this._getToken || opts.keepalive) return r;
    return (await this._refreshToken(used)) ? send(opts) : r;
  }

  /**
   * @private A fresh token for a request or socket that used `used` and was refused:
   * true if there is one. One `getToken` call serves every refusal of the same token
   * (the stream's 4401, a media POST's 401 and a pose POST's 401 often come together):
   * a token already replaced is not asked for again, and a call under way is shared.
   * @param {string} used
   */
  _refreshToken(used) {
    if (!this._getToken) return Promise.resolve(false);
    if (this._token !== used) return Promise.resolve(true);
    if (this._refreshing === null) {
      this._refreshing = this._askToken().finally(() => { this._refreshing = null; });
    }
    return this._refreshing;
  }

  /** @private Ask `getToken` for a fresh token; true if it gave a different one. */
  async _askToken() {
    const before = this._token;
    try {
      const token = await this._getToken();
      this.counters.tokenRefreshes++;
      if (typeof token === 'string' && token && token !== before) {
        this.setToken(token);
        return true;
      }
    } catch (error) {
      this._report({ type: 'token_refresh_failed', message: String(error) });
    }
    return false;
  }

  /** @private Send what is unsent on an open socket, or get a socket. */
  _pump() {
    if (this._mode !== 'socket' || !this._pending.size) return;
    const sock = this._sock;
    if (sock?.opened) {
      const unsent = [...this._pending.values()].filter((r) => r.sock !== sock)
        .sort((a, b) => a.seq - b.seq);
      for (const rec of unsent) {
        if (!sock.queue.length) sock.progressAt = performance.now();
        try {
          sock.ws.send(rec.body);
        } catch {
          return; // closing: its close event resends
        }
        rec.sock = sock;
        sock.queue.push(rec.seq);
        this.counters.batchesSent++;
        if (rec.sent++) this.counters.batchesResent++;
      }
      return;
    }
    if (!sock && this._timer === null && !this._busy) this._connect();
  }

  /** @private */
  _url() {
    const path = '/v1/pose/stream';
    const href = globalThis.location?.href;
    const url = href ? new URL(this._base + path, href) : new URL(this._base + path);
    url.protocol = url.protocol === 'https:' ? 'wss:' : url.protocol === 'http:' ? 'ws:' : url.protocol;
    return url.href;
  }

  /** @private */
  _connect() {
    let ws;
    try {
      ws = new this._WS(this._url(), [STREAM_SUBPROTOCOL, `bearer.${this._token}`]);
    } catch (error) {
      // A token that is not a valid subprotocol, a blocked URL: POST it is.
      this._fallBack('websocket_unavailable', String(error));
      return;
    }
    ws.binaryType = 'arraybuffer';
    /** @type {StreamSocket} */
    const sock = { ws, opened: false, queue: [], progressAt: 0, token: this._token, timer: null };
    this._sock = sock;
    sock.timer = setTimeout(() => this._closed(sock, STREAM_CLOSE.ABNORMAL, 'connect timeout'),
      this._connectTimeoutMs);
    ws.onopen = () => {
      if (this._sock !== sock) return;
      sock.opened = true;
      this.counters.opens++;
      this._failedOpens = 0;
      this._confirming = false;
      clearTimeout(sock.timer);
      // Watch for a socket that stopped answering (no close ever came).
      sock.timer = setInterval(() => {
        if (sock.queue.length && performance.now() - sock.progressAt > this._ackTimeoutMs) {
          this._closed(sock, STREAM_CLOSE.NO_ANSWER, 'no answer');
        }
      }, Math.min(1000, this._ackTimeoutMs / 4));
      this._pump();
    };
    ws.onmessage = (ev) => this._answer(sock, ev.data);
    ws.onclose = (ev) => this._closed(sock, ev.code, ev.reason);
    ws.onerror = () => {}; // a close event follows
  }

  /** @private One answer: for the oldest batch sent on this socket. */
  _answer(sock, data) {
    if (this._sock !== sock || typeof data !== 'string') return;
    let msg;
    try { msg = JSON.parse(data); } catch { return; }
    let seq = sock.queue.shift();
    if (msg.seq != null && msg.seq !== seq) {
      // Answers come in order; if not, trust the seq the service names.
      const at = sock.queue.indexOf(msg.seq);
      if (at >= 0) sock.queue.splice(at, 1);
      if (seq !== undefined) sock.queue.unshift(seq);
      seq = msg.seq;
    }
    sock.progressAt = performance.now();
    this._attempt = 0;
    const rec = this._pending.get(seq);
    const status = Number(msg.status) || 0;
    if (status === 202) {
      this.counters.acks++;
      if (msg.duplicate) this.counters.duplicates++;
    } else {
      this.counters.refusals++;
    }
    if (rec && rec.sock === sock) {
      this._settle(rec, {
        status,
        code: msg.error?.code ?? null,
        message: msg.error?.message ?? null,
        retryAfterMs: msg.retry_after != null ? Number(msg.retry_after) * 1000 : null,
        body: status === 202 ? { seq, status, duplicate: !!msg.duplicate } : msg,
      });
    }
  }

  /** @private Close and forget the current socket. */
  _dropSocket(code, reason) {
    const sock = this._sock;
    if (!sock) return;
    this._sock = null;
    clearTimeout(sock.timer);
    clearInterval(sock.timer);
    sock.ws.onopen = sock.ws.onmessage = sock.ws.onclose = null;
    try { sock.ws.close(code, reason); } catch { /* already closed */ }
  }

  /** @private The socket closed (or is taken for closed): what next depends on the code. */
  _closed(sock, code, reason) {
    if (this._sock !== sock) return;
    const opened = sock.opened;
    const silent = code === STREAM_CLOSE.NO_ANSWER;
    this._dropSocket(silent ? code : STREAM_CLOSE.NORMAL, silent ? 'no answer' : 'closing');
    this.counters.closes[code] = (this.counters.closes[code] ?? 0) + 1;
    for (const rec of this._pending.values()) rec.sock = null; // all to be sent again
    if (this._mode !== 'socket') return;
    const C = STREAM_CLOSE;
    if (code === C.ENDED) {
      this._mode = 'ended';
      for (const rec of [...this._pending.values()]) this._settle(rec, ended(reason));
      return;
    }
    if (code === C.UNSUPPORTED || code === C.POLICY || code === C.TOO_BIG) {
      this._report({ type: 'stream_failed', closeCode: code, message: reason || null });
      this._fallBack('stream_failed', reason);
      return;
    }
    if (code === C.TOKEN) {
      this._busy = true;
      this._refreshToken(sock.token).then((fresh) => {
        this._busy = false;
        if (this._mode !== 'socket') return;
        // The same token again would be closed at once: only POST can still use it.
        if (!fresh && this._token === sock.token) this._fallBack('token_expired', reason);
        else this._pump();
      });
      return;
    }
    if (!opened) {
      this._failedOpens++;
      this.counters.failedOpens++;
      if (this._confirming) {
        this._confirming = false;
        this._fallBack('websocket_unavailable', 'POST works, the socket does not open');
        return;
      }
      if (this._failedOpens >= this._maxOpenFailures && this._pending.size) {
        this._probe();
        return;
      }
    }
    if (code === C.IDLE || code === C.NORMAL) { // nothing lost: reconnect when needed
      this._pump();
      return;
    }
    // 1006 (no answer, refused handshake, network), 1011, 1012 (restart), 1013 (later),
    // 4000 (no answer): back off, then reconnect and resend.
    this._later(backoffDelay(this._attempt++, this._retry, this._random));
  }

  /** @private Reconnect after `ms` (or at the browser's `online` event). */
  _later(ms) {
    if (this._timer !== null) clearTimeout(this._timer);
    this._timer = setTimeout(() => { this._timer = null; this._pump(); }, ms);
  }

  /**
   * @private The socket will not open. Send the oldest batch by POST: no answer (the
   * service is down or overloaded) means keep trying the socket; an answer means the
   * service is there, and one more socket decides whether streaming works at all.
   */
  async _probe() {
    this._busy = true;
    this._failedOpens = 0;
    this.counters.probes++;
    const rec = [...this._pending.values()].sort((a, b) => a.seq - b.seq)[0];
    this.counters.postBatches++;
    const used = this._token;
    const r = await this.fetchTransport.sendPoseBatch(rec.body, { signal: rec.signal });
    this._busy = false;
    if (this._mode !== 'socket') return;
    const what = classify(r);
    if (what === 'retry') {
      this._later(retryDelay(r, this._attempt++, this._retry, this._random));
      return;
    }
    if (r.status === 401 && (await this._refreshToken(used))) {
      this._pump();
      return;
    }
    if (rec.sock === null) this._settle(rec, r);
    this._confirming = true; // the next socket decides (now, or with the next batch)
    this._pump();
  }

  /** @private From now on, pose batches go by POST; the unanswered ones first, in order. */
  _fallBack(reason, message) {
    if (this._mode !== 'socket') return;
    this._mode = 'fetch';
    this.counters.fallback = reason;
    if (this._timer !== null) clearTimeout(this._timer);
    this._timer = null;
    this._dropSocket(STREAM_CLOSE.NORMAL, 'falling back');
    this._report({ type: 'stream_fallback', reason, message: message ?? null });
    const recs = [...this._pending.values()].sort((a, b) => a.seq - b.seq);
    for (const rec of recs) {
      rec.sock = null;
      this._post(rec.body, rec.signal).then((r) => this._settle(rec, r));
    }
  }
}

/**
 * @typedef {object} PendingBatch
 * @property {number} seq
 * @property {ArrayBuffer} body
 * @property {(r: TransportResult) => void} resolve
 * @property {AbortSignal | undefined} signal
 * @property {(() => void) | null} onAbort
 * @property {StreamSocket | null} sock the socket it was last sent on, while that is open
 * @property {number} sent times sent on a socket
 */

/**
 * @typedef {object} StreamSocket
 * @property {WebSocket} ws
 * @property {boolean} opened
 * @property {number[]} queue seqs sent and not answered yet, in order
 * @property {number} progressAt when the last answer came (or the first send into an empty queue)
 * @property {string} token the token it was opened with
 * @property {any} timer the connect timeout, then the answer watchdog
 */

/** @returns {TransportResult} */
function noAnswer(error) {
  return { status: 0, code: null, message: null, retryAfterMs: null, body: null, error };
}

/** @returns {TransportResult} */
function ended(message) {
  return { status: 409, code: 'session_ended', message: message || 'the session has ended',
    retryAfterMs: null, body: null };
}

// -- the client ----------------------------------------------------------------------

/**
 * @typedef {object} TelemetryErrorInfo
 * @property {'rejected' | 'dropped' | 'buffer_overflow' | 'session_ended' | 'lost_on_page_hide'
 *   | 'end_failed' | 'stream_fallback' | 'stream_failed' | 'token_refresh_failed'} type
 *   the last three come from a {@link WebSocketTransport}: it now sends over POST (with
 *   `reason`), the service closed the stream for good (with `closeCode`), `getToken` threw
 * @property {number} [seq] the pose batch concerned
 * @property {number} [frames] frames lost with it
 * @property {number} [status]
 * @property {string | null} [code]
 * @property {string | null} [message]
 */

/**
 * @typedef {object} TelemetryClientOptions
 * @property {string} sessionId the exercise session (as in the token)
 * @property {string} [baseUrl] the service, e.g. `https://telemetry.example` (with `token`,
 *   unless `transport` is given)
 * @property {string} [token] the session token from the Core API
 * @property {'fetch' | 'websocket' | Transport} [transport='fetch'] `fetch`: a
 *   {@link FetchTransport} (one POST per batch); `websocket`: a {@link WebSocketTransport}
 *   (one socket per session, falling back to POST when it cannot be opened); or your own
 * @property {() => string | Promise<string>} [getToken] a fresh session token for the same
 *   session, asked for when the stream says the token expired (`websocket` only)
 * @property {Partial<WebSocketTransportOptions>} [websocket] more options for the
 *   `websocket` transport (`window`, `maxOpenFailures`, `ackTimeoutMs`, ...)
 * @property {SessionClock} [clock] defaults to a clock started now
 * @property {'image' | 'world'} [space='image'] which landmarks to send
 * @property {'v1' | 'v2'} [wire='v2'] the pose batch wire format: `v2` quantised (about
 *   2 KB a second, coordinates within 5e-4), or `v1` float32 (16 KB a second, exact)
 * @property {any} [imageSource] video/canvas/`{width, height}` giving the camera image size
 * @property {number} [batchMs=1000] a batch is closed when its first frame is this old
 * @property {number} [maxFramesPerBatch=120] the service's TELEMETRY_MAX_FRAMES_PER_BATCH
 * @property {number} [maxBufferedBatches=60] unacknowledged batches kept; beyond, the oldest
 *   is dropped (and counted)
 * @property {RetryOptions} [retry]
 * @property {boolean} [endOnPageHide=true] end the session on `pagehide`
 * @property {(info: TelemetryErrorInfo) => void} [onError]
 * @property {() => number} [random] for tests
 */

/**
 * What {@link TelemetryClient#attach} needs of a tracker (a {@link MediaTracker} has it):
 * the client ends it with the session, waiting up to its own drain time, and hands it
 * a share of the keepalive budget on page hide.
 * @typedef {object} AttachedTracker
 * @property {(reason: 'session_ended', timeoutMs?: number) => Promise<unknown>} end the
 *   client passes its `drainMs` as the tracker's own wait
 * @property {(budget: number) => number} pageHide returns the bytes it used
 * @property {boolean} managed set by `attach`: the client, not the tracker, handles page hide
 */

/**
 * Packs MediaPipe Pose results into 1-second batches and delivers them in sequence
 * order (one request at a time over POST, up to the transport's `window` over the
 * WebSocket), retrying each until the service acknowledges it.
 * Every method returns at once; the network work runs in the background.
 */
export class TelemetryClient {
  /** @param {TelemetryClientOptions} opts */
  constructor(opts) {
    const {
      sessionId, baseUrl, token, getToken, transport = 'fetch', websocket = {}, clock,
      space = 'image', wire = 'v2',
      imageSource = null, batchMs = 1000, maxFramesPerBatch = 120, maxBufferedBatches = 60,
      retry = {}, endOnPageHide = true, onError = () => {}, random = Math.random,
    } = opts;
    if (!sessionId) throw new TypeError('sessionId is required');
    if (!(space in SPACES)) throw new RangeError(`space must be 'image' or 'world'`);
    if (wire !== 'v1' && wire !== 'v2') throw new RangeError(`wire must be 'v1' or 'v2'`);
    const named = typeof transport === 'string';
    if (named && transport !== 'fetch' && transport !== 'websocket') {
      throw new RangeError(`transport must be 'fetch', 'websocket' or a Transport`);
    }
    if (named && !(baseUrl && token)) throw new TypeError('give baseUrl and token, or a transport');
    this.sessionId = sessionId;
    /** @type {Transport} */
    this.transport = !named ? transport
      : transport === 'websocket'
        ? new WebSocketTransport({ retry, random, ...websocket, baseUrl, token, getToken,
          onError: (info) => this._report(info) })
        : new FetchTransport({ baseUrl, token });
    /** @type {SessionClock} */
    this.clock = clock ?? new SessionClock();
    this.space = space;
    /** The wire format of the pose batches: `v2` (quantised, the default) or `v1`. */
    this.wire = wire;
    this.imageSource = imageSource;
    /** @private */ this._batchMs = batchMs;
    /** @private */ this._maxFrames = Math.max(1, Math.min(maxFramesPerBatch, 0xffff));
    /** @private */ this._maxBuffered = Math.max(1, maxBufferedBatches);
    /** @private */ this._retry = { ...DEFAULT_RETRY, ...retry };
    /** @private */ this._onError = onError;
    /** @private */ this._random = random;

    /** @private @type {Frame[]} */ this._open = [];
    /** @private */ this._openSize = { width: 0, height: 0 };
    /** @private */ this._lastT = -1;
    /** @private */ this._nextSeq = 0;
    /** @private @type {Array<{seq: number, body: ArrayBuffer, frames: number, attempts: number, gone: boolean, busy: boolean, ctrl: AbortController | null}>} */
    this._queue = [];
    /** @private */ this._pumping = false;
    /** @private @type {Set<() => void>} */ this._wakers = new Set();
    /** @private @type {(() => void) | null} */ this._kick = null;
    /** @private @type {((v?: unknown) => void)[]} */ this._drainWaiters = [];
    /** @private */ this._sealTimer = null;
    /** @private */ this._closed = false; // no more frames (end() or page hide)
    /** @private */ this._serverEnded = false;
    /** @private @type {Promise<any> | null} */ this._ending = null;
    /** @private */ this._endSent = false;
    /** @private @type {Set<AttachedTracker>} */
    this._trackers = new Set();

    this.counters = {
      framesAdded: 0, framesNoPose: 0, framesAcked: 0, framesLost: 0,
      batchesSealed: 0, batchesAcked: 0, batchesDuplicate: 0, batchesDropped: 0,
      batchesRejected: 0, batchesOverflowed: 0, requests: 0, retries: 0,
      lastStatus: null, lastError: null,
    };

    /** @private */ this._onPageHide = () => this.pageHide();
    /** @private */ this._onHidden = () => {
      if (globalThis.document?.visibilityState === 'hidden') this.flush();
    };
    /** @private */ this._onOnline = () => this._wakeAll();
    if (endOnPageHide && typeof addEventListener === 'function') {
      addEventListener('pagehide', this._onPageHide);
      addEventListener('online', this._onOnline);
      globalThis.document?.addEventListener?.('visibilitychange', this._onHidden);
    }
  }

  /**
   * Add one MediaPipe Pose result. A result without a pose (or null) adds an all-NaN
   * frame. `timestampMs` is on this client's clock (`clock.ms()` when omitted); a
   * timestamp not after the previous frame's is moved 1 ms past it. The image size is
   * taken from `result.image`, else from `imageSource`.
   * @param {any} result
   * @param {{ timestampMs?: number, image?: any }} [opts]
   */
  addResult(result, { timestampMs, image } = {}) {
    const values = landmarksToValues(poseOf(result, this.space));
    this.addFrame(values, timestampMs, image ?? result?.image);
  }

  /**
   * Add one frame of 132 values (null: no pose).
   * @param {Float32Array | number[] | null} values
   * @param {number} [timestampMs]
   * @param {any} [image]
   */
  addFrame(values, timestampMs, image) {
    if (this._closed) return;
    if (values && values.length !== FRAME_VALUES) {
      throw new RangeError(`a frame has ${FRAME_VALUES} values, not ${values.length}`);
    }
    const frame = values ? sanitise(Float32Array.from(values)) : null;
    let t = Math.floor(timestampMs ?? this.clock.ms());
    if (!(t > this._lastT)) t = this._lastT + 1;
    if (t > MAX_U32) return;
    const size = imageSizeOf(image ?? this.imageSource);
    if (this._open.length && (t - this._open[0].t >= this._batchMs
        || size.width !== this._openSize.width || size.height !== this._openSize.height)) {
      this._seal();
    }
    if (!this._open.length) this._openSize = size;
    this._open.push({ t, values: frame });
    this._lastT = t;
    this.counters.framesAdded++;
    if (!frame) this.counters.framesNoPose++;
    if (this._open.length >= this._maxFrames) this._seal();
    this._armSealTimer();
  }

  /** Close the open batch now and queue it (it is sent in the background). */
  flush() {
    if (this._open.length) this._seal();
  }

  /**
   * Let `tracker` (a {@link MediaTracker}) end with the session and on page hide.
   * @param {AttachedTracker} tracker
   */
  attach(tracker) {
    this._trackers.add(tracker);
    tracker.managed = true;
  }

  /** A snapshot of the counters plus the buffer state. */
  stats() {
    return {
      ...this.counters,
      nextSeq: this._nextSeq,
      buffered: this._queue.length,
      framesOpen: this._open.length,
      ended: this._ending !== null || this._serverEnded,
    };
  }

  /**
   * Resolves once every sealed batch is acknowledged or given up (or after `timeoutMs`).
   * @param {number} [timeoutMs]
   * @returns {Promise<boolean>} true if nothing is left unacknowledged
   */
  async drain(timeoutMs = 10000) {
    this.flush();
    if (!this._queue.length) return true;
    let timer;
    await Promise.race([
      new Promise((resolve) => this._drainWaiters.push(resolve)),
      new Promise((resolve) => { timer = setTimeout(resolve, timeoutMs); }),
    ]);
    clearTimeout(timer);
    return this._queue.length === 0;
  }

  /**
   * End the session: close the open batch, end attached media trackers, wait (up to
   * `drainMs`) for the buffer to drain, then call the end endpoint (retrying like a
   * batch, up to `endMs`). Resolves with the service's summary, or null if it could not
   * be had (reported through `onError`). Calling it again returns the same promise.
   * @param {{ drainMs?: number, endMs?: number }} [opts]
   */
  end({ drainMs = 15000, endMs = 30000 } = {}) {
    if (!this._ending) this._ending = this._end(drainMs, endMs);
    return this._ending;
  }

  /** @private */
  async _end(drainMs, endMs) {
    this.flush();
    this._closed = true;
    this._clearSealTimer();
    const deadline = performance.now() + drainMs;
    await Promise.all([...this._trackers].map((t) => t.end('session_ended', drainMs)
      .catch(() => {})));
    await this.drain(Math.max(0, deadline - performance.now()));
    const left = this._queue.splice(0);
    for (const entry of left) {
      entry.ctrl?.abort();
      this._lose(entry, 'dropped', { message: 'not acknowledged before the end' });
    }
    this._detach();
    const until = performance.now() + endMs;
    this._endSent = true;
    for (let attempt = 0; ; attempt++) {
      const r = await this.transport.endSession(this.sessionId);
      this.counters.requests++;
      this.counters.lastStatus = r.status;
      if (r.status === 200) return r.body;
      const what = classify(r);
      const wait = retryDelay(r, attempt, this._retry, this._random);
      if ((what !== 'retry') || performance.now() + wait > until) {
        this._report({ type: 'end_failed', status: r.status, code: r.code, message: r.message });
        return null;
      }
      this.counters.retries++;
      await new Promise((resolve) => setTimeout(resolve, wait));
    }
  }

  /**
   * The page is going away: hand the media trackers' last events and the unacknowledged
   * batches to `keepalive` requests (oldest first, within the browser's 64 KiB budget;
   * what does not fit is counted as lost) and end the session with a `keepalive`
   * request. Called on `pagehide`; call it yourself when leaving the page another way.
   */
  pageHide() {
    if (this._endSent || this._serverEnded) return;
    this._endSent = true;
    this._closed = true;
    if (this._open.length) this._seal(false); // sent below with keepalive, not by the loop
    this._clearSealTimer();
    let budget = KEEPALIVE_BUDGET_BYTES - 1024; // headroom for the end request
    for (const t of this._trackers) budget -= t.pageHide(budget);
    const entries = this._queue.splice(0);
    for (const entry of entries) {
      entry.ctrl?.abort();
      entry.gone = true;
      if (entry.body.byteLength <= budget) {
        budget -= entry.body.byteLength;
        this.counters.requests++;
        // Nobody will read the answer: the page is gone. Duplicates are harmless.
        this.transport.sendPoseBatch(entry.body, { keepalive: true }).catch(() => {});
      } else {
        this._lose(entry, 'lost_on_page_hide', {});
      }
    }
    const ended = this.transport.endSession(this.sessionId, { keepalive: true })
      .then((r) => (r.status === 200 ? r.body : null), () => null);
    this._ending ??= ended;
    this.counters.requests++;
    this._detach();
    this._drained(); // an end() waiting for the buffer goes on (its end call is a repeat)
    this.transport.close?.();
    this._wakeAll();
  }

  // -- internals ---------------------------------------------------------------------

  /** @private @param {boolean} [send] start the delivery loop */
  _seal(send = true) {
    const frames = this._open;
    this._open = [];
    const seq = this._nextSeq++;
    const { width, height } = this._openSize;
    const body = encodeBatchAs({ seq, space: this.space, width, height, frames }, this.wire);
    this.counters.batchesSealed++;
    if (this._serverEnded) {
      this.counters.framesLost += frames.length;
      return;
    }
    while (this._queue.length >= this._maxBuffered) {
      const old = this._queue.shift();
      old.ctrl?.abort();
      this.counters.batchesOverflowed++;
      this._lose(old, 'buffer_overflow', {});
    }
    this._queue.push({ seq, body, frames: frames.length, attempts: 0, gone: false, busy: false,
      ctrl: null });
    if (send) this._pump();
  }

  /** @private */
  _lose(entry, type, extra) {
    entry.gone = true;
    this.counters.framesLost += entry.frames;
    this._report({ type, seq: entry.seq, frames: entry.frames, ...extra });
  }

  /** @private */
  _report(info) {
    try { this._onError(info); } catch { /* a callback's bug must not stop delivery */ }
  }

  /** @private */
  _armSealTimer() {
    if (this._sealTimer !== null || this._closed) return;
    // A stalled camera must not hold the frames of a started batch forever.
    this._sealTimer = setInterval(() => {
      if (this._open.length && this.clock.ms() - this._open[0].t >= this._batchMs) this._seal();
    }, Math.max(50, this._batchMs / 2));
  }

  /** @private */
  _clearSealTimer() {
    if (this._sealTimer !== null) clearInterval(this._sealTimer);
    this._sealTimer = null;
  }

  /** @private */
  _detach() {
    if (typeof removeEventListener === 'function') {
      removeEventListener('pagehide', this._onPageHide);
      removeEventListener('online', this._onOnline);
      globalThis.document?.removeEventListener?.('visibilitychange', this._onHidden);
    }
  }

  /**
   * @private A wait that the `online` event and page hide cut short.
   * @param {number} ms
   * @returns {Promise<void>}
   */
  _sleep(ms) {
    /** @type {() => void} */
    let done;
    return /** @type {Promise<void>} */ (new Promise((resolve) => {
      const timer = setTimeout(() => done(), ms);
      done = () => { clearTimeout(timer); resolve(); };
      this._wakers.add(done);
    })).finally(() => { this._wakers.delete(done); });
  }

  /** @private */
  _wakeAll() {
    for (const wake of [...this._wakers]) wake();
  }

  /** @private Start the delivery loop if it is not running (else let it see new work). */
  _pump() {
    if (this._pumping) {
      this._kick?.();
      return;
    }
    this._pumping = true;
    this._deliver().catch((error) => {
      this.counters.lastError = String(error);
    }).finally(() => {
      this._pumping = false;
      if (this._queue.length && !this._serverEnded) this._pump();
      else this._drained();
    });
  }

  /** @private */
  _drained() {
    if (this._queue.length) return;
    for (const resolve of this._drainWaiters.splice(0)) resolve();
  }

  /**
   * @private Lowest sequence numbers first, at most `transport.window` batches in flight
   * (1 for {@link FetchTransport}: one request at a time). A batch waiting to be retried
   * keeps its place in the window.
   */
  async _deliver() {
    /** @type {Set<Promise<void>>} */
    const inflight = new Set();
    for (;;) {
      const window = Math.max(1, Math.floor(Number(this.transport.window) || 1));
      if (!this._serverEnded) {
        for (const entry of this._queue) {
          if (inflight.size >= window) break;
          if (entry.busy || entry.gone) continue;
          entry.busy = true;
          /** @type {Promise<void>} */
          const p = this._deliverOne(entry).finally(() => {
            entry.busy = false;
            inflight.delete(p);
          });
          inflight.add(p);
        }
      }
      if (!inflight.size) return;
      await Promise.race([...inflight,
        /** @type {Promise<void>} */ (new Promise((resolve) => { this._kick = resolve; }))]);
      this._kick = null;
    }
  }

  /** @private Send `entry` until it is answered for good (or given up elsewhere). */
  async _deliverOne(entry) {
    while (!entry.gone && !this._serverEnded) {
      entry.ctrl = new AbortController();
      this.counters.requests++;
      const r = await this.transport.sendPoseBatch(entry.body, { signal: entry.ctrl.signal });
      entry.ctrl = null;
      this.counters.lastStatus = r.status;
      if (entry.gone) return; // dropped while in flight (overflow, page hide, end)
      const what = classify(r);
      if (what === 'retry') {
        const wait = retryDelay(r, entry.attempts, this._retry, this._random);
        entry.attempts++;
        this.counters.retries++;
        await this._sleep(wait);
        continue;
      }
      const at = this._queue.indexOf(entry);
      if (at >= 0) this._queue.splice(at, 1);
      if (what === 'ack') {
        this.counters.batchesAcked++;
        this.counters.framesAcked += entry.frames;
        if (r.body?.duplicate) this.counters.batchesDuplicate++;
      } else if (what === 'ended') {
        if (!this._serverEnded) {
          this._serverEnded = true;
          this._closed = true;
          this._clearSealTimer();
          const left = [entry, ...this._queue.splice(0)];
          for (const e of left) { e.gone = true; e.ctrl?.abort(); this.counters.framesLost += e.frames; }
          this._report({ type: 'session_ended', status: r.status, code: r.code, message: r.message,
            frames: left.reduce((n, e) => n + e.frames, 0) });
        } else {
          entry.gone = true;
        }
      } else {
        if (what === 'drop') this.counters.batchesDropped++;
        else this.counters.batchesRejected++;
        this._lose(entry, what === 'drop' ? 'dropped' : 'rejected',
          { status: r.status, code: r.code, message: r.message });
      }
      this._drained();
      return;
    }
  }
}
