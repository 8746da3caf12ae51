"""``bench/loadgen.py --wire v2``: the pool re-encoded as wire format 2, and the per-batch
rewrite of sequence number and timestamps giving the batch v1 would have carried."""

from __future__ import annotations

import numpy as np
import pytest

from bench.loadgen import batch_body, make_pool, parse_args
from domain import pose_batch_v2 as v2
from domain.pose_batch import decode_batch

BASE = ["--port", "1", "--mode", "closed", "--run-id", "r", "--index-from", "0",
        "--index-to", "1", "--total", "1", "--out", "x.npz"]


def test_v2_pool_batches_are_the_v1_batches_on_the_grid() -> None:
    one, two = make_pool(sessions=2, reps=3), make_pool(sessions=2, reps=3, wire="v2")
    for s1, s2 in zip(one, two, strict=True):
        assert s1.kind == s2.kind
        for a, b in zip(s1.batches, s2.batches, strict=True):
            assert b.template[4] == 2 and len(b.template) < len(a.template) / 4
            for seq in (0, 1, 250):
                x = decode_batch(bytes(batch_body(a, seq)), max_frames=1024)
                y = decode_batch(bytes(batch_body(b, seq)), max_frames=1024)
                assert (x.seq, x.space, x.image_width) == (y.seq, y.space, y.image_width)
                np.testing.assert_array_equal(x.t_ms, y.t_ms)
                np.testing.assert_array_equal(
                    y.frames, v2.dequantise(v2.quantise(x.frames)).reshape(x.frames.shape))


def test_wire_option_defaults_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BENCH_WIRE", raising=False)
    assert parse_args(BASE).wire == "v1"
    assert parse_args([*BASE, "--wire", "v2"]).wire == "v2"
    monkeypatch.setenv("BENCH_WIRE", "v2")
    assert parse_args(BASE).wire == "v2"
