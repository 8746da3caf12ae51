// A plain, loop-by-loop reader of pose batch version 2, written from
// docs/pose-batch-format.md for the unit tests (the service's decoder is
// domain/pose_batch_v2.py; tests/test_web_client.py runs both on this client's output).

const LANDMARKS = 33;
const CHANNELS = 4;
const SERIES = LANDMARKS * CHANNELS;
const GROUPS = 1 + CHANNELS + SERIES;
const STEPS = [5e-4, 5e-4, 5e-4, 5e-3].map((e) => 2.0 * e * (1 - 2 ** -10));

/**
 * @param {ArrayBuffer} body
 * @returns {{ version: number, space: number, seq: number, n: number, width: number,
 *   height: number, t: number[], frames: (Float32Array | null)[], q: (number[] | null)[] }}
 */
export function decodeV2(body) {
  const bytes = new Uint8Array(body);
  const view = new DataView(body);
  const head = {
    version: view.getUint8(4), space: view.getUint8(5), seq: view.getUint32(8, true),
    n: view.getUint16(12, true), width: view.getUint16(14, true), height: view.getUint16(16, true),
  };
  if (String.fromCharCode(...bytes.subarray(0, 4)) !== 'RXPB' || head.version !== 2) {
    throw new Error('not a version 2 batch');
  }
  const { n } = head;
  let pos = 20;
  const t0 = view.getUint32(pos, true);
  pos += 4;
  const nopose = Array.from({ length: n }, (_, i) => (bytes[pos + (i >> 3)] >> (i & 7)) & 1);
  pos += (n + 7) >> 3;
  const ks = Array.from({ length: GROUPS }, (_, g) => (bytes[pos + (g >> 1)] >> ((g & 1) * 4)) & 15);
  pos += (GROUPS + 1) >> 1;
  const m = nopose.filter((x) => !x).length;
  // value order: n - 1 timestamp deltas (group 0), the first pose frame's 132 values
  // (value s in group 1 + s % 4), then 132 differences per later pose frame (group 5 + s)
  const groupOf = [...Array(n - 1).fill(0)];
  for (let j = 0; j < m; j++) {
    for (let s = 0; s < SERIES; s++) groupOf.push(j ? 1 + CHANNELS + s : 1 + (s % CHANNELS));
  }
  const rbits = groupOf.reduce((a, g) => a + ks[g], 0);
  let rpos = pos * 8;
  let upos = (pos + ((rbits + 7) >> 3)) * 8;
  const bit = (p) => (bytes[p >> 3] >> (p & 7)) & 1;
  const values = groupOf.map((g) => {
    let r = 0;
    for (let i = 0; i < ks[g]; i++) r += bit(rpos++) * 2 ** i;
    let h = 0;
    while (!bit(upos)) {
      h++;
      upos++;
      if (upos >= bytes.length * 8) throw new Error('truncated');
    }
    upos++;
    return h * 2 ** ks[g] + r;
  });
  if (((upos + 7) >> 3) !== bytes.length) throw new Error('trailing bytes');
  const unzz = (z) => (z % 2 ? -(z + 1) / 2 : z / 2);
  const t = [t0];
  for (const d of values.slice(0, n - 1)) t.push(t[t.length - 1] + d + 1);
  /** @type {number[][]} */ const q = [];
  for (let j = 0; j < m; j++) {
    const row = values.slice(n - 1 + j * SERIES, n - 1 + (j + 1) * SERIES).map(unzz);
    q.push(j ? row.map((d, s) => q[j - 1][s] + d) : row);
  }
  let j = 0;
  const frames = [];
  const qs = [];
  for (let i = 0; i < n; i++) {
    if (nopose[i]) { frames.push(null); qs.push(null); continue; }
    qs.push(q[j]);
    frames.push(Float32Array.from(q[j++], (v, s) => v * STEPS[s % CHANNELS]));
  }
  return { ...head, t, frames, q: qs };
}
