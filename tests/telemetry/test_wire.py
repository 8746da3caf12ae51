import struct

import numpy as np
import pytest

from telemetry.wire import HEADER, BatchError, decode_batch, encode_batch
from tests.conftest import batch_body, pose_frames


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
