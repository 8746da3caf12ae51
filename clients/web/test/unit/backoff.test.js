// The retry policy: what an answer means (classify), how long to wait (backoffDelay,
// retryDelay, parseRetryAfter), and FetchTransport turning a real HTTP answer into a
// TransportResult.

import assert from 'node:assert/strict';
import { createServer } from 'node:http';
import test from 'node:test';

import {
  CONTENT_TYPE, DEFAULT_RETRY, FetchTransport, backoffDelay, classify, parseRetryAfter,
  retryDelay,
} from '../../telemetry-client.js';

/** A TransportResult. */
const R = (status, extra = {}) => ({ status, code: null, message: null, retryAfterMs: null,
  body: null, ...extra });
const almostOne = () => 1 - 2 ** -40;

test('backoff: full jitter below min(cap, base * 2^attempt)', () => {
  assert.deepEqual(DEFAULT_RETRY, { baseMs: 500, capMs: 15000, maxRetryAfterMs: 60000 });
  const ceilings = [500, 1000, 2000, 4000, 8000, 15000, 15000];
  ceilings.forEach((ceiling, attempt) => {
    assert.equal(backoffDelay(attempt, {}, () => 0), 0);
    const top = backoffDelay(attempt, {}, almostOne);
    assert.ok(top < ceiling && top > ceiling - 1e-6, `attempt ${attempt}: ${top} vs ${ceiling}`);
    assert.equal(backoffDelay(attempt, {}, () => 0.5), ceiling / 2);
  });
  // a huge attempt count stays finite at the cap
  assert.equal(backoffDelay(10_000, {}, () => 0.5), 7500);
  assert.equal(backoffDelay(3, { baseMs: 10, capMs: 50 }, () => 0.5), 25);
});

test('Retry-After: delta seconds or an HTTP date', () => {
  const now = Date.parse('2025-01-01T00:00:00Z');
  assert.equal(parseRetryAfter('5', now), 5000);
  assert.equal(parseRetryAfter(' 0 ', now), 0);
  assert.equal(parseRetryAfter('Wed, 01 Jan 2025 00:00:30 GMT', now), 30000);
  assert.equal(parseRetryAfter('Tue, 31 Dec 2024 23:59:00 GMT', now), 0, 'a past date: now');
  assert.equal(parseRetryAfter('soon', now), null);
  assert.equal(parseRetryAfter(null, now), null);
  assert.equal(parseRetryAfter(undefined, now), null);
});

test('classify: the table of the README', () => {
  const table = [
    [R(202), 'ack'], [R(202, { body: { duplicate: true } }), 'ack'],
    [R(0), 'retry'], [R(408), 'retry'], [R(429), 'retry'], [R(500), 'retry'], [R(502), 'retry'],
    [R(503, { code: 'storage_unavailable' }), 'retry'],
    [R(409, { code: 'sequence_skipped' }), 'drop'], [R(409, { code: 'other' }), 'drop'],
    [R(409, { code: 'session_ended' }), 'ended'], [R(409, { code: 'finished' }), 'ended'],
    [R(400, { code: 'nan_values' }), 'final'], [R(401), 'final'], [R(403), 'final'],
    [R(413), 'final'], [R(415), 'final'],
  ];
  for (const [r, want] of table) assert.equal(classify(r), want, `${r.status} ${r.code}`);
});

test('retryDelay: Retry-After (429/503) plus up to 10 % jitter, capped; else backoff', () => {
  for (const status of [429, 503]) {
    const r = R(status, { retryAfterMs: 2000 });
    assert.equal(retryDelay(r, 4, {}, () => 0), 2000);
    assert.equal(retryDelay(r, 4, {}, () => 0.5), 2100);
    const top = retryDelay(r, 4, {}, almostOne);
    assert.ok(top < 2200 && top > 2199.99, String(top));
  }
  assert.equal(retryDelay(R(503, { retryAfterMs: 3_600_000 }), 0, {}, () => 0), 60000);
  assert.equal(retryDelay(R(503, { retryAfterMs: 90_000 }), 0, { maxRetryAfterMs: 5000 },
    () => 0), 5000);
  // Retry-After only counts on 429/503; without it they back off like any retry
  assert.equal(retryDelay(R(500, { retryAfterMs: 2000 }), 2, {}, () => 0.5), 1000);
  assert.equal(retryDelay(R(503), 2, {}, () => 0.5), 1000);
  assert.equal(retryDelay(R(0), 0, { baseMs: 100 }, () => 0.5), 50);
});

/** A loopback HTTP server answering each request with `answer(req, body)`. */
async function serve(t, answer) {
  const seen = [];
  const server = createServer((req, res) => {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => {
      const body = Buffer.concat(chunks);
      seen.push({ method: req.method, url: req.url, headers: req.headers, body });
      const [status, headers, text] = answer(req, body);
      res.writeHead(status, headers).end(text);
    });
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  t.after(() => new Promise((resolve) => server.close(resolve)));
  return { seen, url: `http://127.0.0.1:${server.address().port}/` };
}

test('FetchTransport: a real 503 with Retry-After and an error body', async (t) => {
  const { seen, url } = await serve(t, () => [503, {
    'Content-Type': 'application/json', 'Retry-After': '3',
  }, JSON.stringify({ error: { code: 'storage_unavailable', message: 'try later' } })]);
  const transport = new FetchTransport({ baseUrl: url, token: 'tok-1' });
  const body = new Uint8Array([1, 2, 3]).buffer;
  const r = await transport.sendPoseBatch(body);
  assert.deepEqual(r, { status: 503, code: 'storage_unavailable', message: 'try later',
    retryAfterMs: 3000, body: { error: { code: 'storage_unavailable', message: 'try later' } } });
  assert.equal(classify(r), 'retry');
  assert.equal(seen[0].method, 'POST');
  assert.equal(seen[0].url, '/v1/pose/frames');
  assert.equal(seen[0].headers.authorization, 'Bearer tok-1');
  assert.equal(seen[0].headers['content-type'], CONTENT_TYPE);
  assert.deepEqual([...seen[0].body], [1, 2, 3]);

  transport.setToken('tok-2');
  const end = await transport.endSession('s/1');
  assert.equal(end.status, 503);
  assert.equal(seen[1].url, '/v1/sessions/s%2F1/end');
  assert.equal(seen[1].headers.authorization, 'Bearer tok-2');
});

test('FetchTransport: no answer is status 0 (refused connection, timeout)', async (t) => {
  const { url } = await serve(t, () => [202, {}, '']);
  const refused = new FetchTransport({ baseUrl: 'http://127.0.0.1:1', token: 't' });
  const r = await refused.sendMediaBatch('{}');
  assert.equal(r.status, 0);
  assert.equal(classify(r), 'retry');
  assert.ok(r.error, 'the failure is kept');
  // an aborted signal is no answer either
  const ctrl = new AbortController();
  ctrl.abort();
  const aborted = await new FetchTransport({ baseUrl: url, token: 't' })
    .sendMediaBatch('{}', { signal: ctrl.signal });
  assert.equal(aborted.status, 0);
});
