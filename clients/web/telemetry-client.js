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
  MAGIC.forEach((b, i) => view.setUint8(i, b));
  view.setUint8(4, 1);
  view.setUint8(5, SPACES[space]);
  view.setUint8(6, LANDMARKS);
  view.setUint8(7, CHANNELS);
  view.setUint32(8, seq >>> 0, true);
  view.setUint16(12, frames.length, true);
  view.setUint16(14, Math.min(0xffff, width), true);
  view.setUint16(16, Math.min(0xffff, height), true);
  view.setUint16(18, 0, true);
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
 * The seam between the client and the network. Today: {@link FetchTransport}, one POST
 * per batch. A streaming transport (one long-lived upload stream or WebTransport
 * session per exercise session, when the service has one) implements the same three
 * methods and resolves each with the service's answer for that batch; the retry,
 * buffer and sequence logic above it stays the same.
 *
 * @typedef {object} Transport
 * @property {string} kind e.g. `post`
 * @property {(body: ArrayBuffer, opts?: SendOptions) => Promise<TransportResult>} sendPoseBatch
 * @property {(json: string, opts?: SendOptions) => Promise<TransportResult>} sendMediaBatch
 * @property {(sessionId: string, opts?: SendOptions) => Promise<TransportResult>} endSession
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

  /** @private */
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

// -- the client ----------------------------------------------------------------------

/**
 * @typedef {object} TelemetryErrorInfo
 * @property {'rejected' | 'dropped' | 'buffer_overflow' | 'session_ended' | 'lost_on_page_hide'
 *   | 'end_failed'} type
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
 * @property {Transport} [transport] defaults to a {@link FetchTransport}
 * @property {SessionClock} [clock] defaults to a clock started now
 * @property {'image' | 'world'} [space='image'] which landmarks to send
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
 * Packs MediaPipe Pose results into 1-second batches and delivers them in sequence
 * order, one request at a time, retrying each until the service acknowledges it.
 * Every method returns at once; the network work runs in the background.
 */
export class TelemetryClient {
  /** @param {TelemetryClientOptions} opts */
  constructor(opts) {
    const {
      sessionId, baseUrl, token, transport, clock, space = 'image', imageSource = null,
      batchMs = 1000, maxFramesPerBatch = 120, maxBufferedBatches = 60, retry = {},
      endOnPageHide = true, onError = () => {}, random = Math.random,
    } = opts;
    if (!sessionId) throw new TypeError('sessionId is required');
    if (!(space in SPACES)) throw new RangeError(`space must be 'image' or 'world'`);
    if (!transport && !(baseUrl && token)) throw new TypeError('give baseUrl and token, or a transport');
    this.sessionId = sessionId;
    /** @type {Transport} */
    this.transport = transport ?? new FetchTransport({ baseUrl, token });
    /** @type {SessionClock} */
    this.clock = clock ?? new SessionClock();
    this.space = space;
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
    /** @private @type {Array<{seq: number, body: ArrayBuffer, frames: number, attempts: number, gone: boolean, ctrl: AbortController | null}>} */
    this._queue = [];
    /** @private */ this._pumping = false;
    /** @private @type {(() => void) | null} */ this._wake = null;
    /** @private @type {((v?: unknown) => void)[]} */ this._drainWaiters = [];
    /** @private */ this._sealTimer = null;
    /** @private */ this._closed = false; // no more frames (end() or page hide)
    /** @private */ this._serverEnded = false;
    /** @private @type {Promise<any> | null} */ this._ending = null;
    /** @private */ this._endSent = false;
    /** @private @type {Set<{ end: (reason: string) => Promise<unknown>, pageHide: (budget: number) => number }>} */
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
    /** @private */ this._onOnline = () => this._wake?.();
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

  /** Let `tracker` (a {@link MediaTracker}) end with the session and on page hide. */
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
    for (const entry of left) this._lose(entry, 'dropped', { message: 'not acknowledged before the end' });
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
    this._wake?.();
  }

  // -- internals ---------------------------------------------------------------------

  /** @private @param {boolean} [send] start the delivery loop */
  _seal(send = true) {
    const frames = this._open;
    this._open = [];
    const seq = this._nextSeq++;
    const { width, height } = this._openSize;
    const body = encodeBatch({ seq, space: this.space, width, height, frames });
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
    this._queue.push({ seq, body, frames: frames.length, attempts: 0, gone: false, ctrl: null });
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

  /** @private */
  _sleep(ms) {
    return new Promise((resolve) => {
      const timer = setTimeout(done, ms);
      function done() { clearTimeout(timer); resolve(); }
      this._wake = done;
    }).finally(() => { this._wake = null; });
  }

  /** @private Start the delivery loop if it is not running. */
  _pump() {
    if (this._pumping) return;
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

  /** @private One request at a time, lowest sequence number first. */
  async _deliver() {
    while (this._queue.length && !this._serverEnded) {
      const entry = this._queue[0];
      entry.ctrl = new AbortController();
      this.counters.requests++;
      const r = await this.transport.sendPoseBatch(entry.body, { signal: entry.ctrl.signal });
      entry.ctrl = null;
      this.counters.lastStatus = r.status;
      if (entry.gone) continue; // dropped while in flight (overflow, page hide)
      const what = classify(r);
      if (what === 'retry') {
        const wait = retryDelay(r, entry.attempts, this._retry, this._random);
        entry.attempts++;
        this.counters.retries++;
        await this._sleep(wait);
        continue;
      }
      this._queue.splice(this._queue.indexOf(entry), 1);
      if (what === 'ack') {
        this.counters.batchesAcked++;
        this.counters.framesAcked += entry.frames;
        if (r.body?.duplicate) this.counters.batchesDuplicate++;
      } else if (what === 'ended') {
        this._serverEnded = true;
        this._closed = true;
        this._clearSealTimer();
        const left = [entry, ...this._queue.splice(0)];
        for (const e of left) { e.gone = true; this.counters.framesLost += e.frames; }
        this._report({ type: 'session_ended', status: r.status, code: r.code, message: r.message,
          frames: left.reduce((n, e) => n + e.frames, 0) });
      } else {
        if (what === 'drop') this.counters.batchesDropped++;
        else this.counters.batchesRejected++;
        this._lose(entry, what === 'drop' ? 'dropped' : 'rejected',
          { status: r.status, code: r.code, message: r.message });
      }
      this._drained();
    }
  }
}
