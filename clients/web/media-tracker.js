// RestartiX Telemetry browser client: video-player events of an HTML <video> element.
//
// Dependency-free ES module. Emits the media events of docs/media-metrics.md for one
// element, groups them into views (one playback of one video), and sends them as JSON
// batches to POST /v1/media/events following the client contract: a view's batches one
// at a time, a failed batch resent as the same bytes (same event ids).
//
//   import { TelemetryClient } from './telemetry-client.js';
//   import { MediaTracker } from './media-tracker.js';
//   const tracker = new MediaTracker(videoEl, { mediaId: 'ex-squat-01',
//     clock: telemetry.clock, transport: telemetry.transport });
//   telemetry.attach(tracker);   // ends with the session and on page hide

import {
  DEFAULT_RETRY, KEEPALIVE_BUDGET_BYTES, SessionClock, classify, retryDelay,
} from './telemetry-client.js';

const ID_RE = /^[A-Za-z0-9_.:-]{1,128}$/;
const MILESTONES = [25, 50, 75, 95];
const MAX_EVENTS_PER_BATCH = 500;
const MAX_T_MS = 86_400_000;
const CONNECTION_TYPES = new Set(['slow-2g', '2g', '3g', '4g', '5g', 'wifi', 'ethernet', 'cellular',
  'other', 'unknown']);
const MEDIA_ERRORS = { 1: 'MEDIA_ERR_ABORTED', 2: 'MEDIA_ERR_NETWORK', 3: 'MEDIA_ERR_DECODE',
  4: 'MEDIA_ERR_SRC_NOT_SUPPORTED' };
/** Events after which the batch goes out at once rather than at the next flush tick. */
const URGENT = new Set(['session_end', 'error']);

/** A random id of `[0-9a-f]`, 16 characters, for view ids. */
export function randomId() {
  const bytes = new Uint8Array(8);
  globalThis.crypto.getRandomValues(bytes);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
}

/**
 * The Network Information API's part of `navigator` (Chromium only, so not in the DOM
 * typings).
 * @typedef {{ connection?: { type?: string, effectiveType?: string } }} NavigatorConnection
 */

/**
 * `navigator.connection` in the service's vocabulary, or undefined.
 * @param {NavigatorConnection | undefined} [nav]
 * @returns {string | undefined}
 */
export function connectionType(nav = /** @type {NavigatorConnection} */ (globalThis.navigator)) {
  const c = nav?.connection;
  if (!c) return undefined;
  if (c.type && c.type !== 'unknown') {
    if (CONNECTION_TYPES.has(c.type)) return c.type;
    return c.type === 'none' ? undefined : 'other';
  }
  return CONNECTION_TYPES.has(c.effectiveType) ? c.effectiveType : undefined;
}

/** A number rounded to ms precision, or undefined if not a finite number >= 0. */
function seconds(x) {
  return typeof x === 'number' && Number.isFinite(x) && x >= 0 ? Math.round(x * 1000) / 1000 : undefined;
}

/** `fields` without undefined values. */
function defined(fields) {
  return Object.fromEntries(Object.entries(fields).filter(([, v]) => v !== undefined));
}

/**
 * One playback of one video: what the tracker keeps about it between events.
 * @typedef {object} View
 * @property {string} id the `view_id`
 * @property {string} mediaId
 * @property {number} n events emitted so far (event ids are `e-<n>`)
 * @property {'starting' | 'playing' | 'paused' | 'buffering' | 'stopped' | 'ended'} state
 *   `stopped`: after a fatal media error
 * @property {number | null} duration seconds, when known
 * @property {number | null} stallStart session-clock ms the ongoing stall began, or null
 * @property {number} stalls stalls so far
 * @property {number} stallMs ms spent stalled (finished stalls)
 * @property {number} lastPos last known playhead, seconds
 * @property {Set<number>} milestones the percentages reported
 * @property {number | null} bitrate the rendition's bits/s, from `qualityChange`
 */

/**
 * @typedef {object} MediaTrackerOptions
 * @property {string | ((video: HTMLVideoElement) => string)} mediaId the video's id (1-128 of
 *   `[A-Za-z0-9_.:-]`, a hashed id, no titles); a function is asked at each new view
 * @property {import('./telemetry-client.js').SessionClock} [clock] the exercise session's
 *   clock (share the pose client's: `telemetry.clock`)
 * @property {import('./telemetry-client.js').Transport} [transport] share the pose client's
 * @property {number} [flushMs=3000] pending events go out this often
 * @property {number} [heartbeatMs=10000]
 * @property {import('./telemetry-client.js').RetryOptions} [retry]
 * @property {(info: object) => void} [onError] a batch refused for good, or the session over
 * @property {() => string} [newViewId] for tests
 * @property {() => number} [random] for tests
 */

/**
 * Listens to one `<video>` element and reports its views. `play` (the request) starts a
 * view with `session_start`; `playing` is `play` (preceded by `buffering_end` after a
 * stall); `pause`; `seeking` is `seek`; `waiting` is `buffering_start`; `timeupdate`
 * reaching 25/50/75/95 % is `milestone`; `ended` is `session_end` (`completed`); a
 * media error is `error`; a heartbeat every `heartbeatMs` while a view is open.
 */
export class MediaTracker {
  /**
   * @param {HTMLVideoElement} video
   * @param {MediaTrackerOptions} opts
   */
  constructor(video, opts) {
    const {
      mediaId, clock, transport, flushMs = 3000, heartbeatMs = 10000, retry = {},
      onError = () => {}, newViewId = () => `v-${randomId()}`, random = Math.random,
    } = opts;
    if (!transport) throw new TypeError('a transport is required (e.g. telemetry.transport)');
    if (typeof mediaId !== 'function' && !ID_RE.test(String(mediaId))) {
      throw new TypeError('mediaId must be 1-128 characters of [A-Za-z0-9_.:-]');
    }
    this.video = video;
    this.transport = transport;
    this.clock = clock ?? new SessionClock();
    /** Set by `TelemetryClient.attach`: the client then ends this tracker. */
    this.managed = false;
    /** @private */ this._mediaId = mediaId;
    /** @private */ this._flushMs = flushMs;
    /** @private */ this._heartbeatMs = heartbeatMs;
    /** @private */ this._retry = { ...DEFAULT_RETRY, ...retry };
    /** @private */ this._onError = onError;
    /** @private */ this._newViewId = newViewId;
    /** @private */ this._random = random;

    /** @private @type {View | null} The open view, or null. */ this._view = null;
    /** @private @type {Array<{view: View, event: Record<string, unknown>}>} */ this._pending = [];
    /** @private */ this._inflight = null;
    /** @private */ this._sending = false;
    /** @private */ this._closed = false;
    /** @private */ this._stopped = false; // the service said the session is over
    /** @private @type {(() => void)[]} */ this._idleWaiters = [];
    /** @private */ this._heartbeat = null;

    this.counters = {
      views: 0, eventsEmitted: 0, eventsAcked: 0, eventsApplied: 0, eventsDuplicate: 0,
      eventsLost: 0, batchesSent: 0, batchesAcked: 0, requests: 0, retries: 0,
      lastStatus: null, byType: /** @type {Record<string, number>} */ ({}),
    };

    /** @private */ this._handlers = {
      play: () => this._onPlayRequest(),
      playing: () => this._onPlaying(),
      pause: () => this._onPause(),
      seeking: () => this._onSeeking(),
      seeked: () => this._onSeeked(),
      waiting: () => this._onWaiting(),
      timeupdate: () => this._onTimeUpdate(),
      ended: () => this._onEnded(),
      error: () => this._onError_(),
      emptied: () => this._endView('user_exit'),
      durationchange: () => { if (this._view) this._view.duration = this._duration(); },
    };
    for (const [type, fn] of Object.entries(this._handlers)) video.addEventListener(type, fn);
    /** @private */ this._onPageHide = () => { if (!this.managed) this.pageHide(KEEPALIVE_BUDGET_BYTES); };
    if (typeof addEventListener === 'function') addEventListener('pagehide', this._onPageHide);
    /** @private */ this._flushTimer = setInterval(() => this._kick(), this._flushMs);

    if (!video.paused && !video.ended) { // attached to a video that is already playing
      this._onPlayRequest();
      if (video.readyState >= 3) this._onPlaying();
    }
  }

  /** The open view's id, or null. */
  get viewId() { return this._view?.id ?? null; }

  /** A snapshot of the counters. */
  stats() {
    return {
      ...this.counters, byType: { ...this.counters.byType }, viewId: this.viewId,
      pending: this._pending.length + (this._inflight?.events.length ?? 0),
      state: this._view?.state ?? 'idle',
    };
  }

  /**
   * Report an ABR rendition change (a plain `<video>` cannot see one; an adaptive player
   * such as hls.js or Shaka can).
   * @param {{ bitrate: number, previousBitrate?: number, resolution?: string }} change bits/s
   */
  qualityChange({ bitrate, previousBitrate, resolution }) {
    if (this._view) this._view.bitrate = bitrate;
    this._emit('quality_change', defined({
      bitrate, previous_bitrate: previousBitrate, resolution,
      position_seconds: seconds(this.video.currentTime),
    }));
  }

  /**
   * Close the open view with `session_end` (`reason`), stop listening, send what is
   * pending and wait until it is acknowledged (or `timeoutMs` passed).
   * @param {'completed' | 'user_exit' | 'error' | 'session_ended' | 'unknown'} [reason]
   * @param {number} [timeoutMs]
   * @returns {Promise<boolean>} true if every event was acknowledged
   */
  async end(reason = 'user_exit', timeoutMs = 10000) {
    this._endView(reason);
    this._close();
    this._kick();
    if (!this._busy()) return this._pending.length === 0;
    let timer;
    await Promise.race([
      /** @type {Promise<void>} */ (new Promise((resolve) => this._idleWaiters.push(resolve))),
      new Promise((resolve) => { timer = setTimeout(resolve, timeoutMs); }),
    ]);
    clearTimeout(timer);
    return !this._busy();
  }

  /**
   * The page is going away: end the open view (`user_exit`, or `error` after a fatal
   * error) and send every unacknowledged event with `keepalive` requests, one batch per
   * view holding the in-flight batch's events and the pending ones in order (so a late
   * copy of the in-flight batch is a duplicate, never ahead of the rest).
   * @param {number} budget bytes the keepalive requests may use
   * @returns {number} bytes used
   */
  pageHide(budget) {
    if (this._closed && !this._busy()) return 0;
    this._endView(this._view?.state === 'stopped' ? 'error' : 'user_exit');
    this._close();
    const items = [...(this._inflight?.items ?? []), ...this._pending.splice(0)];
    this._inflight = null;
    let used = 0;
    while (items.length) {
      const view = items[0].view;
      let n = 0;
      while (n < items.length && n < MAX_EVENTS_PER_BATCH && items[n].view === view) n++;
      const group = items.splice(0, n);
      const json = this._json(view, group);
      const size = new TextEncoder().encode(json).length;
      if (this._stopped || size > budget - used) {
        this.counters.eventsLost += group.length;
        continue;
      }
      used += size;
      this.counters.requests++;
      this.transport.sendMediaBatch(json, { keepalive: true }).catch(() => {});
    }
    return used;
  }

  /** Stop listening without sending anything more. */
  dispose() {
    this._close();
    this._pending = [];
  }

  // -- video events ------------------------------------------------------------------

  /** @private */
  _onPlayRequest() {
    if (this._closed) return;
    if (this._view && this._view.state !== 'ended') return; // resume: `playing` reports it
    this._startView();
  }

  /** @private */
  _onPlaying() {
    if (this._closed) return;
    if (!this._view || this._view.state === 'ended') this._startView();
    const v = this._view;
    if (v.stallStart !== null) {
      this._emit('buffering_end', { position_seconds: this._pos() });
      this._closeStall();
    }
    v.state = 'playing';
    this._emit('play', { position_seconds: this._pos() });
  }

  /** @private */
  _onPause() {
    const v = this._view;
    if (!v || v.state === 'ended' || this.video.ended) return; // the pause before `ended`
    this._closeStall(); // the service closes a stall at a pause
    v.state = 'paused';
    this._emit('pause', { position_seconds: this._pos() });
  }

  /** @private */
  _onSeeking() {
    const v = this._view;
    if (!v || v.state === 'ended') return;
    this._closeStall(); // and at a seek
    this._emit('seek', defined({
      position_seconds: this._pos(), from_position_seconds: seconds(v.lastPos),
    }));
    v.lastPos = this.video.currentTime;
  }

  /** @private */
  _onSeeked() {
    const v = this._view;
    // Data at the new position arrived while paused: no `playing` will close the stall.
    if (v && v.stallStart !== null && this.video.paused) {
      this._emit('buffering_end', { position_seconds: this._pos() });
      this._closeStall();
    }
  }

  /** @private */
  _onWaiting() {
    const v = this._view;
    if (!v || v.state === 'ended' || v.stallStart !== null) return;
    v.stallStart = this.clock.ms();
    v.stalls++;
    v.state = 'buffering';
    this._emit('buffering_start', defined({
      position_seconds: this._pos(), bitrate_before: v.bitrate ?? undefined,
    }));
  }

  /** @private */
  _onTimeUpdate() {
    const v = this._view;
    if (!v || v.state === 'ended') return;
    if (!this.video.seeking) v.lastPos = this.video.currentTime;
    this._milestones();
  }

  /** @private */
  _onEnded() {
    if (!this._view || this._view.state === 'ended') return;
    this._milestones();
    this._endView('completed');
  }

  /** @private */
  _onError_() {
    const v = this._view;
    const err = this.video.error;
    if (!v || !err) return;
    this._closeStall();
    v.state = 'stopped';
    this._emit('error', defined({
      code: MEDIA_ERRORS[err.code] ?? `MEDIA_ERR_${Number(err.code) || 0}`,
      message: String(err.message || MEDIA_ERRORS[err.code] || 'media error').slice(0, 200),
      fatal: true, position_seconds: this._pos(),
    }));
  }

  // -- views -------------------------------------------------------------------------

  /** @private */
  _startView() {
    const mediaId = typeof this._mediaId === 'function' ? this._mediaId(this.video) : this._mediaId;
    if (!ID_RE.test(String(mediaId))) {
      this._report({ type: 'bad_media_id', message: 'mediaId must be 1-128 of [A-Za-z0-9_.:-]' });
      return;
    }
    this._view = {
      id: this._newViewId(), mediaId: String(mediaId), n: 0, state: 'starting',
      duration: this._duration(), stallStart: null, stalls: 0, stallMs: 0, lastPos: 0,
      milestones: new Set(), bitrate: null,
    };
    this.counters.views++;
    this._emit('session_start', defined({
      ...this._loadTimings(), connection_type: connectionType(), position_seconds: this._pos(),
    }));
    this._view.lastPos = this.video.currentTime;
    clearInterval(this._heartbeat);
    this._heartbeat = setInterval(() => this._beat(), this._heartbeatMs);
  }

  /** @private */
  _endView(reason) {
    const v = this._view;
    if (!v || v.state === 'ended') return;
    this._emit('session_end', defined({
      reason, position_seconds: this._pos(), buffering_count: v.stalls,
      buffering_duration_ms: this._stallMs(), dropped_frames: this._dropped(),
    }));
    v.stallStart = null;
    v.state = 'ended';
    clearInterval(this._heartbeat);
    this._heartbeat = null;
  }

  /** @private */
  _beat() {
    const v = this._view;
    if (!v || v.state === 'ended' || this._closed) return;
    const w = this.video.videoWidth;
    const h = this.video.videoHeight;
    this._emit('heartbeat', defined({
      position_seconds: this._pos(), buffering_count: v.stalls,
      buffering_duration_ms: this._stallMs(), dropped_frames: this._dropped(),
      current_bitrate: v.bitrate ?? undefined, resolution: w && h ? `${w}x${h}` : undefined,
    }));
  }

  /** @private */
  _milestones() {
    const v = this._view;
    const d = this._duration();
    if (!v || !d) return;
    const pos = this.video.ended ? d : this.video.currentTime;
    for (const pct of MILESTONES) {
      if (!v.milestones.has(pct) && pos >= (d * pct) / 100) {
        v.milestones.add(pct);
        this._emit('milestone', { percent: pct, position_seconds: this._pos() });
      }
    }
  }

  /** @private */
  _closeStall() {
    const v = this._view;
    if (!v || v.stallStart === null) return;
    v.stallMs += Math.max(0, this.clock.ms() - v.stallStart);
    v.stallStart = null;
  }

  /** @private stalled time so far, including an ongoing stall */
  _stallMs() {
    const v = this._view;
    return v.stallMs + (v.stallStart === null ? 0 : Math.max(0, this.clock.ms() - v.stallStart));
  }

  /** @private */
  _pos() {
    const p = seconds(this.video.currentTime) ?? 0;
    const d = this._duration();
    return d ? Math.min(p, d) : p;
  }

  /** @private the duration in seconds if known and acceptable to the service, else null */
  _duration() {
    const d = this.video.duration;
    return Number.isFinite(d) && d > 0 && d <= 86400 ? d : null;
  }

  /** @private */
  _dropped() {
    try {
      const q = this.video.getVideoPlaybackQuality?.();
      return Number.isInteger(q?.droppedVideoFrames) ? q.droppedVideoFrames : undefined;
    } catch {
      return undefined;
    }
  }

  /** @private time to first byte and load time of the media resource, when the browser shows them */
  _loadTimings() {
    try {
      const src = this.video.currentSrc;
      // Entries of type 'resource' are PerformanceResourceTiming.
      const entries = /** @type {PerformanceResourceTiming[]} */ (
        src ? performance.getEntriesByName(src, 'resource') : []);
      const e = entries[entries.length - 1];
      if (!e) return {};
      const ok = (x) => (Number.isFinite(x) && x > 0 && x <= 600000 ? Math.round(x) : undefined);
      return {
        ttfb_ms: e.responseStart > 0 ? ok(e.responseStart - e.startTime) : undefined,
        load_time_ms: e.responseEnd > 0 ? ok(e.responseEnd - e.startTime) : undefined,
      };
    } catch {
      return {};
    }
  }

  // -- delivery ----------------------------------------------------------------------

  /** @private */
  _emit(type, fields) {
    const v = this._view;
    if (!v || v.state === 'ended' || this._closed) return;
    const event = { id: `e-${++v.n}`, type, t_ms: Math.min(MAX_T_MS, this.clock.ms()), ...fields };
    this._pending.push({ view: v, event });
    this.counters.eventsEmitted++;
    this.counters.byType[type] = (this.counters.byType[type] ?? 0) + 1;
    if (URGENT.has(type)) queueMicrotask(() => this._kick());
  }

  /** @private */
  _json(view, items) {
    return JSON.stringify({
      media_id: view.mediaId, view_id: view.id,
      media_duration_s: view.duration ?? this._durationFor(view),
      events: items.map((i) => i.event),
    });
  }

  /** @private the current duration if `view` is the element's current view */
  _durationFor(view) {
    return view === this._view ? this._duration() : null;
  }

  /** @private */
  _busy() {
    return this._sending || this._pending.length > 0;
  }

  /** @private Send pending events, one batch at a time, until none is left. */
  _kick() {
    if (this._sending || this._stopped || !this._pending.length) return;
    this._sending = true;
    this._deliver().catch(() => {}).finally(() => {
      this._sending = false;
      this._inflight = null;
      if (this._pending.length && !this._stopped && this._closed) this._kick();
      if (!this._busy() || this._stopped) for (const w of this._idleWaiters.splice(0)) w();
    });
  }

  /** @private */
  async _deliver() {
    while (this._pending.length && !this._stopped) {
      const view = this._pending[0].view;
      let n = 0;
      while (n < this._pending.length && n < MAX_EVENTS_PER_BATCH
             && this._pending[n].view === view) n++;
      const items = this._pending.splice(0, n);
      // Frozen once formed: a retry resends these exact bytes.
      const json = this._json(view, items);
      this._inflight = { items, events: items.map((i) => i.event), json };
      this.counters.batchesSent++;
      for (let attempt = 0; ; attempt++) {
        if (this._inflight === null) return; // handed to keepalive on page hide
        this.counters.requests++;
        const r = await this.transport.sendMediaBatch(json);
        this.counters.lastStatus = r.status;
        if (this._inflight === null) return;
        const what = classify(r);
        if (what === 'ack') {
          this.counters.batchesAcked++;
          this.counters.eventsAcked += items.length;
          this.counters.eventsApplied += r.body?.applied ?? 0;
          this.counters.eventsDuplicate += r.body?.duplicates ?? 0;
          break;
        }
        if (what === 'retry') {
          this.counters.retries++;
          await new Promise((resolve) => {
            setTimeout(resolve, retryDelay(r, attempt, this._retry, this._random));
          });
          continue;
        }
        this.counters.eventsLost += items.length;
        if (what === 'ended') {
          this._stopped = true;
          this.counters.eventsLost += this._pending.length;
          this._pending = [];
        }
        this._report({ type: what === 'ended' ? 'session_ended' : 'rejected', status: r.status,
          code: r.code, message: r.message, view_id: view.id, events: items.length });
        break;
      }
      this._inflight = null;
    }
  }

  /** @private */
  _report(info) {
    try { this._onError(info); } catch { /* ignore */ }
  }

  /** @private stop listening to the element and the clock */
  _close() {
    if (this._closed) return;
    this._closed = true;
    for (const [type, fn] of Object.entries(this._handlers)) this.video.removeEventListener(type, fn);
    if (typeof removeEventListener === 'function') removeEventListener('pagehide', this._onPageHide);
    clearInterval(this._heartbeat);
    clearInterval(this._flushTimer);
    this._heartbeat = null;
  }
}
