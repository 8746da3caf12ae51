// Test page for the browser client (driven by tests/browser/test_chromium.py).
//
// Query parameters:
//   mode        `auto` (feed every frame once, play the video to its end, then end the
//               session), `manual` (feed frames in a loop until the test calls
//               `__page.finish()` or leaves the page), `modules` (only expose the modules)
//   api, token, session   the service, the session token, the session id
//   frames      URL of {"fps": 30, "frames": [[132 numbers] | null, ...]} (recorded landmarks)
//   video       URL of the exercise video
//   mediaId, flushMs, heartbeatMs, retryBaseMs, retryCapMs, maxBuffered
//   transport   `fetch` (default) or `websocket`; with `websocket`: `token2` (what
//               `getToken` gives when the stream's token expires), `wsWindow`,
//               `wsOpenFailures`
//   pauseAt, pauseMs, seekFrom, seekTo   a scripted patient: pause at `pauseAt` s for
//               `pauseMs`, later jump from `seekFrom` s to `seekTo` s
//
// State for the test: `window.__page` (state, fed, errors, result, client, tracker,
// tokenAsks: how often `getToken` was called).

import * as clientModule from '../telemetry-client.js';
import * as trackerModule from '../media-tracker.js';

const { SessionClock, TelemetryClient } = clientModule;
const { MediaTracker } = trackerModule;

const q = new URLSearchParams(location.search);
const page = {
  state: 'loading', fed: 0, errors: [], result: null, failure: null, stopFeeding: false,
  modules: { client: clientModule, tracker: trackerModule }, client: null, tracker: null,
  finish: null, tokenAsks: 0,
};
window.__page = page;

/** @param {string} name */
function num(name) {
  const v = q.get(name);
  return v === null || v === '' ? null : Number(v);
}

/** A recorded frame as the legacy MediaPipe Pose `onResults` gives it. */
function toResult(values, camera) {
  if (!values) return { poseLandmarks: undefined, image: camera };
  const poseLandmarks = [];
  for (let i = 0; i < 33; i++) {
    const o = i * 4;
    poseLandmarks.push({ x: values[o], y: values[o + 1], z: values[o + 2], visibility: values[o + 3] });
  }
  return { poseLandmarks, image: camera };
}

/**
 * Feed `frames` at 30 fps (in a loop if `loop`) until done or `page.stopFeeding`.
 * Frame `i` is stamped with its capture time, `i` periods after the start on the
 * session clock, as MediaPipe stamps a result with its video frame's time: when a busy
 * host delays this page's timers, the frames catch up late but keep their 33 ms spacing
 * instead of bunching up at the time of the late tick.
 */
function feed(client, frames, camera, loop, clock) {
  const period = 1000 / 30;
  const start = performance.now();
  const t0 = clock.ms();
  let i = 0;
  return new Promise((resolve) => {
    const more = () => !page.stopFeeding && (loop || i < frames.length);
    function tick() {
      while (more() && performance.now() >= start + i * period) {
        client.addResult(toResult(frames[i % frames.length], camera),
          { timestampMs: t0 + i * period });
        i++;
        page.fed = i;
      }
      if (!more()) { resolve(i); return; }
      setTimeout(tick, Math.max(0, start + i * period - performance.now()));
    }
    tick();
  });
}

async function main() {
  if (q.get('mode') === 'modules') { page.state = 'ready'; return; }
  const loop = q.get('mode') === 'manual';
  const data = await (await fetch(q.get('frames'))).json();
  const camera = document.getElementById('camera');
  const video = document.getElementById('video');
  const clock = new SessionClock();
  const client = new TelemetryClient({
    baseUrl: q.get('api'), token: q.get('token'), sessionId: q.get('session'), clock,
    transport: q.get('transport') ?? 'fetch',
    getToken: q.get('token2') === null ? undefined
      : async () => { page.tokenAsks++; return q.get('token2'); },
    websocket: {
      window: num('wsWindow') ?? 4, maxOpenFailures: num('wsOpenFailures') ?? 3,
    },
    imageSource: camera, maxBufferedBatches: num('maxBuffered') ?? 60,
    retry: { baseMs: num('retryBaseMs') ?? 500, capMs: num('retryCapMs') ?? 15000 },
    onError: (e) => page.errors.push({ source: 'pose', ...e }),
  });
  const tracker = new MediaTracker(video, {
    mediaId: q.get('mediaId') ?? 'test-video-01', clock, transport: client.transport,
    flushMs: num('flushMs') ?? 3000, heartbeatMs: num('heartbeatMs') ?? 10000,
    retry: { baseMs: num('retryBaseMs') ?? 500, capMs: num('retryCapMs') ?? 15000 },
    onError: (e) => page.errors.push({ source: 'media', ...e }),
  });
  client.attach(tracker);
  Object.assign(page, { client, tracker });

  // The scripted patient.
  const pauseAt = num('pauseAt');
  const seekFrom = num('seekFrom');
  let paused = false;
  let resumed = false;
  let seeked = false;
  video.addEventListener('timeupdate', () => {
    if (pauseAt !== null && !paused && video.currentTime >= pauseAt) {
      paused = true;
      video.pause();
      setTimeout(() => { resumed = true; video.play().catch(() => {}); }, num('pauseMs') ?? 1000);
    }
    if (seekFrom !== null && !seeked && (pauseAt === null || resumed)
        && video.currentTime >= seekFrom) {
      seeked = true;
      video.currentTime = num('seekTo');
    }
  });
  const videoEnded = new Promise((resolve) => video.addEventListener('ended', resolve, { once: true }));
  video.src = q.get('video');
  video.play().catch((e) => page.errors.push({ source: 'page', message: `play(): ${e}` }));

  const fed = feed(client, data.frames, camera, loop, clock);
  page.state = 'running';

  page.finish = async () => {
    page.stopFeeding = true;
    await fed;
    page.state = 'ending';
    const summary = await client.end();
    page.result = {
      summary, fed: page.fed, client: client.stats(), tracker: tracker.stats(),
      transport: client.transport.stats?.() ?? null, tokenAsks: page.tokenAsks,
      video: { duration: video.duration, width: video.videoWidth, height: video.videoHeight },
    };
    page.state = 'done';
  };
  if (!loop) {
    await Promise.all([fed, videoEnded]);
    await page.finish();
  }
}

main().catch((e) => {
  page.failure = String(e?.stack ?? e);
  page.state = 'failed';
});
