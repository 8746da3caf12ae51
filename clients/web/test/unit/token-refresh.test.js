// WebSocketTransport's POST side (media events, the end call) and token refresh: a 401
// is resent once with a fresh token, and one `getToken` call serves every request
// refused with the same token (the stream's 4401 and the media POST's 401 often come
// together when a session token expires).

import assert from 'node:assert/strict';
import test from 'node:test';

import { WebSocketTransport } from '../../telemetry-client.js';

/** A fetch that answers 401 to the expired token and 200 to any other. */
function fakeFetch(expired) {
  const seen = [];
  const fetch = async (url, init) => {
    const auth = init.headers.Authorization;
    seen.push({ path: new URL(url).pathname, auth });
    const ok = auth !== `Bearer ${expired}`;
    const body = ok ? { applied: 1 } : { error: { code: 'expired', message: 'token has expired' } };
    return new Response(JSON.stringify(body), {
      status: ok ? 200 : 401, headers: { 'Content-Type': 'application/json' },
    });
  };
  return { fetch, seen };
}

test('media events refused 401 are resent once with a fresh token', async () => {
  const { fetch, seen } = fakeFetch('old');
  let asks = 0;
  const t = new WebSocketTransport({
    baseUrl: 'http://svc', token: 'old', fetch, WebSocket: class {},
    getToken: async () => { asks++; return 'new'; },
  });
  const r = await t.sendMediaBatch('{}');
  assert.equal(r.status, 200);
  assert.equal(asks, 1);
  assert.deepEqual(seen.map((s) => s.auth), ['Bearer old', 'Bearer new']);
  // the end call now goes out with the fresh token at once
  const end = await t.endSession('s-1');
  assert.equal(end.status, 200);
  assert.equal(seen.at(-1).auth, 'Bearer new');
  assert.equal(asks, 1);
});

test('refusals of the same token share one getToken call', async () => {
  const { fetch } = fakeFetch('old');
  let asks = 0;
  let release;
  const gate = new Promise((resolve) => { release = resolve; });
  const t = new WebSocketTransport({
    baseUrl: 'http://svc', token: 'old', fetch, WebSocket: class {},
    getToken: async () => { asks++; await gate; return 'new'; },
  });
  const both = Promise.all([t.sendMediaBatch('{"a":1}'), t.sendMediaBatch('{"b":2}')]);
  await new Promise((resolve) => setTimeout(resolve, 10));
  release();
  const [a, b] = await both;
  assert.equal(a.status, 200);
  assert.equal(b.status, 200);
  assert.equal(asks, 1);
  assert.equal(t.stats().tokenRefreshes, 1);
});

test('without getToken a 401 is the answer', async () => {
  const { fetch, seen } = fakeFetch('old');
  const t = new WebSocketTransport({ baseUrl: 'http://svc', token: 'old', fetch,
    WebSocket: class {} });
  const r = await t.sendMediaBatch('{}');
  assert.equal(r.status, 401);
  assert.equal(seen.length, 1);
});
