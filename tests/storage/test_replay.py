"""Replay blob format: round trips on real MediaPipe data, error bounds, failures."""

from __future__ import annotations

import gzip
import json
import struct
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from storage.replay import (
    DEFAULT_ENCODING,
    ENCODINGS,
    FORMAT_VERSION,
    LOSSLESS,
    MAGIC,
    MAX_CHUNK_FRAMES,
    STRATEGIES,
    ReplayFormatError,
    ReplayWriter,
    read_replay,
)
from tests.data import PUSHUP

# real MediaPipe recordings kept in the repository (tests/data/pose/pushup/SOURCE.md)
DATA = PUSHUP
L, C = 33, 4


def _load(key: str, limit: int | None = None) -> np.ndarray:
    files = sorted(DATA.glob("*.npz"))[:limit]
    assert files, f"no pose recordings under {DATA}"
    return np.concatenate([np.load(f)[key] for f in files])


@pytest.fixture(scope="module")
def real() -> dict[str, np.ndarray]:
    """All the in-repo recordings (about 1,900 frames), image and world space, with
    browser-like timestamps."""
    image, world = _load("landmarks"), _load("world")
    n = len(image)
    rng = np.random.default_rng(1)
    t = np.round(5000.0 + np.arange(n) * 1000 / 30 + rng.uniform(-2, 2, n), 1)
    nan_rows = np.isnan(image).all(axis=(1, 2))
    assert nan_rows.sum() > 0, "the test data is expected to contain no-pose (NaN) frames"
    return {"image": image, "world": world, "t": t}


def _write(t: np.ndarray, frames: np.ndarray, batch: int = 30, **kw: object) -> bytes:
    w = ReplayWriter(org_id="org1", session_id="sess1", space="image", **kw)  # type: ignore[arg-type]
    for s in range(0, len(t), batch):
        w.append(t[s : s + batch], frames[s : s + batch])
    return w.finish()


def _check_bound(orig: np.ndarray, dec: np.ndarray, max_error: list[float]) -> np.ndarray:
    """Finite values within the per-channel bound, non-finite bit-exact; returns max err."""
    fin = np.isfinite(orig)
    nonfin = ~fin
    assert np.array_equal(orig[nonfin].view(np.uint32), dec[nonfin].view(np.uint32))
    assert np.isfinite(dec[fin]).all()
    err = np.zeros(orig.shape, np.float64)
    err[fin] = np.abs(dec[fin].astype(np.float64) - orig[fin].astype(np.float64))
    per_channel = err.reshape(-1, orig.shape[-1]).max(axis=0, initial=0.0)
    assert (per_channel <= np.asarray(max_error)).all(), (per_channel, max_error)
    return per_channel


# ------------------------------------------------------------------ round trips
@pytest.mark.parametrize("space", ["image", "world"])
@pytest.mark.parametrize("encoding", sorted(LOSSLESS))
def test_lossless_encodings_are_bit_exact_on_real_data(
    real: dict[str, np.ndarray], space: str, encoding: str
) -> None:
    frames, t = real[space], real["t"]
    r = read_replay(_write(t, frames, encoding=encoding))
    assert r.frames.dtype == np.float32 and r.frames.shape == frames.shape
    assert np.array_equal(r.frames.view(np.uint32), frames.view(np.uint32))
    assert r.t_ms.dtype == np.float64 and np.array_equal(r.t_ms, t)
    assert r.header.max_error is None


@pytest.mark.parametrize("space", ["image", "world"])
def test_q16delta_error_bound_holds_on_real_data(real: dict[str, np.ndarray], space: str) -> None:
    frames, t = real[space], real["t"]
    r = read_replay(_write(t, frames, encoding="q16delta"))
    bound = r.header.max_error
    assert bound == [5e-4, 5e-4, 5e-4, 5e-3]
    per_channel = _check_bound(frames, r.frames, bound)
    # the bound is used, not just met by accident of a much finer step
    assert (per_channel > 0.9 * np.asarray(bound)).all(), per_channel
    nan_rows = np.isnan(frames).all(axis=(1, 2))
    assert np.isnan(r.frames[nan_rows]).all()
    assert not np.isnan(r.frames[~nan_rows]).any()
    assert np.array_equal(r.t_ms, t)


@pytest.mark.parametrize("max_error", [1e-4, 1e-3, [2e-4, 3e-4, 1e-3, 1e-2]])
def test_q16delta_custom_bounds(real: dict[str, np.ndarray], max_error: object) -> None:
    frames, t = real["world"][:3000], real["t"][:3000]
    r = read_replay(_write(t, frames, encoding="q16delta", max_error=max_error))
    want = [max_error] * 4 if isinstance(max_error, float) else max_error
    assert r.header.max_error == want
    _check_bound(frames, r.frames, want)  # type: ignore[arg-type]


def test_coarser_bound_gives_smaller_blob(real: dict[str, np.ndarray]) -> None:
    frames, t = real["image"], real["t"]
    sizes = [len(_write(t, frames, encoding="q16delta", max_error=e)) for e in (1e-4, 1e-3)]
    lossless = len(_write(t, frames, encoding="f32"))
    assert sizes[1] < sizes[0] < lossless


def test_out_of_range_and_special_values_survive_q16delta() -> None:
    rng = np.random.default_rng(7)
    n = 200
    frames = rng.uniform(-0.5, 1.5, (n, L, C)).astype(np.float32)
    payload_nan = np.array([0x7FC01234], dtype=np.uint32).view(np.float32)[0]
    specials = {
        (3, 0, 0): np.inf,
        (3, 0, 1): -np.inf,
        (4, 5, 2): np.nan,  # partial NaN row
        (5, 6, 1): payload_nan,  # NaN with a payload keeps its bits
        (6, 7, 0): 3.0e38,
        (7, 7, 0): -1.0e12,
        (8, 1, 1): 1.0e-42,  # subnormal
        (9, 1, 1): -0.0,
        (10, 2, 2): 5.0e6,  # beyond 2**30 steps of 1e-3: escape to float32
        (11, 2, 2): 900.0,  # large but quantisable
    }
    for idx, v in specials.items():
        frames[idx] = v
    frames[20:25] = np.nan  # no-pose frames
    frames[199] = np.nan  # the last frame of a chunk
    t = np.arange(n, dtype=np.float64) * 33.3
    for batch in (1, 30, 64):
        r = read_replay(_write(t, frames, batch=batch, encoding="q16delta"))
        _check_bound(frames, r.frames, [5e-4, 5e-4, 5e-4, 5e-3])
        assert r.frames[7, 7, 0] == np.float32(-1.0e12)
        assert r.frames[10, 2, 2] == np.float32(5.0e6)
        assert np.isnan(r.frames[20:25]).all() and np.isnan(r.frames[199]).all()


def test_all_nan_session_and_empty_session() -> None:
    t = np.arange(90, dtype=np.float64)
    frames = np.full((90, L, C), np.nan, np.float32)
    for enc in ENCODINGS:
        r = read_replay(_write(t, frames, encoding=enc))
        assert r.frames.shape == (90, L, C) and np.isnan(r.frames).all()
        empty = ReplayWriter(org_id="o", session_id="s", space="world", encoding=enc).finish()
        e = read_replay(empty)
        assert e.header.frame_count == 0
        assert e.frames.shape == (0, L, C) and e.t_ms.shape == (0,)


def test_uint32_timestamps_and_float64_frames_are_accepted(real: dict[str, np.ndarray]) -> None:
    t = (np.arange(100) * 33 + 4_000_000_000).astype(np.uint32)
    frames = real["image"][:100].astype(np.float64)
    r = read_replay(_write(t, frames, encoding="f32delta"))
    assert np.array_equal(r.t_ms, t.astype(np.float64))
    assert np.array_equal(r.frames, frames.astype(np.float32), equal_nan=True)


def test_large_append_is_split_into_chunks(real: dict[str, np.ndarray]) -> None:
    # 2500 frames (the recordings looped): more than two whole chunks in one append
    n = 2500
    frames = real["world"][np.arange(n) % len(real["world"])]
    t = np.round(5000.0 + np.arange(n) * 1000 / 30, 1)
    for enc in ENCODINGS:
        blob = _write(t, frames, batch=2500, encoding=enc)
        raw = gzip.decompress(blob)
        assert raw.count(b"C" + struct.pack("<I", MAX_CHUNK_FRAMES)) >= 2
        r = read_replay(blob)
        assert r.frames.shape == frames.shape


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    n=st.integers(0, 70),
    landmarks=st.integers(1, 4),
    channels=st.integers(1, 5),
    encoding=st.sampled_from(ENCODINGS),
)
def test_property_any_floats_any_batching(
    data: st.DataObject, n: int, landmarks: int, channels: int, encoding: str
) -> None:
    bits = data.draw(hnp.arrays(np.uint32, (n, landmarks, channels)), label="frame bits")
    frames = bits.view(np.float32)  # every float32 pattern: NaN payloads, inf, subnormals
    nan_rows = data.draw(hnp.arrays(np.bool_, n), label="no-pose rows")
    frames[nan_rows] = np.nan
    t = data.draw(hnp.arrays(np.float64, n, elements=st.floats(allow_nan=False)), label="t")
    cuts = sorted(data.draw(st.lists(st.integers(0, n), max_size=5), label="cuts"))
    kw: dict[str, object] = {}
    if encoding == "q16delta":
        kw["max_error"] = data.draw(st.floats(1e-6, 10.0), label="max_error")
    w = ReplayWriter(
        org_id="o",
        session_id="s",
        space="world",
        encoding=encoding,
        landmarks=landmarks,
        channels=channels,
        **kw,  # type: ignore[arg-type]
    )
    for a, b in zip([0, *cuts], [*cuts, n], strict=True):
        w.append(t[a:b], frames[a:b])
    r = read_replay(w.finish())
    assert r.header.frame_count == n and r.frames.shape == frames.shape
    assert np.array_equal(r.t_ms.view(np.uint64), t.view(np.uint64))
    if encoding in LOSSLESS:
        assert np.array_equal(r.frames.view(np.uint32), frames.view(np.uint32))
    else:
        _check_bound(frames, r.frames, [kw["max_error"]] * channels)  # type: ignore[list-item]


# ------------------------------------------------------------------ header & container
def test_header_fields_and_meta() -> None:
    meta = {"exercise": {"id": "pushup", "reps": 3}, "image_width": 640, "image_height": 480}
    w = ReplayWriter(org_id="org-9", session_id="s-42", space="world", meta=meta)
    w.append(np.array([1.0, 2.0]), np.zeros((2, L, C), np.float32))
    h = read_replay(w.finish()).header
    assert (h.version, h.org_id, h.session_id, h.space) == (
        FORMAT_VERSION,
        "org-9",
        "s-42",
        "world",
    )
    assert (h.landmarks, h.channels, h.frame_count) == (L, C, 2)
    assert h.encoding == DEFAULT_ENCODING == "q16delta"
    assert h.meta == meta
    assert h.encoding_params["max_error"] == [5e-4, 5e-4, 5e-4, 5e-3]


def test_layout_matches_the_documented_bytes() -> None:
    """Parse an f32 blob by hand, following docs/replay-format.md."""
    t = np.array([10.0, 43.5, 77.25])
    frames = np.arange(3 * L * C, dtype=np.float32).reshape(3, L, C)
    w = ReplayWriter(org_id="o", session_id="s", space="image", encoding="f32")
    w.append(t[:2], frames[:2])
    w.append(t[2:], frames[2:])
    blob = w.finish()
    d = zlib.decompressobj(31)
    head = d.decompress(blob)
    assert d.eof  # the header section is its own gzip member ...
    body = zlib.decompress(d.unused_data, 31)  # ... and the body the second
    magic, version, hlen = struct.unpack_from("<8sHI", head)
    assert (magic, version) == (MAGIC, 1) and len(head) == 14 + hlen
    assert json.loads(head[14:])["frame_count"] == 3
    pos = 0
    got_t, got_f = [], []
    for n in (2, 1):
        tag, cn, plen = struct.unpack_from("<cII", body, pos)
        assert (tag, cn, plen) == (b"C", n, n * 8 + n * L * C * 4)
        pos += 9
        got_t.append(np.frombuffer(body, "<f8", n, pos))
        got_f.append(np.frombuffer(body, "<f4", n * L * C, pos + 8 * n))
        pos += plen
    assert struct.unpack_from("<cI", body, pos) == (b"E", 3) and pos + 5 == len(body)
    assert np.array_equal(np.concatenate(got_t), t)
    assert np.array_equal(np.concatenate(got_f), frames.ravel())


def test_blob_is_plain_gzip_and_regzipped_blob_still_reads(real: dict[str, np.ndarray]) -> None:
    blob = _write(real["t"][:300], real["image"][:300])
    raw = gzip.decompress(blob)
    assert raw.startswith(MAGIC)
    r = read_replay(gzip.compress(raw, mtime=0))  # one member instead of two
    assert r.frames.shape == (300, L, C)
    assert _write(real["t"][:300], real["image"][:300]) == blob  # deterministic


def test_incremental_writer_holds_only_compressed_bytes(real: dict[str, np.ndarray]) -> None:
    frames, t = real["image"], real["t"]
    reps = -(-25_000 // len(t))  # the recordings looped: ~14 minutes of frames, 13 MB raw
    w = ReplayWriter(org_id="o", session_id="s", space="image")
    sizes = []
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for _ in range(reps):
            for s in range(0, len(t), 30):
                w.append(t[s : s + 30], frames[s : s + 30])
            sizes.append(w.nbytes)
        held = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    raw = reps * len(t) * (8 + L * C * 4)
    assert w.raw_nbytes == raw and w.frame_count == reps * len(t)
    assert sizes[0] < sizes[1] < sizes[2]  # grows as batches arrive
    assert w.nbytes < raw / 4
    assert held < w.nbytes + 1_000_000, (held, w.nbytes)
    blob = w.finish()
    assert w.nbytes == len(blob) and w.finished


def test_finish_is_final_and_idempotent() -> None:
    w = ReplayWriter(org_id="o", session_id="s", space="image")
    w.append(np.zeros(1), np.zeros((1, L, C), np.float32))
    blob = w.finish()
    assert w.finish() is blob
    with pytest.raises(RuntimeError):
        w.append(np.zeros(1), np.zeros((1, L, C), np.float32))


def test_bad_appends_are_rejected_without_damage() -> None:
    w = ReplayWriter(org_id="o", session_id="s", space="image", encoding="f32delta")
    good_t, good_f = np.array([1.0, 2.0]), np.ones((2, L, C), np.float32)
    w.append(good_t, good_f)
    with pytest.raises(ValueError):
        w.append(np.zeros(3), np.zeros((2, L, C), np.float32))
    with pytest.raises(ValueError):
        w.append(np.zeros(2), np.zeros((2, L, 3), np.float32))
    with pytest.raises(TypeError):
        w.append(np.zeros(2), np.full((2, L, C), "x"))
    w.append(good_t + 2, good_f * 2)
    r = read_replay(w.finish())
    assert np.array_equal(r.t_ms, [1, 2, 3, 4])
    assert np.array_equal(r.frames, np.concatenate([good_f, good_f * 2]))


@pytest.mark.parametrize(
    "kw",
    [
        {"space": "camera"},
        {"encoding": "zstd"},
        {"encoding": "f32", "max_error": 1e-3},
        {"max_error": 0.0},
        {"max_error": [1e-3, 1e-3]},
        {"max_error": float("nan")},
        {"meta": {"x": float("nan")}},
        {"meta": {"x": object()}},
        {"level": 10},
        {"strategy": 99},
        {"strategy": True},
        {"org_id": ""},
    ],
)
def test_writer_rejects_bad_configuration(kw: dict[str, object]) -> None:
    args: dict[str, object] = {"org_id": "o", "session_id": "s", "space": "image", **kw}
    with pytest.raises((ValueError, TypeError)):
        ReplayWriter(**args)  # type: ignore[arg-type]


# ------------------------------------------------------------------ corrupt input
@pytest.fixture(scope="module")
def small_blob(real: dict[str, np.ndarray]) -> bytes:
    return _write(real["t"][:120], real["world"][:120], encoding="q16delta")


def test_every_truncation_is_detected(small_blob: bytes) -> None:
    for cut in range(len(small_blob)):
        with pytest.raises(ReplayFormatError):
            read_replay(small_blob[:cut])


def test_truncation_message_is_precise(small_blob: bytes) -> None:
    with pytest.raises(ReplayFormatError, match="empty blob"):
        read_replay(b"")
    with pytest.raises(ReplayFormatError, match="truncated blob: gzip member 2"):
        read_replay(small_blob[:-3])


def test_bit_flips_are_detected(small_blob: bytes) -> None:
    rng = np.random.default_rng(3)
    for pos in rng.choice(len(small_blob), 200, replace=False):
        bad = bytearray(small_blob)
        bad[pos] ^= 1 << int(rng.integers(8))
        try:
            r = read_replay(bytes(bad))
        except ReplayFormatError:
            continue
        # a flip in gzip header fields that no checksum covers (mtime, OS, XFL)
        # may be harmless; then the content must be unchanged
        assert np.array_equal(r.frames, read_replay(small_blob).frames, equal_nan=True)


def _rebuild(raw: bytes) -> bytes:
    return gzip.compress(raw, mtime=0)


def test_unsupported_version_and_bad_magic(small_blob: bytes) -> None:
    raw = bytearray(gzip.decompress(small_blob))
    v2 = bytearray(raw)
    struct.pack_into("<H", v2, 8, 2)
    with pytest.raises(ReplayFormatError, match="unsupported replay format version 2"):
        read_replay(_rebuild(bytes(v2)))
    with pytest.raises(ReplayFormatError, match="bad magic"):
        read_replay(_rebuild(b"XXREPLAY" + bytes(raw[8:])))
    with pytest.raises(ReplayFormatError, match="not a gzip stream"):
        read_replay(bytes(raw))
    with pytest.raises(ReplayFormatError, match="garbage after gzip member 2"):
        read_replay(small_blob + b"junk")


def _edit_header(blob: bytes, **changes: object) -> bytes:
    raw = gzip.decompress(blob)
    _, version, hlen = struct.unpack_from("<8sHI", raw)
    h = json.loads(raw[14 : 14 + hlen])
    h.update(changes)
    hj = json.dumps(h).encode()
    return _rebuild(struct.pack("<8sHI", MAGIC, version, len(hj)) + hj + raw[14 + hlen :])


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"frame_count": 121}, "frame count mismatch"),
        ({"encoding": "lz4"}, "unknown encoding"),
        ({"landmarks": "33"}, "landmarks"),
        ({"encoding_params": {"max_error": [1, 1, 1, 1]}}, "step"),
        ({"version": 3}, "header JSON version"),
        ({"encoding": "f32"}, "f32 chunk"),
        ({"channels": 3}, "q16delta header needs 3"),
    ],
)
def test_inconsistent_headers_are_rejected(small_blob: bytes, changes: dict, message: str) -> None:
    with pytest.raises(ReplayFormatError, match=message):
        read_replay(_edit_header(small_blob, **changes))


def test_body_damage_is_reported_with_position(small_blob: bytes) -> None:
    raw = gzip.decompress(small_blob)
    hlen = struct.unpack_from("<I", raw, 10)[0]
    body_at = 14 + hlen
    with pytest.raises(ReplayFormatError, match=f"unknown record tag b'Z' at byte {body_at}"):
        read_replay(_rebuild(raw[:body_at] + b"Z" + raw[body_at + 1 :]))
    with pytest.raises(ReplayFormatError, match="without an end record"):
        read_replay(_rebuild(raw[:-5]))
    with pytest.raises(ReplayFormatError, match="stray bytes"):
        read_replay(_rebuild(raw + b"\0"))


def test_decompression_limit(small_blob: bytes) -> None:
    with pytest.raises(ReplayFormatError, match="exceeds limit"):
        read_replay(small_blob, max_decompressed=1000)
    assert read_replay(small_blob, max_decompressed=10_000_000).header.frame_count == 120


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_append_returns_exactly_what_the_reader_decodes(encoding: str) -> None:
    rng = np.random.default_rng(3)
    w = ReplayWriter(org_id="o", session_id="s", space="image", encoding=encoding)
    returned = []
    for k in range(4):
        f = rng.uniform(-0.2, 1.2, size=(30, 33, 4)).astype(np.float32)
        f[5] = np.nan
        f[7, 3, 0] = 5e6  # out of the quantiser's range: kept verbatim
        returned.append(w.append(np.arange(30, dtype=np.float64) + 30 * k, f))
    decoded = read_replay(w.finish()).frames
    np.testing.assert_array_equal(np.concatenate(returned), decoded)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_append_returns_the_decoded_bit_patterns(encoding: str) -> None:
    """Bit for bit, not just equal as numbers: -0.0, NaN payloads, exceptions,
    values that quantise to -0 (decoded as +0.0), appends split into chunks."""
    rng = np.random.default_rng(11)
    w = ReplayWriter(org_id="o", session_id="s", space="world", encoding=encoding)
    returned = []
    for k, n in enumerate((30, 1, 29, MAX_CHUNK_FRAMES + 7, 30)):
        f = rng.normal(0, 0.3, size=(n, L, C)).astype(np.float32)
        f[:, 0, 0] = -1e-5  # rint(x / step) == -0.0
        f[:, 0, 1] = -0.0
        f[0, 2, 2] = np.array([0x7FC01234], np.uint32).view(np.float32)[0]
        f[-1, 3, 3] = 5e6 if encoding == "q16delta" else f[-1, 3, 3]
        f[n // 2] = np.nan
        t = np.arange(n, dtype=np.float64) + 10_000.0 * k
        returned.append(w.append(t, f))
        assert returned[-1].dtype == np.float32 and returned[-1].shape == (n, L, C)
    decoded = read_replay(w.finish()).frames
    assert np.array_equal(np.concatenate(returned).view(np.uint32), decoded.view(np.uint32))


def test_quantiser_range_edge_keeps_deltas_within_32_bits() -> None:
    """q = -2**30 then +2**30 would be a delta of 2**31, whose zig-zag code does not
    fit the 32-bit width: such values are exceptions, stored verbatim."""
    w = ReplayWriter(org_id="o", session_id="s", space="world", max_error=1e3)
    step = w._codec._step_s[0]  # noqa: SLF001
    f = np.zeros((4, L, C), np.float32)
    f[:, 0, 0] = [-(2**30) * step, 2**30 * step, -(2**30 - 1) * step, (2**30 - 1) * step]
    returned = w.append(np.arange(4.0), f)
    decoded = read_replay(w.finish()).frames
    assert np.array_equal(returned.view(np.uint32), decoded.view(np.uint32))
    _check_bound(f, decoded, [1e3] * C)


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_every_zlib_strategy_gives_the_same_replay(
    real: dict[str, np.ndarray], strategy: str
) -> None:
    frames, t = real["image"][:600], real["t"][:600]
    reference = read_replay(_write(t, frames, strategy=zlib.Z_DEFAULT_STRATEGY))
    blob = _write(t, frames, strategy=STRATEGIES[strategy])
    assert blob == _write(t, frames, strategy=STRATEGIES[strategy])  # deterministic
    assert gzip.decompress(blob)  # plain gzip whatever the strategy
    r = read_replay(blob)
    assert np.array_equal(r.frames.view(np.uint32), reference.frames.view(np.uint32))
    assert np.array_equal(r.t_ms, reference.t_ms)


def test_spill_keeps_memory_bounded_and_the_blob_identical(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    kw = dict(org_id="o", session_id="s", space="image", encoding="f32")
    spilled = ReplayWriter(**kw, spill_path=tmp_path / "s.part")
    in_memory = ReplayWriter(**kw)
    for k in range(60):
        f = rng.uniform(0, 1, size=(30, 33, 4)).astype(np.float32)
        t = np.arange(30, dtype=np.float64) + 30 * k
        spilled.append(t, f)
        in_memory.append(t, f)
        assert spilled.memory_nbytes < 64 * 1024 + 32 * 1024
    assert in_memory.memory_nbytes > 500_000  # f32 noise barely compresses
    assert (tmp_path / "s.part").stat().st_size > 400_000
    assert spilled.finish() == in_memory.finish()
