"""Version 2 of the pose batch (``domain/pose_batch_v2.py``): round trips on real clips,
the error bound, live metrics equal to v1's, every fault named, and fuzzing that
decoding never raises anything but :class:`BatchError`."""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actors.pose_stats import PoseStats
from actors.reps import RepEngine
from domain import pose_batch_v2 as v2
from domain.pose_batch import (
    HEADER,
    BatchError,
    PoseBatch,
    decode_batch,
    encode_batch,
    encode_batch_v2,
)
from storage.replay import ReplayWriter
from storage.replay_codec import default_max_error, steps_for
from tests.data import LOWER_BODY, PUSHUP
from tests.support.payloads import pose_frames

CLIPS = sorted(PUSHUP.glob("*.npz")) + sorted(LOWER_BODY.glob("*.npz"))


def _batches(path: Path, key: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    d = np.load(path)
    t = np.rint(d["t_ms"]).astype(np.int64)
    for s in range(0, len(t), 30):
        yield t[s:s + 30], d[key][s:s + 30]


def _v2(t: np.ndarray, f: np.ndarray, seq: int = 0, space: str = "image") -> bytes:
    return encode_batch_v2(seq, t, f, space=space, image_width=640, image_height=480)


def test_grid_is_the_replay_codecs() -> None:
    for space in ("image", "world"):
        assert list(v2.MAX_ERROR) == default_max_error(space, 4)
        assert list(v2.STEPS) == steps_for(default_max_error(space, 4))


@pytest.mark.parametrize("key", ["landmarks", "world"])
def test_real_clips_round_trip_within_the_bound(key: str) -> None:
    sizes = []
    for path in CLIPS:
        for t, f in _batches(path, key):
            body = _v2(t, f, space="image" if key == "landmarks" else "world")
            sizes.append(len(body))
            a = decode_batch(encode_batch(0, t, f), max_frames=120)
            b = decode_batch(body, max_frames=120)
            assert b.t_ms.dtype == a.t_ms.dtype and b.frames.dtype == a.frames.dtype
            assert b.frames.shape == a.frames.shape
            np.testing.assert_array_equal(b.t_ms, a.t_ms)
            nan = np.isnan(a.frames).all(axis=(1, 2))
            assert (np.isnan(b.frames).all(axis=(1, 2)) == nan).all()
            assert not np.isnan(b.frames[~nan]).any()
            err = np.abs(b.frames[~nan].astype(np.float64) - a.frames[~nan])
            assert err[..., :3].max(initial=0) <= 5e-4
            assert err[..., 3].max(initial=0) <= 5e-3
            np.testing.assert_array_equal(b.frames, v2.dequantise(v2.quantise(f)).reshape(
                f.shape))
    # a 30-frame v1 batch is 15,980 bytes
    assert np.mean(sizes) < 2600, np.mean(sizes)


def _live(bodies: list[bytes], space: str) -> tuple[bytes, dict, dict, list[np.ndarray]]:
    """What the session actor computes from these batches (actors/session.py _apply)."""
    writer = ReplayWriter(org_id="o", session_id="s", space=space)
    engine = RepEngine("push_up", space=space, aspect=1.0)
    stats = PoseStats()
    seen = []
    for body in bodies:
        batch = decode_batch(body, max_frames=120)
        frames = writer.append(batch.t_ms, batch.frames)
        stats.add(batch.t_ms, frames)
        engine.feed(batch.t_ms, frames)
        seen.append(frames)
    engine.finish()
    return writer.finish(), engine.summary(), stats.to_dict(), seen


@pytest.mark.parametrize(("name", "key"), [("correct108", "landmarks"), ("wrong20", "world"),
                                           ("correct5", "landmarks")])
def test_live_metrics_are_bit_identical_to_v1(name: str, key: str) -> None:
    space = "image" if key == "landmarks" else "world"
    batches = list(_batches(PUSHUP / f"{name}.npz", key))
    one = _live([encode_batch(i, t, f, space=space) for i, (t, f) in enumerate(batches)], space)
    two = _live([_v2(t, f, i, space) for i, (t, f) in enumerate(batches)], space)
    assert one[0] == two[0]  # the replay blob, byte for byte
    assert one[1] == two[1] and one[1]["rep_count"] > 0  # the rep engine's summary
    assert one[2] == two[2]
    for a, b in zip(one[3], two[3], strict=True):
        assert a.tobytes() == b.tobytes()  # the frames the engines saw, bit for bit


def test_no_pose_frames_and_single_frames() -> None:
    t, f = pose_frames(5, t0=2**32 - 200)
    f[[0, 3]] = np.nan
    b = decode_batch(_v2(t, f), max_frames=120)
    assert np.isnan(b.frames[[0, 3]]).all() and not np.isnan(b.frames[[1, 2, 4]]).any()
    for rows in ([0], [0, 1, 2, 3, 4]):
        g = f.copy()
        g[rows] = np.nan
        b = decode_batch(_v2(t, g), max_frames=120)
        assert np.isnan(b.frames[rows]).all()
    b = decode_batch(_v2(t[:1], f[1:2]), max_frames=120)
    assert b.n == 1 and b.first_t == int(t[0])


@pytest.mark.parametrize("bad", [
    lambda t, f: (t[::-1], f),  # not increasing
    lambda t, f: (t, _set(f, (1, 2, 0), np.nan)),  # partly NaN
    lambda t, f: (t, _set(f, (1, 2, 0), 9000.0)),  # beyond v2's range (v1 takes it)
    lambda t, f: (t, _set(f, (1, 2, 3), 1.2)),  # visibility above 1
])
def test_encoder_refuses_what_v2_cannot_carry(bad: Callable) -> None:
    t, f = pose_frames(4)
    with pytest.raises(ValueError):
        encode_batch_v2(0, *bad(t, f))


def _set(f: np.ndarray, at: tuple[int, int, int], value: float) -> np.ndarray:
    g = f.copy()
    g[at] = value
    return g


def _body(n: int = 30, nopose: tuple[int, ...] = ()) -> bytes:
    t, f = pose_frames(n, t0=1000)
    f[list(nopose)] = np.nan
    return _v2(t, f)


def _patch(body: bytes, offset: int, fmt: str, value: object) -> bytes:
    b = bytearray(body)
    struct.pack_into(fmt, b, offset, value)
    return bytes(b)


_K = HEADER.size + 4 + 4  # the Rice parameter table of a 30-frame body


def _unary_of(values: list[int], ks: list[int] | None = None) -> bytes:
    """A hand-made body: n=1 frame with a pose, the first frame's values given."""
    head = HEADER.pack(b"RXPB", 2, 0, 33, 4, 0, 1, 0, 0, 0)
    table = bytes(v2.K_BYTES)  # k = 0 everywhere: values are all unary
    bits = "".join("0" * v + "1" for v in values)
    bits += "0" * (-len(bits) % 8)
    unary = bytes(int(bits[i:i + 8][::-1], 2) for i in range(0, len(bits), 8))
    return head + (5).to_bytes(4, "little") + b"\0" + table + unary


def _zz(v: int) -> int:
    return 2 * v if v >= 0 else -2 * v - 1


FIRST_OK = [_zz(500), _zz(500), 0, _zz(90)] * 33  # x, y, z, visibility per landmark


@pytest.mark.parametrize(
    ("mutate", "code"),
    [
        (lambda b: b[:HEADER.size + 3], "truncated"),
        (lambda b: b[:_K + 20], "truncated"),
        (lambda b: b[:-1], "truncated"),
        (lambda b: b + b"\0", "trailing_bytes"),
        (lambda b: b + b"\x01", "count_mismatch"),
        (lambda b: _patch(b, HEADER.size + 7, "<B", 0x80), "bad_padding"),  # bitmap bit 31
        (lambda b: _patch(b, _K + 68, "<B", 0x10), "bad_padding"),  # nibble 137
        (lambda b: _patch(b, HEADER.size, "<I", 2**32 - 10), "timestamp_out_of_range"),
        (lambda b: _patch(b, 14, "<H", 0), "bad_image_size"),
        (lambda b: _patch(b, 12, "<H", 0), "empty_batch"),
        (lambda b: _patch(b, 18, "<H", 1), "bad_reserved"),
        (lambda b: _patch(b, 4, "<B", 3), "unsupported_version"),
    ],
)
def test_each_v2_fault_is_named(mutate: Callable[[bytes], bytes], code: str) -> None:
    with pytest.raises(BatchError) as info:
        decode_batch(mutate(_body()), max_frames=120)
    assert info.value.code == code
    assert str(info.value)


@pytest.mark.parametrize(
    ("values", "code"),
    [
        (FIRST_OK, None),
        (FIRST_OK + [0], "count_mismatch"),
        (FIRST_OK[:-1], "truncated"),
        ([_zz(2**23)] + FIRST_OK[1:], "coordinate_out_of_range"),
        ([_zz(-2**23)] + FIRST_OK[1:], "coordinate_out_of_range"),
        ([_zz(2**23 - 1)] + FIRST_OK[1:], None),
        (FIRST_OK[:-1] + [_zz(101)], "visibility_out_of_range"),
        (FIRST_OK[:-1] + [_zz(-1)], "visibility_out_of_range"),
        (FIRST_OK[:-1] + [_zz(100)], None),
    ],
)
def test_value_faults_are_named(values: list[int], code: str | None) -> None:
    body = _unary_of(values)
    if code is None:
        b = decode_batch(body, max_frames=120)
        assert isinstance(b, PoseBatch) and b.first_t == 5
        return
    with pytest.raises(BatchError) as info:
        decode_batch(body, max_frames=120)
    assert info.value.code == code


def test_remainder_padding_must_be_zero() -> None:
    head = HEADER.pack(b"RXPB", 2, 0, 33, 4, 0, 2, 0, 0, 0)
    table = bytearray(v2.K_BYTES)
    table[0] = 3  # group 0 (one timestamp delta): k = 3
    ok = head + (5).to_bytes(4, "little") + b"\x03" + bytes(table) + b"\x02" + b"\x01"
    b = decode_batch(ok, max_frames=120)  # delta 2 + 1: frames at 5 and 8 ms, no pose
    assert list(b.t_ms) == [5, 8] and np.isnan(b.frames).all()
    bad = bytearray(ok)
    bad[-2] |= 0x80
    with pytest.raises(BatchError) as info:
        decode_batch(bytes(bad), max_frames=120)
    assert info.value.code == "bad_padding"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_bodies_raise_only_batch_errors(data: st.DataObject) -> None:
    n = data.draw(st.integers(1, 40))
    nopose = tuple(data.draw(st.sets(st.integers(0, n - 1), max_size=n)))
    body = bytearray(_body(n, nopose))
    for _ in range(data.draw(st.integers(0, 6))):
        i = data.draw(st.integers(HEADER.size, len(body) - 1))
        body[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(HEADER.size, len(body) + 8))
    tail = data.draw(st.binary(max_size=8))
    body = body[:cut] + tail
    try:
        b = decode_batch(bytes(body), max_frames=120)
    except BatchError as exc:
        assert exc.code and str(exc)
        return
    assert b.frames.shape == (n, 33, 4) and b.frames.dtype == np.float32
    assert b.t_ms.dtype == np.uint32 and (np.diff(b.t_ms.astype(np.int64)) > 0).all()


@settings(max_examples=300, deadline=None)
@given(n=st.integers(1, 120), rest=st.binary(max_size=4000))
def test_random_bodies_raise_only_batch_errors(n: int, rest: bytes) -> None:
    body = HEADER.pack(b"RXPB", 2, 0, 33, 4, 9, n, 640, 480, 0) + rest
    try:
        decode_batch(body, max_frames=120)
    except BatchError as exc:
        assert exc.code


@settings(max_examples=100, deadline=None)
@given(n=st.integers(1, 60), seed=st.integers(0, 2**32 - 1), scale=st.sampled_from(
    [1e-3, 0.05, 1.0, 100.0, 8000.0]))
def test_random_frames_round_trip(n: int, seed: int, scale: float) -> None:
    rng = np.random.default_rng(seed)
    t = np.cumsum(rng.integers(1, 5000, size=n)).astype(np.int64)
    f = rng.uniform(-scale, scale, size=(n, 33, 4)).astype(np.float32)
    f[:, :, 3] = rng.uniform(0, 1, size=(n, 33))
    f[rng.random(n) < 0.2] = np.nan
    b = decode_batch(_v2(t, f), max_frames=120)
    np.testing.assert_array_equal(b.t_ms, t)
    np.testing.assert_array_equal(b.frames, v2.dequantise(v2.quantise(f)).reshape(f.shape))
    # the v2 values re-quantise to themselves: the replay stores them unchanged
    np.testing.assert_array_equal(v2.dequantise(v2.quantise(b.frames)).reshape(f.shape),
                                  b.frames)


def test_a_short_body_declaring_many_frames_is_refused_before_allocating() -> None:
    n = 60000
    head = HEADER.pack(b"RXPB", 2, 0, 33, 4, 0, n, 0, 0, 0)
    body = head + bytes(4 + (n + 7) // 8 + 69) + b"\xff"
    with pytest.raises(BatchError) as info:
        decode_batch(body, max_frames=65535)
    assert info.value.code == "truncated" and "need 7979999 values" in str(info.value)
