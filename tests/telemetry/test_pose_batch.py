import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from domain import pose_batch as wire
from domain.pose_batch import HEADER, BatchError, decode_batch, encode_batch
from tests.support.payloads import batch_body, pose_frames


def test_round_trip_keeps_every_value() -> None:
    t, f = pose_frames(30, t0=5000)
    f[3] = np.nan  # a "no pose" frame is allowed
    b = decode_batch(encode_batch(7, t, f, space="world"), max_frames=120)
    assert (b.seq, b.space, b.n) == (7, "world", 30)
    np.testing.assert_array_equal(b.t_ms, t)
    np.testing.assert_array_equal(b.frames, f)
    assert len(encode_batch(0, t, f)) == HEADER.size + 30 * 532


def _patch(body: bytes, offset: int, fmt: str, value: object) -> bytes:
    b = bytearray(body)
    struct.pack_into(fmt, b, offset, value)
    return bytes(b)


@pytest.mark.parametrize(
    ("mutate", "code"),
    [
        (lambda b: b[:10], "truncated"),
        (lambda b: b[:-4], "truncated"),
        (lambda b: b + b"\0" * 532, "length_mismatch"),
        (lambda b: b"XXXX" + b[4:], "bad_magic"),
        (lambda b: _patch(b, 4, "<B", 9), "unsupported_version"),
        (lambda b: _patch(b, 5, "<B", 2), "bad_space"),
        (lambda b: _patch(b, 6, "<B", 17), "bad_landmark_count"),
        (lambda b: _patch(b, 7, "<B", 3), "bad_channel_count"),
        (lambda b: _patch(b, 12, "<H", 0), "empty_batch"),
        (lambda b: _patch(b, 12, "<H", 500), "too_many_frames"),
        (lambda b: _patch(b, 14, "<H", 0), "bad_image_size"),
        (lambda b: _patch(b, 18, "<H", 1), "bad_reserved"),
        # second frame's timestamp equal to the first's
        (lambda b: _patch(b, 20 + 532, "<I", 0), "non_monotonic_timestamps"),
        (lambda b: _patch(b, 20 + 4, "<f", float("nan")), "nan_values"),
        (lambda b: _patch(b, 20 + 8, "<f", float("inf")), "infinite_values"),
        (lambda b: _patch(b, 20 + 4, "<f", 1e9), "coordinate_out_of_range"),
        (lambda b: _patch(b, 20 + 4 + 12, "<f", 1.5), "visibility_out_of_range"),
    ],
)
def test_each_fault_is_named(mutate, code: str) -> None:
    with pytest.raises(BatchError) as info:
        decode_batch(mutate(batch_body(0)), max_frames=120)
    assert info.value.code == code
    assert str(info.value)


def test_hostile_frame_count_does_not_allocate() -> None:
    body = _patch(batch_body(0, n=1), 12, "<H", 65535)
    with pytest.raises(BatchError, match="too_many_frames|exceeds"):
        decode_batch(body, max_frames=65535 - 1)
    with pytest.raises(BatchError) as info:
        decode_batch(body, max_frames=65535)
    assert info.value.code == "truncated"


# -- the fast validation path agrees with the full check ----------------------------
#
# decode_batch confirms valid frames with a few vectorised comparisons and leaves
# everything else to wire._find_fault, the fault-by-fault check. Whatever the frames,
# the answer must be the one _find_fault alone gives: accepted, or the same code and
# message.


def _f32_around(x: float) -> list[float]:
    v = np.float32(x)
    return [float(np.nextafter(v, np.float32(-np.inf))), float(v),
            float(np.nextafter(v, np.float32(np.inf)))]


EDGE_VALUES = sorted({0.0, -0.0, 0.5, 1.0, -1.0, 3e38, -3e38, float("inf"), float("-inf"),
                      *_f32_around(-1e-3), *_f32_around(1.0 + 1e-3), *_f32_around(1e4),
                      *_f32_around(-1e4)}, key=repr)


def _outcome(check, frames: np.ndarray) -> tuple[str, str] | None:
    try:
        check(frames)
    except BatchError as exc:
        return exc.code, str(exc)
    return None


@st.composite
def awkward_frames(draw: st.DrawFn) -> np.ndarray:
    n = draw(st.integers(1, 6))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    frames = rng.uniform(0.0, 1.0, size=(n, 33, 4)).astype(np.float32)
    frames[:, :, :3] = rng.uniform(-2.0, 2.0, size=(n, 33, 3))
    for i in draw(st.lists(st.integers(0, n - 1), max_size=n)):
        frames[i] = np.nan  # a no-pose frame
    for _ in range(draw(st.integers(0, 4))):
        i, lm, ch = draw(st.integers(0, n - 1)), draw(st.integers(0, 32)), draw(st.integers(0, 3))
        frames[i, lm, ch] = draw(st.sampled_from([float("nan"), *EDGE_VALUES]))
    return frames


@settings(max_examples=400, deadline=None)
@given(awkward_frames())
def test_fast_validation_agrees_with_the_full_check(frames: np.ndarray) -> None:
    assert _outcome(wire._check_values, frames) == _outcome(wire._find_fault, frames)
    t = np.arange(len(frames), dtype=np.uint32) * 33
    assert _outcome(lambda f: decode_batch(encode_batch(0, t, f), max_frames=120),
                    frames) == _outcome(wire._find_fault, frames)


@pytest.mark.parametrize("channel", [0, 2, 3])
@pytest.mark.parametrize("value", EDGE_VALUES)
def test_values_at_the_bounds(channel: int, value: float) -> None:
    t, f = pose_frames(3)
    f[1] = np.nan
    f[2, 5, channel] = value
    assert _outcome(wire._check_values, f) == _outcome(wire._find_fault, f)
    in_range = (abs(value) <= 1e4 if channel < 3
                else np.float32(-1e-3) <= np.float32(value) <= np.float32(1.001))
    assert (_outcome(wire._check_values, f) is None) == bool(in_range)


def test_versions_1_and_2_decode_to_the_same_structure() -> None:
    """Version 2 (domain/pose_batch_v2.py, tested in test_pose_batch_v2.py) is accepted
    beside version 1 and decodes to the same PoseBatch: dtypes, shapes, header fields."""
    t, f = pose_frames(30, t0=5000)
    f[3] = np.nan
    kw = dict(space="world", image_width=640, image_height=480)
    one = decode_batch(encode_batch(7, t, f, **kw), max_frames=120)
    two = decode_batch(wire.encode_batch_v2(7, t, f, **kw), max_frames=120)
    for b in (one, two):
        assert (b.seq, b.space, b.n, b.image_width, b.image_height) == (7, "world", 30, 640, 480)
        assert b.t_ms.dtype == np.uint32 and b.frames.dtype == np.float32
        assert b.frames.shape == (30, 33, 4) and b.frames.flags.c_contiguous
    np.testing.assert_array_equal(one.t_ms, two.t_ms)
    np.testing.assert_allclose(two.frames, one.frames, atol=5e-3)
    assert wire.VERSIONS == (1, 2)
